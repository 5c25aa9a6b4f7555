"""Policy losses of the two GOPO agents: pure torch functions of tensors, shapes in the docstrings.

Notation: B sequences (one per turn of one agent), K completion positions (right-aligned, padded with
`mask == 0`), V vocabulary. Papers: gopo = GOPO (Expert loss eq 7, CS loss eq 9a-9d); step = step-by-step
TOD reward (KL to the reference, eq 5).

Which log π. vLLM applies the grammar mask (expert skills, the CS `ACTION: <tag>` prefix) to the logits, then
the temperature, then samples. The servers run with `--logprobs-mode processed_logprobs`, so a recorded logprob
is log softmax(mask(z) / T)[y]: the log-probability under the policy that actually sampled (T is recorded on the
`Generation`). The learner scores the same quantity: `scored_logits` divides by the recorded temperature and sets
the tokens the grammar forbade to −inf (the admitted sets come from `trainer.grammar`, the same xgrammar
replay vLLM ran). Old and new log π then differ only by the weights, so an importance ratio is a true ratio of
behaviour and current policy, and a grammar-forced position (one admitted token) has log π = 0, no gradient
and no entropy. Entropies, the KL to the reference and the ratios are all taken on this masked, tempered policy.
T = 0 (greedy) counts as T = 1: vLLM's processed logprobs of a greedy request are the untempered ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "CSLoss",
    "ExpertLoss",
    "cs_loss",
    "entropy_from_logits",
    "expert_loss",
    "kl_penalty",
    "masked_sum",
    "scored_logits",
    "token_logprobs",
]


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target_t | ·) per position, computed in fp32.

    logits: (B, K, V), position k predicts `target_ids[:, k]`; target_ids: (B, K) int64 → (B, K) fp32.
    Pass `scored_logits(...)` to score the masked, tempered policy the sampler used (see the module docstring).
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    # log_softmax(z)[y] = z[y] − logsumexp(z): avoids materialising a second (B, K, V) tensor
    return z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def scored_logits(
    logits: torch.Tensor, allowed: torch.Tensor | None = None, temperature: torch.Tensor | None = None
) -> torch.Tensor:
    """The logits of the policy that sampled: fp32 z / T with −inf where the grammar forbade the token.

    logits: (B, K, V); allowed: (B, K, V) bool or None (every token allowed); temperature: (B,) per-row sampling
    temperature or None (T = 1); T <= 0 (greedy) is taken as 1 (see the module docstring) → (B, K, V) fp32.
    Every position must allow at least its target token (padding positions: allow everything).
    """
    z = logits.float()
    if temperature is not None:
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
        z = z / t.view(-1, 1, 1)
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return z


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(π(·|prefix)) = −Σ_w p(w) log p(w) per position (gopo eq 9d's inner sum), over the tokens with a finite
    logit: pass `scored_logits(...)` to get the entropy over what the grammar admitted (0 at a forced position).

    logits: (B, K, V) → (B, K) fp32, in nats.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = F.log_softmax(z, dim=-1)
    # forbidden tokens (−inf) contribute 0; masking logp before the product keeps the gradient finite there
    logp_safe = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -(logp.exp() * logp_safe).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_k x[:, k] · mask[:, k]: (B, K), (B, K) → (B,)."""
    return (x * mask).sum(-1)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL(π ‖ π_ref) estimate, the D_KL of step eq 5, summed over the completion's tokens.

    logp, logp_ref: (B, K) log-probs of the sampled tokens under the policy and the frozen reference;
    mask: (B, K) 1 on completion tokens → (B,).

    Per token the "k3" estimator (Schulman 2020): r = π_ref/π, k3 = r − log r − 1 ≥ 0, unbiased for
    KL(π ‖ π_ref) under samples from π and differentiable. Step eq 5 subtracts β·KL from the reward; we
    add β·KL to the loss instead (as GRPO does), which pulls toward π_ref directly rather than through
    the advantage estimator, and keeps the advantages a pure function of the recorded rewards.
    """
    log_r = (logp_ref - logp).clamp(-20.0, 20.0)  # clamp: one badly scored token must not overflow exp
    k3 = log_r.exp() - log_r - 1.0
    return masked_sum(k3, mask)


class ExpertLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar to minimise: pg − α·entropy (mean over sequences)."""
    pg: torch.Tensor
    """Scalar clipped policy-gradient term."""
    entropy: torch.Tensor
    """Scalar mean per-sequence entropy (nats)."""
    ratio: torch.Tensor
    """(B,) detached macro-action importance ratios."""
    clipped: torch.Tensor
    """Scalar: fraction of sequences whose clipped branch was active."""


