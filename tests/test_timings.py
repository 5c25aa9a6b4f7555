"""Per-phase timings on trajectories and episode events, the request log, and the instant-reply load server."""

from __future__ import annotations

import json
import random

import pytest

from gopo_online.loadserver import LoadServer, regex_example, reply_text
from gopo_online.requestlog import RequestLog, read_requests, structured_kind, summarize
from gopo_online.timings import episode_phases, phase_metrics
from gopo_online.types import Trajectory, Turn, UserTurnMeta

META = UserTurnMeta(intent="ask", emotion="calm", satisfaction=3, stop=False)


def _traj(**kw) -> Trajectory:
    turns = tuple(
        Turn(
            index=i,
            user_utterance="u",
            user_meta=META,
            expert_skills=("a",),
            cs_reply="r",
            cs_action="chat",
            timings={"simulator": 1.0, "expert": 0.5, "cs": 2.0, "judge": 0.25},
        )  # fmt: skip
        for i in (1, 2)
    )
    return Trajectory(episode_id="e", scenario_id="s", persona_id="p", turns=turns, duration_s=10.0, **kw)


def test_episode_phases_sum_turns_and_keep_queue_apart():
    ph = episode_phases(_traj(timings={"queue": 3.0}))
    assert ph == {"simulator": 2.0, "expert": 1.0, "cs": 4.0, "judge": 0.5, "queue": 3.0, "episode": 10.0,
                  "other": 2.5}  # fmt: skip
    m = phase_metrics(_traj(), {"publish": 0.125})
    assert m["time/publish_s"] == 0.125 and m["time/cs_s"] == 4.0 and "time/queue_s" not in m


def test_trajectory_timings_are_optional_and_checked():
    t = _traj(timings={"queue": 1.5})
    assert Trajectory.from_json(t.to_json()) == t
    old = json.loads(_traj().to_json())
    del old["timings"]  # a record written before the field existed still reads
    assert Trajectory.model_validate(old).timings == {}
    with pytest.raises(ValueError, match="negative phase timings"):
        _traj(timings={"queue": -1.0})


def test_rollout_records_queue_time(monkeypatch):
    import time

    from gopo_online.config import GopoConfig
    from gopo_online.stream import EpisodeRequest
    from workers import rollout as ro

    def fake_play(**kw):
        return _traj()

    monkeypatch.setattr("simulator.episode.play_episode", fake_play)
    monkeypatch.setattr(ro, "_persona", lambda ctx, pid: type("P", (), {"extrinsic_demand": None})())
    monkeypatch.setattr("simulator.scenarios.sample_instance", lambda *a, **k: None)
    ctx = ro.WorkerContext(cfg=GopoConfig(), broker_url="redis://x", deps_factory=lambda c: ro.EpisodeDeps(
        user_sim=None, expert=None, cs=None, judge=None))  # fmt: skip
    req = EpisodeRequest(episode_id="e", scenario_id="ecommerce", persona_id="p", dispatched_at=time.time() - 4.0)
    t = ro.rollout(req, ctx)
    assert 4.0 <= t.timings["queue"] < 60.0
    assert ro.rollout(req.model_copy(update={"dispatched_at": None}), ctx).timings == {}


