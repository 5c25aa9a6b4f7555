"""`gopo-online bench`: speed and memory targets live here, not in timed unit tests.

Each benchmark returns rows (dicts with `bench`, `metric`, `value`, `unit` and free-form context); the
command prints them as one table and writes them, with the machine's description, to a JSON results file.
Benchmarks that need parts of the system start those parts themselves (a real broker, a real vLLM server).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig

Row = dict[str, Any]


def _row(bench: str, metric: str, value: float, unit: str, **context: Any) -> Row:
    return {"bench": bench, "metric": metric, "value": round(float(value), 6), "unit": unit, **context}


def _timeit(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_math(cfg: GopoConfig) -> list[Row]:
    """Reward math on the learner's hot path: ESNDCG, GAE, GRPO advantages, TSE."""
    import numpy as np

    from gopo_online import metrics, rewards

    rng = np.random.default_rng(0)
    pool = [f"skill_{i}" for i in range(12)]
    pairs = [(list(rng.choice(pool, 5, replace=False)), list(rng.choice(pool, 5, replace=False))) for _ in range(1000)]
    t = _timeit(lambda: [rewards.esndcg(p, q) for p, q in pairs], 5)
    rows = [_row("math", "esndcg", len(pairs) / t, "calls/s")]
    r, v = rng.normal(size=4096), rng.normal(size=4096)
    t = _timeit(lambda: rewards.gae(r, v, 0.95, 0.95), 5)
    rows.append(_row("math", "gae_4096_steps", t * 1e3, "ms"))
    g = rng.normal(size=(64, 8))
    t = _timeit(lambda: [rewards.grpo_advantages(row) for row in g], 5)
    rows.append(_row("math", "grpo_64_groups_of_8", t * 1e3, "ms"))
    t = _timeit(lambda: [metrics.tse((1, 3, 4), (0.4, 0.3, 0.3), 0.9) for _ in range(1000)], 5)
    rows.append(_row("math", "tse", 1000 / t, "calls/s"))
    return rows


BENCHES: dict[str, str] = {
    "math": "gopo_online.bench:bench_math",
    "broker": "gopo_online.bench_parts:bench_broker",
    "vllm": "gopo_online.bench_parts:bench_vllm",
    "push": "gopo_online.bench_parts:bench_push",
    "learner": "trainer.bench:bench_learner",
    "judge": "simulator.judge_bench:bench_judge",
    "traits": "simulator.traits:bench_traits",
    "learning": "gopo_online.bench_learning:bench_learning",
    "faults": "workers.faults:bench_faults",
    "scale": "workers.bench_scale:bench_scale",
    "loop": "gopo_online.bench_loop:bench_loop",
    "async": "gopo_online.bench_loop:bench_async",
    "peer": "simulator.peer_bench:bench_peer",
}
"""Benchmark name -> `module:function(cfg) -> list[Row]`, imported only when run."""
OPT_IN = {"learning", "faults", "async", "peer"}
"""Benchmarks that run only when named with --only (`learning` trains for an hour on the CPU default, `faults`
plays a real train run for minutes, `async` two `train` runs of --minutes each, 10 by default, `peer` a `train` run and
TRL's GRPOTrainer for --minutes each, 5 by default, and installs TRL on first use)."""


def _resolve(target: str) -> Callable[[GopoConfig], list[Row]]:
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    from gopo_online.hardware import cpu_flags

    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or None
    flags = cpu_flags()
    info["cpu"] = model
    info["cpu_flags"] = sorted(f for f in flags if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def _accepted(fn: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `kw` that `fn` declares (benchmark options reach only the benchmarks that use them)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params and v is not None}


def main(cfg: GopoConfig, only: list[str], out: Path, **bench_kw: Any) -> list[Row]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    only = [n.strip() for item in only for n in item.split(",") if n.strip()]  # --only loop,async or repeated
    unknown = [n for n in only if n not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    names = only or [n for n in BENCHES if n not in OPT_IN]
    rows: list[Row] = []
    failures: dict[str, str] = {}
    for name in names:
        console.log(f"bench {name} …")
        t0 = time.time()
        try:
            fn = _resolve(BENCHES[name])
            rows.extend(fn(cfg, **_accepted(fn, bench_kw)))
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            failures[name] = f"{type(e).__name__}: {e}"
            console.log(f"[red]bench {name} failed[/red]: {failures[name]}")
        console.log(f"bench {name} done in {time.time() - t0:.1f}s")
    table = Table(title="gopo-online bench")
    for col in ("bench", "metric", "value", "unit", "context"):
        table.add_column(col)
    for r in rows:
        ctx = {k: v for k, v in r.items() if k not in ("bench", "metric", "value", "unit")}
        table.add_row(r["bench"], r["metric"], f"{r['value']:.4g}", r["unit"], json.dumps(ctx) if ctx else "")
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "rows": rows, "failures": failures}
    out.write_text(json.dumps(payload, indent=2))
    console.log(f"results written to {out}")
    if failures:
        raise SystemExit(1)
    return rows
