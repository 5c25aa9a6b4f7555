"""The wire records (gopo_online/types.py): exact JSON round trip of random Trajectories, and the validators."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gopo_online.types import (
    MAX_SKILLS,
    Compliance,
    ConstraintCheck,
    Generation,
    JudgeScores,
    Trajectory,
    Turn,
    TurnRewards,
    UserTurnMeta,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
unit = st.floats(0.0, 1.0)
text = st.text(max_size=30)
skill_name = st.from_regex(r"[a-z][a-z0-9_]{1,12}", fullmatch=True)


@st.composite
def generations(draw) -> Generation:
    n = draw(st.integers(0, 8))
    return Generation(
        prompt_token_ids=tuple(draw(st.lists(st.integers(0, 200_000), max_size=8))),
        completion_token_ids=tuple(draw(st.lists(st.integers(0, 200_000), min_size=n, max_size=n))),
        logprobs=tuple(
            draw(st.lists(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        ),
        text=draw(text),
        model=draw(st.sampled_from(["policy", "expert-lora", "cs-lora"])),
        policy_version=draw(st.integers(0, 1000)),
        temperature=draw(st.floats(0.0, 2.0)),
        latency_s=draw(nonneg),
        finish_reason=draw(st.none() | st.sampled_from(["stop", "length"])),
    )


@st.composite
def turns(draw, index: int) -> Turn:
    skills = draw(st.lists(skill_name, min_size=1, max_size=MAX_SKILLS, unique=True))
    judge = draw(
        st.none()
        | st.builds(
            JudgeScores,
            scores=st.dictionaries(text, unit, max_size=4),
            principles=st.dictionaries(text, st.sampled_from([0.0, 0.5, 1.0]), max_size=3),
            raw=text,
        )
    )
    rewards = draw(
        st.none()
        | st.builds(
            TurnRewards,
            r_expert=unit,
            r_cs=finite,
            w_expert=nonneg,
            w_cs=st.floats(min_value=1e-6, allow_nan=False, allow_infinity=False),
            joint=finite,
            process=finite,
            compliance=unit,
            skill_distance=st.none() | st.floats(0.0, 2.0),
        )
    )
    checks = draw(
        st.lists(
            st.builds(
                ConstraintCheck,
                skill=st.sampled_from(skills),
                kind=st.sampled_from(["required", "forbidden", "action"]),
                target=text,
                passed=st.booleans(),
            ),
            max_size=4,
        )
    )
    return Turn(
        index=index,
        user_utterance=draw(text),
        user_meta=UserTurnMeta(
            intent=draw(text),
            emotion=draw(text),
            satisfaction=draw(st.integers(1, 5)),
            stop=draw(st.booleans()),
            completed_tasks=tuple(draw(st.lists(text, max_size=3))),
        ),
        expert_skills=tuple(skills),
        teacher_skills=tuple(draw(st.lists(skill_name, max_size=MAX_SKILLS, unique=True))),
        expert_gen=draw(st.none() | generations()),
        cs_reply=draw(text),
        cs_action=draw(st.sampled_from(["chat", "voucher", "refund", "escalate"])),
        cs_gen=draw(st.none() | generations()),
        compliance=Compliance(checks=tuple(checks)),
        judge=judge,
        rewards=rewards,
        cost=draw(nonneg),
        timings=draw(st.dictionaries(st.sampled_from(["simulator", "expert", "cs", "judge"]), nonneg)),
    )


@st.composite
def trajectories(draw) -> Trajectory:
    status = draw(st.sampled_from(["ok", "error"]))
    n = draw(st.integers(1 if status == "ok" else 0, 4))
    ts = tuple(draw(turns(i)) for i in range(1, n + 1))
    # sequential tasks: completed ones in non-decreasing turn order, within 1..n
    done = sorted(draw(st.lists(st.integers(1, max(n, 1)), max_size=3)))
    completion = tuple(done) + (None,) * draw(st.integers(0, 3 - len(done)))
    return Trajectory(
        episode_id=draw(st.uuids()).hex,
        scenario_id=draw(text),
        persona_id=draw(text),
        persona_group=draw(text),
        seed=draw(st.none() | st.integers(0, 2**31)),
        turns=ts,
        status=status,
        error=draw(text.filter(bool)) if status == "error" else None,
        final_satisfaction=draw(st.none() | st.integers(1, 5)),
        finished=draw(st.booleans()),
        task_completion_turns=completion if n else (),
        worker=draw(text),
        started_at=draw(nonneg),
        duration_s=draw(nonneg),
    )


@FAST
@given(trajectories())
def test_trajectory_json_round_trip(t: Trajectory):
    back = Trajectory.from_json(t.to_json())
    assert back == t
    assert back.to_json() == t.to_json()
    assert Trajectory.from_json(t.to_json().encode()) == t


def _meta() -> UserTurnMeta:
    return UserTurnMeta(intent="ask", emotion="calm", satisfaction=3, stop=False)


def _turn(i: int = 1, **kw) -> Turn:
    return Turn(
        **{
            "index": i,
            "user_utterance": "hi",
            "user_meta": _meta(),
            "expert_skills": ("greet",),
            "cs_reply": "hello",
            "cs_action": "chat",
            **kw,
        }
    )


def _gen(**kw) -> dict:
    return {
        "prompt_token_ids": (1, 2),
        "completion_token_ids": (3, 4),
        "logprobs": (-0.1, -0.2),
        "text": "ok",
        "model": "policy",
        "policy_version": 0,
        "temperature": 1.0,
        "latency_s": 0.1,
        **kw,
    }


def test_generation_rejects_length_mismatch_and_positive_logprob():
    Generation(**_gen())
    with pytest.raises(ValidationError, match="logprobs has 1 entries"):
        Generation(**_gen(logprobs=(-0.1,)))
    with pytest.raises(ValidationError, match="logprob is > 0"):
        Generation(**_gen(logprobs=(-0.1, 0.5)))


def test_turn_rejects_repeated_or_too_many_skills():
    with pytest.raises(ValidationError, match="distinct"):
        _turn(expert_skills=("greet", "offer", "greet"))
    with pytest.raises(ValidationError, match="distinct"):
        _turn(teacher_skills=("a", "a"))
    with pytest.raises(ValidationError):
        _turn(expert_skills=("a", "b", "c", "d", "e", "f"))
    with pytest.raises(ValidationError):
        _turn(expert_skills=())


def test_trajectory_validators():
    base = {"episode_id": "e1", "scenario_id": "s", "persona_id": "p"}
    Trajectory(**base, turns=(_turn(1), _turn(2)), task_completion_turns=(1, 2, None))
    with pytest.raises(ValidationError, match="must say why"):
        Trajectory(**base, status="error")
    with pytest.raises(ValidationError, match="carries an error"):
        Trajectory(**base, turns=(_turn(1),), error="boom")
    with pytest.raises(ValidationError, match="complete in order"):
        Trajectory(**base, turns=(_turn(1), _turn(2), _turn(3)), task_completion_turns=(3, 1, None))
    with pytest.raises(ValidationError, match="outside"):
        Trajectory(**base, turns=(_turn(1),), task_completion_turns=(2, None, None))
    with pytest.raises(ValidationError, match="1..n in order"):
        Trajectory(**base, turns=(_turn(1), _turn(3)))
    with pytest.raises(ValidationError, match="no turns"):
        Trajectory(**base)
    with pytest.raises(ValidationError):
        Trajectory(**base, turns=(_turn(1),), unknown_field=1)
    with pytest.raises(ValidationError):
        JudgeScores(principles={"logic": 0.7})
    with pytest.raises(ValidationError):
        JudgeScores(scores={"quality": 1.5})
    with pytest.raises(ValidationError):  # NaN never travels
        Trajectory.from_json(
            Trajectory(**base, turns=(_turn(1),)).to_json().replace('"duration_s":0.0', '"duration_s":NaN')
        )
