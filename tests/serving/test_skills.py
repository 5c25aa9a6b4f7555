"""Hard-constraint checks and the Expert grammar (gopo_online/skills.py)."""

from __future__ import annotations

import re
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gopo_online.skills import (
    MAX_GRAMMAR_POOL,
    allowed_actions,
    check_compliance,
    constraint_lines,
    expert_grammar,
    grammar_rule_count,
    parse_expert_output,
)
from gopo_online.types import Skill

APOLOGIZE = Skill(
    name="apologize",
    description="Apologize for the inconvenience.",
    required_any=((r"\bsorry\b", r"apolog"),),
    forbidden=(r"not our fault",),
)
VOUCHER = Skill(
    name="offer_voucher",
    description="Offer a voucher.",
    required_any=((r"voucher", r"coupon"), (r"\d+\s*%|\$\d+",)),
    allowed_actions=("voucher",),
)
ESCALATE = Skill(name="escalate_human", description="Hand over to a human.", allowed_actions=("escalate",))
PLAIN = Skill(name="greet", description="Greet the customer.")


# ----------------------------------------------------------------------------- compliance
def test_compliance_all_passed_case_insensitive():
    c = check_compliance("SORRY! Here is a Voucher worth 10 %.", "voucher", [APOLOGIZE, VOUCHER])
    # apologize: 1 required + 1 forbidden; voucher: 2 required + 1 action = 5 checks
    assert [(ch.skill, ch.kind) for ch in c.checks] == [
        ("apologize", "required"),
        ("apologize", "forbidden"),
        ("offer_voucher", "required"),
        ("offer_voucher", "required"),
        ("offer_voucher", "action"),
    ]
    assert c.violations == 0 and c.score == 1.0


def test_compliance_counts_each_violation():
    c = check_compliance("It is not our fault. Here is a coupon.", "chat", [APOLOGIZE, VOUCHER])
    failed = [(ch.skill, ch.kind, ch.target) for ch in c.checks if not ch.passed]
    assert failed == [
        ("apologize", "required", r"\bsorry\b | apolog"),
        ("apologize", "forbidden", "not our fault"),
        ("offer_voucher", "required", r"\d+\s*%|\$\d+"),
        ("offer_voucher", "action", "voucher"),
    ]
    # 4 of 5 checks failed -> score 1 - 4/5
    assert c.violations == 4 and c.score == pytest.approx(0.2)


def test_compliance_without_constraints_is_perfect():
    c = check_compliance("hello", "chat", [PLAIN])
    assert c.checks == () and c.score == 1.0


def test_bad_regex_names_the_skill():
    bad = Skill(name="broken", description="x", forbidden=("(unclosed",))
    with pytest.raises(ValueError, match="broken"):
        check_compliance("hi", "chat", [bad])


def test_allowed_actions_intersection_union_default():
    assert allowed_actions([PLAIN]) == ("chat", "voucher", "refund", "escalate")
    assert allowed_actions([PLAIN, VOUCHER]) == ("voucher",)
    both = Skill(name="either", description="x", allowed_actions=("voucher", "refund"))
    assert allowed_actions([both, VOUCHER]) == ("voucher",)
    # conflicting skills: the union, so the violation is counted by the checker rather than hidden by the decoder
    assert allowed_actions([VOUCHER, ESCALATE]) == ("voucher", "escalate")


def test_constraint_lines_are_readable():
    lines = constraint_lines(APOLOGIZE) + constraint_lines(VOUCHER)
    assert lines[0] == 'MUST include one of "sorry" / "apolog"'
    assert lines[1] == 'MUST NOT include "not our fault"'
    assert "allowed actions: voucher" in lines


# ----------------------------------------------------------------------------- grammar
def _language(grammar: str) -> set[str]:
    """Every string the grammar admits, by expanding its rules (our grammars are finite and tiny in tests).

    Understands exactly the subset `expert_grammar` emits: alternatives of `"lit"` / `"lit" rule?` and a rule
    body `"sep" (alts)`.
    """
    rules = dict(line.split(" ::= ", 1) for line in grammar.strip().splitlines())

    def expand(name: str) -> set[str]:
        body = rules[name]
        prefix = ""
        m = re.fullmatch(r'"([^"]*)" \((.*)\)', body)
        if m:
            prefix, body = m.group(1), m.group(2)
        out: set[str] = set()
        for alt in body.split(" | "):
            m = re.fullmatch(r'"([^"]*)"(?: (\w+)\?)?', alt)
            assert m, f"unexpected alternative {alt!r}"
            lit, ref = m.group(1), m.group(2)
            out.add(prefix + lit)
            if ref:
                out |= {prefix + lit + tail for tail in expand(ref)}
        return out

    return expand("root")


