"""The labelled judge set: good and bad CS replies per scenario family, built from the scenarios' own content.

For each of `CASES_PER_FAMILY` sampled cases (the case types in turn) the builder writes one dialogue of three user
turns (one per sequential TSE task) and labels replies at those turns:

good (label 1)
  ``reference``   polite framing + the scenario's reference reply for the turn's task, an action the SOP allows;
  ``paraphrase``  the same facts in other words (written from the business context, not the reference text);
  ``combined``    one reply that covers the open task and the next one, in prose;
  ``guidance``    the next step with the guidance action the case allows.
bad (label 0)
  ``forbidden``     good content, but a sentence a chosen skill forbids (e.g. "I guarantee", "full refund approved");
  ``sop_break``     good content, but an action the scenario's SOP forbids here (refund before verification, a
                    voucher without photo evidence, a full refund without escalation, ...);
  ``wrong_action``  the reference reply with an action tag none of the chosen skills allows;
  ``wrong_fact``    the reference facts with a number changed (a delay, price, window or minutes the case does not
                    have);
  ``rude``          the facts, delivered rudely;
  ``off_topic``     a polite reply about something else;
  ``empty``         nothing;
  ``copy_user``     the user's own message echoed back;
  ``stuffed``       the product / order name repeated with bullet fragments and keywords (the reward-gaming reply
                    seen in a stress run).

Each record holds everything needed to score it again: the case (family, case type, seed, demand -> the same
`ScenarioInstance`), the turn, the history, the user's texts so far, the earlier actions, the Expert's skills, the
reply and its action. Chosen skills are the pool skills whose constraints the GOOD reply of that turn meets, so a good
reply is compliant by construction and a bad one breaks exactly what its kind says.

    python -m simulator.judge_set            # rewrite simulator/data/judge_set/<family>.jsonl
    python -m simulator.judge_set --check    # exit 1 when the shipped files differ from what the builder writes
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from gopo_online.skills import check_compliance
from gopo_online.types import Skill
from simulator.scenarios import FAMILIES, TASK_IDS, ScenarioInstance, get_family, sample_instance, sop_violations

JUDGE_SET_DIR = Path(__file__).parent / "data" / "judge_set"
CASES_PER_FAMILY = 8
GOOD_KINDS = ("reference", "paraphrase", "combined", "guidance")
BAD_KINDS = (
    "forbidden", "sop_break", "wrong_action", "wrong_fact", "rude", "off_topic", "empty", "copy_user", "stuffed"
)  # fmt: skip
DEMANDS = ("preference_learning", "rigid_pursuit", "incentive_open", "feedback_oriented")

OFF_TOPIC = (
    "Our spring garden furniture sale starts next week, with great deals on parasols and benches.",
    "Did you know that our mobile app now has a dark mode? Many people find it easier on the eyes.",
    "The weather looks lovely this weekend, perfect for a picnic in the park with friends.",
    "We are hiring! Our careers page lists open positions in marketing and design.",
    "Fun fact: honey never spoils, archaeologists have found edible honey in ancient tombs.",
    "Have a wonderful afternoon, and remember to drink plenty of water today.",
)
RUDE = (
    "Stop complaining. {fact} Deal with it.",
    "{fact} Honestly, this is a waste of my time, read the emails we send.",
    "Calm down, it is not our problem. {fact}",
    "{fact} I don't care how long you waited, that is your problem.",
)


def _money(x: float) -> str:
    return f"${x:.2f}"


def user_turns(inst: ScenarioInstance) -> tuple[str, str, str]:
    """The user's three messages of the dialogue (one per sequential task), from the case's user facts."""
    f = inst.user_facts
    if inst.case_type == "order_delay":
        return (
            f"Hi, I ordered the {f['product']} {f['ordered_days_ago']} days ago, order {f['order_id']}, and the parcel "
            "has not arrived yet. Where is it?",
            "Yes, that is the one. What is the status and when will it arrive?",
            "Okay. What can you do for me now?",
        )
    if inst.case_type == "return_refund":
        return (
            f"Hello, my {f['product']} from order {f['order_id']} came {f['delivered_days_ago']} days ago and "
            f"{f['problem']}. I want to send it back.",
            "Can I still return it, and how long would a refund take?",
            "Alright, what do I do next?",
        )
    if inst.case_type == "product_inquiry":
        return (
            f"Hi, do you have the {f['wants_product']}? I am thinking of buying it.",
            "How much is it, and can I get it now?",
            "Is there anything else you would suggest?",
        )
    third = (
        "So what will you do about it?"
        if inst.case_type == "late"
        else "I have attached a photo of it. What compensation can I get?"
    )
    return (
        f"My order {f['order_id']} from {f['restaurant']} is a mess: {f['problem']}.",
        "What happened, and what do you need from me?",
        third,
    )


def paraphrase(inst: ScenarioInstance, task: str) -> str:
    """The task's facts in other words than the reference reply (from the business context)."""
    ctx = inst.context
    if inst.family == "ecommerce" and inst.case_type == "product_inquiry":
        p = ctx["product"]
        alts = ctx.get("alternatives") or []
        return {
            "requirement_matching": f"Good question about the {p['name']}, I am happy to look into it for you.",
            "information_delivery": (
                f"Right now the {p['name']} is priced at {_money(p['price'])} and "
                + ("it is sold out at the moment." if p["stock"] == 0 else f"we have {p['stock']} units available.")
            ),
            "proactive_guidance": (
                f"If you like, you could also try the {alts[0]['name']}, which many customers choose for the same use."
                if alts
                else "I can notify you as soon as it is restocked, would you like that?"
            ),
        }[task]
    if inst.family == "ecommerce":
        o = ctx["order"]
        if inst.case_type == "order_delay":
            return {
                "requirement_matching": f"Thank you, I can see order {o['order_id']} for the {o['product_name']}.",
                "information_delivery": (
                    f"It is currently {o['status'].replace('_', ' ')} with {o['carrier']} (tracking {o['tracking']}) "
                    f"and should reach you in about {o['eta_days']} days."
                ),
                "proactive_guidance": "I will keep an eye on it and update you the moment the carrier scans it again.",
            }[task]
        win = ctx["policies"]["return_window_days"]
        days = ctx["policies"]["refund_processing_days"]
        return {
            "requirement_matching": f"Thanks, so you would like to return the {o['product_name']} from order "
            f"{o['order_id']}.",
            "information_delivery": (
                f"Returns are accepted within {win} days of delivery, and this order is "
                + ("eligible" if o["return_eligible"] else "not eligible")
                + f"; a refund reaches you within {days} business days."
            ),
            "proactive_guidance": "Shall I start your return now? You would get a prepaid label by email.",
        }[task]
    o = ctx["order"]
    late = o["actual_min"] - o["promised_min"]
    item = o["issue_item"] or o["items"][0]["name"]
    if inst.case_type == "late":
        info = (
            f"The rider delivered it after {o['actual_min']} min instead of the promised {o['promised_min']} min, "
            f"which is {late} min late."
        )
    else:
        price = next((it["price"] for it in o["items"] if it["name"] == item), o["items"][0]["price"])
        info = f"Please share a picture of the {item}; our policy then lets me compensate up to {_money(price)}."
    return {
        "requirement_matching": f"I am really sorry to hear about your {o['restaurant']} order {o['order_id']}.",
        "information_delivery": info,
        "proactive_guidance": "To make up for it I can add a voucher to your account for the next order.",
    }[task]


