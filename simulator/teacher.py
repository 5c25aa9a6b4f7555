"""Teacher skill sequences T for every Expert decision (gopo §3.3), produced OFFLINE and stored.

The state is reduced to a signature (family, case type, turn bucket, user intent, emotion bucket, number of TSE
tasks done); `generate_table` writes one row per signature to `simulator/data/teacher/<family>.jsonl`, either from
the scenario SOP rules (`sop_sequence`, the default) or from a stronger model through an openai client (rows it
gets wrong fall back to the SOP sequence and say so in `source`). At runtime `teacher_skills` only looks up the
stored table: deterministic, no model call.

    python -m simulator.teacher                       # regenerate from the SOP rules
    python -m simulator.teacher --base-url URL --model NAME   # stronger-model mode
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
from pathlib import Path
from typing import Any

from gopo_online.types import MAX_SKILLS
from simulator.scenarios import FAMILIES, TASK_IDS, ScenarioInstance, get_family
from simulator.state import INTENTS, DialogueState, emotion_bucket, normalise_intent

TEACHER_DIR = Path(__file__).parent / "data" / "teacher"
TURN_BUCKETS = ("1", "2", "3+")
EMOTION_BUCKETS = ("negative", "neutral", "positive")


def turn_bucket(turn: int) -> str:
    return "1" if turn <= 1 else "2" if turn == 2 else "3+"


def signature(family: str, case_type: str, turn: int | str, intent: str, emotion: str, n_done: int) -> str:
    tb = turn if isinstance(turn, str) else turn_bucket(turn)
    emo = emotion if emotion in EMOTION_BUCKETS else emotion_bucket(emotion)
    return f"{family}|{case_type}|{tb}|{normalise_intent(intent)}|{emo}|{n_done}"


def state_signature(state: DialogueState) -> str:
    return signature(
        state.family,
        state.case_type,
        state.turn,
        state.user_intent,
        state.user_emotion,
        sum(t in state.tasks_done for t in TASK_IDS),
    )


def _cap(seq: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in seq:
        if s not in out:
            out.append(s)
    return tuple(out[:MAX_SKILLS])


def sop_sequence(family: str, case_type: str, tb: str, intent: str, emo: str, n_done: int) -> tuple[str, ...]:
    """The SOP's reference skill sequence for one state signature (ordered by importance)."""
    seq: list[str] = []
    if family == "ecommerce":
        if emo == "negative":
            seq.append("express_empathy")
        elif tb == "1" or intent in ("greet", "thank"):
            seq.append("greet_and_acknowledge")
        if intent == "reject_offer" and emo == "negative" and tb == "3+":
            seq.append("escalate_to_specialist")
        if n_done == 0:
            seq.append("check_inventory" if case_type == "product_inquiry" else "verify_order_details")
        if n_done <= 1:
            seq += {
                "order_delay": ["report_order_status", "apologize_for_delay"],
                "return_refund": ["explain_return_policy"],
                "product_inquiry": ["check_inventory"],
            }[case_type]
        if n_done <= 2:
            if case_type == "order_delay":
                seq.append(
                    "offer_coupon"
                    if intent in ("demand_compensation", "complain") and tb == "3+"
                    else "escalate_to_specialist"
                    if intent == "reject_offer"
                    else "report_order_status"
                )
            elif case_type == "return_refund":
                seq.append("process_refund" if intent == "request_refund" and tb != "1" else "issue_return_label")
            else:
                seq.append("recommend_product")
                if intent == "demand_compensation":
                    seq.append("offer_coupon")
        if intent == "inquire_status":
            seq.append("report_order_status")
        if intent == "ask_recommendation":
            seq.append("recommend_product")
        if n_done >= 3 and not seq:
            seq.append("greet_and_acknowledge")
    else:
        evidence_case = case_type in ("damaged", "missing")
        if emo == "negative" or tb == "1":
            seq.append("acknowledge_and_empathize")
        if n_done == 0:
            seq.append("verify_order_issue")
        if n_done <= 1:
            if case_type == "late":
                seq.append("explain_delivery_delay")
            elif intent == "provide_evidence":
                seq.append("explain_compensation_policy")
            else:
                seq.append("request_photo_evidence")
        if n_done <= 2:
            if intent == "reject_offer" and emo == "negative" and tb == "3+":
                seq.append("escalate_to_supervisor")
            elif intent in ("request_refund", "demand_compensation") and evidence_case and tb == "1":
                seq += ["request_photo_evidence", "hold_policy_boundary"]
            elif intent == "request_refund":
                seq += ["offer_partial_refund"] if evidence_case else ["hold_policy_boundary", "offer_voucher"]
            elif intent in ("demand_compensation", "accept_offer", "provide_evidence") or case_type == "late":
                seq.append("offer_voucher")
            else:
                seq.append("contact_merchant_or_rider")
        if n_done >= 2 or intent in ("thank", "accept_offer"):
            seq.append("close_with_reassurance")
    return _cap(seq)