@pytest.mark.parametrize(("n", "k"), [(1, 5), (3, 1), (3, 2), (4, 3), (5, 5)])
def test_grammar_language_is_exactly_the_distinct_sequences(n, k):
    pool = [f"skill_{chr(97 + i)}" for i in range(n)]
    expected = {", ".join(p) for j in range(1, min(k, n) + 1) for p in permutations(pool, j)}
    grammar = expert_grammar(pool, k)
    assert _language(grammar) == expected
    assert grammar.count("::=") == grammar_rule_count(n, k)


def test_grammar_handles_prefix_names():
    # "refund" is a prefix of "refund_policy": the separator keeps them apart
    lang = _language(expert_grammar(["refund", "refund_policy"], 5))
    assert lang == {"refund", "refund_policy", "refund, refund_policy", "refund_policy, refund"}


def test_grammar_is_cached_and_validates_pool():
    pool = ["greet", "apologize", "check_order"]
    assert expert_grammar(pool, 5) is expert_grammar(tuple(pool), 5)
    with pytest.raises(ValueError, match="duplicates"):
        expert_grammar(["greet", "greet"], 2)
    with pytest.raises(ValueError, match="snake case"):
        expert_grammar(["Greet me"], 2)
    with pytest.raises(ValueError, match="empty"):
        expert_grammar([], 2)
    with pytest.raises(ValueError, match="MAX_GRAMMAR_POOL"):
        expert_grammar([f"s{i:02d}" for i in range(MAX_GRAMMAR_POOL + 1)], 5)


def test_grammar_rule_count_for_a_full_pool():
    # n = 12, max 5: root + C(12,1) + C(12,2) + C(12,3) + C(12,4) = 1 + 12 + 66 + 220 + 495
    assert grammar_rule_count(12, 5) == 794


# ----------------------------------------------------------------------------- parsing
def test_parse_expert_output():
    pool = ["greet", "apologize", "check_order"]
    assert parse_expert_output("apologize, check_order", pool) == ("apologize", "check_order")
    assert parse_expert_output("  greet.\n", pool) == ("greet",)
    for bad, why in [("", "empty"), ("greet, greet", "repeats"), ("greet, dance", "outside"), ("greet,", "outside")]:
        with pytest.raises(ValueError, match=why):
            parse_expert_output(bad, pool)
    with pytest.raises(ValueError, match="more than 2"):
        parse_expert_output("greet, apologize, check_order", pool, max_skills=2)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["greet", "apologize", "check_order", "offer_voucher", "refund"]), min_size=1, max_size=5)
)
def test_parse_accepts_exactly_distinct_sequences(skills):
    pool = ["greet", "apologize", "check_order", "offer_voucher", "refund"]
    text = ", ".join(skills)
    if len(set(skills)) == len(skills):
        assert parse_expert_output(text, pool) == tuple(skills)
        assert text in _language(expert_grammar(pool[:5], 5))
    else:
        with pytest.raises(ValueError):
            parse_expert_output(text, pool)


def test_grammar_compiles_with_xgrammar():
    """The grammar is valid for xgrammar (vLLM's grammar backend on CPU) and it rejects a repeated skill."""
    xgr = pytest.importorskip("xgrammar")
    from gopo_online.models import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("default model not prepared (its tokenizer is needed)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok), cache_enabled=False)
    pool = ["greet", "apologize", "check_order", "offer_voucher", "refund", "refund_policy"]
    compiled = compiler.compile_grammar(expert_grammar(pool, 5))
    for text, ok in [
        ("refund_policy, refund", True),
        ("greet, apologize, check_order, offer_voucher, refund", True),
        ("greet, apologize, greet", False),
        ("greet, apologize, check_order, offer_voucher, refund, refund_policy", False),
        ("dance", False),
    ]:
        m = xgr.GrammarMatcher(compiled)
        accepted = m.accept_string(text) and m.is_terminated() is False and m.accept_token(tok.eos_token_id)
        assert bool(accepted) is ok, text
