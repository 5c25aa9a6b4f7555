"""The learner scores a constrained, tempered completion exactly as the sampler did (issue 9 defects 1 and 6).

Production-shaped rows: completions drawn under the real Expert skill grammar and the CS `ACTION: <tag>` grammar,
at temperature 0.8 / 1.3, with the recorded logprobs the sampler computed (after the mask, after the temperature),
scored by the learner's own path (collate -> left-padded batch -> `trainer.learner.score`) with the real model.
"""

from __future__ import annotations

import os

import pytest
import torch

from gopo_online.types import GrammarRef, Trajectory, Turn, TurnRewards, UserTurnMeta
from trainer.collate import collate
from trainer.synthetic import SKILLS, sample_constrained

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def parts():
    from gopo_online.models import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("default model not prepared (gopo-online model prepare)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.grammar import GrammarMasks

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    return tok, model, GrammarMasks(tok, model.config.vocab_size)


@pytest.fixture(scope="module")
def col(parts):
    return _rows(parts)


def _rows(parts):
    tok, model, masks = parts
    expert = GrammarRef(kind="expert_skills", choices=tuple(SKILLS), max_items=5)
    cs = GrammarRef(kind="cs_action", choices=("chat", "voucher", "refund"))
    turns = []
    for t in (1, 2):
        user = ["Where is my order?", "It arrived broken, I want money back."][t - 1]
        u = {"role": "user", "content": user}
        e_sys = {"role": "system", "content": "Pick skills from: " + ", ".join(SKILLS)}
        c_sys = {"role": "system", "content": "Reply as `ACTION: <tag>` then the reply."}
        eg = sample_constrained(model, tok, masks, [e_sys, u], expert, temperature=1.3, seed=t, max_tokens=24)
        cg = sample_constrained(model, tok, masks, [c_sys, u], cs, temperature=0.8, seed=10 + t, max_tokens=24)
        turns.append(
            Turn(
                index=t, user_utterance=user,
                user_meta=UserTurnMeta(intent="ask", emotion="neutral", satisfaction=3, stop=False),
                expert_skills=("greet",), expert_gen=eg, cs_reply=cg.text or "x", cs_action="chat", cs_gen=cg,
                rewards=TurnRewards(r_expert=0.5, r_cs=0.5, w_expert=0.5, w_cs=0.5, joint=0.5),
            )
        )  # fmt: skip
    traj = Trajectory(episode_id="ep-7-0000001", scenario_id="ecommerce-41", persona_id="p1", turns=tuple(turns))
    col = collate([traj], micro_batch_turns=2, pad_id=tok.pad_token_id or 0)
    for mbs in col.batches.values():
        for mb in mbs:
            mb.allowed, bad = masks.batch_allowed(mb.grammars, mb.completions, mb.n_completion)
            assert bad == 0
    return col


def test_learner_scores_the_masked_tempered_policy_the_sampler_recorded(parts, col):
    """Defect: logp_new was a full-vocabulary log-softmax at T = 1, the recorded one masked and tempered."""
    from trainer.learner import _forward, score
    from trainer.losses import token_logprobs

    _, model, _ = parts
    with torch.no_grad():
        for agent, mbs in col.batches.items():
            for mb in mbs:
                mask = mb.completion_mask
                logp, ent, _ = score(model, mb)
                gap = ((logp - mb.old_logprobs).abs() * mask).max().item()
                assert gap < 2e-3, (agent, gap)  # same weights: the importance ratio is 1 token by token
                # the old scoring (full vocabulary, T = 1) of the same rows is far off: the data exercises both
                old = token_logprobs(_forward(model, mb)[0], mb.targets)
                assert ((old - mb.old_logprobs).abs() * mask).sum().item() > 0.5, agent
                # entropy over what the policy may choose: 0 where the grammar forces the token
                forced = (mb.allowed.sum(-1) == 1) & (mask > 0)
                assert forced.any(), agent
                assert ent[forced].abs().max().item() < 1e-5 and logp[forced].abs().max().item() < 1e-5
                free = (mb.allowed.sum(-1) > 1) & (mask > 0)
                assert (ent[free] > 0).all()


def test_entropy_over_the_allowed_set_has_finite_gradients(parts, col):
    from trainer.learner import score

    _, model, _ = parts
    mb = col.batches["expert"][0]
    model.zero_grad()
    logp, ent, _ = score(model, mb)
    ((ent + logp) * mb.completion_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
