"""Fault injection against a real `gopo-online train`: one run, several faults in turn, and the figures.

`run_faults(run_dir, faults, sets)` starts `train` as a user would (a subprocess, the default one-machine layout:
embedded Redis, vLLM policy server, learner, workers), then for each fault in turn waits for its moment, injects
it, and waits for the run to recover:

- "worker":  SIGKILL a rollout worker while its hold mark says it plays an episode (mid-episode);
- "broker":  SIGKILL the embedded Redis (the supervisor restarts it on the same port; its AOF replays);
- "learner": SIGKILL the learner while a checkpoint is being written (a `.tmp-step-*` dir exists), else right
  after a learner step;
- "server":  SIGKILL the vLLM policy server during a weight push (the next version's folders are written, the
  registry does not have it yet), else right after a push;
- "reload-path": remove the folders of the registry's current version (the path a refit would load is gone),
  then SIGKILL the vLLM server: the restarted server must not be sent the missing path (it would kill vLLM's
  engine); the controller refits it to the newest complete older version and says so;
- "broker-pause": SIGSTOP the embedded Redis for 30 s (unreachable, not dead: nothing to restart), then SIGCONT.

Recovery = the supervisor's "restart" event for the part, then one more finished episode (for the learner: one
more learner step). At the end it reads metrics.jsonl, controller.json and the learner's trajectory store:
episodes dispatched, trained (what the learner consumed), lost (deadline passed, or a held episode neither
finished, nor seen by the learner, nor counted from its done mark after its event was lost, nor handed back),
duplicated (an episode id finished twice). `bench_faults` (`gopo-online bench --only faults`) runs all of them in
one run (`BENCH`: a budget long enough for six faults; the run is stopped with Ctrl-C once the last one recovered
and the learner took one more step) and prints the table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

FAULTS = ("worker", "broker", "learner", "server", "reload-path", "broker-pause")
PART_OF = {
    "worker": "worker-",
    "broker": "broker",
    "learner": "learner",
    "server": "policy-server",
    "reload-path": "policy-server",
}
PAUSE_S = 30.0

SHORT = [
    "run.max_steps=3",
    "run.max_episodes=60",
    "run.max_minutes=8",
    "simulator.max_turns=2",
    "simulator.max_tokens=100",
    "agents.cs.max_tokens=32",
    "judge.max_tokens=64",
    "learner.batch_episodes=2",
    "learner.push_every=1",
    "learner.max_staleness=2",
    "learner.checkpoint_every=1",
    "workers.count=2",
    "workers.concurrency=2",
    "workers.max_in_flight=4",
    "workers.restart_backoff_s=0.5",
    "dashboard.tensorboard=false",
]
"""A shortened default run: tiny episodes, a learner step every 2 episodes, a push and a checkpoint each step."""
BENCH = [
    *(s for s in SHORT if not s.startswith(("run.max_steps", "run.max_episodes", "run.max_minutes"))),
    "run.max_steps=200",
    "run.max_episodes=1000",
    "run.max_minutes=30",
]
"""SHORT with a budget that outlasts all six faults (the bench stops the run itself after the last one)."""
BENCH_STEP_TIMEOUT_S = 900.0
"""How long the bench waits for each fault's moment and for its recovery (the suite's shorter run uses 240 s)."""


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


class _Run:
    def __init__(self, run_dir: Path, sets: list[str], log: Any) -> None:
        import psutil

        self.run_dir = run_dir
        self.log = log
        sets = [*sets, f"run.output_dir={json.dumps(str(run_dir.parent))}", f"run.name={json.dumps(run_dir.name)}"]
        args = [sys.executable, "-m", "gopo_online.cli", "train"] + [a for s in sets for a in ("--set", s)]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = run_dir.parent / f"{run_dir.name}.train.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in finish()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)
        self.t0 = time.time()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self, needle: str, whole: bool = False) -> list[Any]:
        """Descendants whose argv has `needle` as a whole argument (a job: "learner") or, unless `whole`, inside its
        first three (a program: "redis-server"; a Celery worker, which retitles itself "[celeryd: …] (worker …)").
        `whole` for the learner: a retitled worker's one-string argv holds "--set learner.…" too."""
        import psutil

        found = []
        try:
            for c in self.ps.children(recursive=True):
                try:
                    argv = c.cmdline()
                    if needle in argv or (not whole and any(needle in a for a in argv[:3])):
                        found.append(c)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return found

    def broker_url(self) -> str | None:
        m = re.search(r"\[train\] broker (redis://\S+)", self.output())
        return m.group(1) if m else None

    def wait(self, pred: Any, timeout_s: float, what: str, step: float = 0.05) -> Any:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.alive():
                tail = "\n".join(self.output().splitlines()[-40:])
                raise RuntimeError(f"train exited (rc {self.proc.returncode}) while waiting for {what}:\n{tail}")
            v = pred()
            if v:
                return v
            time.sleep(step)
        raise TimeoutError(f"no {what} within {timeout_s:.0f}s")


