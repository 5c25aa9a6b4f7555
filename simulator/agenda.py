"""Agenda-guided user simulator (`simulator.mode = "agenda"`): the user model decides, the LLM only words it.

Agenda-based user simulation (Schatzmann et al. 2007, "Agenda-based user simulation for bootstrapping a POMDP
dialogue system"; the rule user simulator of ConvLab-3 follows the same idea): a user is a goal plus a stack of
things to say. Here, per (persona, scenario instance, episode seed):

* the GOAL comes from the instance's hidden goal (`goal.kind`, `goal.accepts`) and `user_facts`;
* the DISCLOSURE POLICY from the persona's information_disclosure level: which facts the opening message carries
  and how many times the agent must ask for a fact before the user gives it (withholding users give a wrong
  order number at the first ask, reluctant ones ask "why do you need that?" first);
* PATIENCE and ACCEPTANCE from problem_solving_style, affective_style, cooperation and the extrinsic demand:
  rigid_pursuit accepts only the exact outcome (`goal.accepts[0]`), incentive_open also accepts a voucher,
  preference_learning first asks for options and accepts only after options were given, feedback_oriented wants an
  acknowledgement (an empathic reply) before anything else counts; competitive/adversarial users reject the first
  one/two acceptable offers, accommodating/collaborative ones take any compensation.

After each agent turn `AgendaState.observe` reads the agent's action tag and reply with the scenario's own rule
detectors (`detect_task`), its SOP check (`sop_violations`) and a few question detectors (was the order number,
a photo, the item asked for?), and `decide` picks intent, emotion, satisfaction 1-5, stop and completed_tasks.
All of this is a pure function of (persona, instance, history, action tags, seed): the same inputs give the same
metadata, and metadata never depends on what a model wrote.

The LLM then rewrites a template utterance for that intent and those facts (a few dozen tokens, the request's
regex admits at most `min(utterance_chars, max_tokens)` printable ASCII characters, so it always fits max_tokens:
every token covers at least one byte). Its text is used only when it passes the quality gates (`quality_issues`)
and keeps the facts the turn must carry; otherwise it is regenerated once, then the template itself is used, and
the turn records `source = "template"`.

Quality gates (`quality_issues`, applied here and, for the llm mode, by `simulator.episode.play_episode`):
a user turn that speaks as the agent, repeats an earlier user turn, discloses a fact the persona's policy keeps
back at this point, or contradicts the scenario state (claims a refund/voucher/label that was never issued, names
another order number).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gopo_online.types import UserTurnMeta
from simulator.personas import Persona
from simulator.scenarios import TASK_IDS, ScenarioInstance, detect_task, sop_violations

# ---------------------------------------------------------------------------------------------------------------------
# Persona -> policy
# ---------------------------------------------------------------------------------------------------------------------

ASKS_NEEDED = {"proactive": 0, "forthcoming": 1, "selective": 1, "reluctant": 2, "withholding": 2}
"""How many times the agent must ask for a withheld fact before the user gives it (0 = volunteered up front)."""
PATIENCE = {"calm": 4, "composed": 4, "sensitive": 3, "irritable": 2, "volatile": 2}
"""Agent turns without progress a user sits through before demanding a supervisor (+ a cooperation bonus); from then
on the user stops only when the agent escalates (unresolved)."""
OFFERS_REJECTED_FIRST = {
    "collaborative": 0,
    "accommodating": 0,
    "compromising": 0,
    "competitive": 1,
    "adversarial": 2,
}
"""Acceptable offers a user turns down before accepting one ("rejects offers on principle")."""
COMPENSATION = ("voucher", "partial_refund", "refund", "return_label")
ANY_COMPENSATION_OK = ("collaborative", "accommodating")
"""Problem-solving styles that take any compensation as a (less satisfying) resolution."""

_EMPATHY = re.compile(r"(sorry|apolog|understand|frustrat|inconvenien|appreciate)", re.I)
_RUDE = re.compile(
    r"(calm down|not our (fault|problem)|deal with it|whatever|stupid|your (own )?fault|stop complaining)", re.I
)
_ASKS = {
    "order_id": re.compile(r"(order (number|id|no\b|#)|which order|order\s*\?|confirm (your|the) order)", re.I),
    "evidence": re.compile(r"(photo|picture|image|evidence|screenshot)", re.I),
    "item": re.compile(r"(which (item|product|dish)|what (item|product|dish)|what did you order)", re.I),
    "details": re.compile(
        r"(what happened|describe|more (details|information)|tell me more|what (seems to be|is) the (problem|issue))",
        re.I,
    ),
}
_OPTIONS = re.compile(r"(option|alternative|recommend|suggest|choose|either|you (might|may|could))", re.I)


@dataclass(frozen=True)
class Policy:
    """What the persona implies for this instance (fixed for the episode)."""

    asks_needed: int
    wrong_id_first: bool
    patience: int
    accepted: tuple[str, ...]
    """Action tags that meet the goal outright."""
    fallback_ok: bool
    """Any compensation also ends the dialogue (accommodating/collaborative users), at a lower satisfaction."""
    reject_first: int
    wants_options: bool
    wants_ack: bool
    base_satisfaction: int
    volatile: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _goal_is_information(instance: ScenarioInstance) -> bool:
    return instance.goal.kind in ("information", "delivery", "purchase", "recommendation")


def build_policy(persona: Persona, instance: ScenarioInstance, rng: random.Random) -> Policy:
    t = persona.intrinsic
    demand = persona.extrinsic_demand
    accepts = tuple(instance.goal.accepts)
    if demand == "rigid_pursuit":
        accepted = accepts[:1]
    elif demand == "incentive_open":
        accepted = tuple(dict.fromkeys((*accepts, "voucher")))
    elif demand == "preference_learning":
        accepted = tuple(dict.fromkeys((*accepts, *(a for a in instance.guidance_actions if a == "recommend"))))
    else:
        accepted = accepts
    patience = PATIENCE[t.affective_style.level] + (persona.cooperation - 3) // 2 + rng.choice((0, 0, 1))
    return Policy(
        asks_needed=ASKS_NEEDED[t.information_disclosure.level],
        wrong_id_first=t.information_disclosure.level == "withholding",
        patience=max(patience, 1),
        accepted=tuple(a for a in accepted if a != "chat") or ("chat",),
        fallback_ok=t.problem_solving_style.level in ANY_COMPENSATION_OK and demand != "rigid_pursuit",
        reject_first=OFFERS_REJECTED_FIRST[t.problem_solving_style.level],
        wants_options=demand == "preference_learning",
        wants_ack=demand == "feedback_oriented",
        base_satisfaction=3 if persona.difficulty == "easy" else 2,
        volatile=t.affective_style.level in ("irritable", "volatile"),
    )


# ---------------------------------------------------------------------------------------------------------------------
# State and its update from one agent turn
# ---------------------------------------------------------------------------------------------------------------------

WITHHELD = ("order_id", "evidence")
"""Facts a persona may keep back (the problem and the product/restaurant are the need itself)."""


def wrong_order_id(order_id: str) -> str:
    """A plausible wrong order number (last digit changed) for the 'wrong number first' disclosure."""
    if not order_id or not order_id[-1].isdigit():
        return order_id + "0"
    return order_id[:-1] + str((int(order_id[-1]) + 3) % 10)


@dataclass
class AgendaState:
    policy: Policy
    satisfaction: int
    disclosed: list[str] = field(default_factory=list)
    asked: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    """Facts asked for in the last agent turn that the user answers now (or refuses, per policy)."""
    tasks_done: list[str] = field(default_factory=list)
    new_tasks: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    """Action tags the agent really took (vouchers, refunds, labels, escalations)."""
    options_given: bool = False
    acknowledged: bool = False
    offers_rejected: int = 0
    last_offer: str = ""
    no_progress: int = 0
    sop_broken: list[str] = field(default_factory=list)
    goal_met: bool = False
    gave_up: bool = False
    resolved_by: str = ""
    wrong_id_given: bool = False
    stop: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "policy"}
        d["asked"] = dict(self.asked)
        return d


def _is_offer(action: str) -> bool:
    return action in (*COMPENSATION, "recommend", "escalate")


def observe(
    state: AgendaState,
    instance: ScenarioInstance,
    reply: str,
    action: str,
    *,
    turn: int,
    prior_actions: Sequence[str],
    user_texts: Sequence[str],
) -> None:
    """Update the user model with agent turn `turn` (its reply text and action tag)."""
    pol = state.policy
    progress = False
    state.new_tasks = []
    for task in TASK_IDS:  # sequential engagement: the first pending task not detected stops the walk
        if task in state.tasks_done:
            continue
        if not detect_task(instance, task, reply, action):
            break
        state.tasks_done.append(task)
        state.new_tasks.append(task)
        progress = True
    state.sop_broken += [
        r
        for r in sop_violations(
            instance, turn=turn, action=action, prior_actions=tuple(prior_actions), user_texts=tuple(user_texts)
        )
        if r not in state.sop_broken
    ]
    if action not in ("chat", "request_evidence"):
        state.issued.append(action)
    state.pending = []
    for fact, rx in _ASKS.items():
        if not (rx.search(reply) or (fact == "evidence" and action == "request_evidence")):
            continue
        state.asked[fact] = state.asked.get(fact, 0) + 1
        state.pending.append(fact)
    if "order_id" in state.pending and instance.case_id and instance.case_id in reply:
        state.pending.remove("order_id")  # the agent already named it (confirming is not asking)
    first_ack = bool(_EMPATHY.search(reply)) and not state.acknowledged
    if _EMPATHY.search(reply):
        state.acknowledged = True
    if _OPTIONS.search(reply) or action == "recommend" or "proactive_guidance" in state.new_tasks:
        state.options_given = True
    rude = bool(_RUDE.search(reply)) or not reply.strip()
    redundant = any(f in state.disclosed and f != "details" for f in state.pending)

    delta = 0
    if state.new_tasks:
        delta += 1
    fresh = [f for f in state.pending if f not in state.disclosed and state.asked[f] <= max(pol.asks_needed, 1)]
    if fresh and not redundant:
        progress = True  # a relevant question moves the case on
    if not progress:
        state.no_progress += 1
        delta -= 2 if pol.volatile else 1
    else:
        state.no_progress = 0
    if rude:
        delta -= 2
    if pol.wants_ack and first_ack and delta <= 0 and not rude:
        delta += 1

    # offers and the goal
    met = False
    exact = False
    if action in pol.accepted:
        met, exact = True, True
    elif pol.fallback_ok and action in COMPENSATION:
        met = True
    if _goal_is_information(instance) and action in pol.accepted + ("chat", "recommend"):
        needed = {"information_delivery"} | ({"proactive_guidance"} if pol.wants_options else set())
        met = needed <= set(state.tasks_done)
        exact = met
    if instance.goal.kind == "acknowledgement":
        met = state.acknowledged and (action == "escalate" or "proactive_guidance" in state.tasks_done)
        exact = met
    if pol.wants_options and not state.options_given:
        met = False
    if pol.wants_ack and not state.acknowledged:
        met = False
    if met and _is_offer(action) and state.offers_rejected < pol.reject_first:
        state.offers_rejected += 1
        state.last_offer = action
        met = False
        delta = min(delta, 0)
    elif _is_offer(action) and not met:
        state.last_offer = action
    if state.gave_up and action == "escalate" and not met:
        state.stop = True  # handed to a supervisor: the user leaves, unresolved
        state.satisfaction = min(state.satisfaction, 2)
        return
    if met:
        state.goal_met = True
        state.resolved_by = action
        state.satisfaction = 5 if exact else max(state.satisfaction, 4)
        state.stop = True
        return
    state.satisfaction = min(max(state.satisfaction + delta, 1), 5)
    if state.no_progress > pol.patience or (rude and pol.volatile and state.satisfaction == 1):
        state.gave_up = True  # out of patience: asks for a supervisor from now on (stops once escalated)


# ---------------------------------------------------------------------------------------------------------------------
# Decisions and words
# ---------------------------------------------------------------------------------------------------------------------

_GOAL_INTENT = {
    "refund": "request_refund",
    "voucher": "demand_compensation",
    "discount": "demand_compensation",
    "information": "inquire_status",
    "delivery": "inquire_status",
    "purchase": "ask_product_info",
    "recommendation": "ask_recommendation",
    "acknowledgement": "complain",
}


def emotion_for(state: AgendaState) -> str:
    s = state.satisfaction
    if state.goal_met:
        return "satisfied"
    if s >= 4:
        return "calm"
    if s == 3:
        return "neutral"
    if s == 2:
        return "frustrated" if state.policy.volatile else "anxious"
    return "angry"


@dataclass(frozen=True)
class Plan:
    """What this user turn says: the intent and the pieces (each carries its facts) a template/LLM turns into text."""

    intent: str
    pieces: tuple[str, ...]
    required: tuple[str, ...]
    """Strings the utterance must contain (the facts disclosed in this turn)."""
    disclosed: tuple[str, ...]
    """Facts (WITHHELD names) disclosed in this turn."""
    withheld_values: tuple[str, ...]
    """True fact values the utterance must NOT contain (the policy keeps them back at this point)."""
    wrong_id: bool = False
    """This turn gives the deliberate wrong order number."""


def _need_text(instance: ScenarioInstance, vague: bool) -> str:
    f = instance.user_facts
    if instance.case_type == "product_inquiry":
        return f"I have a question about the {f['wants_product']}"
    if vague:
        return "There is a problem with my order"
    if instance.family == "food_delivery":
        return f"My order from {f['restaurant']} was a mess: {f['problem']}"
    return f"It is about the {f['product']}: {f['problem']}"


_DEMANDS = {
    "refund": ("I want a full refund.", "Please just refund me in full.", "A full refund is what I am asking for."),
    "voucher": ("I think a voucher would be fair for this.", "Some compensation would be fair.",
                "Could you give me a voucher for the trouble?"),
    "discount": ("Is there any discount on it?", "I would buy it with a discount.", "Any coupon for it?"),
    "information": ("Can you tell me what is going on?", "I need to know what happened.",
                    "Please explain the situation."),
    "delivery": ("I need a firm delivery date.", "When exactly will it arrive?", "Give me a date, please."),
    "purchase": ("When can I buy it?", "I want exactly this one.", "Is it available or not?"),
    "recommendation": ("What would you recommend?", "Which one should I get?", "What fits my needs best?"),
    "acknowledgement": ("I want this recorded and passed on to someone.", "Someone should hear about this.",
                        "Please make sure this gets reported."),
}  # fmt: skip
_OPTION_ASKS = ("What are my options?", "What can you offer me here?", "What choices do I have?")


_PRODUCT_INFO = ("Is it good quality, and what is the warranty?", "How long is the warranty on it?",
                 "Please be honest about its quality.")  # fmt: skip


def _demand_text(instance: ScenarioInstance, pol: Policy, turn: int) -> str:
    if pol.wants_options:
        variants = _OPTION_ASKS
    elif instance.case_type == "product_inquiry" and instance.goal.kind == "information":
        variants = _PRODUCT_INFO
    else:
        variants = _DEMANDS.get(instance.goal.kind, ("Please help me.",) * 3)
    return variants[(turn - 1) % len(variants)]


_ACKS = ("Okay.", "Right.", "Fine.", "I see.", "Alright.")


def plan_turn(persona: Persona, instance: ScenarioInstance, state: AgendaState, turn: int) -> Plan:
    """The intent and content of user turn `turn` (1 = opening), given the state after the last agent turn."""
    pol = state.policy
    f = instance.user_facts
    oid = str(f.get("order_id", ""))
    has_photo = bool(f.get("has_photo", False))
    pieces: list[str] = []
    required: list[str] = []
    disclosed: list[str] = []
    withheld: list[str] = []
    wrong_id = False
    level = persona.intrinsic.information_disclosure.level

    if turn == 1:
        intent = _GOAL_INTENT.get(instance.goal.kind, "complain")
        vague = level in ("reluctant", "withholding")
        pieces.append(_need_text(instance, vague) + ".")
        if pol.asks_needed == 0 and oid:
            pieces.append(f"My order number is {oid}.")
            required.append(oid)
            disclosed.append("order_id")
            if has_photo:
                pieces.append("I have a photo of it.")
                disclosed.append("evidence")
        pieces.append(_demand_text(instance, pol, 1))
        for fact in WITHHELD:
            if fact == "order_id" and oid and "order_id" not in disclosed:
                withheld.append(oid)
        return Plan(intent, tuple(pieces), tuple(required), tuple(disclosed), tuple(withheld))

    if state.goal_met:
        intent = "accept_offer" if state.resolved_by in (*COMPENSATION, "recommend", "escalate") else "thank"
        pieces.append({"accept_offer": "Okay, that works for me.", "thank": "Thanks, that answers it."}[intent])
        pieces.append("Thank you for your help.")
        return Plan(intent, tuple(pieces), (), (), ())
    if state.stop:  # escalated after running out of patience
        return Plan("complain", ("Fine, let the supervisor call me.", "I am not happy with this."), (), (), ())
    if state.gave_up:
        lines = ("This is not going anywhere. Get me a supervisor.", "I want to talk to a supervisor now.",
                 "I asked for a supervisor. Please escalate this.")  # fmt: skip
        return Plan("complain", (lines[turn % len(lines)],), (), (), ())

    intent = ""
    for fact in state.pending:
        if fact == "order_id" and oid and "order_id" in state.disclosed:
            pieces.append(f"I already gave you the order number, {oid}.")
            intent = "provide_info"
        elif fact == "order_id" and oid and "order_id" not in state.disclosed:
            n = state.asked.get("order_id", 0)
            if n >= pol.asks_needed and not (pol.wrong_id_first and not state.wrong_id_given):
                pieces.append(f"The order number is {oid}.")
                required.append(oid)
                disclosed.append("order_id")
                intent = "provide_info"
            elif pol.wrong_id_first and not state.wrong_id_given:
                pieces.append(f"It is order {wrong_order_id(oid)}, I think.")
                required.append(wrong_order_id(oid))
                wrong_id = True
                intent = "provide_info"
            else:
                pieces.append("Why do you need my order number?")
                intent = intent or "other"
        elif fact == "evidence" and "evidence" not in state.disclosed and instance.family == "food_delivery":
            if has_photo and state.asked.get("evidence", 0) >= max(pol.asks_needed, 1):
                pieces.append("I attached a photo of it.")
                required.append("photo")
                disclosed.append("evidence")
                intent = "provide_evidence"
            elif has_photo:
                pieces.append("Do you really need that?")
                intent = intent or "other"
            else:
                pieces.append("I did not take one, sorry.")
                intent = intent or "provide_info"
        elif fact == "details":
            if "problem" in f:
                pieces.append(f"{f['problem']}.".capitalize())
            else:
                pieces.append(f"I want to know more about the {f.get('wants_product', 'product')}.")
            intent = intent or "provide_info"
        elif fact == "item" and "product" in f:
            pieces.append(f"It is the {f['product']}.")
            intent = intent or "provide_info"
    if oid and "order_id" not in state.disclosed and "order_id" not in disclosed:
        withheld.append(oid)
    if state.last_offer and state.offers_rejected and not intent:
        intent = "reject_offer"
        pieces.append({1: "No, that is not good enough.", 2: "I still do not accept that."}.get(state.offers_rejected,
                      "No."))  # fmt: skip
    if not intent:
        intent = "complain" if state.no_progress else _GOAL_INTENT.get(instance.goal.kind, "complain")
        if state.no_progress and not pieces:
            pieces.append(
                ("You are not answering my question.", "I am still waiting for a real answer.", "Hello? Anyone?")[
                    min(state.no_progress - 1, 2)
                ]
            )
    if intent not in ("provide_evidence", "reject_offer") and state.new_tasks and not state.no_progress:
        pieces.insert(0, _ACKS[turn % len(_ACKS)])
    if intent != "provide_evidence" or not pieces:
        pieces.append(_demand_text(instance, pol, turn))
    return Plan(intent, tuple(pieces), tuple(required), tuple(disclosed), tuple(withheld), wrong_id)


_STYLE_OPENERS = {
    "terse": "",
    "concise": "",
    "balanced": "Hi. ",
    "detailed": "Hello, thanks for answering. ",
    "rambling": "Hi there, so, long story, ",
}


def template_utterance(persona: Persona, plan: Plan, turn: int) -> str:
    style = persona.intrinsic.communication_style.level
    text = " ".join(plan.pieces)
    if turn == 1 and _STYLE_OPENERS.get(style):
        text = _STYLE_OPENERS[style] + (text if style != "rambling" else text[0].lower() + text[1:])
    if persona.intrinsic.affective_style.level == "volatile" and plan.intent in ("complain", "reject_offer"):
        text = text.rstrip(".") + "!"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Quality gates
# ---------------------------------------------------------------------------------------------------------------------

_AGENT_SPEAK = re.compile(
    r"(how (can|may) i (help|assist)|assist you|welcome to|customer (service|support) (team|system|desk)|"
    r"thank you for (contacting|reaching|your patience)|is there anything else|"
    r"(glad|happy|here) to (help|assist)|i('d| would) be (happy|glad)|our (policy|team|store|restaurant)|"
    r"we apologi[sz]e|we('re| are) sorry|as (an|your) (agent|assistant)|i can offer you|"
    r"let me (check|look into|help)|(do not|don't) hesitate|if you have any (other |more )?questions|"
    r"feel free to|your (order|refund|voucher) (has been|is being|will be))",
    re.I,
)
_CLAIM_ISSUED = {
    "refund": re.compile(r"(got|received|have|for) (the|my|a) refund|you (already )?refunded", re.I),
    "voucher": re.compile(r"(got|received|have|for) (the|my|a) (voucher|coupon)|you (already )?(issued|gave)", re.I),
    "return_label": re.compile(r"(got|received|have|for) (the|my|a) (return )?label", re.I),
}
_WORDING_ONLY = ("drops_facts", "too_short", "too_long", "off_plan", "echoes_prompt")
"""Gates on the LLM's rewording only (the template itself keeps its facts by construction)."""
_PROMPT_ECHO = re.compile(r"(customer'?s message|rewritten message|rewrite|in your own words)", re.I)
_ORDER_ID = re.compile(r"\b[A-Z]?\d{6}\b")


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def off_plan(text: str, template: str) -> bool:
    """The LLM's words drifted from what this turn says: fewer than half of the template's content words (4+
    letters, numbers) kept, or more than twice its length (a small model rambling on, e.g. as the agent)."""
    content = {w for w in _words(template) if len(w) >= 4 or w.isdigit()}
    kept = content & set(_words(text))
    return (bool(content) and len(kept) < len(content) / 2) or len(text) > 2 * len(template) + 40


