"""Scenario families, their SQLite business store, and sampled scenario instances.

Two families (DESIGN §1, GOPO §3.2, InteractCS FDS):

* ``ecommerce`` — order status / delivery delay, return & refund, product inquiry & recommendation with inventory;
* ``food_delivery`` — after-sales disputes (late, damaged, missing items) with a voucher as a costed action.

Each family defines its skill pool (`gopo_online.types.Skill`, hard constraints included), action tags with costs,
SOP rules, and the three sequential TSE tasks (gopo eq 11). A `ScenarioInstance` is one sampled case: a store row
(order, product), a hidden user goal, per-task detection patterns and reference replies (for BLEU).

TSE task completion — which signal counts:
  every turn the user simulator reports ``completed_tasks`` (its own judgement, recorded in `UserTurnMeta`), and
  `detect_tasks` checks the agent's reply and action tag against instance-specific rules (the facts of B_t, the
  guidance actions). By default the RULE detector is what counts for `Trajectory.task_completion_turns`, because a
  small simulator model reports tasks unreliably; the simulator's claim is kept as a cross-check and the
  agreement rate is reported by `stress`. `play_episode(tse_source=...)` can switch to "simulator", "both" (AND)
  or "either" (OR). Tasks are sequential: a task counts only once every earlier task has, and one reply may
  complete several in order (e.g. name the order AND state its delay); `gopo_online.metrics.tse` gives equal
  completion turns no extra delay (exponent max(N_i - N_{i-1} - 1, 0)).

SOP violations (voucher at most once, evidence before compensation, refund only when eligible, …) are checked by
`sop_violations` and recorded as failed `ConstraintCheck(skill="sop", kind="action")` entries of the turn's
compliance, so they are scored and counted like any other hard-constraint violation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gopo_online.config import gopo_home
from gopo_online.rubric import is_copy, prose_sentences, relevant, structure
from gopo_online.types import Skill

DATA_DIR = Path(__file__).parent / "data"
SEED_FILE = DATA_DIR / "store_seed.json"
TASK_IDS = ("requirement_matching", "information_delivery", "proactive_guidance")
"""The three sequential TSE tasks, in order (gopo §4.1.2)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE products (sku TEXT PRIMARY KEY, name TEXT, category TEXT, price REAL, stock INTEGER, rating REAL,
                       warranty_months INTEGER);
CREATE TABLE orders (order_id TEXT PRIMARY KEY, customer TEXT, sku TEXT REFERENCES products(sku), qty INTEGER,
                     status TEXT, placed_days_ago INTEGER, promised_days INTEGER, delay_days INTEGER, carrier TEXT,
                     tracking TEXT, delivered_days_ago INTEGER, return_eligible INTEGER);
CREATE TABLE food_orders (order_id TEXT PRIMARY KEY, restaurant TEXT, items TEXT, total REAL, delivery_fee REAL,
                          promised_min INTEGER, actual_min INTEGER, issue TEXT, issue_item TEXT, rider TEXT,
                          user_has_photo INTEGER, prior_vouchers_90d INTEGER);
