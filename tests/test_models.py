"""Model provisioning: the prepared default model answers a chat prompt through transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gopo_online.config import ModelConfig
from gopo_online.models import ModelError, is_prepared, prepare_default_model, resolve_model_path


def test_missing_configured_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        resolve_model_path(ModelConfig(path=tmp_path / "nope"))


def test_unprepared_default_model_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOPO_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="gopo-online model prepare"):
        resolve_model_path(ModelConfig())


@pytest.mark.slow
def test_prepared_model_answers_a_chat_prompt() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_default_model()  # idempotent: returns the cached folder
    assert is_prepared(path)
    assert resolve_model_path(ModelConfig()) == path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # ChatML: the prompt ends by opening the assistant turn.
    assert tok.decode(ids["input_ids"][0]).rstrip().endswith("<|im_start|>assistant")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in reply.lower(), reply


def test_tiny_model_is_the_default_architecture_cut_down_and_built_once(tiny_model: str) -> None:
    import json

    from gopo_online.models import TINY_SHAPE, default_model_dir, prepare_tiny_model

    tiny, base = Path(tiny_model), default_model_dir()
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (tiny, base))
    assert {k: cfg[k] for k in TINY_SHAPE} == TINY_SHAPE
    for key in ("architectures", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == base_cfg[key], key
    assert (tiny / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert (tiny / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    assert prepare_tiny_model() == tiny and (tiny / "model.safetensors").stat().st_mtime_ns == stamp  # cached