def _held(url: str, namespace: str) -> dict[str, str]:
    """episode id -> worker (host:pid) from the workers' hold marks."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:held:*", count=1000))
        vals = client.mget(keys) if keys else []
        return {k.decode().rsplit(":held:", 1)[1]: v.decode() for k, v in zip(keys, vals, strict=True) if v}
    except redis.RedisError:
        return {}
    finally:
        client.close()


def _registry_version(sync: Any) -> int:
    """The version the run's weight registry (gopo_online.serving.weights) says every server confirmed; 0 before."""
    try:
        return sync.registry.current_version()
    except (OSError, ValueError):
        return 0


def _inject(run: _Run, fault: str, namespace: str, timeout_s: float) -> dict[str, Any]:
    """Wait for the fault's moment, SIGKILL the part; returns what was killed, when, and what it held."""
    row: dict[str, Any] = {"fault": fault}
    if fault == "worker":
        url = run.broker_url()

        def target() -> Any:
            held = _held(url, namespace)
            for w in run.children("worker"):
                name = next((v for v in held.values() if v.endswith(f":{w.pid}")), None)
                if name:
                    return w, sorted(e for e, v in held.items() if v == name)
            return None

        proc, held_ids = run.wait(target, timeout_s, "worker playing an episode")
        row["held"] = held_ids
    elif fault in ("broker", "broker-pause"):
        proc = run.wait(lambda: (run.children("redis-server") or [None])[0], timeout_s, "embedded Redis")
        time.sleep(1.2)  # appendfsync everysec: what was queued a second ago is on disk
    elif fault == "learner":
        ckpt = run.run_dir / "checkpoints"
        n_steps = sum(e["kind"] == "learner" for e in _events(run.run_dir))

        def moment() -> Any:
            if ckpt.is_dir() and any(p.name.startswith(".tmp-step") for p in ckpt.iterdir()):
                row["moment"] = "checkpoint written, not yet renamed"
                return (run.children("learner", whole=True) or [None])[0]
            if sum(e["kind"] == "learner" for e in _events(run.run_dir)) > n_steps:
                row["moment"] = "right after a step (checkpoint window missed)"
                return (run.children("learner", whole=True) or [None])[0]
            return None

        proc = run.wait(moment, timeout_s, "learner checkpoint", step=0.01)
    elif fault == "server":
        from gopo_online.serving.weights import WeightSync

        weights = WeightSync.for_run(run.run_dir)  # the weights module owns the folder layout
        cur = _registry_version(weights)

        def pushing() -> Any:
            now = _registry_version(weights)
            if now > cur:
                row["moment"] = f"right after the push of v{now} (push window missed)"
                return True
            if all(weights.path(a, cur + 1).is_dir() for a in weights.agents):
                row["moment"] = f"during the push of v{cur + 1} (written, not yet confirmed)"
                return True
            return None

        run.wait(pushing, timeout_s, "a weight push", step=0.005)
        proc = run.wait(lambda: (run.children("vllm.entrypoints") or [None])[0], 10, "vLLM server")
    elif fault == "reload-path":
        from gopo_online.serving.weights import WeightSync

        weights = WeightSync.for_run(run.run_dir)
        run.wait(lambda: _registry_version(weights) >= 2, timeout_s, "a second confirmed push", step=0.2)
        current = weights.registry.current()
        for path in current["paths"].values():
            shutil.rmtree(path, ignore_errors=True)
        row["moment"] = f"v{current['version']} folders removed, server killed"
        row["removed_version"] = current["version"]
        proc = run.wait(lambda: (run.children("vllm.entrypoints") or [None])[0], 10, "vLLM server")
    else:
        raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
    row["killed_pid"] = proc.pid
    row["t_kill"] = time.time()
    if fault == "broker-pause":
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(PAUSE_S)
        os.kill(proc.pid, signal.SIGCONT)
        row["moment"] = f"unreachable for {PAUSE_S:.0f}s (SIGSTOP)"
        return row
    os.kill(proc.pid, signal.SIGKILL)
    run.log(f"[faults] {fault}: killed pid {proc.pid} at +{row['t_kill'] - run.t0:.0f}s {row.get('held', '')}")
    return row


