"""Evaluation metrics: TSE (gopo eq 11), GRE, BLEU, finish and cost rates, and `summarize` for the dashboard.

Pure functions; `sacrebleu` is imported inside `bleu` only. Aggregates over an empty input are NaN, and
`summarize` leaves a key out rather than report a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gopo_online.rewards import esndcg

if TYPE_CHECKING:
    from gopo_online.types import Trajectory

__all__ = ["bleu", "cost_incidence", "cost_rate", "finish_rate", "gre", "summarize", "tse"]

GRE_DIMENSIONS = ("politeness", "product_appropriateness", "action_guidance")
"""GRE's judge dimensions (gopo §4.1.2); the config's `judge.gre_dimensions` has the same default."""


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def tse(completion_turns: Sequence[int | None], weights: Sequence[float], gamma: float) -> float:
    """Task-focused Sequential Engagement (gopo eq 11).

    TSE = Σ_i ω_i I_i γ^(N_i − N_{i−1} − 1), N_0 = 0, with `completion_turns[i]` = N_i (1-based turn) or None.
    Example: N = (1, 3, 4), ω = (0.4, 0.3, 0.3), γ = 0.9 -> 0.4·0.9^0 + 0.3·0.9^1 + 0.3·0.9^0 = 0.97.

    Decisions where the paper is silent:
    - the tasks are sequential, so once a task is incomplete (None) no later task counts (I = 0), even if a
      completion turn was recorded for it;
    - two tasks completed in the same turn cost no delay: the exponent is max(N_i − N_{i−1} − 1, 0), so TSE
      stays within [0, Σ ω];
    - a completion turn earlier than the previous task's is a `ValueError` (the record forbids it too).
    """
    if len(completion_turns) != len(weights):
        raise ValueError(f"tse: {len(completion_turns)} completion turns for {len(weights)} task weights")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"tse: gamma must be in (0, 1], got {gamma}")
    total, prev = 0.0, 0
    for i, (n, w) in enumerate(zip(completion_turns, weights, strict=True), start=1):
        if n is None:
            break  # sequential: task i failed, so tasks i.. contribute I = 0
        if n < 1 or n < prev:
            raise ValueError(f"tse: task {i} completed at turn {n}, before task {i - 1} (turn {prev}) or turn 1")
        total += w * gamma ** max(n - prev - 1, 0)  # gopo eq 11
        prev = n
    return total


def gre(turn_scores: Sequence[Mapping[str, float]], dimensions: Sequence[str] = GRE_DIMENSIONS) -> float:
    """GRE: the judge's mean turn score over `dimensions` (politeness, product appropriateness, action guidance).

    Mean over turns of the mean over dimensions, on the judge's scale ([0, 1] here; the paper reports 1-10).
    A turn missing a dimension is a `KeyError`; callers pass only turns the judge scored. Empty -> NaN.
    """
    per_turn = []
    for j, s in enumerate(turn_scores):
        missing = [d for d in dimensions if d not in s]
        if missing:
            raise KeyError(f"gre: turn {j} has no score for {missing}")
        per_turn.append(_mean([s[d] for d in dimensions]))
    return _mean(per_turn)


def bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 1] through sacrebleu (default 13a tokenisation).

    `refs[i]` is the reference of `hyps[i]`, or a list of references for it (every hyp must then have the
    same number). Empty input -> NaN.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"bleu: {len(hyps)} hypotheses for {len(refs)} references")
    if not hyps:
        return math.nan
    import sacrebleu

    if all(isinstance(r, str) for r in refs):
        streams = [list(refs)]
    else:
        k = {len(r) for r in refs}
        if len(k) != 1:
            raise ValueError(f"bleu: every hypothesis needs the same number of references, got counts {sorted(k)}")
        streams = [[r[j] for r in refs] for j in range(k.pop())]
    return min(max(sacrebleu.corpus_bleu(list(hyps), streams).score / 100.0, 0.0), 1.0)


def finish_rate(finished: Sequence[bool]) -> float:
    """Share of episodes the user ended (stop signal) rather than the turn limit. Empty -> NaN."""
    return _mean([float(bool(f)) for f in finished])


def cost_rate(episode_costs: Sequence[float]) -> float:
    """Mean cost per episode (e.g. vouchers per episode): the J_C the PID-Lagrangian tracks. Empty -> NaN."""
    return _mean(list(episode_costs))


def cost_incidence(episode_costs: Sequence[float]) -> float:
    """Share of episodes with any cost (InteractCS's voucher rate when the cost is a voucher). Empty -> NaN."""
    return _mean([float(c > 0) for c in episode_costs])


def summarize(
    trajectories: Sequence[Trajectory],
    tse_weights: Sequence[float],
    tse_gamma: float,
    gre_dimensions: Sequence[str] = GRE_DIMENSIONS,
) -> dict[str, float]:
    """Namespaced metrics over a batch of trajectories (pass `cfg.rewards.tse_weights`, `cfg.rewards.tse_gamma`).

    `episode/count` and `episode/error_rate` count every trajectory; the rest use the ok ones only.
    TSE uses trajectories with recorded task completion turns (a scenario without TSE tasks has none).
    Turn rewards come from `turn.rewards`; `reward/esndcg` falls back to ESNDCG of the turn's skills when
    rewards were not recorded but a teacher sequence was. Keys whose value cannot be computed are left out.
    """
    ok = [t for t in trajectories if t.status == "ok"]
    turns = [u for t in ok for u in t.turns]
    rewarded = [u.rewards for u in turns if u.rewards is not None]
    esn = [
        u.rewards.r_expert if u.rewards is not None else esndcg(u.expert_skills, u.teacher_skills)
        for u in turns
        if u.rewards is not None or u.teacher_skills
    ]
    judged = [
        u.judge.scores
        for u in turns
        if u.judge is not None and u.judge.ok and all(d in u.judge.scores for d in gre_dimensions)
    ]
    costs = [t.total_cost for t in ok]
    out = {
        "episode/count": float(len(trajectories)),
        "episode/error_rate": _mean([float(t.status == "error") for t in trajectories]),
        "episode/turns": _mean([float(len(t.turns)) for t in ok]),
        "episode/tse": _mean(
            [tse(t.task_completion_turns, tse_weights, tse_gamma) for t in ok if t.task_completion_turns]
        ),
        "episode/satisfaction": _mean([float(t.final_satisfaction) for t in ok if t.final_satisfaction is not None]),
        "episode/finish_rate": finish_rate([t.finished for t in ok]),
        "episode/cost_rate": cost_rate(costs),
        "episode/cost_incidence": cost_incidence(costs),
        "episode/gre": gre(judged, gre_dimensions),
        "episode/compliance": _mean([u.compliance.score for u in turns]),
        "episode/violations_per_turn": _mean([float(u.compliance.violations) for u in turns]),
        "reward/esndcg": _mean(esn),
        "reward/cs": _mean([r.r_cs for r in rewarded]),
        "reward/joint": _mean([r.joint for r in rewarded]),
        "reward/process": _mean([r.process for r in rewarded]),
        "reward/w_expert": _mean([r.w_expert for r in rewarded]),
    }
    return {k: v for k, v in out.items() if not math.isnan(v)}
