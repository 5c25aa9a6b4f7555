"""Reward and advantage math: pure functions of floats and arrays, each tagged with its paper equation.

Papers (DESIGN §3): gopo = GOPO (ESNDCG eq 2-6, judge reward eq 8, joint reward eq 10);
interactcs = InteractCS-RL (hybrid advantage eq 5, process reward eq 6, PID-Lagrangian eq 7-8);
step = step-by-step TOD reward (understanding / generation / TOD rewards eq 2-4, KL shaping eq 5-7).

Nothing here imports torch: the learner turns these numbers into tensors in its collate step.
The only state lives in two small controllers (`AdaptiveKLController`, `PIDLagrangian`), each with a
`state_dict()` / `load_state_dict()` pair so a resumed run continues where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from gopo_online.types import MAX_SKILLS, TurnRewards

__all__ = [
    "AdaptiveKLController",
    "GAEResult",
    "JointSchedule",
    "PIDLagrangian",
    "RewardBreakdown",
    "discounted_returns",
    "esndcg",
    "expert_weight",
    "gae",
    "generation_reward",
    "grpo_advantages",
    "hybrid_advantages",
    "joint_reward",
    "joint_weights",
    "kl_shaped_reward",
    "process_reward",
    "tod_reward",
    "understanding_reward",
    "weighted_judge_reward",
]

PRINCIPLE_LEVELS = (0.0, 0.5, 1.0)
"""InteractCS eq 6: violation, partial adherence, full compliance."""


# ---------------------------------------------------------------------------------------------------------------------
# Expert reward: ESNDCG (gopo eq 2-6)
# ---------------------------------------------------------------------------------------------------------------------


def _dedupe(seq: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in seq:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _dcg(seq: Sequence[str], rel: Mapping[str, int]) -> float:
    # gopo eq 3: DCG(P) = Σ_i (2^Rel(p_i) − 1) / log2(i + 1), i 1-based.
    # A repeated skill keeps its slot but gains nothing: it counts once, at its first occurrence.
    seen: set[str] = set()
    total = 0.0
    for i, s in enumerate(seq, start=1):
        if s not in seen:
            seen.add(s)
            total += (2.0 ** rel.get(s, 0) - 1.0) / math.log2(i + 1)
    return total


def esndcg(predicted: Sequence[str], teacher: Sequence[str]) -> float:
    """Expert reward R^E_t = ESNDCG(P, T) in [0, 1] (gopo eq 2-6).

    Both sequences are capped at `MAX_SKILLS` (5): the first 5 are kept (gopo §3.3). A skill repeated in
    `predicted` counts once, at its first occurrence; the repeat keeps its slot (later skills stay where
    the agent put them) and adds 0, so a repeat never raises the score and the result never exceeds 1.
    Repeats in `teacher` are dropped before n = len(T) is taken (the grammar and the Turn record forbid them).

    Empty cases (the paper leaves them undefined):
    - empty teacher: nothing to match, IDCG = 0 -> 1.0 when `predicted` is empty too, else 0.0;
    - empty predicted, non-empty teacher: 0.0.
    """
    T = _dedupe(teacher)[:MAX_SKILLS]
    P = list(predicted)[:MAX_SKILLS]
    if not T:
        return 1.0 if not P else 0.0
    n = len(T)
    # gopo eq 2: Rel(s) = n − index(s in T) + 1 (1-based index) if s ∈ T, else 0
    rel = {s: n - j + 1 for j, s in enumerate(T, start=1)}
    idcg = _dcg(T, rel)  # gopo eq 4: IDCG(T) = DCG of the teacher sequence itself
    score = _dcg(P, rel) / idcg  # gopo eq 5-6
    # distinct gains in P are bounded by IDCG (rearrangement inequality); clip only float noise
    return min(max(score, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Judge reward (gopo eq 8) and process reward (InteractCS eq 6)
# ---------------------------------------------------------------------------------------------------------------------


def _normalised(weights: Mapping[str, float], what: str) -> dict[str, float]:
    if not weights:
        raise ValueError(f"{what}: no weights given")
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0.0)}
    if bad:
        raise ValueError(f"{what}: weights must be finite and >= 0, got {bad}")
    total = sum(weights.values())
    if total <= 0.0:
        raise ValueError(f"{what}: weights sum to 0")
    return {k: w / total for k, w in weights.items()}


def _missing(scores: Mapping[str, float], weights: Mapping[str, float], what: str) -> None:
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise KeyError(f"{what}: no score for dimension(s) {missing}; scored: {sorted(scores)}")


def weighted_judge_reward(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """CS reward R^A_t = Σ_i α_i S_i with α normalised to sum 1 (gopo eq 8).

    `weights` names the rubric dimensions used; `scores` must hold every one of them (a `KeyError` names the
    missing ones) and may hold more (e.g. GRE dimensions), which are ignored. With scores in [0, 1] the
    result is in [0, 1].
    """
    alpha = _normalised(weights, "weighted_judge_reward")
    _missing(scores, alpha, "weighted_judge_reward")
    return float(sum(a * scores[k] for k, a in alpha.items()))  # gopo eq 8


def process_reward(principles: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Turn-level process reward R^p_{i,t} = Σ_k w_k s_k, s_k ∈ {0, 0.5, 1} (InteractCS eq 6).

    Weights are normalised to sum 1 so the reward stays in [0, 1] whatever scale the config uses.
    A principle missing from `principles` is a `KeyError`; a score outside {0, 0.5, 1} a `ValueError`.
    """
    w = _normalised(weights, "process_reward")
    _missing(principles, w, "process_reward")
    bad = {k: principles[k] for k in w if principles[k] not in PRINCIPLE_LEVELS}
    if bad:
        raise ValueError(f"process_reward: principle scores must be 0, 0.5 or 1 (InteractCS eq 6), got {bad}")
    return float(sum(wk * principles[k] for k, wk in w.items()))


