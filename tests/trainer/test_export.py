"""The learner's export writes each agent's adapter ONCE, into the WeightSync layout, and what it wrote is what
`publish` pushes (no copy). A tiny two-adapter PEFT model stands in for the DeepSpeed engine (no DeepSpeed here;
the whole learner runs in test_learner.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Engine:
    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self) -> int:
        return 0


def _two_adapter_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(LlamaForCausalLM(cfg), lora, adapter_name="expert")
    model.add_adapter("cs", lora)
    return model


def test_export_writes_each_adapter_once_into_the_layout(tmp_path) -> None:
    from gopo_online.config import load_config
    from gopo_online.serving.weights import WeightSync
    from trainer.learner import Learner

    cfg = load_config(overrides=[f"run.output_dir='{tmp_path}'", "learner.finetune='lora'"])
    learner = Learner(cfg)
    engine = _Engine(_two_adapter_model())
    learner._engine_of = lambda agent: engine  # type: ignore[method-assign]
    out = learner.export_weights(4)
    root = cfg.run.run_dir / "weights"
    assert out == {a: root / a / "lora-v4" for a in ("expert", "cs")}
    for a, d in out.items():
        names = {p.name for p in d.iterdir() if p.is_file()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and not any(d.glob("*/")), a
    assert sorted(p.name for p in root.iterdir()) == ["cs", "expert"]  # nothing else: no v000004/, no temp folder
    inode = out["cs"].stat().st_ino
    WeightSync.from_config(cfg, servers=[]).publish(4, out)
    assert out["cs"].stat().st_ino == inode  # publish verified the folder, it did not write it again
    assert (root / "versions.json").is_file()
