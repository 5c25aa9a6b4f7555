"""Per-turn rewards and advantages of a batch of trajectories, from the recorded reward components.

Pure functions over `Trajectory` records and numbers; the math itself lives in `gopo_online.rewards`
(ESNDCG, joint reward eq 10, GRPO baseline, GAE, InteractCS hybrid eq 5). Results are keyed by
(index of the trajectory in the given list, 1-based turn index), the keys `trainer.collate` uses.

Groups: GRPO-style baselines compare rollouts of the same situation. The controller dispatches G rollouts of one
(persona, scenario instance, simulator seed) with one `Trajectory.group_id` (`workers/groups.py`); those are the
groups. Trajectories without a group id fall back to (scenario_id, persona_group), which only groups anything for
hand-made data: scenario_id is the unique instance id. A group with fewer than 2 members in the batch (the
rest of it is in another batch, or it never was one) joins one batch-wide group, a batch-mean baseline.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gopo_online import rewards as R
from gopo_online.types import Trajectory

__all__ = ["Advantages", "TurnSignals", "compute_advantages", "episode_groups", "turn_signals"]

Key = tuple[int, int]


@dataclass(frozen=True)
class TurnSignals:
    """The reward components of one turn, the joint reward recomputed with the configured schedule."""

    r_expert: float
    """R^E_t: ESNDCG(expert, teacher) when the turn has teacher skills, else the recorded value (gopo eq 6)."""
    r_cs: float
    """R^A_t, recorded judge reward (gopo eq 8)."""
    joint: float
    """R_t = w^E_t R^E_t + w^A_t R^A_t (gopo eq 10) under the CURRENT schedule."""
    process: float
    cost: float
    skill_distance: float | None


def turn_signals(trajs: Sequence[Trajectory], rewards_cfg) -> dict[Key, TurnSignals]:
    """TurnSignals of every turn that carries rewards (turns without are not trainable and are absent)."""
    out = {}
    for i, traj in enumerate(trajs):
        if traj.status != "ok":
            continue
        for t in traj.turns:
            if t.rewards is None:
                continue
            r_e = R.esndcg(t.expert_skills, t.teacher_skills) if t.teacher_skills else t.rewards.r_expert
            br = R.joint_reward(r_e, t.rewards.r_cs, t.index, rewards_cfg)  # gopo eq 10
            out[(i, t.index)] = TurnSignals(
                r_e, t.rewards.r_cs, br.joint, t.rewards.process, t.cost, t.rewards.skill_distance
            )
    return out


def episode_groups(trajs: Sequence[Trajectory]) -> list[list[int]]:
    """Trajectory indices grouped by group id (else (scenario, persona group)); singletons merged into one group."""
    by: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        if t.status == "ok":
            by[("group", t.group_id) if t.group_id else ("scenario", t.scenario_id, t.persona_group)].append(i)
    groups = [g for g in by.values() if len(g) >= 2]
    rest = sorted(i for g in by.values() if len(g) < 2 for i in g)
    if rest:
        groups.append(rest)
    return groups


@dataclass
class Advantages:
    expert: dict[Key, float]
    cs: dict[Key, float]
    critic_targets: dict[Key, float] = field(default_factory=dict)
    """GAE only: returns Â + V, the critic's regression targets."""
    signals: dict[Key, TurnSignals] = field(default_factory=dict)


def _outcome(traj: Trajectory) -> float:
    """R^o of InteractCS §4.2.1: final satisfaction (1-5), else the last user turn's satisfaction."""
    if traj.final_satisfaction is not None:
        return float(traj.final_satisfaction)
    return float(traj.turns[-1].user_meta.satisfaction)


def _normalise(adv: dict[Key, float]) -> dict[Key, float]:
    if len(adv) < 2:
        return {k: 0.0 for k in adv} if adv else adv
    v = np.array(list(adv.values()))
    std = v.std()
    return {k: float((a - v.mean()) / (std + 1e-6)) if std > 0 else 0.0 for k, a in adv.items()}


def _centred(rows: list[list[float]]) -> list[list[float]]:
    """x − mean over all turns of the group: a per-turn reward as a baseline-free signal of its group."""
    flat = [x for r in rows for x in r]
    mean = float(np.mean(flat)) if flat else 0.0
    return [[x - mean for x in r] for r in rows]


