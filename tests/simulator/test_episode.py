"""play_episode with small in-test agents (unit level; the real server runs in test_stress_integration)."""

from __future__ import annotations

import pytest

from gopo_online.config import GopoConfig
from gopo_online.types import JudgeScores, Trajectory, UserTurnMeta
from simulator.episode import SINGLE_AGENT_SKILL, OpenAIChatAgent, play_episode
from simulator.personas import load_personas
from simulator.scenarios import sample_instance
from simulator.user import UserTurn, UserTurnError

CFG = GopoConfig()


class ScriptedUser:
    """Returns scripted metas; turn k's entry is the user's k-th message."""

    def __init__(self, metas, fail_at=None):
        self.metas = metas
        self.fail_at = fail_at
        self.calls = []

    def respond(self, *, persona, instance, history, turn, seed=None):
        self.calls.append((turn, len(history), seed))
        if turn == self.fail_at:
            return UserTurnError(stage="json", error="no valid turn", raw_outputs=("{bad",), attempts=3)
        intent, emotion, sat, stop, tasks = self.metas[min(turn, len(self.metas)) - 1]
        meta = UserTurnMeta(intent=intent, emotion=emotion, satisfaction=sat, stop=stop, completed_tasks=tasks)
        return UserTurn(utterance=f"user message {turn}", meta=meta, raw="{}", attempts=1)


class FixedExpert:
    def __init__(self, skills):
        self.skills = tuple(skills)
        self.states = []

    def decide(self, state):
        self.states.append(state)
        return self.skills, None


class ReplyCS:
    def __init__(self, replies, boom_at=None):
        self.replies = replies
        self.boom_at = boom_at

    def respond(self, state):
        if state.turn == self.boom_at:
            raise RuntimeError("cs server went away")
        reply, action = self.replies[min(state.turn, len(self.replies)) - 1]
        return reply, action, None, None


class FullJudge:
    def score(self, state, reply, action):
        return JudgeScores(
            scores={k: 0.5 for k in (*CFG.judge.dimensions, *CFG.judge.gre_dimensions)},
            principles={k: 1.0 for k in CFG.judge.principles},
        )


@pytest.fixture(scope="module")
def persona():
    return load_personas()[0]


@pytest.fixture(scope="module")
def inst():
    return sample_instance("food_delivery", seed=1, case_type="late")


def _replies(inst):
    o = inst.context["order"]
    late = o["actual_min"] - o["promised_min"]
    return [
        ("Hello, how can I help?", "chat"),
        (f"I'm sorry about order {o['order_id']}.", "chat"),
        (f"It arrived {late} minutes late; I can offer a voucher.", "voucher"),
    ]


def test_happy_path_fills_rewards_tse_costs(persona, inst):
    user = ScriptedUser(
        [
            ("complain", "angry", 2, True, ()),
            ("complain", "angry", 2, False, ()),
            ("provide_info", "frustrated", 3, False, ("requirement_matching",)),
            ("thank", "satisfied", 4, True, ("information_delivery", "proactive_guidance")),
        ]
    )
    expert = FixedExpert(["acknowledge_and_empathize", "offer_voucher"])
    tr = play_episode(
        episode_id="e1",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=expert,
        cs=ReplyCS(_replies(inst)),
        judge=FullJudge(),
        cfg=CFG,
        seed=3,
    )
    assert tr.status == "ok" and tr.finished and tr.final_satisfaction == 4
    assert len(tr.turns) == 3  # the stop message after reply 3 ends the episode (the opening stop is ignored)
    # rule detector: reply 2 names the order (task 1); reply 3 states the delay and gives a voucher (tasks 2+3)
    assert tr.task_completion_turns == (2, 3, 3)
    assert [t.cost for t in tr.turns] == [0.0, 0.0, 1.0]
    t3 = tr.turns[2]
    assert t3.rewards is not None and t3.rewards.r_cs == pytest.approx(0.5)
    assert 0.0 <= t3.rewards.r_expert <= 1.0 and t3.rewards.w_expert > tr.turns[0].rewards.w_expert
    assert t3.teacher_skills and set(t3.timings) == {"simulator", "expert", "cs", "judge"}
    # empathy skill needs an empathy word: reply 1 fails it, and offer_voucher needs action "voucher"
    assert tr.turns[0].compliance.violations >= 2 and any(c.skill == "sop" for c in t3.compliance.checks)
    assert expert.states[1].history[0] == ("user", "user message 1") and expert.states[1].prev_skills == expert.skills
    assert Trajectory.from_json(tr.to_json()) == tr