def quality_issues(
    utterance: str,
    *,
    instance: ScenarioInstance,
    earlier_user: Sequence[str],
    issued: Sequence[str],
    withheld_values: Sequence[str] = (),
    allowed_ids: Sequence[str] = (),
) -> list[str]:
    """Problems of one simulated user turn (empty = passes): speaks_as_agent, repeats_turn, breaks_disclosure,
    contradicts_state. `issued` = action tags the agent really took; `withheld_values` = fact values the persona's
    policy keeps back now; `allowed_ids` = order numbers the user may name (the true one once disclosed, the
    deliberate wrong one)."""
    out: list[str] = []
    if _AGENT_SPEAK.search(utterance):
        out.append("speaks_as_agent")
    w = _words(utterance)
    for prev in earlier_user:
        pw = _words(prev)
        if w == pw or (len(w) >= 4 and len(pw) >= 4 and len(set(w) & set(pw)) / len(set(w) | set(pw)) >= 0.9):
            out.append("repeats_turn")
            break
    if any(v and v in utterance for v in withheld_values):
        out.append("breaks_disclosure")
    contradiction = any(rx.search(utterance) and tag not in issued for tag, rx in _CLAIM_ISSUED.items())
    ids = set(_ORDER_ID.findall(utterance))
    if ids - set(allowed_ids) - set(withheld_values):
        contradiction = True
    if contradiction:
        out.append("contradicts_state")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------------------------------