def good_action(inst: ScenarioInstance, task: str, turn: int, user_texts: tuple[str, ...]) -> str:
    """An action the SOP allows at this turn: chat, except guidance where the case's guidance action fits."""
    if task != "proactive_guidance":
        return "chat"
    for action in {
        "order_delay": ("chat",),
        "return_refund": ("return_label",),
        "product_inquiry": ("recommend",),
    }.get(inst.case_type, ("voucher", "escalate")):
        if not sop_violations(inst, turn=turn, action=action, prior_actions=(), user_texts=user_texts):
            return action
    return "chat"


def compliant_skills(fam_skills: tuple[Skill, ...], reply: str, action: str, rng: random.Random) -> tuple[str, ...]:
    """2-3 pool skills whose every constraint the reply and action meet (deterministic in rng)."""
    ok = [s for s in fam_skills if check_compliance(reply, action, [s]).violations == 0 and s.required_any]
    rng.shuffle(ok)
    return tuple(s.name for s in ok[: rng.choice((2, 3))]) if ok else ()


def _forbidden(inst: ScenarioInstance, fact: str) -> tuple[str, str]:
    """(skill that forbids it, reply): good content plus a sentence the skill forbids."""
    if inst.family == "ecommerce":
        oid = inst.case_id
        return "report_order_status", f"{fact} I guarantee that {oid} will be with you tomorrow morning."
    return "hold_policy_boundary", f"{fact} Unfortunately no voucher is possible, but a full refund has been approved."


