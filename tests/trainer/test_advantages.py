from __future__ import annotations

import numpy as np
import pytest

from gopo_online import rewards as R
from gopo_online.config import RewardsConfig
from trainer.advantages import compute_advantages, episode_groups, turn_signals
from trainer.synthetic import make_trajectory

RC = RewardsConfig()


def test_joint_reward_is_recomputed_with_the_schedule(fake_tok):
    tr = make_trajectory(fake_tok, 0, 3)
    sig = turn_signals([tr], RC)
    for t in tr.turns:
        s = sig[(0, t.index)]
        # R^E from the teacher (eq 6), not the recorded random number; joint by eq 10 with the config's schedule
        assert s.r_expert == pytest.approx(R.esndcg(t.expert_skills, t.teacher_skills))
        w_e, w_a = R.joint_weights(t.index, RC)
        assert s.joint == pytest.approx(w_e * s.r_expert + w_a * t.rewards.r_cs)


def test_groups_merge_singletons(fake_tok):
    trajs = [
        make_trajectory(fake_tok, 0, 1, scenario="a"),
        make_trajectory(fake_tok, 1, 1, scenario="a"),
        make_trajectory(fake_tok, 2, 1, scenario="b"),
        make_trajectory(fake_tok, 3, 1, scenario="c"),
    ]
    assert sorted(map(sorted, episode_groups(trajs))) == [[0, 1], [2, 3]]


def test_grpo_expert_is_discounted_sum_of_normalised_rewards(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 3) for i in range(2)]
    adv = compute_advantages(trajs, "grpo", RC, gamma=0.5, gae_lambda=1.0)
    sig = adv.signals
    keys = sorted(sig)
    r = np.array([sig[k].joint for k in keys])
    norm = dict(zip(keys, (r - r.mean()) / (r.std() + 1e-6), strict=True))
    # Â_{0,1} = r̃_1 + 0.5 r̃_2 + 0.25 r̃_3
    expect = norm[(0, 1)] + 0.5 * norm[(0, 2)] + 0.25 * norm[(0, 3)]
    assert adv.expert[(0, 1)] == pytest.approx(expect)
    # CS: group-normalised R_t minus nothing (λ = 0): sums to 0
    assert sum(adv.cs.values()) == pytest.approx(0.0, abs=1e-9)


def test_cost_penalty_charged_to_cs_only(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 3) for i in range(2)]
    a0 = compute_advantages(trajs, "grpo", RC, 0.9, 0.95, cost_lambda=0.0)
    a1 = compute_advantages(trajs, "grpo", RC, 0.9, 0.95, cost_lambda=2.0)
    assert a0.expert == a1.expert
    for k in a0.cs:
        assert a1.cs[k] == pytest.approx(a0.cs[k] - 2.0 * a0.signals[k].cost)


def test_gae_with_zero_values_and_targets(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 2) for i in range(2)]
    adv = compute_advantages(trajs, "gae", RC, 1.0, 1.0, values={})
    # γ = λ = 1, V = 0: returns are reward-to-go, e.g. G_{0,1} = R_1 + R_2
    s = adv.signals
    assert adv.critic_targets[(0, 1)] == pytest.approx(s[(0, 1)].joint + s[(0, 2)].joint)
    assert np.mean(list(adv.expert.values())) == pytest.approx(0.0, abs=1e-9)  # batch-normalised


def _production_batch(fake_tok, n_groups=2, group_size=4, **rewards_cfg):
    """What the loop produces: unique scenario instance ids and seeds per group, G rollouts sharing a group id."""
    trajs = []
    for g in range(n_groups):
        for j in range(group_size):
            t = make_trajectory(fake_tok, g * group_size + j, 3, seed=g)
            trajs.append(
                t.model_copy(update={"scenario_id": f"ecommerce-{1000 + g}", "seed": 77 + g, "group_id": f"grp-{g}"})
            )
    return trajs