def _recover(run: _Run, row: dict[str, Any], timeout_s: float) -> None:
    t_kill = row["t_kill"]
    if row["fault"] == "broker-pause":  # nothing died: recovered = an episode finished after the broker is back
        back = t_kill + PAUSE_S
        ev = run.wait(lambda: next((e for e in _events(run.run_dir) if e["kind"] == "episode" and e["time"] > back),
                                   None), timeout_s, "an episode after the pause", step=0.2)  # fmt: skip
        row["restart_s"] = "-"
        row["recovered_s"] = round(ev["time"] - t_kill, 1)
        row["restarts_during"] = sorted({str(e["payload"].get("part")) for e in _events(run.run_dir)
                                         if e["kind"] == "restart" and e["time"] >= t_kill})  # fmt: skip
        return
    part = PART_OF[row["fault"]]

    def restarted() -> Any:
        return next((e for e in _events(run.run_dir) if e["kind"] == "restart" and e["time"] >= t_kill
                     and str(e.get("payload", {}).get("part", "")).startswith(part)), None)  # fmt: skip

    ev = run.wait(restarted, timeout_s, f"restart of {part}", step=0.2)
    row["restart_s"] = round(ev["time"] - t_kill, 1)
    row["redelivered"] = ev.get("payload", {}).get("redelivered", [])

    kind = "learner" if row["fault"] == "learner" else "episode"  # a restarted learner recovered when it steps

    def progressed() -> Any:
        return next((e for e in _events(run.run_dir) if e["kind"] == kind and e["time"] > ev["time"]), None)

    ev2 = run.wait(progressed, timeout_s, f"a {kind} event after the restart", step=0.2)
    row["recovered_s"] = round(ev2["time"] - t_kill, 1)
    if row["fault"] == "reload-path":
        # the console line of workers/controller.py `_refit`; absent when the learner pushed a new version first
        m = re.search(r"\[train\] the registry's v(\d+) weights cannot be loaded .*? serves v(\d+)", run.output())
        row["moment"] += f"; refit to v{m.group(2)}" if m else "; the learner pushed a new version first"
        row["reported"] = bool(m)
    run.log(f"[faults] {row['fault']}: restarted in {row['restart_s']}s, next episode after {row['recovered_s']}s")


