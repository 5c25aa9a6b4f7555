"""`gopo-online bench --only learner`: learner step time, peak memory and checkpoint time on synthetic batches.

Reached by module path from gopo_online.bench (the base package never imports trainer/).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig


def bench_learner(cfg: GopoConfig, steps: int = 3, episodes: int = 4, turns: int = 4) -> list[dict[str, Any]]:
    """LoRA learner (the one-machine default), ZeRO 0 and 2: median step time of steps 2..n, peak RSS, checkpoint."""
    from transformers import AutoTokenizer

    from gopo_online.models import resolve_model_path
    from trainer.learner import Learner, _rss_mb
    from trainer.synthetic import make_trajectory

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    rows: list[dict[str, Any]] = []
    for zero in (0, 2):
        with tempfile.TemporaryDirectory() as tmp:
            c = cfg.model_copy(
                update={
                    "run": cfg.run.model_copy(update={"output_dir": Path(tmp), "resume": False}),
                    "learner": cfg.learner.model_copy(update={"zero_stage": zero, "batch_episodes": episodes}),
                }
            )
            learner = Learner(c, log=lambda *_: None)
            t0 = time.perf_counter()
            learner.setup()
            setup_s = time.perf_counter() - t0
            times = []
            for s in range(steps):
                batch = [make_trajectory(tok, s * episodes + e, turns, seed=s, grammar=True) for e in range(episodes)]
                t = time.perf_counter()
                learner.step(batch)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            learner.save_checkpoint()
            ckpt_s = time.perf_counter() - t
            learner.cleanup()
        ctx = {"finetune": c.learner.finetune, "zero": zero, "batch": f"{episodes}x{turns} turns"}
        rows += [
            {"bench": "learner", "metric": "step_time_s", "value": statistics.median(times[1:] or times), "unit": "s",
             **ctx},
            {"bench": "learner", "metric": "setup_s", "value": setup_s, "unit": "s", **ctx},
            {"bench": "learner", "metric": "checkpoint_s", "value": ckpt_s, "unit": "s", **ctx},
            {"bench": "learner", "metric": "peak_rss", "value": _rss_mb(), "unit": "MB", **ctx},
        ]  # fmt: skip
    return rows
