"""One shortened real `gopo-online train` (embedded Redis, vLLM, DeepSpeed learner, two workers) takes faults in
turn: kill -9 of a worker mid-episode, then kill -9 of the embedded Redis. The run must go on and end by its
budget (rc 0), every restart an event in metrics.jsonl, the killed worker's episodes redelivered and finished
(or handed back at the stop), nothing lost, nothing finished twice, pushed versions monotonic.
The full set (plus learner and vLLM server kills) is `gopo-online bench --only faults`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.faults import SHORT, run_faults, table

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

SETS = [s for s in SHORT if not s.startswith(("run.max_steps", "run.max_minutes"))] + [
    "run.max_steps=2",
    "run.max_minutes=7",
]


def test_train_survives_worker_and_broker_kills(tmp_path: Path) -> None:
    run_dir = tmp_path / "faults"
    result = run_faults(run_dir, ["worker", "broker"], SETS, step_timeout_s=240, finish_timeout_s=360)
    print(table(result))
    out = result["output"]
    assert result["rc"] == 0, f"train failed:\n{out[-4000:]}"
    rows = {r["fault"]: r for r in result["rows"]}
    assert [r.get("outcome") for r in result["rows"]] == ["recovered", "recovered"], table(result)
    t = result["totals"]
    # the killed worker held an episode; it came back at once (not after the 900 s visibility timeout) ...
    assert rows["worker"]["held"] and set(rows["worker"]["held"]) <= set(rows["worker"]["redelivered"])
    assert rows["worker"]["recovered_s"] < 240
    # ... and was played to the end, or handed back to the queue at the stop: never lost, never twice
    assert t["lost"] == 0 and t["lost_held"] == [], t
    assert t["duplicated"] == 0 and t["trained_twice"] == [], t
    assert t["restarts"] >= 2 and t["versions_monotonic"], t
    assert "restart: worker-" in out and "restart: broker" in out
    assert t["trained"] >= 2  # the learner trained after the broker came back
    assert "restarts" in (run_dir / "dashboard.txt").read_text()
    # the stop hands in-flight episodes back instead of playing them out (a sanity bound on a shared 2-core box)
    assert t["stop_s"] is not None and t["stop_s"] < 90, t