def test_request_log_roundtrip(tmp_path):
    rlog = RequestLog(tmp_path / "requests" / "w.jsonl")
    g = {"grammar": 'root ::= "ab"'}
    for i in range(3):
        rlog.record(model="expert", prompt_token_ids=[1, 2, 3], prompt_tokens=None, completion_tokens=2 + i,
                    max_tokens=128, temperature=1.0, structured=g, latency_s=0.1, finish_reason="stop",
                    started_at=100.0 + i)  # fmt: skip
    rlog.record(model="policy", prompt_token_ids=[], prompt_tokens=40, completion_tokens=7, max_tokens=160,
                temperature=0.7, structured=None, latency_s=0.3, finish_reason="length", started_at=99.0)  # fmt: skip
    lines = (tmp_path / "requests" / "w.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["type"] == "spec" for x in lines) == 1  # the grammar text is written once
    reqs, specs = read_requests([tmp_path / "requests" / "w.jsonl"])
    assert [r["t"] for r in reqs] == [99.0, 100.0, 101.0, 102.0] and specs[reqs[1]["structured_id"]] == g
    assert reqs[0]["prompt_tokens"] == 40 and reqs[1]["prompt_tokens"] == 3
    s = summarize(reqs)
    assert s["expert/grammar"]["requests"] == 3 and s["expert/grammar"]["completion_tokens"] == 3.0
    assert structured_kind({"regex": "x"}) == "regex" and structured_kind(None) is None
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_requests([tmp_path / "bad.jsonl"])


def test_load_server_answers_parse_as_our_formats():
    import re

    from gopo_online.serving.agents import cs_grammar
    from gopo_online.serving.judge import judge_regex
    from gopo_online.skills import expert_grammar
    from simulator.user import user_turn_regex

    for seed in range(20):
        rng = random.Random(seed)
        for pattern in (user_turn_regex(), judge_regex(["a", "b"], ["x"])):
            assert re.fullmatch(pattern, regex_example(pattern, rng))
    assert reply_text({"structured_outputs": {"grammar": expert_grammar(["ga", "ex"], 2)}}) == "ga"
    stops = [json.loads(reply_text({"seed": i, "structured_outputs": {"regex": user_turn_regex()}}))["stop"]
             for i in range(300)]  # fmt: skip
    assert 20 < sum(stops) < 80  # stop_rate 1/6: dialogues last ~6 turns
    assert reply_text({"structured_outputs": {"grammar": cs_grammar(("chat", "voucher"))}}).startswith("ACTION: chat\n")
    assert reply_text({"structured_outputs": {"json": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                        "required": ["n"]}}}) == '{"n": 3}'  # fmt: skip


def test_chat_client_against_load_server_logs_requests(tmp_path):
    from gopo_online.serving.client import ChatClient

    with LoadServer(("policy", "expert")) as srv, ChatClient(srv.base_url, timeout=10.0, max_retries=0) as c:
        c.request_log = RequestLog(tmp_path / "r.jsonl")
        r = c.chat([{"role": "user", "content": "hi"}], model="expert", temperature=1.0, max_tokens=8,
                   structured={"grammar": 'root ::= "ab" | "cd"'})  # fmt: skip
        assert r.text == "ab" and len(r.token_ids) == 1 and len(r.logprobs) == 1 and r.prompt_token_ids
        g = r.to_generation(policy_version=0)
        assert g.completion_token_ids == r.token_ids
        assert srv.requests == 1
    reqs, specs = read_requests([tmp_path / "r.jsonl"])
    assert reqs[0]["model"] == "expert" and reqs[0]["structured"] == "grammar" and reqs[0]["max_tokens"] == 8
    assert reqs[0]["completion_tokens"] == 1 and reqs[0]["prompt_tokens"] == len(reqs[0]["prompt_token_ids"])


def test_worker_writes_the_request_log_of_its_episodes(tmp_path):
    """The real served agents, simulator and judge of a worker, against the load server: every request is logged."""
    from gopo_online.config import load_config
    from workers.controller import Dispatcher
    from workers.rollout import WorkerContext, rollout

    with LoadServer(("policy",)) as srv:
        cfg = load_config(overrides=[f'serving.policy.url="{srv.root_url}"', f'run.output_dir="{tmp_path}"',
                                     "simulator.max_turns=2", "simulator.agenda_rewrite=true"])  # fmt: skip
        traj = rollout(Dispatcher(cfg).request(0, 0), WorkerContext(cfg=cfg, broker_url="memory://"))
        assert traj.status == "ok", traj.error
        logs = list((cfg.run.run_dir / "requests").glob("*.jsonl"))
        assert len(logs) == 1
        reqs, specs = read_requests(logs)
        assert len(reqs) == srv.requests  # one line per chat request the episode made
    kinds = {(r["model"], r["structured"]) for r in reqs}
    assert ("policy", "grammar") in kinds and ("policy", "regex") in kinds  # agents (grammar), simulator/judge (regex)
    assert all(r["structured_id"] in specs for r in reqs if r["structured"])
    n = len(traj.turns)
    assert len(reqs) >= 4 * n  # simulator, Expert, CS, judge per turn (+ the opening user turn)