def compute_advantages(
    trajs: Sequence[Trajectory],
    mode: str,
    rewards_cfg,
    gamma: float,
    gae_lambda: float,
    cost_lambda: float = 0.0,
    values: Mapping[Key, float] | None = None,
) -> Advantages:
    """Â^E and Â^A for every trainable turn. Both agents learn from the joint reward R_t (gopo eq 10: "propagated
    back to both agents"), so w^E_t / w^A_t shape both.

    Expert (gopo eq 7):
      grpo   — per group, R_t normalised over all the group's turns (process-supervised GRPO, Shao et al.
               2024), then Â_t = Σ_{k≥t} γ^{k−t} r̃_k (the Expert plans for the rest of the dialogue);
      gae    — GAE(γ, λ) with the critic's `values` (V = 0 after the last turn), normalised over the batch;
      hybrid — InteractCS eq 5 with the joint reward as the process term: w_o Norm(R^o)_i + w_p (R_t − R̄_g).
    CS (gopo eq 9b, with R_t in place of R^A_t):
      grpo/gae — R_t normalised per group: the reply is judged by its turn's joint reward against the group's;
      hybrid   — InteractCS eq 5: w_o Norm(R^o)_i + w_p (R_t − R̄_g) + w_p (R^p_t − R̄^p_g) − λ c_t, R^p = the
                 judge's principle reward (InteractCS eq 6); both process terms centred on their group mean, so
                 the process reward shapes the comparison instead of raising every sample.
    The cost penalty λ·c_t (PID-Lagrangian, InteractCS eq 7-8) is charged to the CS agent, whose action tag
    causes the cost; pass cost_lambda = 0 to disable it.
    """
    if mode not in ("grpo", "gae", "hybrid"):
        raise ValueError(f"advantage mode must be grpo|gae|hybrid, got {mode!r}")
    sig = turn_signals(trajs, rewards_cfg)
    rows: dict[int, list[Key]] = defaultdict(list)
    for k in sorted(sig):
        rows[k[0]].append(k)
    groups = [[i for i in g if rows.get(i)] for g in episode_groups(trajs)]
    groups = [g for g in groups if g]
    a_e: dict[Key, float] = {}
    a_cs: dict[Key, float] = {}
    targets: dict[Key, float] = {}

    if mode == "gae":
        vals = values or {}
        for keys in rows.values():
            r = [sig[k].joint for k in keys]
            v = [vals.get(k, 0.0) for k in keys]
            res = R.gae(r, v, gamma, gae_lambda, last_value=0.0)
            for k, a, g in zip(keys, res.advantages, res.returns, strict=True):
                a_e[k], targets[k] = float(a), float(g)
        a_e = _normalise(a_e)

    for g in groups:
        keys = [k for i in g for k in rows[i]]
        if mode == "hybrid":
            outcomes = [_outcome(trajs[i]) for i in g]
            joint = _centred([[sig[k].joint for k in rows[i]] for i in g])
            proc = _centred([[sig[k].process for k in rows[i]] for i in g])
            cs_proc = [[j + p for j, p in zip(jr, pr, strict=True)] for jr, pr in zip(joint, proc, strict=True)]
            costs = [[sig[k].cost for k in rows[i]] for i in g]
            zero = [[0.0] * len(rows[i]) for i in g]
            w_o, w_p = rewards_cfg.outcome_weight, rewards_cfg.process_weight
            ae = R.hybrid_advantages(outcomes, joint, zero, 0.0, w_o, w_p)  # InteractCS eq 5, no cost term
            ac = R.hybrid_advantages(outcomes, cs_proc, costs, cost_lambda, w_o, w_p)  # InteractCS eq 5
            for i, e_row, c_row in zip(g, ae, ac, strict=True):
                for k, x, y in zip(rows[i], e_row, c_row, strict=True):
                    a_e[k], a_cs[k] = float(x), float(y)
            continue
        norm = R.grpo_advantages([sig[k].joint for k in keys])  # gopo eq 10's R_t against the group's
        flat = dict(zip(keys, norm, strict=True))
        if mode == "grpo":
            for i in g:
                ret = R.discounted_returns([flat[k] for k in rows[i]], gamma)
                a_e.update({k: float(x) for k, x in zip(rows[i], ret, strict=True)})
        for k in keys:
            a_cs[k] = float(flat[k]) - cost_lambda * sig[k].cost  # InteractCS eq 7: Lagrangian cost penalty
    return Advantages(a_e, a_cs, targets, sig)
