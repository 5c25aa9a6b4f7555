"""The whole loop, for real: `gopo-online train` on the one-machine default with a tiny budget, then a resumed run
that takes faults.

Run 1 starts (through the CLI, as a user would) an embedded Redis, a vLLM policy server, a Celery rollout worker
and the DeepSpeed learner, on the default architecture with ~6.6 M random parameters (the `tiny_model` fixture:
what is tested is the machinery, and the 135M model made this test 11-15 minutes of a 2-core box); episodes are
played against the live server, the learner takes a step and pushes LoRA adapters to the live server. (Its
learner steps take seconds, so a step can fall inside the broker kill's outage below: the step's learner and push
events must still reach metrics.jsonl — the publisher's outbox and the durable events queue, gopo_online.stream.
Before those, 1 suite of 4 failed here with the events of such a step lost.)

Run 2 resumes on the same run dir: the new server is refit to the pushed version before dispatch, later trajectories
carry that version, and the learner continues from its checkpoint. It also takes faults in turn
(workers/faults.py): kill -9 of the worker mid-episode, then kill -9 of the embedded Redis. It must go on and end by
its budget (rc 0), every restart an event, the killed worker's episodes redelivered at once and finished (or handed
back at the stop), nothing lost, nothing finished or trained twice, pushed versions monotonic. (One resumed run
carries both: a separate fault run cost the suite ~7 minutes of start-up and episodes.) The full fault set (plus
learner and vLLM server kills, a 30 s broker pause) is `gopo-online bench --only faults`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.faults import run_faults, table

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

BUDGET = [
    "run.max_steps=1",
    "run.max_episodes=40",
    "run.max_minutes=9",
    "simulator.max_turns=2",
    "simulator.mode=agenda",  # the default here; explicit: the user model, not the 135M model's JSON, decides a turn
    "simulator.max_tokens=48",
    "agents.cs.max_tokens=32",
    "judge.max_tokens=64",
    "learner.batch_episodes=2",
    "learner.group_size=2",  # a step trains 2 episodes (groups of 4 made it 4: 200 s a step on an AVX2 box)
    "learner.push_every=1",
    "learner.max_staleness=0",  # train only on trajectories sampled entirely by the current version
    "learner.checkpoint_every=1",
    "workers.count=1",
    "workers.concurrency=3",
    "workers.max_in_flight=3",
    "dashboard.tensorboard=false",
]


def _train(run_dir: Path, model: str) -> subprocess.CompletedProcess[str]:
    sets = [
        *BUDGET,
        f"model.path={json.dumps(model)}",
        f"run.output_dir={json.dumps(str(run_dir.parent))}",
        f"run.name={json.dumps(run_dir.name)}",
    ]
    args = [sys.executable, "-m", "gopo_online.cli", "train"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_end_to_end_then_resume_under_faults(tmp_path: Path, tiny_model: str) -> None:
    run_dir = tmp_path / "loop"
    proc = _train(run_dir, tiny_model)
    logs = (
        "\n".join(p.read_text()[-3000:] for p in sorted((run_dir / "logs").glob("*.log"))) if run_dir.exists() else ""
    )
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"

    events = _events(run_dir)
    episodes = [e for e in events if e["kind"] == "episode"]
    steps = [e for e in events if e["kind"] == "learner"]
    pushes = [e for e in events if e["kind"] == "push"]
    ok = [e for e in episodes if e["payload"]["status"] == "ok"]
    # agenda mode: a user turn cannot fail on the small model's JSON (issue 8: 2 of 4 episodes did), so no episode
    # may end in the simulator, and the quality-gate counts travel in every episode event
    sim_failed = [e["payload"] for e in episodes if "simulator" in e["payload"].get("error", "")]
    assert not sim_failed, sim_failed
    assert len(ok) >= 4, f"too few good episodes: {[e['payload'] for e in episodes]}"
    assert all({"episode/sim_flagged", "episode/sim_template_turns"} <= set(e["metrics"]) for e in ok)
    assert len(steps) == 1, "the learner did not take its step"
    assert all(all(v == v for v in e["metrics"].values()) for e in steps)  # finite losses (NaN != NaN)
    last_push = max(e["metrics"]["sys/policy_version"] for e in pushes)
    assert last_push == 1  # one push per step, confirmed by the server before the event was sent
    assert min(e["metrics"]["episode/policy_version"] for e in ok) == 0  # the first episodes ran on the base
    assert [e["metrics"]["learner/trained_version"] for e in steps] == [0]
    # Version registries (written only after the server reported the new version) and a checkpoint exist.
    reg = json.loads((run_dir / "weights" / "versions.json").read_text())
    from gopo_online.trajectory_store import read_records

    stored = list(read_records(run_dir))  # what the learner saw, kept with its outcome (trained / dropped_stale)
    assert sum(r["outcome"] == "trained" for r in stored) >= 2 and all("trajectory" in r for r in stored)
    assert reg["current"]["version"] == last_push and sorted(reg["current"]["paths"]) == ["cs", "expert"]
    assert any((run_dir / "checkpoints").iterdir())
    state = json.loads((run_dir / "controller.json").read_text())
    first_next = state["next_episode"]
    assert state["finished"] >= 4

    # Resume: same run dir, two more learner steps, a worker and then the broker killed on the way; numbering,
    # checkpoint and served version continue.
    resumed = [*BUDGET, f"model.path={json.dumps(tiny_model)}", "run.max_steps=3", "workers.restart_backoff_s=0.5"]
    result = run_faults(run_dir, ["worker", "broker"], resumed, step_timeout_s=240, finish_timeout_s=360)
    print(table(result))
    out = result["output"]
    assert result["rc"] == 0, f"resumed train failed:\n{out[-4000:]}"
    # Stale until refit: the fresh server was brought to the version the learner last pushed before dispatching.
    assert f"policy server serves version {int(last_push)}" in out, out[-2000:]
    state = json.loads((run_dir / "controller.json").read_text())
    assert state["next_episode"] > first_next and len(state["runs"]) == 2
    new_events = _events(run_dir)[len(events) :]
    new_steps = [e for e in new_events if e["kind"] == "learner"]
    assert [e["step"] for e in new_steps] == [2, 3], "the learner did not resume from its checkpoint"
    # Later trajectories carry the pushed version, and the learner trained on them.
    new_ok = [e for e in new_events if e["kind"] == "episode" and e["payload"]["status"] == "ok"]
    assert not [e for e in new_events if e["kind"] == "episode" and "simulator" in e["payload"].get("error", "")]
    assert new_ok and min(e["metrics"]["episode/policy_version"] for e in new_ok) >= last_push
    # max_staleness = 0: each resumed step could only use trajectories tagged with the version pushed just before it
    assert [e["metrics"]["learner/trained_version"] for e in new_steps] == [last_push, last_push + 1]
    assert max(e["metrics"]["sys/policy_version"] for e in new_events if e["kind"] == "push") == last_push + 2

    # The faults: each part restarted and the run went on.
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
    # the learner trained after the broker came back (its queue, replayed from the AOF, still fed it)
    assert any(e["time"] > rows["broker"]["t_kill"] for e in new_steps), (rows["broker"], new_steps)
    assert "restarts" in (run_dir / "dashboard.txt").read_text()
    # the stop hands in-flight episodes back instead of playing them out (a sanity bound on a shared 2-core box)
    assert t["stop_s"] is not None and t["stop_s"] < 90, t