# ---------------------------------------------------------------------------------------------------------------------
# Joint reward (gopo eq 10)
# ---------------------------------------------------------------------------------------------------------------------

EXPONENTIAL_RATE = 3.0
"""κ of the exponential w^E ramp: progress p ∈ [0, 1] maps to (e^{κp} − 1)/(e^κ − 1)."""


@dataclass(frozen=True)
class JointSchedule:
    """The w^E_t / w^A_t schedule of gopo eq 10 (the `rewards.w_*` config keys)."""

    start: float = 0.3
    """w^E at turn 1."""
    end: float = 0.7
    """w^E from turn `ramp_turns` on."""
    ramp_turns: int = 6
    """Turn at which w^E reaches `end`."""
    schedule: Literal["linear", "exponential", "constant"] = "linear"
    """Shape of the ramp; "constant" keeps w^E = start."""
    floor: float = 0.2
    """w^A = max(1 − w^E, floor), so the CS agent's reward never vanishes."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end):
            raise ValueError(f"JointSchedule needs 0 <= start <= end (w^E increases), got {self.start}, {self.end}")
        if self.ramp_turns < 1:
            raise ValueError(f"JointSchedule.ramp_turns must be >= 1, got {self.ramp_turns}")
        if self.floor <= 0.0:
            raise ValueError(f"JointSchedule.floor must be > 0 (gopo: w^A > 0), got {self.floor}")
        if self.schedule not in ("linear", "exponential", "constant"):
            raise ValueError(f"JointSchedule.schedule: unknown {self.schedule!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> JointSchedule:
        """From a `RewardsConfig` (duck-typed, so this module does not need the config)."""
        return cls(
            start=cfg.w_expert_start,
            end=cfg.w_expert_end,
            ramp_turns=cfg.w_expert_ramp_turns,
            schedule=cfg.w_expert_schedule,
            floor=cfg.w_cs_floor,
        )


def _schedule(params: JointSchedule | Any) -> JointSchedule:
    return params if isinstance(params, JointSchedule) else JointSchedule.from_config(params)


def expert_weight(turn: int, params: JointSchedule | Any = JointSchedule()) -> float:
    """w^E_t for the 1-based turn index t: non-decreasing in t, `start` at t = 1, `end` from `ramp_turns` on.

    `params` is a `JointSchedule` or a `RewardsConfig`.
    """
    s = _schedule(params)
    if turn < 1:
        raise ValueError(f"turn index is 1-based, got {turn}")
    if s.schedule == "constant":
        return s.start
    p = 1.0 if s.ramp_turns == 1 else min(1.0, (turn - 1) / (s.ramp_turns - 1))
    if s.schedule == "exponential":
        p = math.expm1(EXPONENTIAL_RATE * p) / math.expm1(EXPONENTIAL_RATE)
    return s.start + (s.end - s.start) * p


def joint_weights(turn: int, params: JointSchedule | Any = JointSchedule()) -> tuple[float, float]:
    """(w^E_t, w^A_t) of gopo eq 10, with w^A_t = max(1 − w^E_t, floor) > 0."""
    w_e = expert_weight(turn, params)
    return w_e, max(1.0 - w_e, _schedule(params).floor)


@dataclass(frozen=True)
class RewardBreakdown:
    """Every component of one turn's joint reward, so the dashboard can show each (gopo eq 10)."""

    turn: int
    r_expert: float
    """R^E_t = ESNDCG (gopo eq 6)."""
    r_cs: float
    """R^A_t, weighted judge score (gopo eq 8)."""
    w_expert: float
    w_cs: float
    joint: float
    """R_t = w^E_t R^E_t + w^A_t R^A_t."""

    def to_turn_rewards(
        self, process: float = 0.0, compliance: float = 1.0, skill_distance: float | None = None
    ) -> TurnRewards:
        """The wire record (`gopo_online.types.TurnRewards`) of this breakdown plus the turn's other signals."""
        return TurnRewards(
            r_expert=self.r_expert,
            r_cs=self.r_cs,
            w_expert=self.w_expert,
            w_cs=self.w_cs,
            joint=self.joint,
            process=process,
            compliance=compliance,
            skill_distance=skill_distance,
        )