def test_tse_source_simulator_uses_claims(persona, inst):
    user = ScriptedUser(
        [
            ("complain", "angry", 2, False, ()),
            ("complain", "angry", 2, False, ("requirement_matching",)),
            ("thank", "satisfied", 4, True, ("information_delivery",)),
        ]
    )
    tr = play_episode(
        episode_id="e2",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=FixedExpert(["verify_order_issue"]),
        cs=ReplyCS([("ok", "chat")]),
        judge=None,
        cfg=CFG,
        seed=0,
        tse_source="simulator",
    )
    assert tr.task_completion_turns == (1, 2, None)
    assert all(t.rewards is None and t.judge is None for t in tr.turns)


def test_max_turns_asks_for_final_verdict(persona, inst):
    user = ScriptedUser([("complain", "neutral", 3, False, ())])
    tr = play_episode(
        episode_id="e3",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=FixedExpert(["verify_order_issue"]),
        cs=ReplyCS([("ok", "chat")]),
        judge=None,
        cfg=CFG,
        seed=0,
        max_turns=2,
    )
    assert tr.status == "ok" and len(tr.turns) == 2 and not tr.finished and tr.final_satisfaction == 3
    assert [c[0] for c in user.calls] == [1, 2, 3]


def test_agent_exception_becomes_error_trajectory(persona, inst):
    user = ScriptedUser([("complain", "angry", 2, False, ())])
    tr = play_episode(
        episode_id="e4",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=FixedExpert(["verify_order_issue"]),
        cs=ReplyCS([("ok", "chat")], boom_at=2),
        judge=FullJudge(),
        cfg=CFG,
        seed=0,
    )
    assert tr.status == "error" and len(tr.turns) == 1
    assert tr.error.startswith("turn 2 cs: RuntimeError: cs server went away")
    assert Trajectory.from_json(tr.to_json()).error == tr.error


def test_simulator_error_turn_ends_episode_explicitly(persona, inst):
    user = ScriptedUser([("complain", "angry", 2, False, ())], fail_at=2)
    tr = play_episode(
        episode_id="e5",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=FixedExpert(["verify_order_issue"]),
        cs=ReplyCS([("ok", "chat")]),
        judge=None,
        cfg=CFG,
    )
    assert tr.status == "error" and len(tr.turns) == 1 and "json failed" in tr.error and "{bad" in tr.error


def test_expert_outside_pool_is_an_error(persona, inst):
    user = ScriptedUser([("complain", "angry", 2, False, ())])
    tr = play_episode(
        episode_id="e6",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=FixedExpert(["fly_to_the_moon"]),
        cs=ReplyCS([("ok", "chat")]),
        judge=None,
        cfg=CFG,
    )
    assert tr.status == "error" and "outside the pool" in tr.error and tr.turns == ()


class _Res:
    def __init__(self, text):
        self.text = text


class _EchoClient:
    def __init__(self, text):
        self.text = text
        self.last = None

    def chat(self, messages, **kw):
        self.last = (messages, kw)
        return _Res(self.text)


def test_single_agent_marker_and_action_parsing(persona, inst):
    client = _EchoClient("We are sorry! Here is a voucher for you.\nACTION: voucher")
    user = ScriptedUser([("complain", "angry", 2, False, ()), ("thank", "satisfied", 5, True, ())])
    tr = play_episode(
        episode_id="e7",
        scenario_instance=inst,
        persona=persona,
        user_sim=user,
        expert=None,
        cs=OpenAIChatAgent(client, "m"),
        judge=FullJudge(),
        cfg=CFG,
        seed=1,
    )
    t = tr.turns[0]
    assert t.expert_skills == (SINGLE_AGENT_SKILL,) and t.cs_action == "voucher" and "ACTION" not in t.cs_reply
    assert t.rewards.w_expert == 0.0 and t.rewards.joint == t.rewards.r_cs and t.cost == 1.0
    assert all(c.skill in ("scenario", "sop") for c in t.compliance.checks)
    assert "Business context" in client.last[0][0]["content"] and client.last[1]["seed"] is not None
    assert OpenAIChatAgent(_EchoClient("no tag"), "m").respond(_state_of(tr, inst))[1] == "chat"


def _state_of(tr, inst):
    from simulator.state import DialogueState

    fam = inst.scenario
    return DialogueState(
        episode_id="x",
        turn=1,
        family=inst.family,
        case_type=inst.case_type,
        user_utterance="hi",
        user_intent="greet",
        user_emotion="calm",
        skill_pool=fam.skills,
        action_tags=fam.action_tags,
        business_context=inst.business_context(),
    )