def _clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip: −min(ρ Â, clip(ρ, 1−ε, 1+ε) Â) elementwise; returns (loss, ρ, clipped-active flag)."""
    ratio = log_ratio.clamp(-20.0, 20.0).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), ratio, (clipped < unclipped).float()


def expert_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    alpha: float,
    clip_eps: float,
) -> ExpertLoss:
    """Expert loss, gopo eq 7: −E[Â^E log π_E(a^E|s^E)] − α H(π_E), with PPO-clip for off-policy samples.

    logp_new: (B, K) log π_θ of the sampled tokens (with grad); logp_old: (B, K) behaviour log-probs
    (detached); mask: (B, K) 1 on the macro-action's tokens; advantages: (B,) one Â per skill sequence;
    entropy: (B, K) per-position entropies of π_θ.

    A skill sequence is ONE macro action, so its log π is the sum over its tokens and the importance
    ratio is ρ = exp(Σ_k (logp_new − logp_old)); the surrogate is −min(ρ Â, clip(ρ, 1±ε) Â). At ρ = 1
    its gradient is −Â ∇ Σ_k log π, the REINFORCE gradient of eq 7. H(π_E(·|s)) over all sequences is
    intractable; Σ_k H(π(·|s, a_<k)) along the sampled path is its chain-rule estimate
    (E[Σ_k H_k] = H(sequence)); the gradient flows through the per-position entropies only.
    """
    log_ratio = masked_sum(logp_new - logp_old, mask)  # (B,): one macro action, one ratio
    per_seq, ratio, clip_active = _clipped_surrogate(log_ratio, advantages, clip_eps)
    pg = per_seq.mean()
    ent = masked_sum(entropy, mask).mean()
    loss = pg - alpha * ent  # gopo eq 7
    return ExpertLoss(loss, pg, ent, ratio.detach(), clip_active.mean())


class CSLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar to minimise: λp·L_p + λs·L_s + λd·L_d (gopo eq 9a)."""
    pg: torch.Tensor
    """Scalar L_p (eq 9b), clipped surrogate on the reward advantage."""
    skill: torch.Tensor
    """Scalar surrogate of L_s (eq 9c) whose gradient is the REINFORCE gradient of E[d]."""
    entropy: torch.Tensor
    """Scalar mean per-sequence entropy; L_d = −entropy (eq 9d)."""
    ratio: torch.Tensor
    """(B, K) detached per-token importance ratios."""
    clipped: torch.Tensor
    """Scalar: fraction of completion tokens whose clipped branch was active."""


def cs_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    skill_distance: torch.Tensor,
    entropy: torch.Tensor,
    lambda_p: float,
    lambda_s: float,
    lambda_d: float,
    clip_eps: float,
) -> CSLoss:
    """Customer-service loss, gopo eq 9a-9d, with per-token PPO-clip for off-policy samples.

    logp_new: (B, K) with grad; logp_old: (B, K) behaviour log-probs; mask: (B, K) 1 on reply tokens;
    advantages: (B,) the reply's advantage on R^A (eq 9b; R^A minus a group baseline, optionally minus
    the cost penalty λ·c); skill_distance: (B,) d(a^A, a^E) CENTRED by the caller (d − baseline), 0 where
    unknown; entropy: (B, K) per-position entropies.

    eq 9b  L_p = −E[R^A log π_A]: per token −min(ρ_k Â, clip(ρ_k) Â), summed over the reply (at ρ = 1 this
           is −Â Σ_k log π, REINFORCE on the whole reply), mean over replies.
    eq 9c  L_s = d(a^A, a^E): the reply is sampled text, so d is NOT differentiable in θ. Its gradient is
           taken by the score function, ∇ E[d] = E[(d − b) ∇ log π_A]: d enters as a REINFORCE penalty, the
           clipped surrogate of advantage −(d − b) on the reply's tokens, whose gradient at ρ = 1 is exactly
           (d − b) Σ_k ∇ log π. Its VALUE is (d − b)·Σ_k ρ_k, not d: report d itself from the data.
    eq 9d  L_d = −Σ_k Σ_w p log p = −H, summed over the reply's positions.
    """
    log_ratio = logp_new - logp_old  # (B, K): token-level actions
    per_tok, ratio, clip_active = _clipped_surrogate(log_ratio, advantages.unsqueeze(-1), clip_eps)
    pg = masked_sum(per_tok, mask).mean()  # eq 9b
    # eq 9c as a REINFORCE penalty: the centred distance is a negative advantage, clipped like the PG term
    per_tok_s, _, _ = _clipped_surrogate(log_ratio, -skill_distance.unsqueeze(-1), clip_eps)
    skill = masked_sum(per_tok_s, mask).mean()
    ent = masked_sum(entropy, mask).mean()
    loss = lambda_p * pg + lambda_s * skill - lambda_d * ent  # eq 9a with L_d = −H (eq 9d)
    n_tok = mask.sum().clamp_min(1.0)
    return CSLoss(loss, pg, skill, ent, ratio.detach(), (clip_active * mask).sum() / n_tok)
