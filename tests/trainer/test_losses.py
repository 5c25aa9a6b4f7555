"""Loss math with hand-derived numbers (torchtune test_ppo_loss style): the working is in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import cs_loss, entropy_from_logits, expert_loss, kl_penalty, token_logprobs

torch.set_num_threads(1)


def test_token_logprobs_matches_log_softmax_and_raw_definition():
    # logits [0, ln 3] -> p = [1/4, 3/4]; target 1 -> log(3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))
    # temperature 2: logits/2 = [0, ln √3] -> p1 = √3 / (1 + √3)
    lp2 = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0)
    assert lp2.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    # bf16 logits are scored in fp32
    assert token_logprobs(logits.bfloat16(), torch.tensor([[1]])).dtype == torch.float32


def test_entropy_uniform_and_peaked():
    # uniform over 4 -> ln 4; one-hot-ish -> ~0
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])).item() == pytest.approx(0.0, abs=1e-6)


def _seq(vals):
    return torch.tensor([vals], dtype=torch.float32)


def test_expert_ratio_one_is_vanilla_pg():
    # logp_new = logp_old -> ρ = 1, no clipping: pg = −Â Σ log π... as a value −ρ Â = −Â;
    # its gradient is −Â ∇ Σ_k log π_k, i.e. −Â per token of the macro action (masked tokens get 0).
    logp = _seq([-1.0, -2.0, -0.5]).requires_grad_()
    mask = _seq([0.0, 1.0, 1.0])
    adv = torch.tensor([2.0])
    res = expert_loss(logp, logp.detach(), mask, adv, torch.zeros(1, 3), alpha=0.0, clip_eps=0.2)
    assert res.loss.item() == pytest.approx(-2.0)
    assert res.ratio.item() == pytest.approx(1.0)
    res.loss.backward()
    assert logp.grad.tolist() == [[0.0, -2.0, -2.0]]


def test_expert_ratio_is_macro_action_sum_and_clips():
    # Σ_k (new − old) over the 2 masked tokens = 0.3 + 0.2 = 0.5 -> ρ = e^0.5 ≈ 1.6487 > 1 + ε = 1.2
    new = _seq([-1.0, -0.7, -0.8]).requires_grad_()
    old = _seq([-9.0, -1.0, -1.0])  # position 0 is masked: its huge gap must not count
    mask = _seq([0.0, 1.0, 1.0])
    # Â = +1: min(1.6487, 1.2) = 1.2 -> loss −1.2, clipped branch active, zero gradient
    res = expert_loss(new, old, mask, torch.tensor([1.0]), torch.zeros(1, 3), 0.0, 0.2)
    assert res.ratio.item() == pytest.approx(math.exp(0.5))
    assert res.loss.item() == pytest.approx(-1.2)
    assert res.clipped.item() == 1.0
    res.loss.backward()
    assert torch.all(new.grad == 0)
    # Â = −1: min(−1.6487, −1.2) = −1.6487 -> loss +1.6487, unclipped (pessimistic bound keeps the gradient)
    new.grad = None
    res = expert_loss(new, old, mask, torch.tensor([-1.0]), torch.zeros(1, 3), 0.0, 0.2)
    assert res.loss.item() == pytest.approx(math.exp(0.5))
    assert res.clipped.item() == 0.0
    res.loss.backward()
    # d/dlogp_k of ρ·1 = ρ on each masked token
    assert new.grad[0, 1].item() == pytest.approx(math.exp(0.5))


def test_expert_entropy_sign():
    # loss = pg − α Σ_k H_k: entropies 1.5 and 0.5 on masked tokens, α = 0.1 -> −0.2 with zero advantage
    logp = _seq([-1.0, -1.0])
    res = expert_loss(logp, logp, _seq([1.0, 1.0]), torch.tensor([0.0]), _seq([1.5, 0.5]), 0.1, 0.2)
    assert res.entropy.item() == pytest.approx(2.0)
    assert res.loss.item() == pytest.approx(-0.2)


def test_positive_advantage_raises_logprob_after_one_sgd_step():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 4, 2]])
    mask = torch.ones(1, 3)
    opt = torch.optim.SGD([logits], lr=0.5)
    before = token_logprobs(logits, targets).sum().item()
    lp = token_logprobs(logits, targets)
    res = expert_loss(lp, lp.detach(), mask, torch.tensor([1.0]), entropy_from_logits(logits), 0.0, 0.2)
    res.loss.backward()
    opt.step()
    assert token_logprobs(logits, targets).sum().item() > before
    # and a negative advantage lowers it
    logits2 = logits.detach().clone().requires_grad_()
    before2 = token_logprobs(logits2, targets).sum().item()
    lp2 = token_logprobs(logits2, targets)
    cs = cs_loss(lp2, lp2.detach(), mask, torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1, 3), 1.0, 0.0, 0.0, 0.2)
    cs.loss.backward()
    torch.optim.SGD([logits2], lr=0.5).step()
    assert token_logprobs(logits2, targets).sum().item() < before2


def test_cs_loss_terms_by_hand():
    # two replies, ratio 1 everywhere. Reply 0: 2 tokens, Â = 1; reply 1: 1 token, Â = −0.5.
    # L_p per reply = −Â Σ_k ρ_k: reply0 −2, reply1 +0.5 -> mean −0.75
    # skill (centred d = [0.2, −0.2]) = Σ_k d ρ_k: 0.4, −0.2 -> mean 0.1
    # entropy Σ_k H: reply0 1 + 1 = 2, reply1 3 -> mean 2.5
    # loss = λp·(−0.75) + λs·0.1 − λd·2.5 with (1, 0.5, 0.1): −0.75 + 0.05 − 0.25 = −0.95
    logp = torch.tensor([[-1.0, -2.0], [0.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ent = torch.tensor([[1.0, 1.0], [9.0, 3.0]])
    res = cs_loss(
        logp, logp.detach(), mask, torch.tensor([1.0, -0.5]), torch.tensor([0.2, -0.2]), ent, 1.0, 0.5, 0.1, 0.2
    )
    assert res.pg.item() == pytest.approx(-0.75)
    assert res.skill.item() == pytest.approx(0.1)
    assert res.entropy.item() == pytest.approx(2.5)
    assert res.loss.item() == pytest.approx(-0.95)
    # gradient on a token: (λp·(−Â) + λs·d)/B: reply0 (−1 + 0.1)/2 = −0.45; reply1 (0.5 − 0.1)/2 = 0.2
    res.loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.45)
    assert logp.grad[1, 1].item() == pytest.approx(0.2)
    assert logp.grad[1, 0].item() == 0.0


def test_skill_distance_penalty_lowers_logprob_of_distant_reply():
    # zero reward advantage, a reply farther from the skills than the baseline (d − b > 0): REINFORCE pushes it down
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    targets = torch.tensor([[0, 1]])
    mask = torch.ones(1, 2)
    lp = token_logprobs(logits, targets)
    res = cs_loss(lp, lp.detach(), mask, torch.zeros(1), torch.tensor([0.5]), torch.zeros(1, 2), 1.0, 1.0, 0.0, 0.2)
    res.loss.backward()
    torch.optim.SGD([logits], lr=1.0).step()
    assert token_logprobs(logits, targets).sum().item() < lp.sum().item()


def test_kl_k3_by_hand():
    # log r = ref − new = ln 2 -> k3 = 2 − ln 2 − 1 = 1 − ln 2 ≈ 0.3069; equal log-probs -> 0; masked positions ignored
    new = torch.tensor([[-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.0 + math.log(2.0), -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert kl_penalty(new, ref, mask).item() == pytest.approx(1 - math.log(2))
    assert kl_penalty(new, new, mask).item() == 0.0
    # the KL's gradient pulls logp toward the reference: d k3/d new = 1 − r = 1 − 2 = −1 < 0 -> raising new lowers it
    new = new.clone().requires_grad_()
    kl_penalty(new, ref, mask).sum().backward()
    assert new.grad[0, 0].item() == pytest.approx(-1.0)