def test_grpo_groups_form_from_group_ids_with_production_shaped_ids(fake_tok):
    """Groups come from the group id the dispatcher stamps (tests/workers/test_groups.py covers the dispatch side)."""
    trajs = _production_batch(fake_tok)
    assert sorted(map(sorted, episode_groups(trajs))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    adv = compute_advantages(trajs, "grpo", RC, 0.9, 0.95)
    for g in ([0, 1, 2, 3], [4, 5, 6, 7]):  # normalised within each group: zero mean there, not just batch-wide
        vals = [a for k, a in adv.cs.items() if k[0] in g]
        assert len(vals) == 12 and sum(vals) == pytest.approx(0.0, abs=1e-9)
        assert np.std(vals) == pytest.approx(1.0, abs=1e-4)


def test_joint_reward_weight_reaches_the_cs_advantage(fake_tok):
    """Defect: the CS advantage used R^A alone, so w^A_t (gopo eq 10) had no effect on it."""
    trajs = _production_batch(fake_tok, n_groups=1)
    const = {"w_expert_start": 0.7, "w_expert_end": 0.7, "w_expert_schedule": "constant"}
    lo = compute_advantages(trajs, "grpo", RewardsConfig(**const, w_cs_floor=0.3), 0.9, 0.95)
    hi = compute_advantages(trajs, "grpo", RewardsConfig(**const, w_cs_floor=3.0), 0.9, 0.95)
    assert max(abs(lo.cs[k] - hi.cs[k]) for k in lo.cs) > 0.05


def test_hybrid_uses_the_joint_reward_and_centres_the_process_reward(fake_tok):
    """Defect: hybrid dropped R^A for the CS agent and added the process reward uncentred (raised every sample)."""
    trajs = _production_batch(fake_tok, n_groups=1)
    base = compute_advantages(trajs, "hybrid", RC, 0.9, 0.95, cost_lambda=0.5)

    def shifted(update_turn):
        out = []
        for t in trajs:
            turns = tuple(x.model_copy(update={"rewards": update_turn(x.rewards)}) for x in t.turns)
            out.append(t.model_copy(update={"turns": turns}))
        return compute_advantages(out, "hybrid", RC, 0.9, 0.95, cost_lambda=0.5)

    # +0.5 on every turn's process reward: no turn is better than another, nothing changes
    plus = shifted(lambda r: r.model_copy(update={"process": r.process + 0.5}))
    for k in base.cs:
        assert plus.cs[k] == pytest.approx(base.cs[k])
    # R^A of one turn up: that turn's CS advantage rises (the joint reward carries R^A)
    bump = shifted(lambda r: r.model_copy(update={"r_cs": r.r_cs + 1.0}) if r is trajs[0].turns[0].rewards else r)
    assert bump.cs[(0, 1)] > base.cs[(0, 1)] + 0.05


def test_hybrid_matches_interactcs_eq5(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 2) for i in range(3)]
    adv = compute_advantages(trajs, "hybrid", RC, 0.9, 0.95, cost_lambda=0.5)
    norm = R.grpo_advantages([t.final_satisfaction for t in trajs])
    sig = adv.signals
    mean_joint = np.mean([s.joint for s in sig.values()])
    mean_proc = np.mean([s.process for s in sig.values()])
    t = trajs[1].turns[0]
    s = sig[(1, 1)]
    w_o, w_p = RC.outcome_weight, RC.process_weight
    # InteractCS eq 5 with the centred joint reward (gopo eq 10) and the centred principle reward as process terms
    expect = w_o * norm[1] + w_p * (s.joint - mean_joint) + w_p * (s.process - mean_proc) - 0.5 * t.cost
    assert adv.cs[(1, 1)] == pytest.approx(expect)
    assert adv.expert[(1, 1)] == pytest.approx(w_o * norm[1] + w_p * (s.joint - mean_joint))
