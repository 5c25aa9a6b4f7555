"""The fault figures (workers/faults.py `totals`, `table`) from a run directory's files: lost, duplicated, trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.faults import table, totals

pytestmark = pytest.mark.faults


def _write(run_dir: Path, events: list[dict], state: dict, store: list[tuple[str, str]]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"half a li')
    (run_dir / "controller.json").write_text(json.dumps(state))
    # the learner's trajectory store (gopo_online.trajectory_store): one record per trajectory it saw
    (run_dir / "trajectories").mkdir()
    lines = [json.dumps({"episode_id": eid, "outcome": outcome, "learner_version": 0}) for eid, outcome in store]
    (run_dir / "trajectories" / "part-000000.jsonl").write_text("".join(x + "\n" for x in lines))


def _ep(eid: str, t: float) -> dict:
    return {"kind": "episode", "time": t, "step": 0, "metrics": {}, "payload": {"episode_id": eid, "status": "ok"}}


def test_totals_count_lost_duplicated_trained(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    events = [
        _ep("ep-1", 1.0), _ep("ep-2", 2.0), _ep("ep-2", 3.0),  # ep-2 finished twice: a duplicate
        {"kind": "restart", "time": 2.5, "step": 1, "metrics": {}, "payload": {"part": "worker-0"}},
        {"kind": "push", "time": 4.0, "step": 1, "metrics": {"sys/policy_version": 1.0}},
        {"kind": "push", "time": 5.0, "step": 2, "metrics": {"sys/policy_version": 2.0}},
    ]  # fmt: skip
    state = {"dispatched": 6, "finished": 3, "lost": 1, "handed_back": [{"episode_id": "ep-5"}]}
    store = [("ep-1", "trained"), ("ep-2", "trained"), ("ep-6", "dropped_stale"), ("ep-3", "trained"),
             ("ep-3", "trained")]  # ep-3 trained twice (a redelivery the dedupe missed)  # fmt: skip
    _write(run_dir, events, state, store)
    rows = [{"fault": "worker", "held": ["ep-1", "ep-4", "ep-5"], "restart_s": 0.6, "recovered_s": 12.0,
             "outcome": "recovered"}]  # fmt: skip
    t = totals(run_dir, rows)
    # ep-4 was held by the killed worker and neither finished nor handed back: lost (on top of the deadline's 1)
    assert t["lost_held"] == ["ep-4"] and t["lost"] == 2
    assert t["duplicated"] == 1 and t["trained"] == 3 and t["trained_twice"] == ["ep-3"]
    assert t["restarts"] == 1 and t["versions_monotonic"]
    assert t["held_redelivered_and_finished"] == ["ep-1"] and t["handed_back"] == 1
    text = table({"rows": rows, "totals": {**t, "stop_s": 4.2}, "rc": 0})
    assert "worker" in text and "12.0s" in text and "lost 2, duplicated 1" in text and "stop took 4.2s" in text


def test_a_held_episode_whose_event_was_lost_is_not_lost(tmp_path: Path) -> None:
    """Seen on a fresh clone (resumed run under faults): the killed worker had published ep-7 but its episode event
    never reached metrics.jsonl; the controller counted it from its done mark. That is not a lost episode, and nor
    is ep-8, which only the learner's store shows (it consumed the trajectory)."""
    run_dir = tmp_path / "r"
    note = {"source": "controller", "episode_id": "ep-7", "event_lost": True, "error": "episode ep-7: published"}
    events = [_ep("ep-1", 1.0), {"kind": "error", "time": 2.0, "step": 0, "metrics": {}, "payload": note}]
    _write(run_dir, events, {"dispatched": 4, "finished": 3, "lost": 0}, [("ep-1", "trained"), ("ep-8", "trained")])
    rows = [{"fault": "worker", "held": ["ep-7", "ep-8", "ep-9"], "outcome": "recovered"}]
    t = totals(run_dir, rows)
    assert t["lost_held"] == ["ep-9"] and t["lost"] == 1, t
    assert t["event_lost"] == ["ep-7"] and t["held_redelivered_and_finished"] == ["ep-7"]
    assert t["duplicated"] == 0