def utterance_regex(max_chars: int) -> str:
    """One line of printable ASCII without quotes/backslashes, 8..max_chars characters, starting with a letter.
    Every token covers at least one byte, so a match of n characters is at most n tokens."""
    return "[A-Za-z][ !#-\\[\\]-~]{7," + str(max(max_chars - 1, 8)) + "}"


def replay(
    persona: Persona,
    instance: ScenarioInstance,
    history: Sequence[tuple[str, str]],
    actions: Sequence[str],
    episode_seed: int,
) -> tuple[AgendaState, list[Plan]]:
    """The user model after every agent turn of `history` (a pure function: re-run from the start each turn)."""
    rng = random.Random(f"agenda:{episode_seed}:{persona.id}:{instance.instance_id}")
    pol = build_policy(persona, instance, rng)
    st = AgendaState(policy=pol, satisfaction=pol.base_satisfaction)
    plans: list[Plan] = []
    user_texts: list[str] = []
    agent_turn = 0
    for role, text in history:
        if role == "user":
            user_texts.append(text)
            plan = plan_turn(persona, instance, st, len(user_texts))
            plans.append(plan)
            st.disclosed += [d for d in plan.disclosed if d not in st.disclosed]
            st.wrong_id_given = st.wrong_id_given or plan.wrong_id
        else:
            action = actions[agent_turn] if agent_turn < len(actions) else "chat"
            observe(st, instance, text, action, turn=agent_turn + 1, prior_actions=actions[:agent_turn],
                    user_texts=user_texts)  # fmt: skip
            agent_turn += 1
    return st, plans


