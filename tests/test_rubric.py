"""The rubric judge (gopo_online.rubric): text evidence, gates, scores and the mixed mode."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gopo_online.config import GopoConfig, JudgeConfig
from gopo_online.rubric import (
    RubricCase,
    is_copy,
    is_prose,
    mix_verdicts,
    reference_f1,
    relevant,
    resolve_mode,
    rubric_verdict,
    structure,
    unsupported_facts,
)
from gopo_online.types import JudgeScores, Skill

DIMS = ["quality", "skill_compliance", "empathy", "diversity", "politeness", "product_appropriateness",
        "action_guidance"]  # fmt: skip
PRINS = ["logic", "empathy", "compliance"]
USER = "Hi, I ordered the BassPro Over-Ear Headphones last week, order 482211. Are they in stock again?"
CTX = {"product": {"name": "BassPro Over-Ear Headphones", "price": 89.0, "stock": 80, "warranty_months": 12}}
TERMS = ("BassPro Over-Ear Headphones", "headphones", "stock", "price")
GOOD = "Thanks for asking! The BassPro Over-Ear Headphones cost $89 and are in stock, with 80 units left."
ISSUE_STUFFED = (
    "BassPro Over-Ear Headphones: * [BassPro Over-Ear Headphones AI] * BassPro Over-Ear Headphones in stock * $89 * "
    "recommend BassPro Over-Ear Headphones"
)


def _case(reply: str, action: str = "chat", **kw) -> RubricCase:
    base = {
        "user_utterance": USER,
        "reply": reply,
        "action": action,
        "case_terms": TERMS,
        "context": CTX,
        "references": ("The BassPro Over-Ear Headphones costs $89 and is in stock (80 left).",),
        "tasks_hit": ("requirement_matching", "information_delivery"),
        "task_pending": "information_delivery",
    }
    base.update(kw)
    return RubricCase(**base)


def _ra(v: JudgeScores) -> float:
    # gopo eq 8 with the default weights: 0.3 quality + 0.3 skill_compliance + 0.2 empathy + 0.2 diversity
    return (
        0.3 * v.scores["quality"]
        + 0.3 * v.scores["skill_compliance"]
        + 0.2 * v.scores["empathy"]
        + 0.2 * v.scores["diversity"]
    )


def test_prose_and_structure():
    assert is_prose("It costs $19.") and is_prose("Your order is in transit with UPS.")
    assert not is_prose("BassPro Over-Ear Headphones") and not is_prose("* $89")
    s = structure(ISSUE_STUFFED)
    # "basspro over-ear" occurs 4 times; under half of the words sit in sentences
    assert s.stuffed and s.repeat == 4 and s.prose_fraction < 0.5
    assert not structure(GOOD).stuffed
    assert structure("refund, voucher, sorry, delay, 482211, BassPro, headphones, tracking").stuffed


def test_relevance_copy_and_reference_overlap():
    assert relevant(GOOD, USER) and not relevant("Our garden furniture sale starts next week.", USER, TERMS)
    assert relevant("I will check the stock for you.", "thanks", TERMS)  # about the case, not the user's words
    assert is_copy(USER, USER) and not is_copy(GOOD, USER)
    # stems of GOOD and the reference share basspro, over-ear, headphones, $89, stock, 80 ... F1 well above 0.5
    assert reference_f1(GOOD, ["The BassPro Over-Ear Headphones costs $89 and is in stock (80 left)."]) > 0.5
    assert reference_f1("", ["anything"]) == 0.0


def test_unsupported_numbers_are_named():
    assert unsupported_facts(GOOD, CTX, (USER,)) == []
    assert unsupported_facts("They cost $99 and 80 are left.", CTX) == ["99"]
    # minutes late = actual - promised is supported; 3 and below are small counts
    food = {"order": {"promised_min": 30, "actual_min": 75}}
    assert unsupported_facts("It came 45 min late, after 75 min; sorry for the 2 cold dishes.", food) == []
    assert unsupported_facts("It came 50 min late.", food) == ["50"]
    assert unsupported_facts("We refund up to 50% of it.", {"policies": {"partial_refund_max_fraction": 0.5}}) == []
    assert unsupported_facts("About order 999999: it is late.", {"order": {"order_id": "482211"}}) == ["999999"]


def test_good_reply_scores_high_and_keeps_its_evidence():
    v = rubric_verdict(_case(GOOD), DIMS, PRINS)
    assert v.ok and v.mode == "rubric" and v.evidence["gates"] == []
    assert v.evidence["relevant"] and v.evidence["reference_f1"] > 0.5 and v.evidence["polite"] >= 1
    assert _ra(v) > 0.7 and v.principles["compliance"] == 1.0


@pytest.mark.parametrize(
    ("reply", "action", "skills", "gate"),
    [
        ("", "chat", (), "empty"),
        ("Stop complaining. They cost $89, deal with it.", "chat", (), "toxic"),
        (ISSUE_STUFFED, "recommend", (), "stuffed"),
        (USER, "chat", (), "copy_of_user"),
        ("Our spring garden furniture sale starts next week, with great deals on benches.", "chat", (), "off_topic"),
        ("They cost $99 and are in stock.", "chat", (), "unsupported_fact"),
        (
            GOOD,
            "voucher",
            (Skill(name="recommend_product", description="d", allowed_actions=("recommend",)),),
            "hard_constraint",
        ),
        (
            GOOD + " I guarantee it.",
            "chat",
            (Skill(name="no_promises", description="d", forbidden=(r"\bguarantee",)),),
            "hard_constraint",
        ),
    ],
)
def test_each_gate_caps_the_reward(reply, action, skills, gate):
    good = _ra(rubric_verdict(_case(GOOD), DIMS, PRINS))
    v = rubric_verdict(_case(reply, action, skills=skills), DIMS, PRINS)
    assert gate in v.evidence["gates"], v.evidence
    assert _ra(v) <= 0.25 and good - _ra(v) >= 0.5  # gate factor 0.25 on scores <= 1
    assert all(p == 0.0 for p in v.principles.values())


def test_unknown_dimension_is_an_error_naming_it():
    with pytest.raises(ValueError, match="wit"):
        rubric_verdict(_case(GOOD), ["quality", "wit"], PRINS)


def test_mixed_mode_weights_each_dimension_and_survives_a_failed_llm():
    rub = rubric_verdict(_case(GOOD), ["quality"], ["logic"])
    llm = JudgeScores(scores={"quality": 0.2}, principles={"logic": 0.0}, raw="x")
    m = mix_verdicts(rub, llm, 0.75)
    # 0.75 * rubric + 0.25 * 0.2
    assert m.scores["quality"] == pytest.approx(0.75 * rub.scores["quality"] + 0.05) and m.mode == "mixed"
    assert m.evidence["llm_scores"] == {"quality": 0.2}
    failed = mix_verdicts(rub, JudgeScores(ok=False, error="no digits"), 0.5)
    assert failed.ok and failed.scores == rub.scores and "no digits" in failed.notes[-1]


def test_auto_mode_is_rubric_on_the_small_default_and_llm_for_a_capable_judge():
    assert resolve_mode(GopoConfig()) == "rubric"
    ext = GopoConfig.model_validate(
        {"serving": {"simulator": "external", "external_url": "http://h/v1", "external_model": "big"}}
    )
    assert resolve_mode(ext) == "llm"
    assert resolve_mode(GopoConfig(judge=JudgeConfig(mode="mixed"))) == "mixed"


_NAMES = ["BassPro Over-Ear Headphones", "AirTone Wireless Earbuds", "order 482211", "Burger Barn", "F731378"]
_KEYWORDS = ["refund", "voucher", "sorry", "delay", "in stock", "$89", "tracking", "recommend", "escalate", "12-month",
             "return label", "photo", "coupon", "AI", "notify"]  # fmt: skip


@st.composite
def stuffed_replies(draw) -> str:
    """A product/order name repeated with keyword fragments, joined as bullets, commas, brackets or pipes."""
    name = draw(st.sampled_from(_NAMES))
    kws = draw(st.lists(st.sampled_from(_KEYWORDS), min_size=3, max_size=10))
    sep = draw(st.sampled_from([" * ", ", ", " | ", "\n- ", " • ", " [", "; "]))
    parts: list[str] = []
    for kw in kws:
        parts.append(draw(st.sampled_from([kw, f"{name} {kw}", f"[{name} {kw}]", f"{kw} {name}"])))
    parts.insert(draw(st.integers(0, len(parts))), name)
    parts.insert(draw(st.integers(0, len(parts))), name)
    head = draw(st.sampled_from(["", f"{name}: ", f"{name} - "]))
    return head + sep.join(parts)


@given(stuffed_replies())
def test_keyword_stuffed_replies_fail_the_rubric(reply):
    v = rubric_verdict(_case(reply, "recommend"), DIMS, PRINS)
    assert "stuffed" in v.evidence["gates"], (reply, v.evidence["structure"])
    assert _ra(v) <= 0.25
