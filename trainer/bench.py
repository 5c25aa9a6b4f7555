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


def matmul_flops(dtype: str, n: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of an n x n matmul in `dtype` at the current torch thread count: the dense-compute ceiling of this box
    for the learner (its forward and backward are mostly such matmuls)."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b  # warm-up: thread pool, packing buffers
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * n**3 * repeats / (time.perf_counter() - t)


def flops_per_trained_token(n_params: float, finetune: str) -> float:
    """Dense FLOPs per token through one learner step: the policy's forward (2N) and backward (2N for the activation
    gradients, + 2N for the weight gradients unless LoRA freezes the base), plus the reference forward (2N)."""
    return n_params * (6.0 if finetune == "lora" else 8.0)


def bench_learner(cfg: GopoConfig, steps: int = 3, episodes: int = 4, turns: int = 4) -> list[dict[str, Any]]:
    """LoRA learner (the one-machine default), ZeRO 0 and 2: median step time of steps 2..n, trained tokens/s and its
    ratio to the box's FLOP bound, peak RSS, checkpoint."""
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
            times, tok_s, comp_tok_s = [], [], []
            for s in range(steps):
                batch = [make_trajectory(tok, s * episodes + e, turns, seed=s, grammar=True) for e in range(episodes)]
                t = time.perf_counter()
                st = learner.step(batch)
                times.append(time.perf_counter() - t)
                tok_s.append(st.trained_tok_per_s or 0.0)
                comp_tok_s.append(st.trained_completion_tok_per_s or 0.0)
            import torch

            dtype = "bfloat16" if learner.bf16 else "float32"
            module = next(iter(learner.engines.values())).module
            # non-embedding base weights: the per-token matmuls (the lm head runs on the completion positions only)
            n_params = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n and "embed" not in n)
            peak = matmul_flops(dtype)
            bound = peak / flops_per_trained_token(n_params, c.learner.finetune)
            t = time.perf_counter()
            learner.save_checkpoint()
            ckpt_s = time.perf_counter() - t
            learner.cleanup()
        ctx = {"finetune": c.learner.finetune, "zero": zero, "batch": f"{episodes}x{turns} turns"}
        rows += [
            {"bench": "learner", "metric": "step_time_s", "value": statistics.median(times[1:] or times), "unit": "s",
             **ctx},
            {"bench": "learner", "metric": "trained_tok_per_s", "value": statistics.median(tok_s[1:] or tok_s),
             "unit": "tok/s", "completion_tok_per_s": round(statistics.median(comp_tok_s[1:] or comp_tok_s), 1), **ctx},
            {"bench": "learner", "metric": "flop_bound_tok_per_s", "value": bound, "unit": "tok/s", "dtype": dtype,
             "matmul_gflops": round(peak / 1e9, 1), "params": n_params, "threads": torch.get_num_threads(), **ctx},
            {"bench": "learner", "metric": "ratio_to_flop_bound", "unit": "x",
             "value": statistics.median(tok_s[1:] or tok_s) / bound, **ctx},
            {"bench": "learner", "metric": "setup_s", "value": setup_s, "unit": "s", **ctx},
            {"bench": "learner", "metric": "checkpoint_s", "value": ckpt_s, "unit": "s", **ctx},
            {"bench": "learner", "metric": "peak_rss", "value": _rss_mb(), "unit": "MB", **ctx},
        ]  # fmt: skip
    return rows
