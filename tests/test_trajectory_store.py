"""The run's trajectory store: every trajectory kept with its outcome, rotated, readable after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gopo_online.trajectory_store import TrajectoryStore, read_records
from gopo_online.types import Generation, Trajectory, Turn, UserTurnMeta


def traj(eid: str, version: int | None = 0, status: str = "ok", text: str = "Hello!") -> Trajectory:
    gen = None
    if version is not None:
        gen = Generation(prompt_token_ids=(1,), completion_token_ids=(2,), logprobs=(-0.5,), text=text, model="cs",
                         policy_version=version, temperature=1.0, latency_s=0.1)  # fmt: skip
    meta = UserTurnMeta(intent="greet", emotion="calm", satisfaction=4, stop=True)
    turns = () if status == "error" else (Turn(index=1, user_utterance="hi", user_meta=meta, expert_skills=("greet",),
                                                 cs_reply=text, cs_action="chat", cs_gen=gen),)  # fmt: skip
    return Trajectory(episode_id=eid, scenario_id="ecommerce", persona_id="p1", persona_group="impatient",
                      turns=turns, status=status, error="judge timed out" if status == "error" else None)  # fmt: skip


def test_records_keep_outcome_version_and_the_whole_trajectory(tmp_path: Path) -> None:
    with TrajectoryStore(tmp_path) as store:
        store.append_batch(
            [(traj("a"), "trained"), (traj("b"), "dropped_stale"), (traj("c", None, "error"), "error")], 3
        )
        store.dead_letter("not a valid Trajectory: turns.0.index", b'{"episode_id": "x", "turns": [{"index": 0}]}')
    recs = list(read_records(tmp_path))
    assert [r["outcome"] for r in recs] == ["trained", "dropped_stale", "error", "dead_lettered"]
    assert recs[0]["learner_version"] == 3 and Trajectory.model_validate(recs[0]["trajectory"]) == traj("a")
    assert recs[2]["trajectory"]["error"] == "judge timed out"
    assert "turns.0.index" in recs[3]["reason"] and '"episode_id": "x"' in recs[3]["body"]
    with pytest.raises(ValueError, match="outcome"):
        TrajectoryStore(tmp_path).append(traj("d"), "lost")  # type: ignore[arg-type]


def test_rotation_continuation_dedupe_and_crash_fragment(tmp_path: Path) -> None:
    store = TrajectoryStore(tmp_path, max_bytes=2048)
    for i in range(8):
        store.append(traj(f"e{i}", text="x" * 300), "trained", 0)
    store.close()
    parts = sorted((tmp_path / "trajectories").iterdir())
    assert len(parts) > 2 and all(p.stat().st_size <= 2048 for p in parts)
    with open(parts[-1], "ab") as f:
        f.write(b'{"outcome": "trained", "episode_id": "half')  # the learner died mid-write
    store = TrajectoryStore(tmp_path, max_bytes=2048)  # a restarted learner continues the last part
    store.append(traj("e3", text="again"), "dropped_stale", 1)  # a redelivered episode, written again
    store.close()
    recs = list(read_records(tmp_path))
    assert [r["episode_id"] for r in recs] == [f"e{i}" for i in range(8)]  # first position, no fragment
    assert recs[3]["outcome"] == "dropped_stale" and recs[3]["trajectory"]["turns"][0]["cs_reply"] == "again"
    assert len(list(read_records(tmp_path, dedupe=False))) == 9
    for p in sorted((tmp_path / "trajectories").iterdir()):
        for line in p.read_bytes().splitlines():
            if line.startswith(b'{"stored_at"'):
                json.loads(line)  # every complete line is one whole record


@pytest.mark.integration
def test_the_consumer_keeps_its_dead_letters_in_the_store(redis_url: str, tmp_path: Path) -> None:
    """A message the consumer cannot use reaches the store too (real Redis broker, private queue names)."""
    import contextlib
    import uuid

    from kombu import Producer

    from gopo_online.config import BrokerConfig
    from gopo_online.stream import Topology, TrajectoryConsumer, TrajectoryPublisher, connect, delete_topology

    tag = uuid.uuid4().hex[:8]
    names = ("trajectory_queue", "dead_letter_queue", "weights_exchange", "events_exchange", "task_queue")
    bcfg = BrokerConfig(**{n: f"t.{n}.{tag}" for n in names})
    url = redis_url
    with TrajectoryStore(tmp_path / "run") as store, contextlib.ExitStack() as cleanup:
        cleanup.callback(delete_topology, url, bcfg)
        topo = Topology(bcfg)
        with connect(url, bcfg) as conn:
            topo.declare(conn.default_channel)
            Producer(conn.default_channel).publish(
                b'{"episode_id": "broken", "hello": 1}', exchange=topo.trajectory_exchange,
                routing_key=bcfg.trajectory_queue, content_type="application/json", content_encoding="utf-8",
            )  # fmt: skip
        with TrajectoryPublisher(url, bcfg) as pub:
            pub.publish(traj("good"))
        with TrajectoryConsumer(url, bcfg) as consumer:
            consumer.on_dead_letter = store.dead_letter
            got = consumer.get_batch(10, timeout_s=0.5)
        store.append_batch([(t, "trained") for t in got], 0)
    recs = list(read_records(tmp_path / "run"))
    assert [r["outcome"] for r in recs] == ["dead_lettered", "trained"]
    assert "not a valid Trajectory" in recs[0]["reason"] and '"broken"' in recs[0]["body"]


def test_learner_outcomes_follow_staleness_then_errors() -> None:
    """What the learner records per trajectory: the same staleness and error rules `Learner.step` applies."""
    from trainer.learner import admit

    batch = [traj("fresh", version=4), traj("old", version=2), traj("edge", version=3), traj("err", None, "error")]
    # learner at v4, max_staleness 1: v3 is within budget, v2 is not; an error episode is never trained
    got = admit(batch, version=4, max_staleness=1).outcomes
    assert got == {"fresh": "trained", "old": "dropped_stale", "edge": "trained", "err": "error"}
