"""A restarted learner never trains a redelivered trajectory twice: the consumed ids live in its checkpoint.

The learner acks a batch only after the step that used it and the trajectory store's write; a learner killed in
between gets the batch redelivered. Its step runs DeepSpeed (tests/trainer/test_learner.py, slow); here the step
is a stand-in that runs the real admission (`Learner._admit`, where ids become consumed) and "checkpoints" with
the real `dedupe_state` / `load_dedupe_state` that `save_checkpoint` / `load_checkpoint` call, so the loop's
bookkeeping (`_loop`: split off consumed ids, record, ack) runs for real in milliseconds.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from gopo_online.trajectory_store import TrajectoryStore, read_records
from trainer.learner import Learner, _loop, _Run
from trainer.stats import AgentStats, StepStats
from trainer.synthetic import FakeTokenizer, make_trajectory


class Killed(Exception):
    """The learner process dying at a chosen point (SIGKILL has no Python side: nothing after it runs)."""


def _cfg(tmp_path):
    from gopo_online.config import load_config

    return load_config(overrides=[f"run.output_dir='{tmp_path}'", "run.name='r'", "learner.checkpoint_every=1"])


def _learner(cfg, checkpoint: dict | None, saved: list[dict], kill_in_step: bool) -> Learner:
    learner = Learner(cfg, log=lambda msg: None)
    if checkpoint is not None:
        learner.load_dedupe_state(checkpoint)

    def step(batch):  # admission, then the checkpoint of `_bookkeeping` (checkpoint_every = 1), then maybe death
        st = StepStats(agents={a: AgentStats() for a in ("expert", "cs")})
        learner._last_version_before = learner.version
        learner._admit(batch, st)
        learner.global_step += 1
        saved.append(json.loads(json.dumps(learner.dedupe_state())))  # what learner_state.json holds
        if kill_in_step:
            raise Killed("after the checkpoint's rename, before the trajectory store's write")
        return st

    learner.step = step  # type: ignore[method-assign]
    return learner


def _run(learner: Learner, store: TrajectoryStore, batches, acked: list[str], kill_at_ack: bool = False) -> _Run:
    def ack(ids):
        if kill_at_ack:
            raise Killed("after the trajectory store's write, before the ack")
        acked.extend(ids)

    return _Run(learner, iter(batches), None, ack, lambda e: None, store, [], threading.Event(), lambda: None)


def _resume(learner: Learner, store: TrajectoryStore) -> None:
    """What `main` does after `setup` resumed from the checkpoint."""
    for eid in store.recorded(learner.unrecorded):
        learner.unrecorded.pop(eid, None)


@pytest.mark.parametrize("death", ["before the store's write", "before the ack"])
def test_restarted_learner_does_not_train_a_redelivered_trajectory_twice(tmp_path, death):
    cfg = _cfg(tmp_path)
    tok = FakeTokenizer()
    first = [make_trajectory(tok, i, 1, version=0, seed=1).model_copy(update={"episode_id": f"ep{i}"})
             for i in range(2)]  # fmt: skip
    second = [make_trajectory(tok, i, 1, version=0, seed=2).model_copy(update={"episode_id": f"ep{i}"})
              for i in range(2, 4)]  # fmt: skip
    store = TrajectoryStore(cfg.run.run_dir)
    saved: list[dict] = []
    acked: list[str] = []

    # 1. the first learner trains `first`, checkpoints, and is killed before its ack: nothing acked
    one = _learner(cfg, None, saved, kill_in_step=death == "before the store's write")
    with pytest.raises(Killed):
        _loop(cfg, _run(one, store, [first], acked, kill_at_ack=death == "before the ack"), None)
    assert acked == []

    # 2. the restarted learner resumes from that checkpoint; the broker redelivers `first`, then `second` comes
    trained: list[str] = []
    two = _learner(cfg, saved[-1], saved, kill_in_step=False)
    step = two.step
    two.step = lambda batch: (trained.extend(t.episode_id for t in batch), step(batch))[1]  # type: ignore[method-assign]
    _resume(two, store)
    _loop(cfg, _run(two, store, [first, second], acked), None)

    assert trained == ["ep2", "ep3"]  # the checkpoint already holds the step on ep0, ep1
    assert sorted(acked) == ["ep0", "ep1", "ep2", "ep3"]  # the redelivered ones are acked all the same
    store.close()
    records = Counter((r["episode_id"], r["outcome"]) for r in read_records(cfg.run.run_dir, dedupe=False))
    # every trajectory recorded once as trained: killed before the store's write, ep0 and ep1 are recorded
    # when they come back; killed after it, they are not recorded a second time
    assert records == {(f"ep{i}", "trained"): 1 for i in range(4)}


def test_consumed_ids_are_bounded_and_survive_a_checkpoint_round_trip(tmp_path, monkeypatch):
    import trainer.learner as learner_mod

    monkeypatch.setattr(learner_mod, "CONSUMED_IDS_KEPT", 3)
    cfg = _cfg(tmp_path)
    a = Learner(cfg, log=lambda msg: None)
    a._remember([f"ep{i}" for i in range(5)])
    b = Learner(cfg, log=lambda msg: None)
    b.load_dedupe_state(json.loads(json.dumps(a.dedupe_state())))
    assert list(b.consumed) == ["ep2", "ep3", "ep4"]  # the oldest fell out of the window
