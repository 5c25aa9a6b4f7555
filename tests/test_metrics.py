"""Metrics (gopo_online/metrics.py): TSE (gopo eq 11), GRE, BLEU, rates and `summarize`."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gopo_online.config import RewardsConfig
from gopo_online.metrics import bleu, cost_incidence, cost_rate, finish_rate, gre, summarize, tse
from gopo_online.rewards import joint_reward
from gopo_online.types import Compliance, ConstraintCheck, JudgeScores, Trajectory, Turn, UserTurnMeta

W, G = (0.4, 0.3, 0.3), 0.9
FAST = settings(max_examples=200, deadline=None)


def test_tse_hand_values():
    # issue example: N = (1, 3, 4): 0.4*0.9^(1-0-1) + 0.3*0.9^(3-1-1) + 0.3*0.9^(4-3-1) = 0.4 + 0.27 + 0.3 = 0.97
    assert tse((1, 3, 4), W, G) == pytest.approx(0.97)
    # N = (2, 5, None): 0.4*0.9 + 0.3*0.9^2 + 0 = 0.36 + 0.243 = 0.603
    assert tse((2, 5, None), W, G) == pytest.approx(0.603)
    # all in the first three turns, one per turn: every exponent 0 -> Σω = 1
    assert tse((1, 2, 3), W, G) == pytest.approx(1.0)
    assert tse((None, None, None), W, G) == 0.0


def test_tse_sequential_and_same_turn_decisions():
    # task 1 incomplete: the later completions do not count (sequential tasks)
    assert tse((None, 2, 3), W, G) == 0.0
    assert tse((1, None, 3), W, G) == pytest.approx(0.4)
    # two tasks in one turn: exponent max(2 - 2 - 1, 0) = 0, no bonus above ω
    assert tse((2, 2, 3), W, G) == pytest.approx(0.4 * 0.9 + 0.3 + 0.3)
    with pytest.raises(ValueError, match="before task"):
        tse((3, 2, 4), W, G)
    with pytest.raises(ValueError, match="3 task weights"):
        tse((1, 2), W, G)


@FAST
@given(
    st.lists(st.integers(1, 8), min_size=3, max_size=3).map(sorted),
    st.integers(0, 3),
    st.floats(0.01, 1.0),
)
def test_tse_range_and_monotone_in_delay(turns, n_done, gamma):
    N = [t if i < n_done else None for i, t in enumerate(turns)]
    v = tse(N, W, gamma)
    assert 0.0 <= v <= sum(W) + 1e-12
    # completing the last done task one turn later never raises TSE
    if n_done:
        later = list(N)
        later[n_done - 1] += 1
        assert tse(later, W, gamma) <= v + 1e-12


def test_gre_bleu_rates():
    # turn means: (0.5 + 1 + 0)/3 = 0.5 and (1 + 1 + 1)/3 = 1 -> GRE 0.75
    s1 = {"politeness": 0.5, "product_appropriateness": 1.0, "action_guidance": 0.0, "quality": 0.2}
    s2 = {"politeness": 1.0, "product_appropriateness": 1.0, "action_guidance": 1.0}
    assert gre([s1, s2]) == pytest.approx(0.75)
    assert math.isnan(gre([]))
    with pytest.raises(KeyError, match="action_guidance"):
        gre([{"politeness": 1.0, "product_appropriateness": 1.0}])
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu(["completely different words here"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    b = bleu(["the cat sat on a mat today"], [["the cat sat on the mat", "a cat sat on a mat today"]])
    assert 0.0 < b <= 1.0
    assert 0.0 < bleu(["the cat sat on the red mat"], ["the cat sat on the mat"]) < 1.0
    assert finish_rate([True, False, True, True]) == 0.75
    assert cost_rate([0.0, 1.0, 2.0, 1.0]) == 1.0
    assert cost_incidence([0.0, 1.0, 2.0, 0.0]) == 0.5
    assert math.isnan(finish_rate([]))


def _turn(i: int, skills, teacher, cost=0.0, judge=None, rewards=True, passed=(True,)):
    return Turn(
        index=i,
        user_utterance="hi",
        user_meta=UserTurnMeta(intent="ask", emotion="calm", satisfaction=3, stop=False),
        expert_skills=tuple(skills),
        teacher_skills=tuple(teacher),
        cs_reply="hello",
        cs_action="voucher" if cost else "chat",
        compliance=Compliance(
            checks=tuple(ConstraintCheck(skill=skills[0], kind="required", target="x", passed=p) for p in passed)
        ),
        judge=judge,
        rewards=joint_reward(1.0 if list(skills) == list(teacher) else 0.0, 0.5, i).to_turn_rewards(process=0.5)
        if rewards
        else None,
        cost=cost,
    )


def test_summarize_keys_and_values():
    gre_scores = {"politeness": 1.0, "product_appropriateness": 0.5, "action_guidance": 0.0}
    a = Trajectory(
        episode_id="a",
        scenario_id="s",
        persona_id="p",
        turns=(
            _turn(1, ["greet"], ["greet"], judge=JudgeScores(scores=gre_scores)),
            _turn(2, ["offer"], ["apologise"], cost=1.0, passed=(True, False)),
        ),
        final_satisfaction=4,
        finished=True,
        task_completion_turns=(1, 2, None),  # 0.4 + 0.3 = 0.7
    )
    b = Trajectory(
        episode_id="b",
        scenario_id="s",
        persona_id="p",
        # no recorded rewards: reward/esndcg falls back to ESNDCG of the skills ([b, a] vs [a, b] = 0.79671)
        turns=(_turn(1, ["b", "a"], ["a", "b"], rewards=False),),
        final_satisfaction=2,
        task_completion_turns=(None, None, None),  # 0
    )
    err = Trajectory(episode_id="c", scenario_id="s", persona_id="p", status="error", error="simulator timeout")
    cfg = RewardsConfig()
    m = summarize([a, b, err], cfg.tse_weights, cfg.tse_gamma)
    assert m["episode/count"] == 3.0
    assert m["episode/error_rate"] == pytest.approx(1 / 3)
    assert m["episode/tse"] == pytest.approx((0.7 + 0.0) / 2)
    assert m["episode/satisfaction"] == pytest.approx(3.0)
    assert m["episode/finish_rate"] == pytest.approx(0.5)
    assert m["episode/cost_rate"] == pytest.approx(0.5)  # episode costs 1 and 0
    assert m["episode/cost_incidence"] == pytest.approx(0.5)
    assert m["episode/gre"] == pytest.approx(0.5)  # one judged turn: (1 + 0.5 + 0)/3
    # compliance per turn: 1, 0.5 (one of two checks failed), 1 -> mean 2.5/3
    assert m["episode/compliance"] == pytest.approx(2.5 / 3)
    assert m["reward/esndcg"] == pytest.approx((1.0 + 0.0 + 0.796708) / 3, abs=1e-6)
    assert m["reward/process"] == pytest.approx(0.5)
    assert all(k.split("/")[0] in {"episode", "reward"} for k in m)
    assert all(isinstance(v, float) and not math.isnan(v) for v in m.values())
    # an empty batch reports only the count
    assert summarize([], cfg.tse_weights, cfg.tse_gamma) == {"episode/count": 0.0}