def _sop_break(inst: ScenarioInstance) -> tuple[str, tuple[str, ...]]:
    """(action, prior actions) that break a rule of this case: a refund at turn 1 (before verification / without
    escalation), a voucher without photo evidence, or a second voucher."""
    if inst.family == "ecommerce":
        return ("refund", ()) if inst.case_type != "order_delay" else ("voucher", ("voucher",))
    return ("refund", ()) if inst.case_type == "late" else ("voucher", ())


def _wrong_action(inst: ScenarioInstance) -> tuple[str, str]:
    """(skill restricting the action, an action it does not allow)."""
    if inst.family == "ecommerce":
        return "issue_return_label", "escalate"
    return "request_photo_evidence", "voucher"


def _wrong_fact(fact: str, rng: random.Random) -> str:
    """The fact sentence with every stand-alone number (not ids) shifted to a value the case does not have."""
    shift = rng.choice((7, 11, 13))

    def bump(m: re.Match[str]) -> str:
        x = float(m.group(0)) + shift
        return f"{x:.2f}" if "." in m.group(0) else f"{x:g}"

    return re.sub(r"(?<![\w.])\d+(\.\d+)?(?![\w])", bump, fact)


def _stuffed(inst: ScenarioInstance, rng: random.Random) -> str:
    ctx = inst.context
    row = ctx.get("product") or ctx.get("order") or {}
    name = row.get("name") or row.get("product_name") or row.get("restaurant") or inst.case_id
    facts = [str(v) for k, v in row.items() if k in ("status", "carrier", "tracking", "price", "stock", "issue")]
    words = ["refund", "voucher", "sorry", "delay", "recommend", "return label", "in stock", "escalate"]
    rng.shuffle(words)
    if rng.random() < 0.5:
        return f"{name}: * [{name} AI] * " + " * ".join(f"{name} {w}" for w in words[:3]) + " * " + " * ".join(facts)
    return ", ".join([inst.case_id, name, *facts, *words[:5], name, name])


def _record(inst: ScenarioInstance, seed: int, demand: str, **kw: Any) -> dict[str, Any]:
    return {"family": inst.family, "case_type": inst.case_type, "seed": seed, "demand": demand,
            "instance_id": inst.instance_id, **kw}  # fmt: skip