CREATE TABLE policies (key TEXT PRIMARY KEY, value TEXT);
"""


class ScenarioStore:
    """Read-only SQLite store built once from the shipped JSON seed into the cache dir (keyed by the seed's hash).

    Thread-safe: each query opens its own read-only connection (cheap), so worker threads never share one."""

    def __init__(self, path: Path | None = None, seed_file: Path = SEED_FILE) -> None:
        seed_bytes = seed_file.read_bytes()
        digest = hashlib.sha256(seed_bytes).hexdigest()[:12]
        self.path = path or gopo_home() / "cache" / "simulator" / f"store-{digest}.sqlite"
        if not self.path.is_file():
            self._build(json.loads(seed_bytes))

    def _build(self, seed: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # build into a temp file and rename: concurrent first users never see a half-written store
        tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        con = sqlite3.connect(tmp)
        try:
            con.executescript(_SCHEMA)
            con.executemany(
                "INSERT INTO products VALUES (:sku,:name,:category,:price,:stock,:rating,:warranty_months)",
                seed["products"],
            )
            con.executemany(
                "INSERT INTO orders VALUES (:order_id,:customer,:sku,:qty,:status,:placed_days_ago,:promised_days,"
                ":delay_days,:carrier,:tracking,:delivered_days_ago,:return_eligible)",
                seed["orders"],
            )
            con.executemany(
                "INSERT INTO food_orders VALUES (:order_id,:restaurant,:items,:total,:delivery_fee,:promised_min,"
                ":actual_min,:issue,:issue_item,:rider,:user_has_photo,:prior_vouchers_90d)",
                [{**r, "items": json.dumps(r["items"])} for r in seed["food_orders"]],
            )
            con.executemany(
                "INSERT INTO policies VALUES (?, ?)", [(k, json.dumps(v)) for k, v in seed["policies"].items()]
            )
            con.commit()
        finally:
            con.close()
        os.replace(tmp, self.path)

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, params).fetchall()]
        finally:
            con.close()

    def product(self, sku: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM products WHERE sku = ?", (sku,))
        return rows[0] if rows else None

    def order(self, order_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT o.*, p.name AS product_name, p.category, p.price FROM orders o "
            "JOIN products p ON p.sku = o.sku WHERE o.order_id = ?",
            (order_id,),
        )
        if not rows:
            return None
        r = rows[0]
        r["return_eligible"] = bool(r["return_eligible"])
        return r

    def food_order(self, order_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM food_orders WHERE order_id = ?", (order_id,))
        if not rows:
            return None
        r = rows[0]
        r["items"] = json.loads(r["items"])
        r["user_has_photo"] = bool(r["user_has_photo"])
        return r

    def in_stock_alternatives(self, category: str, exclude_sku: str = "", limit: int = 3) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM products WHERE category = ? AND sku != ? AND stock > 0 ORDER BY rating DESC, price LIMIT ?",
            (category, exclude_sku, limit),
        )

    def policies(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.query("SELECT * FROM policies")}

    def ids(self, table: Literal["orders", "food_orders", "products"], where: str = "1=1") -> list[str]:
        key = "sku" if table == "products" else "order_id"
        return [r[key] for r in self.query(f"SELECT {key} FROM {table} WHERE {where} ORDER BY {key}")]


_STORE: ScenarioStore | None = None
_STORE_LOCK = threading.Lock()


def default_store() -> ScenarioStore:
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = ScenarioStore()
        return _STORE


# ---------------------------------------------------------------------------------------------------------------------
# Families: skills, actions, SOP, tasks
# ---------------------------------------------------------------------------------------------------------------------


class ActionSpec(_Model):
    tag: str
    cost: float = Field(ge=0.0)
    """Operational cost (InteractCS eq 2): 1.0 = one voucher."""
    description: str


class TaskSpec(_Model):
    id: str
    description: str
    detection: str
    """How the rule detector recognises completion in an agent reply/action."""


class ScenarioFamily(_Model):
    id: str
    title: str
    description: str
    case_types: tuple[str, ...]
    skills: tuple[Skill, ...]
    actions: tuple[ActionSpec, ...]
    sop_rules: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]

    @property
    def skill_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.skills)

    @property
    def action_tags(self) -> tuple[str, ...]:
        return tuple(a.tag for a in self.actions)

    def skill(self, name: str) -> Skill:
        for s in self.skills:
            if s.name == name:
                return s
        raise KeyError(f"{self.id}: no skill {name!r}")

    def action_cost(self, tag: str) -> float:
        """Cost of an action tag; unknown tags cost 0 (they are flagged by the compliance check instead)."""
        return next((a.cost for a in self.actions if a.tag == tag), 0.0)


_EMPATHY = r"(sorry|apolog|understand|frustrat|inconvenien|appreciate)"
_GREETING = r"\b(hi|hello|thank|thanks|welcome|happy to help|glad)\b"
_CLOSE = r"(anything else|let me know|next step|feel free|reach out|we will|we'll|i will|i'll)"

TASKS = (
    TaskSpec(
        id="requirement_matching",
        description="Identify what the user needs (the order/product and the problem).",
        detection="reply names the user's order id, product or dish, or the specific problem of this case",
    ),
    TaskSpec(
        id="information_delivery",
        description="Deliver the relevant facts from the business context.",
        detection="reply states a case fact from B_t: status/ETA/delay days, stock/price, refund window/amount, "
        "compensation policy",
    ),
    TaskSpec(
        id="proactive_guidance",
        description="Proactively propose the next step or a solution.",
        detection="action tag is one of the case's guidance actions, or reply offers a concrete next step "
        "(recommend/return/refund/voucher/escalate phrasing)",
    ),
)

ECOMMERCE = ScenarioFamily(
    id="ecommerce",
    title="E-commerce customer service",
    description="An online shop's after-sales and pre-sales desk: order tracking, delays, returns/refunds, product "
    "questions and recommendations.",
    case_types=("order_delay", "return_refund", "product_inquiry"),
    skills=(
        Skill(
            name="greet_and_acknowledge",
            description="Greet the customer and acknowledge their request.",
            required_any=((_GREETING, _EMPATHY),),
        ),
        Skill(
            name="express_empathy",
            description="Show empathy for the customer's inconvenience or frustration.",
            required_any=((_EMPATHY,),),
            forbidden=(r"\bcalm down\b", r"not our (fault|problem)"),
        ),
        Skill(
            name="verify_order_details",
            description="Confirm or ask for the order number and item concerned.",
            required_any=((r"\border\b", r"#?\d{6}\b"),),
        ),
        Skill(
            name="report_order_status",
            description="Tell the customer the order's current status, carrier and expected delivery.",
            required_any=((r"(shipped|deliver|transit|processing|delayed|status|arriv|tracking|carrier)",),),
            forbidden=(r"\bguarantee",),
        ),
        Skill(
            name="apologize_for_delay",
            description="Apologise specifically for the delivery delay.",
            required_any=((r"(sorry|apolog)",), (r"(delay|late|wait|longer)",)),
        ),
        Skill(
            name="explain_return_policy",
            description="Explain the return/refund policy: 30-day window, eligibility and processing time.",
            required_any=((r"(return|refund)",), (r"(\d+\s*(business\s*)?days?|policy|eligib|window)",)),
        ),
        Skill(
            name="process_refund",
            description="Start the refund for an eligible order and say when it arrives.",
            required_any=((r"refund",),),
            allowed_actions=("refund",),
        ),
        Skill(
            name="issue_return_label",
            description="Send a prepaid return label and explain how to ship it back.",
            required_any=((r"(label|ship (it )?back|send (it )?back|return)",),),
            allowed_actions=("return_label",),
        ),
        Skill(
            name="check_inventory",
            description="Check and state stock availability of the product.",
            required_any=((r"(in stock|out of stock|stock|available|availability|units? left|sold out)",),),
        ),
        Skill(
            name="recommend_product",
            description="Recommend a suitable in-stock product (name, price) that matches the customer's need.",
            required_any=((r"(recommend|suggest|alternative|you (might|may) (like|try)|option)",),),
            allowed_actions=("chat", "recommend"),
        ),
        Skill(
            name="offer_coupon",
            description="Offer a one-time discount coupon as goodwill compensation.",
            required_any=((r"(coupon|voucher|discount|credit)",),),
            allowed_actions=("voucher",),
        ),
        Skill(
            name="escalate_to_specialist",
            description="Escalate the case to a specialist and say what happens next.",
            required_any=((r"(escalat|specialist|supervisor|team|colleague)",),),
            allowed_actions=("escalate",),
        ),
    ),
    actions=(
        ActionSpec(tag="chat", cost=0.0, description="Reply only."),
        ActionSpec(tag="recommend", cost=0.0, description="Attach a product recommendation card."),
        ActionSpec(tag="return_label", cost=0.1, description="Email a prepaid return label."),
        ActionSpec(tag="refund", cost=1.0, description="Refund the order amount to the original payment."),
        ActionSpec(tag="voucher", cost=1.0, description="Issue a one-time discount voucher."),
        ActionSpec(tag="escalate", cost=0.2, description="Hand the case to a human specialist."),
    ),
    sop_rules=(
        "voucher_at_most_once: at most one voucher per conversation",
        "refund_only_if_eligible: refund only delivered orders inside the 30-day return window",
        "voucher_only_for_long_delay: a delay voucher only when the delay is at least 5 days",
        "no_refund_before_verification: do not refund in the first turn before the order is verified",
    ),
    tasks=TASKS,
)

FOOD_DELIVERY = ScenarioFamily(
    id="food_delivery",
    title="Food-delivery after-sales disputes",
    description="A food-delivery platform's after-sales desk: late deliveries, damaged and missing items, with "
    "vouchers and refunds as costed actions (InteractCS FDS).",
    case_types=("late", "damaged", "missing"),
    skills=(
        Skill(
            name="acknowledge_and_empathize",
            description="Acknowledge the problem and show empathy.",
            required_any=((_EMPATHY,),),
            forbidden=(r"\bcalm down\b", r"not our (fault|problem)"),
        ),
        Skill(
            name="verify_order_issue",
            description="Confirm the order, restaurant and which item or delay is affected.",
            required_any=((r"(order|F\d{6}|restaurant|item|dish)",),),
        ),
        Skill(
            name="request_photo_evidence",
            description="Ask for a photo of the damaged or missing item as evidence.",
            required_any=((r"(photo|picture|image|evidence)",),),
            allowed_actions=("chat", "request_evidence"),
        ),
        Skill(
            name="explain_delivery_delay",
            description="Explain how late the order was (promised vs actual minutes) and why.",
            required_any=((r"(minute|min\b|late|delay|rider|traffic)",),),
        ),
        Skill(
            name="explain_compensation_policy",
            description="Explain what compensation the policy allows (voucher, partial refund) and its conditions.",
            required_any=((r"(policy|voucher|refund|compensat)",),),
        ),
        Skill(
            name="offer_voucher",
            description="Offer a one-time voucher as compensation.",
            required_any=((r"(voucher|coupon|credit)",),),
            allowed_actions=("voucher",),
            forbidden=(r"another voucher",),
        ),
        Skill(
            name="offer_partial_refund",
            description="Refund the affected item (at most half the order).",
            required_any=((r"refund",),),
            allowed_actions=("partial_refund",),
        ),
        Skill(
            name="contact_merchant_or_rider",
            description="Say you will check with the restaurant or rider.",
            required_any=((r"(restaurant|merchant|rider|driver|kitchen|check with|contact)",),),
        ),
        Skill(
            name="hold_policy_boundary",
            description="Politely decline a request the policy does not allow, and explain why.",
            required_any=((r"(unfortunately|unable|cannot|can't|policy|not able)",),),
            forbidden=(r"full refund (is|has been) (approved|issued)",),
        ),
        Skill(
            name="escalate_to_supervisor",
            description="Escalate to a supervisor when the user will not accept.",
            required_any=((r"(escalat|supervisor|specialist|team)",),),
            allowed_actions=("escalate",),
        ),
        Skill(
            name="close_with_reassurance",
            description="Close by reassuring the user and saying what happens next.",
            required_any=((_CLOSE,),),
        ),
    ),
    actions=(
        ActionSpec(tag="chat", cost=0.0, description="Reply only."),
        ActionSpec(tag="request_evidence", cost=0.0, description="Open the photo upload for the user."),
        ActionSpec(tag="voucher", cost=1.0, description="Issue a one-time voucher."),
        ActionSpec(tag="partial_refund", cost=1.0, description="Refund the affected item."),
        ActionSpec(tag="refund", cost=2.0, description="Refund the whole order."),
        ActionSpec(tag="escalate", cost=0.2, description="Hand the case to a supervisor."),
    ),
    sop_rules=(
        "voucher_at_most_once: at most one voucher per conversation",
        "evidence_before_compensation: damaged/missing items need photo evidence before any voucher or refund",
        "one_compensation_per_order: do not combine voucher and refund in one conversation",
        "full_refund_needs_escalation: a full-order refund only after escalation",
    ),
    tasks=TASKS,
)

FAMILIES: dict[str, ScenarioFamily] = {f.id: f for f in (ECOMMERCE, FOOD_DELIVERY)}


def get_family(family_id: str) -> ScenarioFamily:
    try:
        return FAMILIES[family_id]
    except KeyError:
        raise KeyError(f"unknown scenario family {family_id!r}; known: {sorted(FAMILIES)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------------------------------


class HiddenGoal(_Model):
    kind: str
    """e.g. refund, replacement, voucher, information, recommendation, acknowledgement."""
    text: str
    """What the user privately wants (the simulator sees it; the agents never do)."""
    accepts: tuple[str, ...] = ()
    """Action tags that would satisfy the user (used in the simulator prompt, not for scoring)."""


class ScenarioInstance(_Model):
    """One sampled case of a family: a store row, the hidden goal and the detection/reference material."""

    family: str
    case_type: str
    case_id: str
    """Order id or product sku the case is about."""
    goal: HiddenGoal
    user_facts: dict[str, Any]
    """What the user knows and may (or may not) disclose."""
    context: dict[str, Any]
    """B_t: order/product rows, inventory, policy limits."""
    task_patterns: dict[str, tuple[str, ...]]
    """Task id -> regexes; the task is detected when ANY matches the reply (case-insensitive)."""
    guidance_actions: tuple[str, ...] = ()
    reference_replies: dict[str, str] = Field(default_factory=dict)
    """Task id -> a reference reply for BLEU."""

    @property
    def instance_id(self) -> str:
        return f"{self.family}/{self.case_type}/{self.case_id}"

    @property
    def scenario(self) -> ScenarioFamily:
        return get_family(self.family)

    @property
    def case_terms(self) -> tuple[str, ...]:
        """What this case is about, as words a relevant reply may mention: the user's facts (order id, product,
        restaurant, problem) and the names of the products/dishes in the business context."""
        terms = [v for v in self.user_facts.values() if isinstance(v, str)]
        ctx = self.context
        for key in ("product", "order"):
            row = ctx.get(key) or {}
            terms += [str(row[k]) for k in ("name", "product_name", "restaurant", "order_id", "sku") if row.get(k)]
            terms += [str(it.get("name", "")) for it in row.get("items", []) if isinstance(it, dict)]
            terms += [str(a.get("name", "")) for a in ctx.get("alternatives", []) if isinstance(a, dict)]
        # the business context's own vocabulary (tracking, carrier, stock, refund, voucher, ...): a next-step reply
        # about the case ("I will send you the tracking link") is on topic without repeating the user's words
        for row in (ctx.get("order") or {}, ctx.get("product") or {}, ctx.get("policies") or {}):
            terms += [w for k in row for w in k.split("_") if w not in _GENERIC_KEYS]
        return tuple(dict.fromkeys(t for t in terms if t))

    def business_context(self) -> dict[str, Any]:
        """B_t as the CS agent sees it (never the hidden goal)."""
        return {"scenario": self.family, "case_type": self.case_type, **self.context}


_GENERIC_KEYS = frozenset(
    {"id", "days", "day", "ago", "min", "value", "name", "qty", "max", "per", "has", "user", "eta", "customer",
     "placed", "actual", "total", "prior", "90d", "months", "fraction", "required", "threshold"}
)  # fmt: skip


def _num(x: float) -> str:
    return f"{x:g}"


def _money(x: float) -> str:
    # "$12.5", "12.50" and "12.5" all count as stating the amount
    return rf"\$?{int(x)}(\.{round(x * 100) % 100:02d}|\.{round(x * 10) % 10})?\b"


_ECOM_GOALS = {
    "order_delay": {
        "rigid_pursuit": ("delivery", "Get a firm delivery date today; refuses vague answers.", ("chat", "escalate")),
        "preference_learning": ("information", "Understand where the parcel is and what the options are.", ("chat",)),
        "incentive_open": ("voucher", "Would accept a coupon for the inconvenience.", ("voucher",)),
        "feedback_oriented": ("acknowledgement", "Wants the delay acknowledged and reported.", ("escalate", "chat")),
    },
    "return_refund": {
        "rigid_pursuit": ("refund", "Wants a full refund, not an exchange.", ("refund", "return_label")),
        "preference_learning": (
            "information",
            "Wants to understand return options before deciding.",
            ("return_label",),
        ),
        "incentive_open": ("voucher", "Would keep the item for a discount coupon.", ("voucher", "refund")),
        "feedback_oriented": ("acknowledgement", "Wants the quality problem recorded.", ("escalate", "return_label")),
    },
    "product_inquiry": {
        "rigid_pursuit": ("purchase", "Wants exactly this product and asks when it is in stock.", ("chat",)),
        "preference_learning": ("recommendation", "Wants a recommendation that fits their use.", ("recommend",)),
        "incentive_open": ("discount", "Will buy if there is a discount.", ("voucher", "recommend")),
        "feedback_oriented": ("information", "Wants honest information about quality and warranty.", ("chat",)),
    },
}
_FOOD_GOALS = {
    "rigid_pursuit": ("refund", "Wants a full refund of the order.", ("refund", "partial_refund")),
    "preference_learning": (
        "information",
        "Wants to know what happened and what compensation is possible.",
        ("voucher", "partial_refund"),
    ),
    "incentive_open": ("voucher", "Would accept a voucher.", ("voucher",)),
    "feedback_oriented": ("acknowledgement", "Wants the restaurant/rider to get feedback.", ("escalate", "chat")),
}


def _ecommerce_instance(case_type: str, rng: random.Random, store: ScenarioStore, demand: str) -> ScenarioInstance:
    pol = store.policies()
    kind, goal_text, accepts = _ECOM_GOALS[case_type][demand]
    if case_type == "product_inquiry":
        sku = rng.choice(store.ids("products"))
        p = store.product(sku)
        assert p is not None
        alts = store.in_stock_alternatives(p["category"], sku)
        context = {"product": p, "alternatives": alts, "policies": {"voucher_value": pol["ecommerce.voucher_value"]}}
        user_facts = {"wants_product": p["name"], "category": p["category"]}
        stock_pat = (
            r"(out of stock|sold out|not available|unavailable)"
            if p["stock"] == 0
            else rf"(in stock|available|{p['stock']} (units?|left|pieces))"
        )
        patterns = {
            "requirement_matching": (re.escape(p["name"].split()[0]), p["category"].replace("_", " "), re.escape(sku)),
            "information_delivery": (stock_pat, _money(p["price"]), rf"{p['warranty_months']}[- ]month"),
            "proactive_guidance": (
                r"(recommend|suggest|alternative|you (might|may) (like|try)|notify you|restock)",
                *(re.escape(a["name"].split()[0]) for a in alts),
            ),
        }
        alt = alts[0]["name"] if alts else "a similar model"
        refs = {
            "requirement_matching": f"Thanks for asking about the {p['name']}. Let me check it for you.",
            "information_delivery": (
                f"The {p['name']} costs ${_num(p['price'])} and is "
                + ("currently out of stock." if p["stock"] == 0 else f"in stock ({p['stock']} left).")
            ),
            "proactive_guidance": f"I recommend the {alt}, which is in stock and suits the same use. Shall I add it?",
        }
        return ScenarioInstance(
            family="ecommerce",
            case_type=case_type,
            case_id=sku,
            goal=HiddenGoal(kind=kind, text=goal_text, accepts=accepts),
            user_facts=user_facts,
            context=context,
            task_patterns=patterns,
            guidance_actions=("recommend", "voucher"),
            reference_replies=refs,
        )
    where = (
        "status IN ('delayed','in_transit','processing','shipped')"
        if case_type == "order_delay"
        else "status = 'delivered'"
    )
    oid = rng.choice(store.ids("orders", where))
    o = store.order(oid)
    assert o is not None
    context = {
        "order": o,
        "policies": {
            "return_window_days": pol["ecommerce.return_window_days"],
            "refund_processing_days": pol["ecommerce.refund_processing_days"],
            "delay_voucher_threshold_days": pol["ecommerce.delay_voucher_threshold_days"],
            "voucher_value": pol["ecommerce.voucher_value"],
        },
    }
    if case_type == "order_delay":
        eta = max(o["promised_days"] + o["delay_days"] - o["placed_days_ago"], 1)
        user_facts = {
            "order_id": oid,
            "product": o["product_name"],
            "ordered_days_ago": o["placed_days_ago"],
            "problem": "the parcel has not arrived yet",
        }
        context["order"]["eta_days"] = eta
        patterns = {
            "requirement_matching": (oid, re.escape(o["product_name"].split()[0]), r"(parcel|package|delivery|order)"),
            "information_delivery": (
                re.escape(o["status"].replace("_", " ")),
                o["carrier"],
                o["tracking"],
                rf"\b{eta}\s*(business\s*)?days?",
                rf"\b{o['delay_days']}\s*days?" if o["delay_days"] else r"(on (its|the) way|in transit)",
            ),
            "proactive_guidance": (r"(notify|update you|track(ing)? link|coupon|voucher|escalat|cancel)",),
        }
        refs = {
            "requirement_matching": f"I understand you are waiting for order {oid}, the {o['product_name']}.",
            "information_delivery": (
                f"Your order is {o['status'].replace('_', ' ')} with {o['carrier']}, tracking "
                f"{o['tracking']}; it should arrive in about {eta} days."
            ),
            "proactive_guidance": "I will send you the tracking link and notify you as soon as it moves.",
        }
        guidance = ("voucher", "escalate")
    else:
        user_facts = {
            "order_id": oid,
            "product": o["product_name"],
            "delivered_days_ago": o["delivered_days_ago"],
            "problem": rng.choice(["it stopped working", "it arrived scratched", "it is not what I expected"]),
        }
        win = pol["ecommerce.return_window_days"]
        patterns = {
            "requirement_matching": (oid, re.escape(o["product_name"].split()[0]), r"\b(return|refund)"),
            "information_delivery": (
                rf"\b{win}[- ]days?",
                r"(eligib|not eligible|outside|within)",
                rf"{pol['ecommerce.refund_processing_days']}\s*(business\s*)?days?",
                _money(o["price"] * o["qty"]),
            ),
            "proactive_guidance": (
                r"(return label|prepaid label|ship (it )?back|start (the|your) (return|refund))",
                r"(exchange|replacement|repair|warranty)",
            ),
        }
        elig = "is within" if o["return_eligible"] else "is outside"
        refs = {
            "requirement_matching": f"I see you want to return the {o['product_name']} from order {oid}.",
            "information_delivery": (
                f"Your order {elig} our {win}-day return window; refunds take "
                f"{pol['ecommerce.refund_processing_days']} business days."
            ),
            "proactive_guidance": "I can email you a prepaid return label so you can ship it back today.",
        }
        guidance = ("return_label", "refund", "escalate")
    return ScenarioInstance(
        family="ecommerce",
        case_type=case_type,
        case_id=oid,
        goal=HiddenGoal(kind=kind, text=goal_text, accepts=accepts),
        user_facts=user_facts,
        context=context,
        task_patterns=patterns,
        guidance_actions=guidance,
        reference_replies=refs,
    )


def _food_instance(case_type: str, rng: random.Random, store: ScenarioStore, demand: str) -> ScenarioInstance:
    pol = store.policies()
    oid = rng.choice(store.ids("food_orders", f"issue = '{case_type}'"))
    o = store.food_order(oid)
    assert o is not None
    kind, goal_text, accepts = _FOOD_GOALS[demand]
    late = o["actual_min"] - o["promised_min"]
    context = {
        "order": o,
        "policies": {
            "voucher_value": pol["food.voucher_value"],
            "late_threshold_min": pol["food.late_threshold_min"],
            "max_vouchers_per_order": pol["food.max_vouchers_per_order"],
            "partial_refund_max_fraction": pol["food.partial_refund_max_fraction"],
            "evidence_required": case_type in pol["food.evidence_required_for"],
        },
    }
    item = o["issue_item"] or o["items"][0]["name"]
    problem = {
        "late": f"the food arrived {late} minutes late and cold",
        "damaged": f"the {item} arrived spilled and damaged",
        "missing": f"the {item} was missing from the bag",
    }[case_type]
    user_facts = {
        "order_id": oid,
        "restaurant": o["restaurant"],
        "problem": problem,
        "has_photo": o["user_has_photo"] if case_type != "late" else False,
    }
    item_price = next((it["price"] for it in o["items"] if it["name"] == item), o["items"][0]["price"])
    info = {
        "late": (rf"\b{late}\s*min", rf"\b{o['promised_min']}\s*min", rf"\b{o['actual_min']}\s*min", r"rider"),
        "damaged": (r"(photo|picture|evidence)", _money(item_price), r"(policy|voucher|refund)"),
        "missing": (r"(photo|picture|receipt|evidence)", _money(item_price), r"(policy|voucher|refund)"),
    }[case_type]
    patterns = {
        "requirement_matching": (
            oid,
            re.escape(o["restaurant"]),
            re.escape(item.split()[0]),
            {
                "late": r"\b(late|delay)",
                "damaged": r"(damag|spill|broken)",
                "missing": r"(missing|forgot|not in the bag)",
            }[case_type],
        ),
        "information_delivery": info,
        "proactive_guidance": (r"(voucher|coupon|refund|credit|re-?deliver|resend|escalat|feedback to)",),
    }
    refs = {
        "requirement_matching": f"I'm sorry that {problem} on your {o['restaurant']} order {oid}.",
        "information_delivery": (
            f"Your order was promised in {o['promised_min']} min and arrived after {o['actual_min']} min."
            if case_type == "late"
            else f"Could you send a photo of the {item}? Our policy covers up to ${_num(item_price)} for this item."
        ),
        "proactive_guidance": f"I can offer a ${_num(pol['food.voucher_value'])} voucher for your next order.",
    }
    return ScenarioInstance(
        family="food_delivery",
        case_type=case_type,
        case_id=oid,
        goal=HiddenGoal(kind=kind, text=goal_text, accepts=accepts),
        user_facts=user_facts,
        context=context,
        task_patterns=patterns,
        guidance_actions=("voucher", "partial_refund", "refund", "escalate"),
        reference_replies=refs,
    )


def sample_instance(
    family: str,
    *,
    seed: int,
    demand: str = "preference_learning",
    case_type: str | None = None,
    store: ScenarioStore | None = None,
) -> ScenarioInstance:
    """A case of `family`, deterministic in (seed, demand, case_type). The hidden goal follows the persona's
    extrinsic demand."""
    fam = get_family(family)
    rng = random.Random(f"{family}:{seed}")
    ct = case_type or rng.choice(fam.case_types)
    if ct not in fam.case_types:
        raise ValueError(f"{family}: unknown case type {ct!r}; known {fam.case_types}")
    store = store or default_store()
    if family == "ecommerce":
        return _ecommerce_instance(ct, rng, store, demand)
    return _food_instance(ct, rng, store, demand)


# ---------------------------------------------------------------------------------------------------------------------
# Task detection and SOP
# ---------------------------------------------------------------------------------------------------------------------


def reply_substantive(instance: ScenarioInstance, reply: str, user_text: str | None = None) -> tuple[bool, str]:
    """(ok, why not): a reply that can complete a task at all. It must be built of sentences, not a keyword list or a
    repeated product name (`gopo_online.rubric.structure`); with the user's last message given, it must not be a copy
    of it and must relate to it or to the case (`rubric.relevant`)."""
    st = structure(reply)
    if st.n_words == 0:
        return False, "empty"
    if st.stuffed:
        return False, f"stuffed ({st.as_dict()})"
    if user_text is not None:
        if is_copy(reply, user_text):
            return False, "copy of the user's message"
        if not relevant(reply, user_text, instance.case_terms):
            return False, "unrelated to the user's message and the case"
    return True, ""


def detect_task(
    instance: ScenarioInstance, task_id: str, reply: str, action: str, user_text: str | None = None
) -> bool:
    """Does this reply/action complete `task_id` (rule detector, see module docstring)?

    Structure and relevance first, then the fact: the reply must be substantive (`reply_substantive`), and a task
    pattern counts only where it occurs inside a prose sentence of the reply, so a list of keywords, the product name
    repeated with bullet fragments, or an unrelated reply satisfies no task. The guidance action tag still counts for
    proactive_guidance, but only on a substantive reply."""
    if not reply_substantive(instance, reply, user_text)[0]:
        return False
    if task_id == "proactive_guidance" and action in instance.guidance_actions:
        return True
    sentences = prose_sentences(reply)
    return any(re.search(p, s, re.I) for p in instance.task_patterns.get(task_id, ()) for s in sentences)


def next_task(done: tuple[str, ...]) -> str | None:
    return next((t for t in TASK_IDS if t not in done), None)


def detect_tasks(
    instance: ScenarioInstance, reply: str, action: str, done: tuple[str, ...], user_text: str | None = None
) -> tuple[str, ...]:
    """Tasks newly completed by this reply, in order: pending tasks are checked one after the other and the
    first one not detected stops the walk (sequential engagement)."""
    out: list[str] = []
    for task in TASK_IDS:
        if task in done:
            continue
        if not detect_task(instance, task, reply, action, user_text):
            break
        out.append(task)
    return tuple(out)


_EVIDENCE = re.compile(r"(photo|picture|pic\b|image|attached|evidence|screenshot)", re.I)


def sop_violations(
    instance: ScenarioInstance, *, turn: int, action: str, prior_actions: tuple[str, ...], user_texts: tuple[str, ...]
) -> tuple[str, ...]:
    """SOP rules broken by taking `action` at 1-based `turn`, given the earlier actions and all user utterances
    so far (including this turn's). Returns rule ids (the prefix of the family's `sop_rules` entries)."""
    out: list[str] = []
    if action == "voucher" and "voucher" in prior_actions:
        out.append("voucher_at_most_once")
    ctx = instance.context
    if instance.family == "ecommerce":
        order = ctx.get("order") or {}
        if action == "refund" and not order.get("return_eligible", False):
            out.append("refund_only_if_eligible")
        if action == "refund" and turn == 1:
            out.append("no_refund_before_verification")
        if (
            action == "voucher"
            and instance.case_type == "order_delay"
            and order.get("delay_days", 0) < ctx["policies"]["delay_voucher_threshold_days"]
        ):
            out.append("voucher_only_for_long_delay")
    else:
        compensation = {"voucher", "partial_refund", "refund"}
        if (
            action in compensation
            and ctx["policies"]["evidence_required"]
            and not any(_EVIDENCE.search(u) for u in user_texts)
        ):
            out.append("evidence_before_compensation")
        if action in compensation and any(a in compensation and a != action for a in prior_actions):
            out.append("one_compensation_per_order")
        if action == "refund" and "escalate" not in prior_actions:
            out.append("full_refund_needs_escalation")
    return tuple(out)
