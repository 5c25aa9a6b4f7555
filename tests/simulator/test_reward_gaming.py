"""Rewards that resist gaming: the TSE task detectors (simulator.scenarios) are not satisfied by a copy of the product
name, a list of keywords, a copy of the user's text, or a reply unrelated to the user's last message (issue 8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.scenarios import (
    FAMILIES,
    TASK_IDS,
    ScenarioStore,
    detect_task,
    detect_tasks,
    get_family,
    sample_instance,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ScenarioStore(path=tmp_path_factory.mktemp("store") / "s.sqlite")


def _basspro(store):
    for seed in range(500):
        inst = sample_instance("ecommerce", seed=seed, case_type="product_inquiry", store=store)
        if inst.context["product"]["name"] == "BassPro Over-Ear Headphones":
            return inst
    raise AssertionError("no BassPro case in the store")


def test_the_issue_example_completes_no_task(store):
    # From a 12-persona stress run: this "reply" gave TSE 1.0 (all three tasks) with the old regex detectors.
    inst = _basspro(store)
    p = inst.context["product"]
    alt = inst.context["alternatives"][0]["name"]
    stuffed = (
        f"BassPro Over-Ear Headphones: * [BassPro Over-Ear Headphones AI] * BassPro Over-Ear Headphones in stock * "
        f"${p['price']:.2f} * {p['warranty_months']}-month * recommend {alt.split()[0]} * BassPro Over-Ear Headphones"
    )
    assert detect_tasks(inst, stuffed, "recommend", ()) == ()
    assert detect_tasks(inst, stuffed, "chat", (), "Do you have the BassPro headphones?") == ()
    # the same facts written as sentences do complete them, in order
    prose = (
        f"Yes, the BassPro Over-Ear Headphones are in stock at ${p['price']:.2f}, with a {p['warranty_months']}-month "
        f"warranty. If you want something lighter, I recommend the {alt}."
    )
    assert detect_tasks(inst, prose, "chat", (), "Do you have the BassPro headphones?") == TASK_IDS


def test_unrelated_reply_and_copy_of_the_user_complete_nothing(store):
    inst = sample_instance("ecommerce", seed=3, case_type="order_delay", store=store)
    o = inst.context["order"]
    user = f"My order {o['order_id']} has still not arrived, what can you do?"
    done = ("requirement_matching", "information_delivery")
    unrelated = "Our garden furniture sale is on, and we can notify you by email about new parasols."
    # the pattern "notify" matches, so the old detector credited it; it has nothing to do with the user or the case
    assert detect_task(inst, "proactive_guidance", unrelated, "chat")
    assert not detect_task(inst, "proactive_guidance", unrelated, "chat", user)
    assert detect_tasks(inst, user, "chat", (), user) == ()  # the user's words echoed back
    on_topic = "I will send you the tracking link and notify you as soon as the carrier scans it."
    assert detect_tasks(inst, on_topic, "chat", done, user) == ("proactive_guidance",)


_KEYWORDS = ["refund", "voucher", "coupon", "sorry", "delay", "late", "in stock", "available", "tracking", "recommend",
             "escalate", "return label", "photo", "policy", "minutes", "notify", "AI", "30-day"]  # fmt: skip


@st.composite
def stuffed_case(draw):
    """A scenario case and a reply built from its own keywords: names, ids, facts and task words, as fragments."""
    family = draw(st.sampled_from(sorted(FAMILIES)))
    ct = draw(st.sampled_from(get_family(family).case_types))
    inst = sample_instance(family, seed=draw(st.integers(0, 400)), case_type=ct)
    ctx = inst.context
    row = ctx.get("product") or ctx.get("order") or {}
    names = [inst.case_id] + [str(row[k]) for k in ("name", "product_name", "restaurant", "carrier", "tracking")
                              if row.get(k)]  # fmt: skip
    facts = [str(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    pool = names + facts + _KEYWORDS
    parts = draw(st.lists(st.sampled_from(pool), min_size=3, max_size=12))
    name = draw(st.sampled_from(names))
    parts += [name] * draw(st.integers(0, 3))
    parts = draw(st.permutations(parts))
    sep = draw(st.sampled_from([" * ", ", ", " | ", "\n- ", " • ", "; ", " [", " "]))
    head = draw(st.sampled_from(["", f"{name}: ", f"[{name}] "]))
    action = draw(st.sampled_from(inst.guidance_actions + ("chat",)))
    return inst, head + sep.join(parts), action


@settings(max_examples=150)
@given(stuffed_case())
def test_keyword_stuffed_replies_complete_no_task(case):
    inst, reply, action = case
    assert detect_tasks(inst, reply, action, ()) == (), reply
    for task in TASK_IDS:
        assert not detect_task(inst, task, reply, action), (task, reply)
