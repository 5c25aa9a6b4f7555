"""Weight-push benchmark (`gopo-online bench --only push`) and its test stand-ins: a random LoRA adapter, a
full-weights source, a greedy probe. Nothing here is on the training loop's path; the push itself is
`gopo_online.serving.weights.WeightSync`."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gopo_online.serving.weights import FullReloadTransport, LoRATransport, WeightSync

MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""Copied next to full weights so the folder is a loadable HF model on its own (vLLM's reload reads only
*.safetensors; the rest keeps the folder usable for restarts and offline evaluation)."""


def full_weights_writer(state_dict: Any, base_model_path: Path | str, version: int = 0) -> Callable[[Path], None]:
    """A `WeightSync.write` source for the full transport: `state_dict` as model.safetensors + the base's config."""

    def write(dest: Path) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt", "gopo_version": str(version)})
        for name in MODEL_SIDE_FILES:
            src = Path(base_model_path) / name
            if src.is_file():
                shutil.copy2(src, dest / name)

    return write


def single_sync(
    kind: str, root: Path | str, servers: list[str], *, served_name: str = "policy", adapter_name: str | None = None
) -> WeightSync:
    """A one-agent `WeightSync` ("policy") over `kind`'s transport: the benchmark's and the tests' push."""
    if kind == "full":
        transport: Any = FullReloadTransport(served_name=served_name)
    elif kind == "lora":
        transport = LoRATransport(served_name=served_name, adapter_name=adapter_name)
    else:
        raise ValueError(f"unknown weight transport {kind!r} (full | lora)")
    return WeightSync(root, {"policy": transport}, servers)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def bench_weight_push(
    model_path: Path | str | None = None,
    transports: tuple[str, ...] = ("full", "lora"),
    repeats: int = 5,
    *,
    lora_rank: int = 8,
    workdir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Start one vLLM server per transport (one at a time), publish `repeats` new versions, report latency.

    Each version has genuinely new weights (full: every tensor scaled by a version-dependent factor; LoRA: a
    fresh random adapter), so nothing is cached. Returns one dict per transport with median / p90 of
    write_s, push_s and their total, in seconds.
    """
    from gopo_online.serving.process import VLLMServer

    if model_path is None:
        from gopo_online.models import default_model_dir

        model_path = default_model_dir()
    model_path = Path(model_path)
    rows: list[dict[str, Any]] = []
    root_tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gopo-bench-push-"))
    try:
        for kind in transports:
            lora = kind == "lora"
            with VLLMServer(
                model_path,
                dev_mode=not lora,
                enable_lora=lora,
                max_lora_rank=max(16, lora_rank),
                log_path=root_tmp / f"vllm-{kind}.log",
            ) as server:
                t_start = time.perf_counter()
                sync = single_sync(kind, root_tmp / kind, [server.root_url])
                log(f"[bench] {kind}: server up ({time.perf_counter() - t_start:.1f}s)")
                sources = (
                    _full_sources(model_path)
                    if not lora
                    else _lora_sources(model_path, root_tmp / "adapters", lora_rank)
                )
                results = []
                for v in range(1, repeats + 1):
                    r = sync.publish(v, {"policy": next(sources)})
                    assert r is not None
                    results.append(r)
                    log(f"[bench] {kind} v{v}: write {r.write_s:.3f}s push {r.push_s:.3f}s")
                    probe(server.base_url, r.served_models["policy"])  # the pushed weights serve requests
            w = [r.write_s for r in results]
            p = [r.push_s for r in results]
            t = [a + b for a, b in zip(w, p, strict=True)]
            rows.append(
                {
                    "transport": kind,
                    "repeats": repeats,
                    "write_s_median": statistics.median(w),
                    "write_s_p90": _pct(w, 0.9),
                    "push_s_median": statistics.median(p),
                    "push_s_p90": _pct(p, 0.9),
                    "total_s_median": statistics.median(t),
                    "total_s_p90": _pct(t, 0.9),
                    "push_s_all": p,
                    "write_s_all": w,
                }
            )
    finally:
        if workdir is None:
            shutil.rmtree(root_tmp, ignore_errors=True)
    return rows


def _full_sources(model_path: Path) -> Iterator[Callable[[Path], None]]:
    from safetensors.torch import load_file

    base = {}
    for f in sorted(model_path.glob("*.safetensors")):
        base.update(load_file(str(f)))
    v = 0
    while True:
        v += 1
        scale = 1.0 + 1e-3 * v
        yield full_weights_writer(
            {k: t * scale if t.is_floating_point() else t for k, t in base.items()}, model_path, v
        )


def _lora_sources(model_path: Path, out: Path, rank: int) -> Iterator[Path]:
    v = 0
    while True:
        v += 1
        yield make_random_lora_adapter(model_path, out / f"a{v}", rank=rank, seed=v)


def make_random_lora_adapter(
    model_path: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    seed: int = 0,
    alpha: float | None = None,
    b_std: float = 0.05,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a PEFT LoRA adapter with random, NONZERO B (a zero B would leave the output unchanged).

    For tests and benchmarks: a stand-in for a trained adapter.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def probe(
    base_url: str, model: str, prompt: str = "The capital of France is", max_tokens: int = 8, timeout_s: float = 120.0
) -> dict[str, Any]:
    """One greedy completion: returns text, token ids and logprobs (a fingerprint of the served weights)."""
    import httpx

    r = httpx.post(
        f"{base_url.rstrip('/')}/completions",
        timeout=timeout_s,
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": 1,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"text": c["text"], "token_ids": c.get("token_ids"), "logprobs": c["logprobs"]["token_logprobs"]}