def joint_reward(r_e: float, r_a: float, turn: int, params: JointSchedule | Any = JointSchedule()) -> RewardBreakdown:
    """R_t = w^E_t R^E_t + w^A_t R^A_t (gopo eq 10) with the weights of `joint_weights`."""
    w_e, w_a = joint_weights(turn, params)
    return RewardBreakdown(turn=turn, r_expert=r_e, r_cs=r_a, w_expert=w_e, w_cs=w_a, joint=w_e * r_e + w_a * r_a)


# ---------------------------------------------------------------------------------------------------------------------
# Step-by-step TOD rewards (step eq 2-5) and the adaptive KL coefficient (step eq 6-7, Ziegler et al. 2019)
# ---------------------------------------------------------------------------------------------------------------------


def _match_reward(gt: Iterable[Any], pred: Iterable[Any], k: float) -> tuple[float, int]:
    """(|gt ∩ pred| · exp(−k |gt \\ pred| / |gt|), |gt|): the shared numerator of step eq 2-4."""
    g, p = set(gt), set(pred)
    if not g:
        return 0.0, 0
    rho = math.exp(-k * len(g - p) / len(g))
    return len(g & p) * rho, len(g)


def understanding_reward(gt: Iterable[Any], pred: Iterable[Any], alpha: float) -> float:
    """R_u = |SV_gt ∩ SV^| · ρ_u / |SV_gt|, ρ_u = exp(−α |SV_gt \\ SV^| / |SV_gt|) (step eq 2).

    Slot-value pairs are any hashables (e.g. ("price", "cheap")). Empty ground truth: nothing to
    understand, nothing missed -> 1.0 (undefined in the paper). Extra predictions are not penalised (as in eq 2).
    """
    num, n = _match_reward(gt, pred, alpha)
    return 1.0 if n == 0 else num / n


def generation_reward(gt: Iterable[Any], pred: Iterable[Any], beta: float) -> float:
    """R_g = |S_gt ∩ S^| · ρ_g / |S_gt|, ρ_g = exp(−β |S_gt \\ S^| / |S_gt|) (step eq 3). Empty S_gt -> 1.0."""
    num, n = _match_reward(gt, pred, beta)
    return 1.0 if n == 0 else num / n


def tod_reward(
    sv_gt: Iterable[Any], sv_pred: Iterable[Any], s_gt: Iterable[Any], s_pred: Iterable[Any], alpha: float, beta: float
) -> float:
    """R_tod = (|SV_gt ∩ SV^| ρ_u + |S_gt ∩ S^| ρ_g) / (|SV_gt| + |S_gt|) (step eq 4). Both sets empty -> 1.0."""
    nu, du = _match_reward(sv_gt, sv_pred, alpha)
    ng, dg = _match_reward(s_gt, s_pred, beta)
    return 1.0 if du + dg == 0 else (nu + ng) / (du + dg)


