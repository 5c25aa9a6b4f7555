"""`bench --only peer` parts: the single-turn task TRL trains on (the CS agent's prompts, R^A of the rubric judge),
the time-to-target rule, our side's numbers from a run's metrics, the bench-only install; and, where TRL is
installed, a real GRPOTrainer run on the tiny model."""

from __future__ import annotations

import json
import types

import pytest

from gopo_online.config import load_config
from simulator import peer_bench
from simulator.peer_bench import PeerReward, ours_from_run, peer_cases, time_to_target
from simulator.scenarios import FAMILIES


@pytest.fixture(scope="module")
def cases():
    cfg = load_config()
    return cfg, peer_cases(cfg)


def test_time_to_target_is_the_first_running_mean_above_the_start():
    pts = [(10.0, 0.2), (20.0, 0.2), (30.0, 0.2), (40.0, 0.3), (50.0, 0.3), (60.0, 0.4)]
    got = time_to_target(pts, gain=0.05)
    # baseline 0.2, target 0.25; running means of 3: (0.2,0.2,0.3)=0.233 at 40 s, (0.2,0.3,0.3)=0.267 at 50 s
    assert got["baseline"] == pytest.approx(0.2) and got["target"] == pytest.approx(0.25) and got["seconds"] == 50.0
    assert time_to_target(pts, gain=0.5)["seconds"] is None
    assert time_to_target(pts[:2], gain=0.05) == {"baseline": None, "target": None, "seconds": None, "updates": 2}


def test_peer_prompts_are_the_cs_agents_own(cases):
    _cfg, cs = cases
    assert len(cs) == len({(c["record"]["family"], c["record"]["instance_id"], c["record"]["turn"]) for c in cs}) > 20
    for c in cs:
        msgs, rec = c["messages"], c["record"]
        assert msgs[0]["role"] == "system" and "Business context" in msgs[0]["content"]
        assert msgs[-1]["role"] == "user" and msgs[-1]["content"].startswith(rec["user_utterance"])
        assert "[HARD CONSTRAINTS for this reply]" in msgs[-1]["content"]
        assert len(msgs) == 2 + 2 * (rec["turn"] - 1)  # system, the earlier exchanges, this message


def test_peer_reward_ranks_the_reference_reply_above_junk_and_counts_tokens(cases):
    cfg, cs = cases
    reward = PeerReward(cfg, cs)
    from simulator import judge_set

    refs = {(r["family"], r["instance_id"], r["turn"], tuple(r["expert_skills"])): r
            for f in FAMILIES for r in judge_set.load(f) if r["kind"] == "reference"}  # fmt: skip
    pairs = []
    for i, c in enumerate(cs):
        rec = c["record"]
        ref = refs.get((rec["family"], rec["instance_id"], rec["turn"], tuple(rec["expert_skills"])))
        if ref is not None:
            pairs.append((i, f"ACTION: {ref['action']}\n{ref['reply']}"))
    assert len(pairs) >= 10
    idx = [i for i, _ in pairs]
    good = reward(prompts=None, completions=[[{"role": "assistant", "content": t}] for _, t in pairs],
                  completion_ids=[[1, 2, 3]] * len(pairs), case=idx)  # fmt: skip
    junk = reward(prompts=None, completions=["ok ok ok ok"] * len(pairs), completion_ids=[[1]] * len(pairs), case=idx)
    assert min(good) > max(junk) and sum(good) / len(good) > 0.7
    assert reward.completion_tokens == 4 * len(pairs) and reward.unparsed == len(pairs)  # the junk has no ACTION line
    assert reward.scored == 2 * len(pairs)


def test_ours_from_run_reads_trained_tokens_updates_and_cs_reward(tmp_path):
    lines = [{"time": 100.0, "kind": "episode"}, {"time": 90.0, "kind": "run"},
             {"time": 130.0, "kind": "learner", "metrics": {"learner/completion_tokens_cs": 300.0,
              "learner/completion_tokens_expert": 100.0, "sys/step_time_s": 20.0, "reward/cs": 0.2}},
             {"time": 160.0, "kind": "learner", "metrics": {"learner/completion_tokens_cs": 200.0,
              "learner/completion_tokens_expert": 100.0, "sys/step_time_s": 22.0, "reward/cs": 0.3}}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    got = ours_from_run(tmp_path)
    assert got["wall_s"] == 60.0 and got["completion_tokens"] == 700 and got["cs_completion_tokens"] == 500
    assert got["points"] == [(30.0, 0.2), (60.0, 0.3)] and got["step_s"] == [20.0, 22.0] and got["updates"] == 2
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"time": 1.0, "kind": "run"}) + "\n")
    with pytest.raises(RuntimeError, match="no episode or update"):
        ours_from_run(tmp_path)


def test_ensure_trl_installs_the_pin_only_when_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(peer_bench.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(peer_bench.subprocess, "run", lambda *a, **k: calls.append(a[0]))
    peer_bench.ensure_trl(log=lambda *_: None)
    assert calls == []
    monkeypatch.setattr(peer_bench.importlib.util, "find_spec", lambda name: None)
    failed = types.SimpleNamespace(returncode=1, stderr="no index")
    monkeypatch.setattr(peer_bench.subprocess, "run", lambda cmd, **k: calls.append(cmd) or failed)
    with pytest.raises(RuntimeError, match=r"(?s)trl==1\.16\.0.*no index"):
        peer_bench.ensure_trl(log=lambda *_: None)
    assert calls[0][-1] == peer_bench.TRL_PIN and "-c" in calls[0]  # CPU constraints: torch stays the installed build


@pytest.mark.slow
def test_trl_side_really_trains_on_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    """In its own process as the bench runs it, even with a learner's torch.distributed variables in this one."""
    pytest.importorskip("trl", reason="TRL is the peer bench's own dependency (installed on first `bench --only peer`)")
    monkeypatch.setenv("WORLD_SIZE", "1")  # what a learner leaves behind (it failed the suite in-process)
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(overrides=[f"model.path={json.dumps(tiny_model)}", "agents.cs.max_tokens=16"])
    got = peer_bench.run_trl_child(cfg, seconds=1.0, out_dir=tmp_path, batch=4, generations=2)
    assert (tmp_path / "trl.json").is_file()
    assert got["updates"] >= 1 and got["wall_s"] > 0 and 0 < got["completion_tokens"] <= 4 * 16 * got["updates"]
    assert got["scored"] == 4 * got["updates"] and len(got["points"]) == got["updates"]
    assert all(0.0 <= r <= 1.0 for _, r in got["points"])
