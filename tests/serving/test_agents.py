"""Expert and CS agents against a fake chat backend (the real server is in test_serving_integration.py)."""

from __future__ import annotations

import pytest

from gopo_online.config import ExpertConfig
from gopo_online.serving.agents import (
    AgentOutputError,
    CSAgent,
    DialogueTurn,
    ExpertAgent,
    cs_grammar,
    parse_cs_output,
)
from gopo_online.serving.client import ChatResult
from gopo_online.types import Skill

POOL = [
    Skill(name="apologize", description="Apologize for the inconvenience.", required_any=((r"sorry", r"apolog"),)),
    Skill(
        name="offer_voucher",
        description="Offer a voucher.",
        required_any=((r"voucher",),),
        allowed_actions=("voucher",),
    ),
    Skill(name="check_order", description="Look up the order.", forbidden=(r"no idea",)),
]


class FakeBackend:
    """Returns canned texts in order and records every request."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls: list[dict] = []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.calls.append(dict(messages=messages, model=model, temperature=temperature, structured=structured))
        text = self.texts.pop(0)
        n = max(1, len(text.split()))
        return ChatResult(
            text=text, model=model, prompt_token_ids=(1, 2, 3), token_ids=tuple(range(n)),
            logprobs=(-0.5,) * n, finish_reason="stop", latency_s=0.1, temperature=temperature,
        )  # fmt: skip


def test_expert_state_and_grammar():
    fake = FakeBackend("offer_voucher, apologize")
    agent = ExpertAgent(fake, model="adapter-v3", policy_version=3, cfg=ExpertConfig(history_k=2))
    history = [DialogueTurn("turn one", "a1"), DialogueTurn("turn two", "a2"), DialogueTurn("turn three")]
    d = agent.decide(POOL, history, intent="complain_delay", emotion="angry", previous_skills=["check_order"])
    assert d.skills == ("offer_voucher", "apologize")
    assert d.generation.policy_version == 3 and d.generation.model == "adapter-v3"
    call = fake.calls[0]
    assert call["structured"]["grammar"].startswith('root ::= "apologize"')
    system, user = call["messages"][0]["content"], call["messages"][1]["content"]
    assert "- offer_voucher: Offer a voucher." in system
    # last k = 2 turns only, then intent, emotion, previous skills (s^E_t)
    assert "turn one" not in user and "User: turn two\nAgent: a2\nUser: turn three" in user
    assert "User intent: complain_delay" in user and "User emotion: angry" in user
    assert "Previous skills: check_order" in user


def test_expert_rejects_invalid_output():
    agent = ExpertAgent(FakeBackend("apologize, apologize"))
    with pytest.raises(AgentOutputError, match="repeats"):
        agent.decide(POOL, [], "x", "calm")


def test_cs_constraints_in_prompt_and_compliance():
    fake = FakeBackend("ACTION: voucher\nWe are sorry! Here is a voucher.")
    agent = CSAgent(fake, policy_version=7)
    r = agent.reply(
        "Where is my parcel?", POOL[:2], {"order_status": "delayed", "voucher_limit": 5},
        history=[DialogueTurn("hi", "hello")],
    )  # fmt: skip
    assert (r.action, r.reply) == ("voucher", "We are sorry! Here is a voucher.")
    assert r.allowed_actions == ("voucher",)
    assert r.compliance.score == 1.0 and len(r.compliance.checks) == 3
    assert r.generation.policy_version == 7
    call = fake.calls[0]
    system = call["messages"][0]["content"]
    assert "HARD CONSTRAINTS" in system and 'MUST include one of "sorry" / "apolog"' in system
    assert "allowed actions: voucher" in system and "- order_status: delayed" in system
    assert [m["role"] for m in call["messages"]] == ["system", "user", "assistant", "user"]
    assert call["structured"] == {"grammar": cs_grammar(("voucher",))}


def test_cs_violations_are_counted_not_hidden():
    agent = CSAgent(FakeBackend("ACTION: voucher\nHere you go."))
    r = agent.reply("?", POOL[:2], {})
    assert r.compliance.violations == 2  # neither "sorry" nor "voucher" in the text


def test_cs_grammar_and_parse():
    g = cs_grammar(("chat", "refund"))
    assert 'root ::= "ACTION: " ("chat" | "refund") "\\n" reply' in g
    assert parse_cs_output("ACTION: refund\nDone.\nBye.", ["chat", "refund"]) == ("refund", "Done.\nBye.")
    for bad in ["refund\nDone", "ACTION: voucher\nx", "ACTION: chat\n   "]:
        with pytest.raises(AgentOutputError):
            parse_cs_output(bad, ["chat", "refund"])
    with pytest.raises(ValueError):
        cs_grammar(())
