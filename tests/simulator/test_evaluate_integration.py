"""A tiny real `eval`: adapters written by the real learner's export into a run folder, one real vLLM server serving
them next to the base model, the real simulator and judge, 2 held-out personas x 1 turn per arm. No mocks. The
model is the default architecture with 6.6 M random parameters (the `tiny_model` fixture): what is tested is the
loading of a trained run, the pairing and the report, not what a model writes (with the 135M model: ~3 min of a
2-core box)."""

from __future__ import annotations

import json
import os

import pytest

from gopo_online.config import load_config
from gopo_online.types import Trajectory

pytestmark = pytest.mark.integration
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cfg(tmp_path, model, *extra):
    return load_config(
        overrides=[
            f"model.path={json.dumps(model)}",
            f"run.output_dir='{tmp_path}'",
            "run.name='trained'",
            "run.resume=false",
            "simulator.max_turns=1",
            "simulator.json_retries=1",
            "agents.cs.max_tokens=48",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    """A run folder whose version-1 adapters come from `Learner.export_weights`, with B moved off zero so the
    adapters are not the identity (a fresh LoRA adapter equals the base model)."""
    import torch

    from trainer.learner import Learner

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("runs")
    cfg = _cfg(tmp, tiny_model)
    learner = Learner(cfg)
    learner.setup()
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in learner.engines["lora"].module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        learner.export_weights(1)
    finally:
        learner.cleanup()
    return cfg, cfg.run.run_dir


def test_eval_against_base_is_paired_and_reported(trained_run, tmp_path):
    from simulator.evaluate import METRICS, main

    cfg, run_dir = trained_run
    assert (run_dir / "weights" / "expert" / "lora-v1" / "adapter_model.safetensors").is_file()
    out = tmp_path / "eval"
    report = main(cfg, run=run_dir, against="base", n_personas=2, seed=3, out=out, concurrency=4, max_turns=1,
                  resamples=200)  # fmt: skip

    for name in ("report.json", "report.png", "trajectories.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["overall"] == json.loads(json.dumps(report["overall"]))
    assert set(on_disk["overall"]) == set(METRICS)
    assert on_disk["arms"]["a"]["label"] == "trained@v1" and on_disk["arms"]["b"]["label"] == "base"
    assert on_disk["setup"]["split"] == "heldout" and on_disk["pairs_total"] == 2

    trajs = {t.episode_id: t for t in map(Trajectory.from_json, (out / "trajectories.jsonl").read_text().splitlines())}
    assert len(trajs) == 4
    from simulator.personas import load_personas

    heldout = {p.id for p in load_personas(split="heldout")}
    both_ok = 0
    for row in on_disk["pairs"]:
        ta, tb = trajs[row["arms"]["a"]["episode_id"]], trajs[row["arms"]["b"]["episode_id"]]
        # the pairing: same persona, scenario instance and simulator seed in both arms, held-out personas only
        assert ta.persona_id == tb.persona_id == row["persona_id"] and row["persona_id"] in heldout
        assert ta.scenario_id == tb.scenario_id == row["scenario_id"]
        assert ta.seed == tb.seed == row["seed"]
        assert all(t.error for t in (ta, tb) if t.status == "error")
        both_ok += ta.status == tb.status == "ok"
        # both arms on one server under different names: the run's LoRA adapters vs the base model
        for u in ta.turns:
            assert (u.expert_gen.model, u.cs_gen.model) == ("a-expert-v1", "a-cs-v1")
            assert u.expert_gen.policy_version == u.cs_gen.policy_version == 1
        for u in tb.turns:
            assert (u.expert_gen.model, u.cs_gen.model) == (cfg.model.served_name, cfg.model.served_name)
            assert u.expert_gen.policy_version == 0
        # the configured simulated user (simulator.mode auto -> agenda here), as in training: eval played the LLM
        # role-play whatever the mode said, so its users were not the ones the policy was trained against
        assert all(u.user_meta.state is not None for t in (ta, tb) for u in t.turns), "not the agenda user model"
    assert any(t.status == "ok" for t in trajs.values()), [t.error for t in trajs.values()]
    # a metric that every complete pair has counts exactly those pairs
    assert on_disk["overall"]["finish_rate"]["n"] == both_ok
    for m in METRICS:
        s = on_disk["overall"][m]
        if s["n"]:
            assert s["ci_low"] - 1e-9 <= s["diff"] <= s["ci_high"] + 1e-9, m
