"""`bench --only loop`: how much of the bare engine the training loop gets.

1. A real, short `gopo-online train` (its own vLLM server, workers, learner) writes its request log
   (run_dir/requests/*.jsonl, `workers.request_log`).
2. A fresh policy server with the same flags replays the SAME requests: the same prompt token ids, the same number
   of generated tokens (min_tokens = max_tokens = what the loop got, ignore_eos), at the loop's concurrency
   (`workers.in_flight_limit` requests at once), on the base model, without structured output.
3. Rows: the loop's rollout tok/s (generated tokens / span of its requests), the replay's, their ratio, and the
   loop's episodes/min and learner steps from its metrics.

Replay is the ceiling for this request mix; the loop falls short of it by what sits between requests (simulator
and judge parsing, admin calls, the queue, the learner's CPU share). Imports nothing heavy at module level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig


def loop_rate(reqs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Generated tokens, span (first start -> last end), tok/s and mean requests in flight of a request log."""
    if not reqs:
        raise ValueError("the request log is empty: the run made no model request")
    start = min(r["t"] for r in reqs)
    end = max(r["t"] + r["latency_s"] for r in reqs)
    span = max(end - start, 1e-9)
    tokens = sum(r["completion_tokens"] for r in reqs)
    prompt = sum(r["prompt_tokens"] for r in reqs)
    return {
        "requests": float(len(reqs)),
        "generated_tokens": float(tokens),
        "prompt_tokens": float(prompt),
        "span_s": span,
        "tok_per_s": tokens / span,
        "prompt_tok_per_s": prompt / span,
        "mean_in_flight": sum(r["latency_s"] for r in reqs) / span,
    }


def replay(base_url: str, model: str, reqs: Sequence[Mapping[str, Any]], concurrency: int, timeout_s: float = 300.0):
    """Send every request of the log again (token-id prompts, exactly as many generated tokens) with `concurrency`
    at once; returns {generated_tokens, wall_s, tok_per_s, prompt_tokens}."""
    import httpx

    todo = [r for r in reqs if r["prompt_token_ids"] and r["completion_tokens"] > 0]
    if not todo:
        raise ValueError("no replayable request (prompt token ids and generated tokens) in the log")

    def one(client: httpx.Client, r: Mapping[str, Any]) -> int:
        n = int(r["completion_tokens"])
        body = {"model": model, "prompt": list(r["prompt_token_ids"]), "max_tokens": n, "min_tokens": n,
                "ignore_eos": True, "temperature": float(r.get("temperature", 1.0))}  # fmt: skip
        resp = client.post(f"{base_url}/completions", json=body, timeout=timeout_s)
        resp.raise_for_status()
        return int(resp.json()["usage"]["completion_tokens"])

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        one(client, todo[0])  # warm-up, not timed
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(lambda r: one(client, r), todo))
        wall = time.perf_counter() - t0
    return {
        "generated_tokens": float(tokens),
        "prompt_tokens": float(sum(r["prompt_tokens"] for r in todo)),
        "wall_s": wall,
        "tok_per_s": tokens / wall,
    }


