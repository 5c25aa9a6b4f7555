"""The episode judge in its modes, the labelled judge set, and the rubric's numbers on it (bench --only judge)."""

from __future__ import annotations

import pytest

from gopo_online.config import GopoConfig, JudgeConfig
from gopo_online.types import JudgeScores, Trajectory, UserTurnMeta
from simulator import judge_set
from simulator.episode import play_episode
from simulator.judge_bench import AUC_TARGET, MARGIN_TARGET, auc, bench_judge, score_records, subset, summarise
from simulator.judging import EpisodeJudge
from simulator.personas import load_personas
from simulator.scenarios import FAMILIES, sample_instance
from simulator.user import UserTurn

CFG = GopoConfig()
EXPECTED_GATE = {
    "forbidden": "hard_constraint",
    "sop_break": "hard_constraint",
    "wrong_action": "hard_constraint",
    "wrong_fact": "unsupported_fact",
    "rude": "toxic",
    "off_topic": "off_topic",
    "empty": "empty",
    "copy_user": "copy_of_user",
    "stuffed": "stuffed",
}


@pytest.fixture(scope="module")
def scored():
    rubric = EpisodeJudge(CFG, "rubric")
    return {f: score_records(rubric, judge_set.load(f)) for f in FAMILIES}


def test_auc_by_hand():
    # good {0.9, 0.5}, bad {0.5, 0.1}: pairs (0.9>0.5) (0.9>0.1) (0.5=0.5 -> 1/2) (0.5>0.1) = 3.5 / 4
    assert auc([0.9, 0.5], [0.5, 0.1]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="good and bad"):
        auc([], [0.1])


def test_shipped_set_is_what_the_builder_writes_and_big_enough():
    for family in FAMILIES:
        records = judge_set.load(family)
        assert records == judge_set.build_family(family)  # rebuild with python -m simulator.judge_set
        assert len(records) >= 60
        kinds = {r["kind"] for r in records}
        assert kinds == set(judge_set.GOOD_KINDS) | set(judge_set.BAD_KINDS)
        assert {r["label"] for r in records if r["kind"] in judge_set.GOOD_KINDS} == {1}
        assert {r["label"] for r in records if r["kind"] in judge_set.BAD_KINDS} == {0}
        assert len({r["id"] for r in records}) == len(records)


def test_every_good_reply_passes_every_check_and_every_bad_one_fails_its_own(scored):
    for rows in scored.values():
        for r, v, _ in rows:
            gates = v.evidence["gates"]
            if r["label"] == 1:
                assert gates == [], (r["id"], v.evidence)
            elif r["kind"] == "wrong_fact" and not v.evidence["unsupported"]:
                # a shifted number that happens to exist elsewhere in the case (e.g. "14 days" for an order placed
                # 14 days ago) is not caught by number checks: a known limit, visible in the per-kind table
                continue
            else:
                assert EXPECTED_GATE[r["kind"]] in gates, (r["id"], r["reply"], v.evidence)


def test_rubric_reaches_the_default_bar_on_both_families(scored):
    for family, rows in scored.items():
        s = summarise(CFG, rows)
        assert s["auc"] >= AUC_TARGET and s["margin"] >= MARGIN_TARGET, (family, s)
        assert s["failed"] == 0 and s["n"] == len(rows)


def test_bench_rows_rubric_only():
    cfg = CFG.model_copy(update={"judge": CFG.judge.model_copy(update={"bench_llm_items": 0})})
    rows = bench_judge(cfg)
    metrics = {r["metric"]: r for r in rows}
    assert {f"rubric.{f}.{m}" for f in FAMILIES for m in ("auc", "accuracy", "margin", "cost_per_call")} <= set(metrics)
    assert metrics["qualifying_modes"]["modes"] == ["rubric"] and metrics["qualifying_modes"]["configured_default"] == (
        "rubric"
    )


def test_subset_is_round_robin_over_kinds():
    records = judge_set.load("ecommerce")
    pick = subset(records, 13)
    assert len({r["kind"] for r in pick}) == 13
    assert len(subset(records, 20)) == 20 and len(subset(records, 10_000)) == len(records)


class ScriptedUser:
    def respond(self, *, persona, instance, history, turn, seed=None):
        meta = UserTurnMeta(intent="complain", emotion="angry", satisfaction=2, stop=False)
        return UserTurn(utterance=f"Where is my food? It is {turn * 10} minutes late.", meta=meta, raw="{}", attempts=1)


class FixedExpert:
    def decide(self, state):
        return ("acknowledge_and_empathize", "verify_order_issue"), None


class ReplyCS:
    def __init__(self, replies):
        self.replies = replies

    def respond(self, state):
        reply, action = self.replies[state.turn - 1]
        return reply, action, None, None


class FixedLLM:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    def score(self, state, reply, action):
        self.calls += 1
        return JudgeScores(
            scores={k: self.value for k in (*CFG.judge.dimensions, *CFG.judge.gre_dimensions)},
            principles={k: 1.0 for k in CFG.judge.principles},
            raw="fixed",
        )


def _episode(judge, replies, inst):
    return play_episode(
        episode_id="j1",
        scenario_instance=inst,
        persona=load_personas()[0],
        user_sim=ScriptedUser(),
        expert=FixedExpert(),
        cs=ReplyCS(replies),
        judge=judge,
        cfg=CFG,
        seed=1,
        max_turns=len(replies),
    )


def test_rubric_evidence_lands_on_the_trajectory_and_ranks_replies():
    inst = sample_instance("food_delivery", seed=1, case_type="late")
    o = inst.context["order"]
    good = f"I'm so sorry that your order {o['order_id']} from {o['restaurant']} came late, I understand."
    stuffed = f"{o['restaurant']}: * [{o['restaurant']} AI] * {o['order_id']} * sorry * late * {o['restaurant']}"
    tr = _episode(EpisodeJudge(CFG, "rubric"), [(good, "chat"), (stuffed, "chat")], inst)
    assert tr.status == "ok", tr.error
    t1, t2 = tr.turns
    assert t1.judge.mode == "rubric" and t1.judge.evidence["gates"] == [] and t1.judge.evidence["hard_checks"] > 0
    assert "stuffed" in t2.judge.evidence["gates"]
    assert t1.rewards.r_cs - t2.rewards.r_cs >= 0.5
    assert tr.task_completion_turns[0] == 1  # the stuffed reply completes nothing
    assert Trajectory.from_json(tr.to_json()) == tr  # the evidence survives the wire


def test_mixed_mode_calls_both_and_llm_mode_only_the_model():
    inst = sample_instance("food_delivery", seed=1, case_type="late")
    o = inst.context["order"]
    reply = [(f"I'm so sorry about your order {o['order_id']}, I understand.", "chat")]
    llm = FixedLLM(0.0)
    cfg = GopoConfig(judge=JudgeConfig(mixed_rubric_weight=0.5))
    mixed = _episode(EpisodeJudge(cfg, "mixed", llm), reply, inst).turns[0].judge
    rubric = _episode(EpisodeJudge(cfg, "rubric"), reply, inst).turns[0].judge
    assert llm.calls == 1 and mixed.mode == "mixed"
    assert mixed.scores == pytest.approx({k: 0.5 * v for k, v in rubric.scores.items()})  # 0.5 * rubric + 0.5 * 0
    only = _episode(EpisodeJudge(cfg, "llm", FixedLLM(0.3)), reply, inst).turns[0].judge
    assert only.mode == "llm" and set(only.scores.values()) == {0.3} and only.evidence == {}
    with pytest.raises(ValueError, match="needs an LLM judge"):
        EpisodeJudge(cfg, "mixed")
