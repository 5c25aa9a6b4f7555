"""Reward and advantage math (gopo_online/rewards.py): hand-derived values with the working, then properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gopo_online.config import RewardsConfig
from gopo_online.rewards import (
    AdaptiveKLController,
    JointSchedule,
    PIDLagrangian,
    RewardBreakdown,
    discounted_returns,
    esndcg,
    expert_weight,
    gae,
    generation_reward,
    grpo_advantages,
    hybrid_advantages,
    joint_reward,
    joint_weights,
    kl_shaped_reward,
    process_reward,
    tod_reward,
    understanding_reward,
    weighted_judge_reward,
)
from gopo_online.types import TurnRewards

LOG2_3 = math.log2(3)  # 1.5849625...
SKILLS = [f"s{i}" for i in range(9)]
FAST = settings(max_examples=200, deadline=None)

distinct_skills = st.lists(st.sampled_from(SKILLS), min_size=1, max_size=7, unique=True)
any_skills = st.lists(st.sampled_from(SKILLS), min_size=0, max_size=8)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


# ---- ESNDCG (gopo eq 2-6) -------------------------------------------------------------------------------------------


def test_esndcg_hand_values():
    # T = [a, b], n = 2: Rel(a) = 2, Rel(b) = 1.
    # IDCG = (2^2 - 1)/log2(2) + (2^1 - 1)/log2(3) = 3 + 1/1.58496 = 3.63093
    idcg = 3 + 1 / LOG2_3
    # P = [b, a]: DCG = 1/1 + 3/log2(3) = 2.89279 -> 0.79671
    assert esndcg(["b", "a"], ["a", "b"]) == pytest.approx((1 + 3 / LOG2_3) / idcg)
    assert esndcg(["b", "a"], ["a", "b"]) == pytest.approx(0.796708, abs=1e-6)
    # P = [a, a, b]: the repeat keeps slot 2 and gains 0; b sits at slot 3: DCG = 3 + 0 + 1/log2(4) = 3.5
    assert esndcg(["a", "a", "b"], ["a", "b"]) == pytest.approx(3.5 / idcg)
    # T = [a, b, c], n = 3: Rel = 3, 2, 1; IDCG = 7 + 3/log2(3) + 1/2 = 9.39279
    # P = [a, x, c]: DCG = 7 + 0 + 1/log2(4) = 7.5 -> 0.79848
    assert esndcg(["a", "x", "c"], ["a", "b", "c"]) == pytest.approx(7.5 / (7 + 3 / LOG2_3 + 0.5))
    # no overlap -> 0
    assert esndcg(["x", "y"], ["a", "b"]) == 0.0


def test_esndcg_empty_cases():
    assert esndcg([], []) == 1.0  # nothing asked, nothing given
    assert esndcg(["a"], []) == 0.0  # no teacher: a prediction earns nothing
    assert esndcg([], ["a"]) == 0.0


def test_esndcg_caps_both_at_five():
    T = ["a", "b", "c", "d", "e", "f"]
    # T capped to a..e (n = 5); f is outside the capped teacher, so it scores 0 anywhere
    assert esndcg(T, T) == 1.0
    assert esndcg(["a", "b", "c", "d", "e"], T) == 1.0
    # P capped to its first 5: the sixth skill (a, the most relevant) is ignored
    assert esndcg(["x1", "x2", "x3", "x4", "x5", "a"], T) == 0.0


@FAST
@given(distinct_skills)
def test_esndcg_teacher_is_one(T):
    assert esndcg(T, T) == pytest.approx(1.0)


@FAST
@given(any_skills, any_skills)
def test_esndcg_in_unit_interval(P, T):
    assert 0.0 <= esndcg(P, T) <= 1.0


@FAST
@given(distinct_skills.filter(lambda t: len(t) >= 2))
def test_esndcg_swapping_first_two_teacher_skills_lowers_score(T):
    P = [T[1], T[0], *T[2:]]
    assert esndcg(P, T) < esndcg(T, T)


@FAST
@given(st.lists(st.sampled_from(SKILLS), max_size=6, unique=True), distinct_skills)
def test_esndcg_order_sensitivity(P, T):
    # Two teacher skills at slots i < j of P (within the cap): putting the more relevant one first scores higher.
    Tc = T[:5]
    slots = [k for k, s in enumerate(P[:5]) if s in Tc]
    if len(slots) < 2:
        return
    i, j = slots[:2]
    swapped = list(P)
    swapped[i], swapped[j] = P[j], P[i]
    more_relevant_first = Tc.index(P[i]) < Tc.index(P[j])
    if more_relevant_first:
        assert esndcg(swapped, T) < esndcg(P, T)
    else:
        assert esndcg(swapped, T) > esndcg(P, T)


@FAST
@given(st.lists(st.sampled_from(SKILLS), min_size=1, max_size=5, unique=True), distinct_skills, st.data())
def test_esndcg_duplicates_do_not_raise_score(P, T, data):
    # a repeat comes after the skill's first occurrence (a copy placed before it would be the first one)
    dup = data.draw(st.sampled_from(P))
    at = data.draw(st.integers(P.index(dup) + 1, len(P)))
    with_dup = [*P[:at], dup, *P[at:]]
    assert esndcg(with_dup, T) <= esndcg(P, T) + 1e-12


# ---- judge / process rewards (gopo eq 8, InteractCS eq 6) -----------------------------------------------------------


def test_weighted_judge_reward_hand_value():
    # weights 3:3:2:2 normalise to 0.3, 0.3, 0.2, 0.2; 0.3*0.5 + 0.3*0.1 + 0.2*1 + 0.2*0 = 0.38
    scores = {"quality": 0.5, "skill_compliance": 0.1, "empathy": 1.0, "diversity": 0.0, "politeness": 0.9}
    weights = {"quality": 3, "skill_compliance": 3, "empathy": 2, "diversity": 2}
    assert weighted_judge_reward(scores, weights) == pytest.approx(0.38)


def test_weighted_judge_reward_missing_dimension_is_named():
    with pytest.raises(KeyError, match="empathy"):
        weighted_judge_reward({"quality": 1.0}, {"quality": 0.5, "empathy": 0.5})
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_judge_reward({"quality": 1.0}, {"quality": 0.0})


def test_process_reward_hand_value_and_levels():
    # 0.4*1 + 0.3*0.5 + 0.3*0 = 0.55
    w = {"logic": 0.4, "empathy": 0.3, "compliance": 0.3}
    assert process_reward({"logic": 1.0, "empathy": 0.5, "compliance": 0.0}, w) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        process_reward({"logic": 0.7, "empathy": 0.5, "compliance": 0.0}, w)
    with pytest.raises(KeyError, match="compliance"):
        process_reward({"logic": 1.0, "empathy": 0.5}, w)


@FAST
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 10), min_size=1).filter(
        lambda w: sum(w.values()) > 0
    ),
    st.data(),
)
def test_judge_and_process_rewards_in_unit_interval(weights, data):
    scores = {k: data.draw(st.floats(0, 1)) for k in weights}
    assert 0.0 <= weighted_judge_reward(scores, weights) <= 1.0 + 1e-12
    principles = {k: data.draw(st.sampled_from([0.0, 0.5, 1.0])) for k in weights}
    assert 0.0 <= process_reward(principles, weights) <= 1.0 + 1e-12


# ---- joint reward (gopo eq 10) --------------------------------------------------------------------------------------


def test_joint_weights_linear_hand_values():
    # start 0.3, end 0.7, ramp 6: w^E_t = 0.3 + 0.4 (t - 1)/5 -> t=3: 0.46, w^A = 0.54
    s = JointSchedule(start=0.3, end=0.7, ramp_turns=6, schedule="linear", floor=0.2)
    assert joint_weights(1, s) == pytest.approx((0.3, 0.7))
    assert joint_weights(3, s) == pytest.approx((0.46, 0.54))
    assert joint_weights(6, s) == pytest.approx((0.7, 0.3))
    assert joint_weights(50, s) == pytest.approx((0.7, 0.3))
    # R_3 = 0.46 * 1.0 + 0.54 * 0.5 = 0.73
    b = joint_reward(1.0, 0.5, 3, s)
    assert isinstance(b, RewardBreakdown)
    assert (b.turn, b.r_expert, b.r_cs) == (3, 1.0, 0.5)
    assert b.joint == pytest.approx(0.73)


def test_joint_weights_floor_exponential_constant_and_config():
    # w^E = 0.9 -> 1 - 0.9 = 0.1 < floor 0.2 -> w^A = 0.2
    assert joint_weights(1, JointSchedule(start=0.9, end=0.95, floor=0.2))[1] == pytest.approx(0.2)
    # exponential, ramp 6, t=2: p = 1/5, eased (e^{3*0.2} - 1)/(e^3 - 1) = 0.822119/19.085537 = 0.043076
    e = JointSchedule(start=0.3, end=0.7, ramp_turns=6, schedule="exponential")
    assert expert_weight(2, e) == pytest.approx(0.3 + 0.4 * 0.0430757, abs=1e-6)
    assert expert_weight(1, e) == pytest.approx(0.3) and expert_weight(6, e) == pytest.approx(0.7)
    assert expert_weight(4, JointSchedule(schedule="constant", start=0.4, end=0.8)) == 0.4
    # a RewardsConfig works directly
    cfg = RewardsConfig(w_expert_start=0.2, w_expert_end=0.6, w_expert_ramp_turns=3)
    assert joint_weights(2, cfg) == pytest.approx((0.4, 0.6))
    with pytest.raises(ValueError):
        expert_weight(0, cfg)
    with pytest.raises(ValueError):
        JointSchedule(start=0.8, end=0.2)


@FAST
@given(
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(1, 10),
    st.sampled_from(["linear", "exponential", "constant"]),
    st.floats(0.01, 1),
)
def test_joint_weights_monotone_with_positive_floor(a, b, ramp, schedule, floor):
    s = JointSchedule(start=min(a, b), end=max(a, b), ramp_turns=ramp, schedule=schedule, floor=floor)
    ws = [joint_weights(t, s) for t in range(1, 15)]
    for (we0, _), (we1, _) in zip(ws, ws[1:], strict=False):
        assert we1 >= we0 - 1e-12
    assert all(wa >= floor > 0 for _, wa in ws)
    assert all(s.start - 1e-12 <= we <= s.end + 1e-12 for we, _ in ws)


def test_breakdown_to_turn_rewards():
    tr = joint_reward(0.5, 0.8, 1).to_turn_rewards(process=0.55, compliance=0.5)
    assert isinstance(tr, TurnRewards)
    # default schedule, t = 1: w^E = 0.3, w^A = 0.7 -> 0.15 + 0.56 = 0.71
    assert tr.joint == pytest.approx(0.71) and tr.process == 0.55


# ---- step-by-step rewards (step eq 2-5) and adaptive KL (eq 6-7) ----------------------------------------------------


def test_understanding_generation_tod_hand_values():
    sv_gt, sv_pred = {"a", "b", "c", "d"}, {"a", "b", "x"}
    # |∩| = 2, |gt \ pred| = 2 of 4: ρ_u = e^{-1 * 0.5} = 0.606531; R_u = 2 * 0.606531 / 4 = 0.303265
    assert understanding_reward(sv_gt, sv_pred, alpha=1.0) == pytest.approx(0.5 * math.exp(-0.5))
    assert generation_reward({"p"}, {"p"}, beta=5.0) == 1.0
    assert generation_reward({"p", "q"}, set(), beta=1.0) == 0.0
    assert understanding_reward(set(), {"x"}, alpha=1.0) == 1.0  # nothing to understand
    # TOD: (2 e^{-0.5} + 1 * e^{-2 * 0.5}) / (4 + 2) = (1.213061 + 0.367879) / 6 = 0.263490
    r = tod_reward(sv_gt, sv_pred, {"p", "q"}, {"p"}, alpha=1.0, beta=2.0)
    assert r == pytest.approx((2 * math.exp(-0.5) + math.exp(-1.0)) / 6)
    assert tod_reward([], [], [], [], 1.0, 1.0) == 1.0


def test_kl_shaped_reward_and_adaptive_controller():
    assert kl_shaped_reward(1.0, 2.0, 0.1) == pytest.approx(0.8)  # 1 - 0.1 * 2
    np.testing.assert_allclose(kl_shaped_reward([1.0, 0.0], [0.0, 1.0], 0.5), [1.0, -0.5])
    c = AdaptiveKLController(init_beta=0.1, target=0.1, rate=0.5)
    # KL = 0.2: e = clip(0.2/0.1 - 1, ±0.2) = 0.2; β = 0.1 (1 + 0.5 * 0.2) = 0.11 (step eq 7)
    assert c.update(0.2) == pytest.approx(0.11)
    assert c.update(0.1) == pytest.approx(0.11)  # on target: unchanged
    # KL = 0: e = -0.2; β = 0.11 * (1 - 0.5 * 0.2) = 0.099
    assert c.update(0.0) == pytest.approx(0.099)
    d = AdaptiveKLController(init_beta=1.0, target=1.0)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    assert AdaptiveKLController(0.05, target=None).update(100.0) == 0.05  # fixed β


def test_adaptive_kl_beta_responds_within_tens_of_steps_at_the_production_defaults():
    """Defect: β was updated with n_steps=1 against horizon 10 000, 0.05 -> 0.051 after 1000 steps at 50x target."""
    from gopo_online.config import LearnerConfig

    lc = LearnerConfig()
    c = AdaptiveKLController(lc.kl_coef, lc.kl_target)  # the learner's construction, production defaults
    betas = [c.update(50 * lc.kl_target) for _ in range(30)]
    assert betas[19] > 2 * lc.kl_coef  # doubled within 20 steps at 50x the target KL
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:], strict=False))
    for _ in range(60):  # and comes back down when the KL collapses
        b = c.update(0.0)
    assert b < lc.kl_coef


# ---- returns and advantages -----------------------------------------------------------------------------------------


def test_discounted_returns_hand_values():
    # γ = 0.5, r = [1, 0, 2]: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 0.5), [1.5, 1.0, 2.0])
    # bootstrap V_T = 4: G2 = 2 + 0.5*4 = 4, G1 = 2, G0 = 2
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 0.5, last_value=4.0), [2.0, 2.0, 4.0])


def test_gae_hand_values():
    # r = [1, 2, 3], V = 0.5 each, γ = 0.9, λ = 0.95, V_T = 0; γλ = 0.855
    # δ = [1 + 0.45 - 0.5, 2 + 0.45 - 0.5, 3 - 0.5] = [0.95, 1.95, 2.5]
    # A2 = 2.5; A1 = 1.95 + 0.855*2.5 = 4.0875; A0 = 0.95 + 0.855*4.0875 = 4.4448125
    adv, ret = gae([1, 2, 3], [0.5, 0.5, 0.5], 0.9, 0.95)
    np.testing.assert_allclose(adv, [4.4448125, 4.0875, 2.5])
    np.testing.assert_allclose(ret, [4.9448125, 4.5875, 3.0])


def _gae_plain(rewards, values, gamma, lam, last_value):
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_v = last_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.floats(0, 1),
    st.floats(0, 1),
    st.data(),
)
def test_gae_batched_matches_plain_loop(B, T, gamma, lam, data):
    rows = st.lists(finite, min_size=T, max_size=T)
    R = data.draw(st.lists(rows, min_size=B, max_size=B))
    V = data.draw(st.lists(rows, min_size=B, max_size=B))
    last = data.draw(st.lists(finite, min_size=B, max_size=B))
    adv, ret = gae(np.array(R), np.array(V), gamma, lam, last_value=np.array(last))
    for b in range(B):
        expected = _gae_plain(R[b], V[b], gamma, lam, last[b])
        np.testing.assert_allclose(adv[b], expected, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(gae(R[b], V[b], gamma, lam, last[b]).advantages, expected, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(ret, adv + np.array(V))


@FAST
@given(st.lists(finite, min_size=1, max_size=12), st.floats(0, 1))
def test_gae_lambda_one_zero_values_is_discounted_return(r, gamma):
    np.testing.assert_allclose(gae(r, [0.0] * len(r), gamma, 1.0).advantages, discounted_returns(r, gamma), atol=1e-9)


def test_grpo_advantages_hand_values():
    # r = [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.816497 -> ±1/0.816497 = ±1.224745
    np.testing.assert_allclose(grpo_advantages([1, 2, 3], eps=0.0), [-1.224745, 0.0, 1.224745], atol=1e-6)
    np.testing.assert_array_equal(grpo_advantages([0.7, 0.7, 0.7]), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(grpo_advantages([0.3]), [0.0])
    with pytest.raises(ValueError):
        grpo_advantages([])


group = st.lists(st.floats(-100, 100), min_size=1, max_size=16)


@FAST
@given(group)
def test_grpo_advantages_sum_to_zero(r):
    assert abs(grpo_advantages(r).sum()) < 1e-6


@FAST
@given(group, st.floats(-1e3, 1e3))
def test_grpo_advantages_shift_invariant(r, c):
    a, b = grpo_advantages(r), grpo_advantages([x + c for x in r])
    if np.std(r) < 1e-3:  # float noise of the shift decides whether a near-constant group has any spread
        return
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_hybrid_advantages_hand_values():
    # outcomes [1, 3] -> Norm = [-1, 1] (mean 2, std 1, eps 0)
    # traj 0: [-1 + 0.5 - 0.5*0, -1 + 1 - 0.5*1] = [-0.5, -0.5]; traj 1: [1 + 0 - 0.5*1] = [0.5]
    a = hybrid_advantages([1, 3], [[0.5, 1.0], [0.0]], [[0, 1], [1]], lam=0.5, eps=0.0)
    np.testing.assert_allclose(a[0], [-0.5, -0.5])
    np.testing.assert_allclose(a[1], [0.5])
    # weights scale the outcome and process parts: w_o = 2, w_p = 0 -> traj 0 = [-2, -2 - 0.5]
    a = hybrid_advantages(
        [1, 3], [[0.5, 1.0], [0.0]], [[0, 1], [1]], lam=0.5, outcome_weight=2, process_weight=0, eps=0
    )
    np.testing.assert_allclose(a[0], [-2.0, -2.5])
    with pytest.raises(ValueError):
        hybrid_advantages([1, 3], [[0.5, 1.0], [0.0]], [[0, 1], [1, 1]], lam=0.5)
    with pytest.raises(ValueError):
        hybrid_advantages([1], [[0.5]], [[0]], lam=-1.0)


@FAST
@given(st.integers(1, 6), st.data(), st.floats(0, 5))
def test_hybrid_without_process_or_cost_is_grpo(G, data, lam):
    outcomes = data.draw(st.lists(st.floats(0, 1), min_size=G, max_size=G))
    lengths = data.draw(st.lists(st.integers(1, 5), min_size=G, max_size=G))
    zeros = [[0.0] * n for n in lengths]
    adv = hybrid_advantages(outcomes, zeros, zeros, lam)
    norm = grpo_advantages(outcomes)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(adv[i], [norm[i]] * n)


# ---- PID-Lagrangian (InteractCS eq 7-8) -----------------------------------------------------------------------------


def test_pid_lagrangian_hand_values():
    pid = PIDLagrangian(budget=0.3, kp=1.0, ki=0.1, kd=0.0)
    # cost 0.5: e = 0.2, I = 0.2, λ = 0.2 + 0.1*0.2 = 0.22
    assert pid.update(0.5) == pytest.approx(0.22)
    # again: e = 0.2, I = 0.4, λ = 0.2 + 0.04 = 0.24
    assert pid.update(0.5) == pytest.approx(0.24)
    # cost 0.1: e = -0.2, I = 0.2, λ = max(0, -0.2 + 0.02) = 0
    assert pid.update(0.1) == 0.0
    assert pid.integral == pytest.approx(0.2)
    # derivative on rising cost only: kd = 1, costs 0.3 then 0.5: D = 0.2; e = 0.2, I = 0.2 -> λ = 0.2 + 0.02 + 0.2
    pd = PIDLagrangian(budget=0.3, kp=1.0, ki=0.1, kd=1.0)
    pd.update(0.3)
    assert pd.update(0.5) == pytest.approx(0.42)


def test_pid_lagrangian_anti_windup_and_resume():
    pid = PIDLagrangian(budget=0.0, kp=0.0, ki=1.0, integral_max=1.0)
    for _ in range(100):
        lam = pid.update(10.0)
    assert pid.integral == 1.0 and lam == 1.0  # wound up to the bound, not to 1000
    # with the bound, one step below budget already lowers λ (it would take ~100 steps without it)
    assert pid.update(0.0) == 1.0 and pid.update(-0.5) == pytest.approx(0.5)
    other = PIDLagrangian.from_config(RewardsConfig())
    other.load_state_dict(pid.state_dict())
    other.kp, other.ki, other.kd, other.budget, other.integral_max = pid.kp, pid.ki, pid.kd, pid.budget, 1.0
    assert [other.update(c) for c in (0.2, 0.9, 0.0)] == [pid.update(c) for c in (0.2, 0.9, 0.0)]


@FAST
@given(st.lists(st.floats(0, 5), min_size=1, max_size=40), st.floats(0, 2), st.floats(0, 2), st.floats(0, 2))
def test_pid_lambda_never_negative_integral_bounded(costs, kp, ki, kd):
    pid = PIDLagrangian(budget=0.3, kp=kp, ki=ki, kd=kd, integral_max=2.0)
    for c in costs:
        assert pid.update(c) >= 0.0
        assert 0.0 <= pid.integral <= 2.0


@FAST
@given(st.floats(0.31, 5), st.floats(0, 2), st.floats(0.01, 2), st.integers(2, 40))
def test_pid_lambda_rises_while_cost_above_budget(cost, kp, ki, steps):
    pid = PIDLagrangian(budget=0.3, kp=kp, ki=ki, kd=0.5, integral_max=3.0)
    lams = [pid.update(cost) for _ in range(steps)]
    for k in range(1, steps):
        assert lams[k] >= lams[k - 1] - 1e-12
        if pid.integral_max - k * (cost - 0.3) > 1e-9:  # integral not yet saturated at step k
            assert lams[k] > lams[k - 1]
