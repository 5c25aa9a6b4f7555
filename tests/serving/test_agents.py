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
    agent = ExpertAgent(fake, model="adapter-v3", policy_version=3, cfg=ExpertConfig(history_k=2, skill_codes=False))
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
    agent = ExpertAgent(FakeBackend("apologize, apologize"), cfg=ExpertConfig(skill_codes=False))
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
    system, last = call["messages"][0]["content"], call["messages"][-1]["content"]
    assert "HARD CONSTRAINTS" in system and "- order_status: delayed" in system
    # this turn's skills come last (after the stable system prompt and the past turns)
    assert last.startswith("Where is my parcel?\n") and 'MUST include one of "sorry" / "apolog"' in last
    assert "allowed actions: voucher" in last and "one of: voucher" in last and "apolog" not in system
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


# ----------------------------------------------------------------------------- skill codes and shared prefixes
def test_skill_codes_are_one_to_one_and_mnemonic():
    from gopo_online.serving.agents import _ONE_TOKEN_CODES, skill_codes

    codes = skill_codes([s.name for s in POOL])
    assert codes == {"apologize": "ap", "offer_voucher": "ov", "check_order": "co"}
    big = [f"skill_{w}_{i}" for i, w in enumerate("abcdefghijkl")]  # 12 names with the same initials
    cb = skill_codes(big)
    assert len(set(cb.values())) == 12 and set(cb.values()) <= set(_ONE_TOKEN_CODES)
    assert skill_codes(big) == cb  # a pure function of the pool
    with pytest.raises(ValueError, match="duplicates"):
        skill_codes(["greet", "greet"])


def test_expert_writes_codes_and_returns_names():
    fake = FakeBackend("ov, ap")
    agent = ExpertAgent(fake, model="a", policy_version=1)  # default config: codes on
    d = agent.decide(POOL, [DialogueTurn("where is it?")], "complain_delay", "angry", previous_skills=["check_order"])
    assert d.skills == ("offer_voucher", "apologize") and d.generation.text == "ov, ap"
    call = fake.calls[0]
    grammar = call["structured"]["grammar"]
    assert grammar.startswith('root ::= "ap"') and "offer_voucher" not in grammar  # the decoder writes codes
    system, user = (m["content"] for m in call["messages"])
    assert "ov: offer_voucher - Offer a voucher." in system and "Previous skills: co" in user


@pytest.mark.parametrize("codes", [True, False])
def test_expert_grammar_ref_rebuilds_the_grammar_the_server_got(codes):
    """The learner replays `Generation.grammar` to mask its logits like the server did: with skill codes the
    decoder's grammar runs over the codes, so the recorded reference must name the codes, not the skill names."""
    from trainer.grammar import grammar_text

    fake = FakeBackend("ov, ap" if codes else "offer_voucher, apologize")
    agent = ExpertAgent(fake, model="a", policy_version=1, cfg=ExpertConfig(skill_codes=codes))
    d = agent.decide(POOL, [DialogueTurn("where is it?")], "complain_delay", "angry")
    assert grammar_text(d.generation.grammar) == fake.calls[0]["structured"]["grammar"]


@pytest.mark.parametrize("text", ["ov, ov", "offer_voucher", "ov, zz", ""])
def test_expert_codes_keep_the_distinct_pool_guarantee(text):
    with pytest.raises(AgentOutputError):
        ExpertAgent(FakeBackend(text)).decide(POOL, [], "x", "calm")


def test_expert_code_grammar_admits_exactly_distinct_codes():
    from itertools import permutations

    from gopo_online.serving.agents import skill_codes
    from tests.serving.test_skills import _language

    names = [s.name for s in POOL]
    codes = list(skill_codes(names).values())
    fake = FakeBackend("ap")
    ExpertAgent(fake, cfg=ExpertConfig(max_skills=2)).decide(POOL, [], "x", "calm")
    lang = _language(fake.calls[0]["structured"]["grammar"])
    want = {", ".join(p) for k in (1, 2) for p in permutations(codes, k)}
    assert lang == want


def test_expert_system_prompt_is_shared_across_turns_and_episodes():
    fake = FakeBackend("ap", "co")
    agent = ExpertAgent(fake)
    agent.decide(POOL, [DialogueTurn("a")], "i1", "calm")
    agent.decide(POOL, [DialogueTurn("b", "c"), DialogueTurn("d")], "i2", "angry", previous_skills=["apologize"])
    assert fake.calls[0]["messages"][0] == fake.calls[1]["messages"][0]


def test_cs_past_turns_are_a_prefix_of_the_next_turn():
    fake = FakeBackend("ACTION: voucher\nSorry, a voucher.", "ACTION: chat\nLet me check.")
    agent = CSAgent(fake)
    ctx = {"order_status": "delayed"}
    agent.reply("Where is it?", POOL[:2], ctx, history=[DialogueTurn("hi", "hello")])
    agent.reply("And now?", [POOL[2]], ctx, history=[DialogueTurn("hi", "hello"), DialogueTurn("Where is it?", "x")])
    first, second = (c["messages"] for c in fake.calls)
    assert second[: len(first) - 1] == first[:-1]  # system + past turns unchanged: the prefix cache's part