def run_faults(
    run_dir: Path,
    faults: list[str] | tuple[str, ...] = ("worker", "broker"),
    sets: list[str] | None = None,
    *,
    step_timeout_s: float = 240.0,
    finish_timeout_s: float = 420.0,
    stop_after: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """One shortened `train` taking `faults` in turn; returns {"rows", "totals", "rc", "output"}.

    `stop_after`: once the last fault recovered and the learner took one more step, stop the run (SIGINT, as
    Ctrl-C) instead of waiting for its budget."""
    sets = list(SHORT if sets is None else sets)
    run = _Run(run_dir, sets, log)
    rows: list[dict[str, Any]] = []
    stop_s = None
    try:
        # an episode of THIS run (a resumed run dir already holds the earlier runs' episodes)
        run.wait(lambda: any(e["kind"] == "episode" and e["time"] >= run.t0 for e in _events(run_dir)),
                 step_timeout_s * 2, "a first episode")  # fmt: skip
        cfg = json.loads((run_dir / "config.json").read_text())
        namespace = cfg["broker"]["task_queue"]
        for fault in faults:
            try:
                row = _inject(run, fault, namespace, step_timeout_s)
            except (TimeoutError, RuntimeError) as e:
                rows.append({"fault": fault, "outcome": f"not injected: {e}"})
                log(f"[faults] {fault}: {e}")
                if not run.alive():
                    break
                continue  # the run goes on: the next fault still tells something
            rows.append(row)
            try:
                _recover(run, row, step_timeout_s)
            except (TimeoutError, RuntimeError) as e:
                row["outcome"] = f"not recovered: {e}"
                log(f"[faults] {fault}: {e}")
                break
            row["outcome"] = "recovered"
        if stop_after and rows and run.alive():
            if rows[-1].get("outcome") == "recovered":
                t_last = time.time()
                try:
                    run.wait(lambda: any(e["kind"] == "learner" and e["time"] > t_last for e in _events(run_dir)),
                             step_timeout_s, "a learner step after the last fault", step=0.5)  # fmt: skip
                except (TimeoutError, RuntimeError) as e:
                    log(f"[faults] {e}")
            if run.alive():
                run.proc.send_signal(signal.SIGINT)  # stop now, not at the (long) budget
        # the run ends by its budget; time its stop from the console's "stopping" line to the exit
        deadline = time.time() + finish_timeout_s
        t_stopping = None
        while run.alive() and time.time() < deadline:
            if t_stopping is None and "[train] stopping" in run.output():
                t_stopping = time.time()
            time.sleep(0.2)
        if run.alive():
            run.proc.send_signal(signal.SIGINT)
            t_stopping = time.time()
            run.proc.wait(180)
        stop_s = round(time.time() - t_stopping, 1) if t_stopping is not None else None
    finally:
        if run.alive():
            run.proc.kill()
            run.proc.wait(30)
        run._out.close()
    out = totals(run_dir, rows)
    out["stop_s"] = stop_s
    return {"rows": rows, "totals": out, "rc": run.proc.returncode, "output": run.output()}


def totals(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    events = _events(run_dir)
    state = json.loads((run_dir / "controller.json").read_text())
    finished = Counter(e["payload"]["episode_id"] for e in events if e["kind"] == "episode" and e.get("payload"))
    handed_back = {p["episode_id"] for p in state.get("handed_back", [])}
    # published, but the episode event was lost (the worker was killed between publish and event, or the event
    # was sent while the broker restarted): the controller counted it from its done mark and said so in the log
    event_lost = {
        e["payload"]["episode_id"]
        for e in events
        if e["kind"] == "error" and (e.get("payload") or {}).get("event_lost") and "episode_id" in e["payload"]
    }
    # what the learner trained, from the trajectory store it writes after each step (one record per trajectory)
    from gopo_online.trajectory_store import read_records

    records = list(read_records(run_dir, dedupe=False))
    seen_by_learner = {r["episode_id"] for r in records}
    held = {eid for r in rows for eid in r.get("held", [])}
    reached = set(finished) | handed_back | event_lost | seen_by_learner
    lost_held = sorted(e for e in held if e not in reached)
    trained_ids = Counter(r["episode_id"] for r in records if r.get("outcome") == "trained")
    trained = len(trained_ids)
    pushes = [e["metrics"].get("sys/policy_version", 0) for e in events if e["kind"] == "push"]
    return {
        "dispatched": state["dispatched"],
        "finished": state["finished"],
        "trained": trained,
        "lost": state["lost"] + len(lost_held),
        "lost_held": lost_held,
        "duplicated": sum(n - 1 for n in finished.values() if n > 1),
        "trained_twice": sorted(e for e, n in trained_ids.items() if n > 1),
        "handed_back": len(handed_back),
        "restarts": sum(e["kind"] == "restart" for e in events),
        "versions_monotonic": pushes == sorted(pushes),
        "held_redelivered_and_finished": sorted(e for e in held if e in finished or e in event_lost),
        "event_lost": sorted(event_lost),
    }


def table(result: dict[str, Any]) -> str:
    t = result["totals"]
    lines = [f"{'fault':<12} {'moment':<58} {'restart':>8} {'recovered':>10}  outcome"]
    for r in result["rows"]:
        moment = r.get("moment") or (f"mid-episode, held {len(r.get('held', []))}" if r["fault"] == "worker" else "")
        rs = f"{r['restart_s']}s" if isinstance(r.get("restart_s"), float | int) else "-"
        rec = f"{r['recovered_s']}s" if "recovered_s" in r else "-"
        lines.append(f"{r['fault']:<12} {moment[:58]:<58} {rs:>8} {rec:>10}  {r.get('outcome', '?')}")
    lines.append(
        f"run: rc {result['rc']}; dispatched {t['dispatched']}, finished {t['finished']}, trained {t['trained']}, "
        f"lost {t['lost']}, duplicated {t['duplicated']}, trained twice {len(t.get('trained_twice', []))}, "
        f"handed back {t['handed_back']}, restarts {t['restarts']}, "
        f"stop took {t.get('stop_s')}s"
    )
    return "\n".join(lines)


def bench_faults(cfg: Any) -> list[dict[str, Any]]:
    """`gopo-online bench --only faults`: the four faults in one shortened run; prints the table, returns rows."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="gopo-faults-")) / "faults"
    # A learner step of this shortened run took 70-215 s on a 2-core Xeon (bf16, next to the server and two
    # workers), and the learner fault waits for one: 240 s (the suite's bound) missed it there.
    result = run_faults(run_dir, FAULTS, BENCH, stop_after=True, step_timeout_s=BENCH_STEP_TIMEOUT_S,
                        finish_timeout_s=600.0)  # fmt: skip
    print(table(result), flush=True)
    print(json.dumps(result["totals"]), flush=True)
    t = result["totals"]
    rows = [
        {"bench": "faults", "metric": f"{r['fault']} recovered", "value": float(r.get("recovered_s", float("nan"))),
         "unit": "s", "restart_s": r.get("restart_s"), "outcome": r.get("outcome")}
        for r in result["rows"]
    ]  # fmt: skip
    for k in ("dispatched", "finished", "trained", "lost", "duplicated", "restarts"):
        rows.append({"bench": "faults", "metric": k, "value": float(t[k]), "unit": "episodes", "rc": result["rc"]})
    return rows


if __name__ == "__main__":
    out = run_faults(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else FAULTS)
    print(table(out))
    print(json.dumps(out["totals"]))