def _build_case(family: str, c: int) -> list[dict[str, Any]]:
    """The labelled replies of the family's c-th case."""
    fam = get_family(family)
    out: list[dict[str, Any]] = []
    seed, demand = 1000 + c, DEMANDS[c % len(DEMANDS)]
    ct = fam.case_types[c % len(fam.case_types)]
    inst = sample_instance(family, seed=seed, demand=demand, case_type=ct)
    rng = random.Random(f"judge-set:{family}:{c}")
    users = user_turns(inst)
    refs = inst.reference_replies

    def turn_ctx(i: int) -> dict[str, Any]:
        history: list[list[str]] = []
        for j in range(i):
            history += [["user", users[j]], ["agent", refs[TASK_IDS[j]]]]
        return {"turn": i + 1, "tasks_done": list(TASK_IDS[:i]), "history": history,
                "user_utterance": users[i], "user_texts": list(users[: i + 1]),
                "prior_actions": ["chat"] * i}  # fmt: skip

    def add(kind: str, label: int, i: int, reply: str, action: str, skills: tuple[str, ...], **extra: Any) -> None:
        ctx = turn_ctx(i)
        ctx.update(extra)
        out.append(_record(inst, seed, demand, id=f"{family}/{c}/{kind}", kind=kind, label=label, **ctx,
                           expert_skills=list(skills), action=action, reply=reply))  # fmt: skip

    opener = rng.choice(("Hello, thank you for reaching out.", "Hi, thanks for contacting us.", "Thank you."))
    # good ---------------------------------------------------------------------------------------------------
    i = rng.randrange(2)  # requirement_matching or information_delivery turn
    task = TASK_IDS[i]
    reply = f"{opener} {refs[task]}" if i == 0 else f"{refs[task]} Let me know if you have any questions."
    add("reference", 1, i, reply, "chat", compliant_skills(fam.skills, reply, "chat", rng))
    j = 1 - i
    reply = paraphrase(inst, TASK_IDS[j])
    add("paraphrase", 1, j, reply, "chat", compliant_skills(fam.skills, reply, "chat", rng))
    reply = f"{paraphrase(inst, TASK_IDS[0])} {refs[TASK_IDS[1]]}"
    add("combined", 1, 0, reply, "chat", compliant_skills(fam.skills, reply, "chat", rng))
    action = good_action(inst, TASK_IDS[2], 3, tuple(users))
    reply = f"Thanks for your patience. {refs[TASK_IDS[2]]}"
    add("guidance", 1, 2, reply, action, compliant_skills(fam.skills, reply, action, rng))
    # bad ----------------------------------------------------------------------------------------------------
    fact = refs[TASK_IDS[1]]
    skill, reply = _forbidden(inst, fact)
    add("forbidden", 0, 1, reply, "chat", (skill, *compliant_skills(fam.skills, fact, "chat", rng)[:1]))
    action, prior = _sop_break(inst)
    if prior:  # a second voucher: at turn 2, after a first one
        add("sop_break", 0, 1, f"{fact} I have added a voucher to your account.", action, (),
            prior_actions=list(prior))  # fmt: skip
    else:
        add("sop_break", 0, 0, f"{opener} {refs[TASK_IDS[0]]}", action, ())
    skill, action = _wrong_action(inst)
    reply = f"{refs[TASK_IDS[1]]} Let me know if you have any questions."
    add("wrong_action", 0, 1, reply, action, (skill,))
    reply = _wrong_fact(fact, rng)
    add("wrong_fact", 0, 1, reply, "chat", compliant_skills(fam.skills, reply, "chat", rng))
    reply = rng.choice(RUDE).format(fact=fact)
    add("rude", 0, 1, reply, "chat", ())
    add("off_topic", 0, rng.randrange(3), rng.choice(OFF_TOPIC), "chat", ())
    add("empty", 0, rng.randrange(3), rng.choice(("", " ", "\n")), "chat", ())
    k = rng.randrange(3)
    add("copy_user", 0, k, users[k], "chat", ())
    k = rng.randrange(3)
    stuffed_action = ("recommend" if inst.case_type == "product_inquiry" else "chat") if k == 2 else "chat"
    add("stuffed", 0, k, _stuffed(inst, rng), stuffed_action, ())
    return out


def build_family(family: str, n_cases: int = CASES_PER_FAMILY) -> list[dict[str, Any]]:
    """The labelled replies of one family (deterministic)."""
    return [r for c in range(n_cases) for r in _build_case(family, c)]


def write_all(out_dir: Path = JUDGE_SET_DIR) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for family in FAMILIES:
        path = out_dir / f"{family}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in build_family(family)))
        paths[family] = path
    return paths


def load(family: str, path: Path | None = None) -> list[dict[str, Any]]:
    """The shipped labelled replies of `family`."""
    path = path or JUDGE_SET_DIR / f"{family}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no judge set for {family!r} at {path}; build it with python -m simulator.judge_set")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=JUDGE_SET_DIR)
    ap.add_argument("--check", action="store_true", help="compare the shipped files with a fresh build")
    args = ap.parse_args(argv)
    if args.check:
        stale = [f for f in FAMILIES if load(f, args.out / f"{f}.jsonl") != build_family(f)]
        if stale:
            print(f"judge set out of date for {stale}: run python -m simulator.judge_set", file=sys.stderr)
            return 1
        print("judge set up to date")
        return 0
    for family, path in write_all(args.out).items():
        print(f"{family}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