def kl_shaped_reward(r: Any, kl: Any, beta: float) -> Any:
    """R_total = R_t − β D_KL(π ‖ π_o) (step eq 5). Scalars or arrays (broadcast)."""
    out = np.asarray(r, dtype=np.float64) - beta * np.asarray(kl, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


class AdaptiveKLController:
    """Adaptive KL coefficient β (step eq 6-7, after Ziegler et al. 2019), one update per learner step.

    e_t = clip(KL_t / KL_target − 1, −clip, clip)   (step eq 6)
    β_{t+1} = β_t (1 + K_β e_t)                     (step eq 7; the paper's K_β = 0.2)

    At a KL far above target β grows by (1 + 0.2 K_β) per step: ×2.2 in 20 steps at K_β = 0.2, so it answers
    within tens of steps. Ziegler's per-sample form K_β = n_samples / horizon with horizon 10 000 moved β by
    0.002 % per step here (one update per batch of a few rows), i.e. never. `target=None` keeps β fixed.
    """

    def __init__(self, init_beta: float, target: float | None, rate: float = 0.2, clip: float = 0.2) -> None:
        if init_beta < 0 or not 0 < rate <= 1 or clip <= 0 or (target is not None and target <= 0):
            raise ValueError(f"AdaptiveKLController: bad args beta={init_beta}, target={target}, rate={rate}")
        self.beta = float(init_beta)
        self.target = target
        self.rate = float(rate)
        self.clip = float(clip)

    def update(self, kl: float) -> float:
        """Feed the KL measured in the last step; returns the new β."""
        if not math.isfinite(kl):
            raise ValueError(f"AdaptiveKLController.update: KL must be finite, got {kl}")
        if self.target is None:
            return self.beta
        e = float(np.clip(kl / self.target - 1.0, -self.clip, self.clip))  # step eq 6
        self.beta *= 1.0 + self.rate * e  # step eq 7
        return self.beta

    def state_dict(self) -> dict[str, float | None]:
        return {"beta": self.beta, "target": self.target, "rate": self.rate, "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = None if state.get("target") is None else float(state["target"])
        self.rate = float(state.get("rate", self.rate))  # checkpoints of the per-sample form carry no rate
        self.clip = float(state.get("clip", self.clip))


# ---------------------------------------------------------------------------------------------------------------------
# Returns and advantages
# ---------------------------------------------------------------------------------------------------------------------


def _discount_cumsum(x: np.ndarray, d: float, last: np.ndarray) -> np.ndarray:
    """y_t = x_t + d · y_{t+1} along the last axis, y_T = `last`; vectorised over leading axes."""
    y = np.empty_like(x)
    acc = last
    for t in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., t] + d * acc
        y[..., t] = acc
    return y


def discounted_returns(rewards: Any, gamma: float, last_value: Any = 0.0) -> np.ndarray:
    """G_t = Σ_k γ^k r_{t+k} (+ γ^{T−t} V_T bootstrap). `rewards`: (T,) or (B, T); returns the same shape."""
    r = np.asarray(rewards, dtype=np.float64)
    return _discount_cumsum(r, gamma, np.broadcast_to(np.asarray(last_value, dtype=np.float64), r.shape[:-1]))


class GAEResult(NamedTuple):
    advantages: np.ndarray
    """Â_t, shape of `rewards`."""
    returns: np.ndarray
    """Critic targets Â_t + V(s_t), shape of `rewards`."""


def gae(rewards: Any, values: Any, gamma: float, lam: float, last_value: Any = 0.0) -> GAEResult:
    """Generalised advantage estimation (Schulman et al. 2016), the critic path of the Expert loss (gopo eq 7).

    δ_t = r_t + γ V_{t+1} − V_t with V_T = `last_value` (0 for a finished dialogue);
    Â_t = Σ_k (γλ)^k δ_{t+k}. `rewards`, `values`: (T,) or (B, T) equal-length rows; `last_value`: scalar or (B,).
    """
    r = np.asarray(rewards, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if r.shape != v.shape:
        raise ValueError(f"gae: rewards {r.shape} and values {v.shape} differ in shape")
    last = np.broadcast_to(np.asarray(last_value, dtype=np.float64), r.shape[:-1])
    v_next = np.concatenate([v[..., 1:], last[..., None]], axis=-1)
    delta = r + gamma * v_next - v
    adv = _discount_cumsum(delta, gamma * lam, np.zeros(r.shape[:-1]))
    return GAEResult(adv, adv + v)


def grpo_advantages(group_rewards: Any, eps: float = 1e-6) -> np.ndarray:
    """GRPO group baseline: Â_i = (r_i − mean(r)) / (std(r) + eps), over one group of rollouts.

    Population std (ddof = 0); a group of identical rewards (or of one) gets all-zero advantages.
    The advantages sum to 0 and are unchanged by adding a constant to every reward.
    """
    r = np.asarray(group_rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"grpo_advantages: need a non-empty 1-D group, got shape {r.shape}")
    if r.max() == r.min():  # identical rewards: no signal (checked exactly: mean() has float noise, /eps blows it up)
        return np.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


def hybrid_advantages(
    outcomes: Sequence[float],
    process: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    lam: float,
    outcome_weight: float = 1.0,
    process_weight: float = 1.0,
    eps: float = 1e-6,
) -> list[np.ndarray]:
    """InteractCS hybrid advantage (eq 5) for one group of G trajectories of the same scenario.

    A_{i,t} = w_o · Norm(R^o)_i + w_p · R^p_{i,t} − λ · c_{i,t}, Norm = `grpo_advantages` over the group's
    outcome rewards R^o_i (final satisfaction, §4.2.1); R^p_{i,t} is the process reward of turn t (eq 6),
    c_{i,t} its cost and λ ≥ 0 the PID-Lagrangian multiplier (eq 7-8). `outcome_weight` / `process_weight`
    are the `rewards.outcome_weight` / `process_weight` knobs (the paper uses 1, 1).
    Returns one array of length T_i per trajectory (trajectories may differ in length).
    """
    if not (len(outcomes) == len(process) == len(costs)):
        raise ValueError(
            f"hybrid_advantages: {len(outcomes)} outcomes, {len(process)} process rows, {len(costs)} cost rows"
        )
    if lam < 0:
        raise ValueError(f"hybrid_advantages: λ must be >= 0, got {lam}")
    norm = grpo_advantages(outcomes, eps)
    out = []
    for i, (p_i, c_i) in enumerate(zip(process, costs, strict=True)):
        p = np.asarray(p_i, dtype=np.float64)
        c = np.asarray(c_i, dtype=np.float64)
        if p.shape != c.shape or p.ndim != 1:
            raise ValueError(f"hybrid_advantages: trajectory {i}: process {p.shape} vs costs {c.shape}")
        out.append(outcome_weight * norm[i] + process_weight * p - lam * c)  # InteractCS eq 5
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Cost constraint: PID-Lagrangian (InteractCS eq 7-8, Stooke et al. 2020 Alg. 2)
# ---------------------------------------------------------------------------------------------------------------------


class PIDLagrangian:
    """PID controller for the Lagrange multiplier λ of the cost constraint J_C ≤ d (InteractCS eq 7-8).

    Per update k with the current cost rate J_C,k (e.g. vouchers per episode over the last batch):
        e_k = J_C,k − d                                  (error: cost rate minus budget)
        I_k = clip(I_{k−1} + e_k, 0, integral_max)       (anti-windup: the integral never goes below 0 nor
                                                          above the bound, so λ recovers quickly)
        D_k = max(0, J_C,k − J_C,k−1)                    (Stooke et al.: only rising cost feeds the D term;
                                                          `derivative_positive_only=False` uses the raw Δe)
        λ_k = max(0, Kp e_k + Ki I_k + Kd D_k)
    With Ki > 0 and a constant cost above budget, λ rises every step until the integral saturates.
    """

    def __init__(
        self,
        budget: float,
        kp: float = 1.0,
        ki: float = 0.1,
        kd: float = 0.0,
        integral_max: float = 10.0,
        derivative_positive_only: bool = True,
    ) -> None:
        if min(kp, ki, kd) < 0 or integral_max <= 0 or budget < 0:
            raise ValueError(f"PIDLagrangian: gains and budget must be >= 0, integral_max > 0: {kp, ki, kd, budget}")
        self.budget = float(budget)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.integral_max = float(integral_max)
        self.derivative_positive_only = derivative_positive_only
        self.integral = 0.0
        self.prev_cost: float | None = None
        self.lam = 0.0
        self.steps = 0

    @classmethod
    def from_config(cls, cfg: Any) -> PIDLagrangian:
        """From a `RewardsConfig` (cost_budget, pid_kp, pid_ki, pid_kd, pid_integral_max)."""
        return cls(cfg.cost_budget, cfg.pid_kp, cfg.pid_ki, cfg.pid_kd, cfg.pid_integral_max)

    def update(self, cost_rate: float) -> float:
        """Feed the current cost rate J_C,k; returns the new λ ≥ 0."""
        if not math.isfinite(cost_rate):
            raise ValueError(f"PIDLagrangian.update: cost rate must be finite, got {cost_rate}")
        e = cost_rate - self.budget
        self.integral = min(max(self.integral + e, 0.0), self.integral_max)
        d = 0.0 if self.prev_cost is None else cost_rate - self.prev_cost
        if self.derivative_positive_only:
            d = max(d, 0.0)
        self.prev_cost = cost_rate
        self.lam = max(0.0, self.kp * e + self.ki * self.integral + self.kd * d)  # InteractCS eq 8
        self.steps += 1
        return self.lam

    def state_dict(self) -> dict[str, float | int | None]:
        return {"integral": self.integral, "prev_cost": self.prev_cost, "lam": self.lam, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.integral = float(state["integral"])
        self.prev_cost = None if state.get("prev_cost") is None else float(state["prev_cost"])
        self.lam = float(state["lam"])
        self.steps = int(state.get("steps", 0))