class AgendaUserSimulator:
    """`simulator.mode = "agenda"`: deterministic user model + LLM (or template) wording. `agenda = True` tells
    `play_episode` to pass the agent's action tags and the episode seed."""

    agenda = True

    def __init__(
        self,
        client: Any | None,
        model: str,
        *,
        temperature: float = 0.7,
        max_tokens: int = 320,
        utterance_chars: int = 240,
        max_turns: int = 6,
        rewrite: bool = True,
        regex: bool = True,
    ) -> None:
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_chars = min(utterance_chars, max_tokens)
        if self.max_chars < 16:
            raise ValueError(
                f"simulator.max_tokens={max_tokens} / utterance_chars={utterance_chars} leave {self.max_chars} "
                "characters for a user utterance; need >= 16"
            )
        self.max_turns = max_turns
        self.rewrite = rewrite and client is not None
        self.regex = regex
        """vLLM: the length-bounding regex rides along; other endpoints know no regex (a text over the bound is
        rejected by the `too_long` gate instead)."""

    @classmethod
    def from_config(
        cls, sim_cfg: Any, client: Any, model: str, *, rewrite: bool, regex: bool = True
    ) -> AgendaUserSimulator:
        """`rewrite`: `simulator.agenda_rewrite` resolved (its "auto" needs the whole config: `agenda_rewrite`)."""
        return cls(
            client,
            model,
            temperature=sim_cfg.temperature,
            max_tokens=sim_cfg.max_tokens,
            utterance_chars=sim_cfg.utterance_chars,
            max_turns=sim_cfg.max_turns,
            rewrite=rewrite,
            regex=regex,
        )

    def messages(self, persona: Persona, instance: ScenarioInstance, template: str) -> list[dict[str, str]]:
        t = persona.intrinsic
        system = (
            f"You are a customer of a {instance.scenario.title.lower()} company writing a chat message to its "
            f"support agent. Your style: {t.communication_style.description} {t.affective_style.description} "
            "Rewrite the customer's message below in your own words, as the customer. Keep every number and name. "
            "One or two short sentences. Write only the message."
        )
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Customer's message: {template}\nRewritten message:"},
        ]

    def respond(
        self,
        *,
        persona: Persona,
        instance: ScenarioInstance,
        history: Sequence[tuple[str, str]],
        turn: int,
        seed: int | None = None,
        actions: Sequence[str] = (),
        episode_seed: int | None = None,
    ) -> Any:
        from simulator.user import UserTurn

        t0 = time.monotonic()
        eseed = episode_seed if episode_seed is not None else (seed or 0)
        state, plans = replay(persona, instance, history, actions, eseed)
        plan = plan_turn(persona, instance, state, turn)
        template = template_utterance(persona, plan, turn)  # our own words: not bound by the LLM regex
        earlier = [text for role, text in history if role == "user"]
        allowed = [v for v in plan.required if _ORDER_ID.fullmatch(v)]
        if "order_id" in state.disclosed:
            allowed.append(str(instance.user_facts.get("order_id", "")))
        if state.wrong_id_given:
            allowed.append(wrong_order_id(str(instance.user_facts.get("order_id", ""))))

        def gates(text: str) -> list[str]:
            issues = quality_issues(
                text,
                instance=instance,
                earlier_user=earlier,
                issued=state.issued,
                withheld_values=plan.withheld_values,
                allowed_ids=allowed,
            )
            if any(r.lower() not in text.lower() for r in plan.required):
                issues.append("drops_facts")
            if len(_words(text)) < 3:
                issues.append("too_short")
            if len(text) > self.max_chars:  # an endpoint that ignores the regex (non-vLLM)
                issues.append("too_long")
            if off_plan(text, template):
                issues.append("off_plan")
            if _PROMPT_ECHO.search(text):
                issues.append("echoes_prompt")
            return issues

        utterance, source, raws, rejected = template, "template", [], []
        if self.rewrite:
            for attempt in range(2):  # the LLM's words, regenerated once, else the template
                try:
                    res = self.client.chat(
                        self.messages(persona, instance, template),
                        model=self.model,
                        temperature=self.temperature,
                        max_tokens=self.max_tokens,
                        seed=None if seed is None else seed + 7919 * attempt,
                        structured={"regex": utterance_regex(self.max_chars)} if self.regex else None,
                    )
                except Exception as e:  # noqa: BLE001 - only the words were asked for: the template stands in
                    # (recorded); an endpoint that is really down fails the agents' calls on it, visibly
                    rejected.append(f"request failed: {type(e).__name__}: {str(e)[:200]}")
                    break
                text = (getattr(res, "text", res if isinstance(res, str) else "") or "").strip()
                raws.append(text)
                issues = gates(text)
                if not issues:
                    utterance, source = text, "llm"
                    break
                rejected.append(",".join(issues))
        final_issues = [
            i
            for i in gates(utterance)
            if i not in ("drops_facts", "too_short", "too_long", "off_plan", "echoes_prompt")
        ]
        meta_state = {
            **{k: v for k, v in state.as_dict().items() if k not in ("new_tasks",)},
            "plan_intent": plan.intent,
            "disclosed_now": list(plan.disclosed),
            "llm_rejected": rejected,
            "gate_issues": final_issues,
            "policy": state.policy.as_dict(),
        }
        stop = state.stop if turn > 1 else False
        meta = UserTurnMeta(
            intent=plan.intent,
            emotion=emotion_for(state),
            satisfaction=state.satisfaction,
            stop=stop,
            completed_tasks=tuple(state.new_tasks) if turn > 1 else (),
            source=source,
            state=_jsonable(meta_state),
        )
        return UserTurn(
            utterance=utterance,
            meta=meta,
            raw=raws[-1] if raws else "",
            attempts=max(len(raws), 1),
            repairs=tuple(f"llm text rejected: {r}" for r in rejected),
            latency_s=time.monotonic() - t0,
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def llm_turn_issues(
    utterance: str,
    *,
    persona: Persona,
    instance: ScenarioInstance,
    history: Sequence[tuple[str, str]],
    actions: Sequence[str],
) -> list[str]:
    """Quality gates for a turn the LLM wrote whole (simulator.mode "llm"): the persona's disclosure policy says
    the true order number may appear only after the agent asked for it `ASKS_NEEDED` times (or named it)."""
    oid = str(instance.user_facts.get("order_id", ""))
    level = persona.intrinsic.information_disclosure.level
    agent = [text for role, text in history if role == "agent"]
    asked = sum(bool(_ASKS["order_id"].search(t)) for t in agent)
    named = any(oid and oid in t for t in agent)
    may_name = not oid or named or asked >= ASKS_NEEDED[level]
    return quality_issues(
        utterance,
        instance=instance,
        earlier_user=[text for role, text in history if role == "user"],
        issued=[a for a in actions if a not in ("chat", "request_evidence")],
        withheld_values=() if may_name else (oid,),
        allowed_ids=(oid, wrong_order_id(oid)) if may_name else (wrong_order_id(oid),),
    )
