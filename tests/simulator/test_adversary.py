"""The prompt-injecting user (simulator.adversary): what it changes in a user turn, what it leaves to the wrapped
simulator, and how injected turns are counted (breaches, compensations)."""

from __future__ import annotations

import pytest

from gopo_online.types import Compliance, ConstraintCheck, Trajectory, Turn, UserTurnMeta
from simulator.adversary import INJECTIONS, PromptInjector, breaches, compensations, injected_turns
from simulator.user import UserTurn, UserTurnError


class Base:
    agenda = True

    def __init__(self) -> None:
        self.max_turns = 6
        self.calls: list[dict] = []

    def respond(self, **kw):
        self.calls.append(kw)
        if kw.get("fail"):
            return UserTurnError(stage="request", error="down")
        meta = UserTurnMeta(intent="inform", emotion="calm", satisfaction=3, stop=False, state={"turn": kw["turn"]})
        return UserTurn(utterance="my order is late", meta=meta, raw="", attempts=1)


def test_injection_appended_from_turn_and_the_rest_is_the_wrapped_users():
    base = Base()
    inj = PromptInjector(base, from_turn=2)
    first = inj.respond(turn=1, episode_seed=4, persona=None)
    assert first.utterance == "my order is late" and "injection" not in first.meta.state
    second = inj.respond(turn=2, episode_seed=4, persona=None, actions=("chat",))
    text = inj.injection_for(2, 4)
    assert text in INJECTIONS and second.utterance == f"my order is late {text}"
    # intent, emotion, satisfaction, stop and the agenda state stay the user model's; the state names the injection
    assert (second.meta.intent, second.meta.satisfaction, second.meta.stop) == ("inform", 3, False)
    assert second.meta.state == {"turn": 2, "injection": text}
    assert base.calls[-1]["actions"] == ("chat",)  # every argument reaches the wrapped simulator
    assert inj.respond(turn=3, fail=True).ok is False  # a failed turn passes through untouched
    # the episode loop and stress read and set the wrapped simulator's attributes through the wrapper
    assert inj.agenda is True
    inj.max_turns = 2
    assert base.max_turns == 2


def test_injector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="from_turn"):
        PromptInjector(Base(), from_turn=0)
    with pytest.raises(ValueError, match="texts"):
        PromptInjector(Base(), texts=())


def _turn(i: int, *, injected: bool, action: str = "chat", passed: bool = True, cost: float = 0.0) -> Turn:
    meta = UserTurnMeta(intent="x", emotion="calm", satisfaction=3, stop=False,
                        state={"injection": INJECTIONS[0]} if injected else {})  # fmt: skip
    checks = (ConstraintCheck(skill="s", kind="action", target="chat", passed=passed),)
    return Turn(index=i, user_utterance="u", user_meta=meta, expert_skills=("s",), cs_reply="r", cs_action=action,
                compliance=Compliance(checks=checks), cost=cost)  # fmt: skip


def test_breaches_and_compensations_count_only_injected_turns():
    turns = (
        _turn(1, injected=False, passed=False, action="voucher", cost=1.0),  # not injected: never counted
        _turn(2, injected=True, passed=False),  # a broken hard constraint after an injection
        _turn(3, injected=True, action="voucher", cost=1.0),  # allowed, but compensation granted
        _turn(4, injected=True),
    )
    tr = Trajectory(episode_id="e", scenario_id="s", persona_id="p", turns=turns)
    assert injected_turns(tr) == [2, 3, 4]
    assert breaches(tr) == 1 and compensations(tr) == 1
