"""Real DeepSpeed steps with synthetic trajectories on the default architecture with 6.6 M random parameters (the
`tiny_model` fixture; the default tokenizer and chat template): the learner's machinery, ~20x cheaper per token
than the 135M model (these tests took ~2 min of a 2-core box with it)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from trainer.synthetic import make_trajectory

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _cfg(tmp_path, *extra):
    from gopo_online.config import load_config
    from gopo_online.models import tiny_model_dir

    return load_config(
        overrides=[
            f"model.path={json.dumps(str(tiny_model_dir()))}",  # built by the `tiny_model` fixture (via `tok`)
            f"run.output_dir='{tmp_path}'",
            "learner.finetune='lora'",
            "learner.micro_batch_turns=4",
            "learner.checkpoint_every=100",
            "learner.lr=1e-3",  # large enough that bf16 adapters visibly move in one step
            *extra,
        ]
    )


def _batch(tok, version, seed):
    return [make_trajectory(tok, i, 2, version=version, seed=seed) for i in range(2)]


def _lora(learner):
    return {n: p.detach().float().clone() for n, p in learner.engines["lora"].module.named_parameters() if "lora_" in n}


def _opt_state(learner):
    opt = learner.engines["lora"].optimizer
    inner = getattr(opt, "optimizer", opt)
    return {k: v.clone() for s in inner.state.values() for k, v in s.items() if torch.is_tensor(v) and v.numel() > 1}


def test_lora_zero0_two_steps_checkpoint_and_resume(tok, tmp_path):
    from trainer.learner import Learner

    pushed = []
    cfg = _cfg(tmp_path, "run.resume=false", "learner.zero_stage=0")
    learner = Learner(cfg, publish=lambda v, e: pushed.append((v, e)))
    learner.setup()
    try:
        assert pushed[0][0] == 0 and (pushed[0][1]["expert"] / "adapter_model.safetensors").is_file()
        before = _lora(learner)
        batch1 = _batch(tok, 0, seed=1)
        m1 = learner.step(batch1)
        assert all(torch.isfinite(torch.tensor(v)) for v in m1.values())
        assert m1["learner/rows_expert"] == 4 and m1["learner/rows_cs"] == 4
        # the trained-token counts are the batch's own token ids (padding excluded), the rates per second of the step
        for agent, attr in (("expert", "expert_gen"), ("cs", "cs_gen")):
            gens = [getattr(t, attr) for tr in batch1 for t in tr.turns]
            assert m1[f"learner/completion_tokens_{agent}"] == sum(len(g.completion_token_ids) for g in gens)
            assert m1[f"learner/tokens_{agent}"] == sum(len(g.prompt_token_ids) + len(g.completion_token_ids)
                                                        for g in gens)  # fmt: skip
        n_comp = m1["learner/completion_tokens_expert"] + m1["learner/completion_tokens_cs"]
        assert m1["sys/trained_completion_tok_per_s"] == pytest.approx(n_comp / m1["sys/step_time_s"], rel=0.05)
        assert m1["sys/trained_tok_per_s"] > m1["sys/trained_completion_tok_per_s"] > 0
        after = _lora(learner)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert any(".expert." in n for n in changed) and any(".cs." in n for n in changed)
        assert learner.version == 1 and pushed[-1][0] == 1  # push_every = 1
        ckpt = learner.save_checkpoint()
        assert (ckpt / "learner_state.json").is_file() and (ckpt.parent / "latest").read_text() == ckpt.name
        batch2 = _batch(tok, 1, seed=2)
        m2 = learner.step(batch2)
        w2 = _lora(learner)
    finally:
        learner.cleanup()

    # resume from the checkpoint (taken after step 1) and redo step 2: same losses, same weights
    cfg2 = _cfg(tmp_path, "run.resume=true", "learner.zero_stage=0")
    resumed = Learner(cfg2)
    resumed.setup()
    try:
        assert resumed.global_step == 1 and resumed.version == 1
        assert list(resumed.consumed) == ["ep0", "ep1"]  # step 1's batch: not trained again if redelivered
        assert json.loads((ckpt / "learner_state.json").read_text())["global_step"] == 1
        for n, p in _lora(resumed).items():
            assert torch.equal(p, after[n]), n
        assert _opt_state(resumed)  # Adam moments came back
        m2r = resumed.step(batch2)
        for k in ("loss/expert", "loss/cs", "loss/kl"):
            assert m2r[k] == pytest.approx(m2[k], rel=1e-3, abs=1e-5), k
        for n, p in _lora(resumed).items():
            assert torch.allclose(p, w2[n], atol=1e-3), n
        assert resumed.global_step == 2 and resumed.version == 2
    finally:
        resumed.cleanup()


def test_lora_zero2_gae_step_and_stale_drop(tok, tmp_path):
    from trainer.learner import Learner

    cfg = _cfg(
        tmp_path, "run.resume=false", "learner.zero_stage=2", "learner.advantage='gae'", "learner.max_staleness=0"
    )
    learner = Learner(cfg)
    learner.setup()
    try:
        before = _lora(learner)
        m = learner.step(_batch(tok, 0, seed=3))
        assert "loss/critic" in m and all(torch.isfinite(torch.tensor(v)) for v in m.values())
        assert any(not torch.equal(before[n], p) for n, p in _lora(learner).items())
        # now at version 1 with max_staleness 0: a version-0 episode is dropped and counted
        m = learner.step(_batch(tok, 0, seed=4)[:1] + _batch(tok, 1, seed=4)[1:])
        assert m["learner/dropped_stale"] == 1 and m["learner/episodes"] == 1
        assert torch.isfinite(torch.tensor(m["loss/expert"]))
    finally:
        learner.cleanup()


def test_main_loop_with_injected_parts(tok, tmp_path):
    from trainer.learner import main

    cfg = _cfg(tmp_path, "run.resume=false", "run.max_steps=1", "learner.checkpoint_every=100")
    published, announced, seen = [], [], []
    batches = iter([[make_trajectory(tok, 0, 1, version=0, seed=5)]] * 3)
    assert (
        main(
            cfg,
            source=batches,
            publish=lambda v, e: published.append(v),
            announce=lambda v, e: announced.append((v, sorted(e))),
            on_metrics=seen.append,
        )
        == 0
    )
    assert len(seen) == 1  # max_steps = 1 stopped the loop
    assert published == [0, 1] and announced == [(0, ["cs", "expert"]), (1, ["cs", "expert"])]
    run_dir = cfg.run.run_dir
    assert (run_dir / "learner_metrics.jsonl").read_text().count("\n") == 1
    from gopo_online.trajectory_store import read_records

    assert [(r["episode_id"], r["outcome"]) for r in read_records(run_dir)] == [("ep0", "trained")]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000001"  # written on the way out


def _production_batch(tok, version, seed, n=2):
    """Unique scenario instance ids and seeds, grammar-constrained completions, CS sampled at T = 0.8."""
    out = []
    for i in range(n):
        t = make_trajectory(tok, 10 * seed + i, 2, version=version, seed=seed, grammar=True)
        out.append(t.model_copy(update={"scenario_id": f"ecommerce-{seed}{i:03d}", "seed": 1000 * seed + i}))
    return out


def test_push_every_two_grammar_masks_and_future_versions(tok, tmp_path):
    """Defects 9.1 / 9.6 on the real DeepSpeed step: push_every = 2 crashed at the second step (`mb.versions ==
    None`); a trajectory from a future policy version was trained on; the masks and the per-agent metrics."""
    from trainer.learner import Learner

    pushed = []
    cfg = _cfg(tmp_path, "run.resume=false", "learner.push_every=2", "learner.zero_stage=0")
    learner = Learner(cfg, publish=lambda v, e: pushed.append(v))
    learner.setup()
    try:
        m1 = learner.step(_production_batch(tok, 0, seed=1))
        m2 = learner.step(_production_batch(tok, 0, seed=2))  # one step after the push: crashed before
        assert learner.version == 1 and pushed == [0, 1]
        for m in (m1, m2):
            assert all(math.isfinite(v) for v in m.values())
            for a in ("expert", "cs"):
                assert m[f"learner/grammar_mismatch_{a}"] == 0 and m[f"learner/forced_frac_{a}"] > 0
                for key in ("ratio", "ratio_max", "clip_frac", "logprob_gap", "kl_beta"):
                    assert f"learner/{key}_{a}" in m, key
                assert f"loss/{a}_entropy" in m and f"loss/kl_{a}" in m
        assert m1["learner/ratio_max_cs"] == pytest.approx(1.0)  # right after the push: on-policy, ratio 1
        # a version-5 episode while the learner is at version 1: rejected and counted, not trained on
        m3 = learner.step(_production_batch(tok, 5, seed=3)[:1] + _production_batch(tok, 1, seed=4)[:1])
        assert m3["learner/dropped_future"] == 1 and m3["learner/dropped_future_total"] == 1
        assert m3["learner/episodes"] == 1 and m3["learner/rows_expert"] == 2
    finally:
        learner.cleanup()
