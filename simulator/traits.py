"""Personas that show: the same fixed, scripted agent against personas that differ in ONE trait, with the outcome
each pair must differ in and its direction. A property of the agenda user model (template words, no LLM,
deterministic given the seeds), not a tuning target. `gopo-online bench --only traits` prints it as rows;
tests/simulator/test_persona_traits.py asserts the directions."""

from __future__ import annotations

from statistics import mean
from typing import Any

from gopo_online.config import GopoConfig
from simulator.agenda import AgendaUserSimulator
from simulator.episode import play_episode
from simulator.personas import Persona, load_personas
from simulator.scenarios import FAMILIES, sample_instance

CFG = GopoConfig()
HARD = {"communication_style": "terse", "information_disclosure": "reluctant",
        "problem_solving_style": "adversarial", "affective_style": "volatile"}  # fmt: skip
EASY = {"communication_style": "balanced", "information_disclosure": "forthcoming",
        "problem_solving_style": "collaborative", "affective_style": "calm"}  # fmt: skip
MID = {"communication_style": "balanced", "information_disclosure": "forthcoming",
       "problem_solving_style": "compromising", "affective_style": "composed"}  # fmt: skip


def make(levels: dict[str, str], cooperation: int = 3, demand: str = "preference_learning") -> Persona:
    base = load_personas()[0]
    intr = base.intrinsic.model_copy(
        update={d: getattr(base.intrinsic, d).model_copy(update={"level": lv}) for d, lv in levels.items()}
    )
    return base.model_copy(update={"intrinsic": intr, "cooperation": cooperation, "extrinsic_demand": demand,
                                   "scenarios": ()})  # fmt: skip


class ScriptedAgent:
    """Fixed policy: empathise and ask for the order, state the case facts, offer a voucher, escalate, refund."""

    def __init__(self, inst):
        self.inst = inst

    def respond(self, state):
        r, tags = self.inst.reference_replies, self.inst.scenario.action_tags
        script = [
            ("I'm sorry about this. Could you give me your order number?", "chat"),
            (f"{r['requirement_matching']} {r['information_delivery']}", "chat"),
            (f"{r['proactive_guidance']} As an alternative I can offer a voucher.", "voucher"),
            ("I understand. I will escalate this to a specialist team.", "escalate"),
            ("I have started a refund for you.", "partial_refund" if "partial_refund" in tags else "refund"),
        ]
        reply, action = script[min(state.turn, len(script)) - 1]
        return reply, action if action in tags else "chat", None, None


def instances(n_seeds: int = 4):
    out = []
    for fam in FAMILIES.values():
        for ct in fam.case_types:
            for s in range(n_seeds):
                out.append((fam.id, ct, s))
    return out


def run(p: Persona, n_seeds: int = 4, max_turns: int = 6, cfg: GopoConfig = CFG) -> dict[str, float]:
    sim = AgendaUserSimulator(None, "m")
    trajs, disclosed_at, voucher_ok = [], [], []
    for fam, ct, s in instances(n_seeds):
        inst = sample_instance(fam, seed=s, case_type=ct, demand=p.extrinsic_demand)
        tr = play_episode(episode_id=f"{fam}-{ct}-{s}", scenario_instance=inst, persona=p, user_sim=sim, expert=None,
                          cs=ScriptedAgent(inst), judge=None, cfg=cfg, seed=s, max_turns=max_turns)  # fmt: skip
        if tr.status != "ok":
            raise RuntimeError(f"trait episode {tr.episode_id} of persona {p.id} failed: {tr.error}")
        trajs.append(tr)
        oid = str(inst.user_facts.get("order_id", ""))
        if oid:
            disclosed_at.append(next((t.index for t in tr.turns if oid in t.user_utterance), max_turns + 1))
        after_voucher = [t for t in tr.turns if t.index == 4]  # the reaction to turn 3's voucher
        if after_voucher and any(u.cs_action == "voucher" for u in tr.turns[2:3]):
            voucher_ok.append(after_voucher[0].user_meta.intent == "accept_offer")
        elif tr.finished and len(tr.turns) == 3 and tr.turns[2].cs_action == "voucher":
            voucher_ok.append(True)  # accepted: the acceptance ended the dialogue (not a Turn)
        elif len(tr.turns) >= 3 and tr.turns[2].cs_action == "voucher":
            voucher_ok.append(False)
    return {
        "satisfaction": mean(t.final_satisfaction for t in trajs),
        "finish_rate": mean(t.finished for t in trajs),
        "turns": mean(len(t.turns) for t in trajs),
        "voucher_accept": mean(voucher_ok) if voucher_ok else 0.0,
        "disclosure_turn": mean(disclosed_at),
    }


ROWS = [
    ("difficulty (hard vs easy)", make(HARD, cooperation=1), make(EASY, cooperation=5)),
    ("cooperation (1 vs 5)", make(MID, cooperation=1), make(MID, cooperation=5)),
    ("demand (rigid_pursuit vs incentive_open)", make(MID, demand="rigid_pursuit"),
     make(MID, demand="incentive_open")),
    ("disclosure (withholding vs proactive)", make({**MID, "information_disclosure": "withholding"}),
     make({**MID, "information_disclosure": "proactive"})),
    ("affect (volatile vs calm)", make({**MID, "affective_style": "volatile"}),
     make({**MID, "affective_style": "calm"})),
]  # fmt: skip


def trait_table(n_seeds: int = 4, cfg: GopoConfig = CFG) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    return [(name, run(a, n_seeds, cfg=cfg), run(b, n_seeds, cfg=cfg)) for name, a, b in ROWS]


EXPECTED = {
    "difficulty (hard vs easy)": [("satisfaction", "<"), ("finish_rate", "<")],
    "cooperation (1 vs 5)": [("satisfaction", "<")],
    "demand (rigid_pursuit vs incentive_open)": [("voucher_accept", "<")],
    "disclosure (withholding vs proactive)": [("disclosure_turn", ">")],
    "affect (volatile vs calm)": [("satisfaction", "<=")],
}
"""Per row: the outcomes in which persona A must differ from persona B, and how (A <op> B)."""

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b}


def bench_traits(cfg: GopoConfig, n_seeds: int = 4) -> list[dict[str, Any]]:
    """One row per (trait pair, outcome): A's and B's value and whether the expected direction holds."""
    rows, per_arm = [], len(instances(n_seeds))
    for name, a, b in trait_table(n_seeds, cfg):
        for metric, op in EXPECTED[name]:
            holds = bool(_OPS[op](a[metric], b[metric]))
            rows.append({"bench": "traits", "metric": f"{name}: {metric}", "value": round(a[metric], 4),
                         "unit": f"A (B = {b[metric]:.3f})", "b": round(b[metric], 4), "expected": f"A {op} B",
                         "holds": holds, "episodes_per_arm": per_arm})  # fmt: skip
    return rows