def all_signatures(family: str) -> list[tuple[str, str, str, str, int]]:
    fam = get_family(family)
    return list(itertools.product(fam.case_types, TURN_BUCKETS, INTENTS, EMOTION_BUCKETS, range(4)))


def _model_sequence(client: Any, model: str, family: str, sig: tuple, timeout_s: float) -> tuple[str, ...] | None:
    fam = get_family(family)
    case, tb, intent, emo, n_done = sig
    pool = "\n".join(f"- {s.name}: {s.description}" for s in fam.skills)
    prompt = (
        f"You are a senior {fam.title} supervisor. SOP rules: {'; '.join(fam.sop_rules)}.\n"
        f"Case: {case}. Turn {tb}. The user's intent is {intent}, emotion {emo}; {n_done} of the tasks "
        f"(requirement matching, information delivery, proactive guidance) are done.\nSkill pool:\n{pool}\n"
        "Answer with a JSON list of 1-5 distinct skill names, most important first."
    )
    schema = {"type": "array", "items": {"enum": list(fam.skill_names)}, "minItems": 1, "maxItems": MAX_SKILLS}
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0.0,
        seed=0,
        max_tokens=80,
        timeout=timeout_s,
        extra_body={"structured_outputs": {"json": schema}},
    )
    try:
        seq = json.loads(resp.choices[0].message.content or "")
    except json.JSONDecodeError:
        return None
    if not isinstance(seq, list) or not seq or any(s not in fam.skill_names for s in seq):
        return None
    out = _cap([str(s) for s in seq])
    return out if len(out) == len(seq) else None


def generate_table(
    family: str, out_dir: Path = TEACHER_DIR, *, client: Any = None, model: str | None = None, timeout_s: float = 60.0
) -> Path:
    """Write the teacher table of `family`; with `client`+`model` the stronger model answers each signature."""
    rows = []
    for sig in all_signatures(family):
        seq = sop_sequence(family, *sig)
        source = "sop"
        if client is not None and model:
            got = _model_sequence(client, model, family, sig, timeout_s)
            seq, source = (got, f"model:{model}") if got else (seq, "sop_fallback")
        case, tb, intent, emo, n_done = sig
        rows.append({"key": f"{family}|{case}|{tb}|{intent}|{emo}|{n_done}", "skills": list(seq), "source": source})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{family}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TeacherTable:
    """The stored tables, loaded once; `lookup` is a dict access."""

    def __init__(self, directory: Path = TEACHER_DIR) -> None:
        self.table: dict[str, tuple[str, ...]] = {}
        for path in sorted(directory.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.table[row["key"]] = tuple(row["skills"])

    def lookup(self, key: str) -> tuple[str, ...]:
        try:
            return self.table[key]
        except KeyError:
            raise KeyError(
                f"no teacher entry for state signature {key!r}; regenerate with `python -m simulator.teacher`"
            ) from None

    def __call__(self, scenario: ScenarioInstance | str, state: DialogueState) -> tuple[str, ...]:
        return teacher_skills(scenario, state, table=self)


_TABLE: TeacherTable | None = None
_LOCK = threading.Lock()


def default_table() -> TeacherTable:
    global _TABLE
    with _LOCK:
        if _TABLE is None:
            _TABLE = TeacherTable()
        return _TABLE


def teacher_skills(
    scenario: ScenarioInstance | str,
    state: DialogueState,
    table: TeacherTable | None = None,
) -> tuple[str, ...]:
    """Reference sequence T for the Expert's decision in `state` (stored-table lookup; deterministic)."""
    fam = scenario.family if isinstance(scenario, ScenarioInstance) else scenario
    if fam != state.family:
        raise ValueError(f"state is from family {state.family!r}, scenario is {fam!r}")
    return (table or default_table()).lookup(state_signature(state))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TEACHER_DIR)
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint of the stronger model")
    ap.add_argument("--model")
    ap.add_argument("--api-key", default="EMPTY")
    args = ap.parse_args(argv)
    client = None
    if args.base_url:
        from openai import OpenAI

        client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=60.0)
    for fam in args.family or sorted(FAMILIES):
        print(generate_table(fam, args.out, client=client, model=args.model))


if __name__ == "__main__":
    main()