def _read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (none if it is missing), skipping a line that is not JSON."""
    path = run_dir / "metrics.jsonl"
    out: list[dict[str, Any]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _metrics(run_dir: Path) -> dict[str, float]:
    episodes = steps = 0
    first = last = None
    hit_rate = None
    for ev in _read_events(run_dir):
        kind = ev.get("kind")
        hit_rate = (ev.get("metrics") or {}).get("sys/prefix_cache_hit_rate", hit_rate)  # the last one: whole run
        t = ev.get("time")
        if isinstance(t, int | float):
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
        if kind == "episode":
            episodes += 1
        elif kind == "learner":
            steps = max(steps, int(ev.get("step") or 0))
    minutes = ((last - first) / 60.0) if first is not None and last is not None and last > first else None
    return {
        "episodes": float(episodes),
        "learner_steps": float(steps),
        "episodes_per_min": episodes / minutes if minutes else 0.0,
        "prefix_cache_hit_rate": hit_rate,
    }


def reward_curve(run_dir: Path, bin_s: float = 60.0) -> dict[str, Any]:
    """Reward against wall-clock from a run's metrics.jsonl: each learner step's `reward/joint` (the mean joint
    reward of the batch it trained on) at its seconds since the run's first event; the mean per `bin_s` bin; and
    the mean over the second half of the run (what a user sees after a fixed wall-clock budget)."""
    events = _read_events(run_dir)
    times = [e["time"] for e in events if isinstance(e.get("time"), int | float)]
    if not times:
        return {"points": [], "bins": [], "late_mean": None}
    t0, t1 = min(times), max(times)
    points = [(round(e["time"] - t0, 1), float(e["metrics"]["reward/joint"])) for e in events
              if e.get("kind") == "learner" and "reward/joint" in (e.get("metrics") or {})]  # fmt: skip
    bins: dict[int, list[float]] = {}
    for t, r in points:
        bins.setdefault(int(t // bin_s), []).append(r)
    half = (t1 - t0) / 2.0
    late = [r for t, r in points if t >= half]
    return {
        "points": points,
        "bins": [(k * bin_s, sum(v) / len(v)) for k, v in sorted(bins.items())],
        "late_mean": sum(late) / len(late) if late else None,
    }


def _train(
    minutes: float, out: Path, name: str, extra: Sequence[str] = (), checkout: Path | None = None
) -> tuple[TrainRun, float]:
    """A real `gopo-online train` of `minutes` in a child process; with `checkout`, the code of that checkout (an
    earlier commit's worktree) runs, in this environment."""
    sets = [f"run.output_dir={json.dumps(str(out))}", f"run.name={json.dumps(name)}", f"run.max_minutes={minutes}",
            "run.resume=false", "dashboard.enabled=false", "dashboard.tensorboard=false", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "gopo_online.cli", "train"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if checkout is not None:  # sys.path (PYTHONPATH) is searched before the editable install's finder
        env["PYTHONPATH"] = str(checkout)
    t0 = time.perf_counter()
    proc = run_sampling_rss(cmd, timeout=60 * minutes + 300, env=env, cwd=checkout)
    return proc, time.perf_counter() - t0


class TrainRun(subprocess.CompletedProcess):
    peak_rss_mb: float = 0.0
    """The largest resident memory of the whole process tree (train, its servers, workers, learner, broker)."""


def run_sampling_rss(cmd: Sequence[str], timeout: float, every_s: float = 2.0, **kw: Any) -> TrainRun:
    """`subprocess.run(cmd, capture_output, text)` that samples the RSS of the child's process tree every `every_s`
    and keeps the peak (`TrainRun.peak_rss_mb`)."""
    import threading

    from gopo_online.procutil import tree_rss_mb

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # no pipe to fill up
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kw)
        peak = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every_s):
                peak[0] = max(peak[0], tree_rss_mb(child.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        finally:
            done.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        result = TrainRun(cmd, rc, out.read(), err.read())
    result.peak_rss_mb = peak[0]
    return result


BASELINE_REF = "fd353a5"
"""The main that throughput issue was measured on (2026-11-21, the last commit before it): `bench --only loop` runs
its `train` side by side with this checkout's unless `--baseline none`."""


def _worktree(ref: str, where: Path) -> Path:
    """A detached git worktree of `ref` of the repository this module lives in."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(where), ref],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"git worktree add {ref} failed: {proc.stderr.strip()[-500:]}")
    return where


def _drop_worktree(where: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(where)],
                   capture_output=True, text=True, timeout=120)  # fmt: skip


def baseline_rows(ours: Mapping[str, float], ours_wall: float, baseline: str, minutes: float, tmp: Path) -> list[Row]:
    """The same `train` on the `baseline` commit (a worktree, this environment), then its episodes/min and learner
    steps/min and ours / theirs (target >= 5x)."""
    tree = _worktree(baseline, tmp / "baseline-tree")
    try:
        proc, wall = _train(minutes, tmp / "baseline-runs", "baseline", (), checkout=tree)
    finally:
        _drop_worktree(tree)
    run_dir = tmp / "baseline-runs" / "baseline"
    if not (run_dir / "metrics.jsonl").is_file():
        raise RuntimeError(f"the baseline train ({baseline}) wrote no metrics (rc {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")  # fmt: skip
    b = _metrics(run_dir)
    # per minute of each whole `train` (start-up included, the same for both): a run with one episode has no span
    rate = {side: {k: m[k] / max(w / 60.0, 1e-9) for k in ("episodes", "learner_steps")}
            for side, m, w in (("ours", ours, ours_wall), ("baseline", b, wall))}  # fmt: skip
    o, t = rate["ours"], rate["baseline"]
    return [
        _row("loop", "baseline.episodes_per_min", t["episodes"], "episodes/min", commit=baseline,
             episodes=int(b["episodes"]), learner_steps=int(b["learner_steps"]), rc=proc.returncode,
             wall_s=round(wall, 1)),
        _row("loop", "baseline.learner_steps_per_min", t["learner_steps"], "steps/min", commit=baseline),
        _row("loop", "train.episodes_per_train_min", o["episodes"], "episodes/min", wall_s=round(ours_wall, 1)),
        _row("loop", "train.learner_steps_per_min", o["learner_steps"], "steps/min"),
        _row("loop", "ratio_episodes_per_min_vs_baseline", o["episodes"] / max(t["episodes"], 1e-9), "x",
             target=5.0, baseline_zero=t["episodes"] == 0),
        _row("loop", "ratio_learner_steps_per_min_vs_baseline", o["learner_steps"] / max(t["learner_steps"], 1e-9),
             "x", target=5.0, baseline_zero=t["learner_steps"] == 0),
    ]  # fmt: skip


SYNC_SETS = ("workers.sync=true", "learner.max_staleness=0", "learner.push_every=1")
"""The synchronous baseline: dispatch waits for the learner's push, nothing trained is ever stale."""


def bench_async(cfg: GopoConfig, minutes: float = 10.0) -> list[Row]:
    """The default asynchronous loop vs the same system run synchronously (`workers.sync`, max_staleness 0), each a
    real `train` of `minutes` from the same seed, one after the other on this box: episodes/min, learner
    steps/min and reward against wall-clock, and the async/sync ratios (target >= 2x episodes/min)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gopo-async-") as tmp:
        out = Path(tmp) / "runs"
        got: dict[str, dict[str, Any]] = {}
        for arm, extra in (("async", ()), ("sync", SYNC_SETS)):
            proc, wall = _train(minutes, out, arm, extra)
            run_dir = out / arm
            if not (run_dir / "metrics.jsonl").is_file():
                raise RuntimeError(f"the {arm} train wrote no metrics (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            m = _metrics(run_dir)
            curve = reward_curve(run_dir)
            span_min = max(wall / 60.0, 1e-9)
            got[arm] = {**m, "steps_per_min": m["learner_steps"] / span_min}
            rows.append(_row("async", f"{arm}.episodes_per_min", m["episodes_per_min"], "episodes/min",
                             episodes=int(m["episodes"]), rc=proc.returncode, wall_s=round(wall, 1)))  # fmt: skip
            rows.append(_row("async", f"{arm}.learner_steps_per_min", got[arm]["steps_per_min"], "steps/min",
                             learner_steps=int(m["learner_steps"])))  # fmt: skip
            rows.append(_row("async", f"{arm}.reward_second_half", curve["late_mean"] or 0.0, "reward/joint",
                             curve=curve["bins"], measured=curve["late_mean"] is not None))  # fmt: skip
        a, s = got["async"], got["sync"]
        rows.append(_row("async", "ratio_episodes_per_min", a["episodes_per_min"] / max(s["episodes_per_min"], 1e-9),
                         "x", target=2.0))  # fmt: skip
        rows.append(_row("async", "ratio_learner_steps_per_min", a["steps_per_min"] / max(s["steps_per_min"], 1e-9),
                         "x"))  # fmt: skip
    return rows


def bench_loop(cfg: GopoConfig, minutes: float = 3.0, baseline: str | None = BASELINE_REF) -> list[Row]:
    """Run a `minutes`-long train, then replay its request log on a bare server (see the module docstring); then,
    unless `baseline` is None or "none", the same train on the `baseline` commit."""
    from gopo_online.requestlog import read_requests, summarize
    from gopo_online.serving.process import server_from_config

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gopo-loop-") as tmp:
        out = Path(tmp) / "runs"
        proc, train_s = _train(minutes, out, "loop", ["workers.request_log=true"])
        run_dir = out / "loop"
        logs = sorted((run_dir / "requests").glob("*.jsonl"))
        if not logs:
            raise RuntimeError(f"train wrote no request log (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        reqs, _specs = read_requests(logs)
        loop = loop_rate(reqs)
        m = _metrics(run_dir)
        concurrency = cfg.workers.in_flight_limit
        rows.append(_row("loop", "train.rollout_tok_per_s", loop["tok_per_s"], "tok/s", requests=int(loop["requests"]),
                         mean_in_flight=round(loop["mean_in_flight"], 2), train_s=round(train_s, 1),
                         rc=proc.returncode))  # fmt: skip
        rows.append(_row("loop", "train.prompt_tok_per_s", loop["prompt_tok_per_s"], "tok/s"))
        rows.append(_row("loop", "train.episodes_per_min", m["episodes_per_min"], "episodes/min",
                         episodes=int(m["episodes"]), learner_steps=int(m["learner_steps"])))  # fmt: skip
        rows.append(_row("loop", "train.requests_by_kind", len(reqs), "requests", by_kind=summarize(reqs)))
        if m["prefix_cache_hit_rate"] is not None:
            rows.append(_row("loop", "train.prefix_cache_hit_rate", m["prefix_cache_hit_rate"], "",
                             note="policy server: cached / queried prompt tokens over the run"))  # fmt: skip
        rows.append(_row("loop", "train.peak_rss_tree", proc.peak_rss_mb, "MiB", target=8192,
                         note="RSS summed over the tree: shared pages count once per process"))  # fmt: skip
        server = server_from_config(cfg, "policy")
        server.log_path = Path(tmp) / "replay-vllm.log"
        server.start()
        try:
            r = replay(server.base_url, cfg.model.served_name, reqs, concurrency)
        finally:
            server.stop()
        rows.append(_row("loop", "replay.tok_per_s", r["tok_per_s"], "tok/s", concurrency=concurrency,
                         wall_s=round(r["wall_s"], 1)))  # fmt: skip
        rows.append(_row("loop", "ratio_loop_to_replay", loop["tok_per_s"] / r["tok_per_s"], "x", target=0.9))
        if baseline and baseline.lower() != "none":
            rows += baseline_rows(m, train_s, baseline, minutes, Path(tmp))
    return rows
