"""Skills as hard constraints, and the Expert's output grammar.

A `Skill` compiles to checkable constraints (DESIGN §1): each required group is met when ANY of its regexes
matches the reply, each forbidden regex must not match, and `allowed_actions` restricts the CS action tag.
`check_compliance` scores every constraint of every chosen skill: one `ConstraintCheck` each.

`expert_grammar` builds the EBNF (xgrammar/GBNF syntax, what vLLM's `structured_outputs.grammar` takes) that
admits exactly the ordered sequences of 1..max_skills DISTINCT pool skills written `a, b, c`. JSON schema
`uniqueItems` is not enforced by vLLM 0.32 (DESIGN §5), so distinctness lives in the grammar: one rule per set
of skills already used. That is sum_{j<max} C(n, j) rules (n = 12, max 5: 793); no automaton for "distinct"
needs fewer states. xgrammar compile time measured here (SmolLM2 tokenizer, 1 thread, max 5): n = 8: 0.16 s,
10: 0.8 s, 12: 4.4 s, 16: 61 s (sharing the skill literals as rules did not help: 12: 4.0 s, 16: 54 s). vLLM caches
a compiled grammar by its text, so each pool pays once per server; later requests take ~0.2-1 s. The pool size is
therefore capped at `MAX_GRAMMAR_POOL` and the grammar string is cached per pool here.

Imports only `re`: this module sits in the base package and must stay light.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from gopo_online.types import Compliance, ConstraintCheck, Skill

SKILL_SEPARATOR = ", "
"""Between skills in the Expert's output: `empathize, check_order`."""
DEFAULT_ACTIONS: tuple[str, ...] = ("chat", "voucher", "refund", "escalate")
"""Action tags when neither the scenario nor any chosen skill restricts them."""
MAX_GRAMMAR_POOL = 12
"""Largest pool the distinct-skill grammar is built for (n = 12, max 5: 794 rules, 4.4 s to compile once)."""
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,40}$")


# ----------------------------------------------------------------------------- hard constraints
@dataclass(frozen=True)
class CompiledSkill:
    """A skill's constraints with their regexes compiled (case-insensitive)."""

    skill: Skill
    required: tuple[tuple[re.Pattern[str], ...], ...]
    forbidden: tuple[re.Pattern[str], ...]


@functools.lru_cache(maxsize=1024)
def compile_skill(skill: Skill) -> CompiledSkill:
    """Compile a skill's regexes once (Skill is frozen and hashable). Raises re.error naming the skill."""
    try:
        required = tuple(tuple(re.compile(p, re.IGNORECASE) for p in group) for group in skill.required_any)
        forbidden = tuple(re.compile(p, re.IGNORECASE) for p in skill.forbidden)
    except re.error as e:
        raise ValueError(f"skill {skill.name!r}: bad regex {e.pattern!r}: {e}") from None
    return CompiledSkill(skill, required, forbidden)


def check_compliance(reply: str, action: str, skills: Sequence[Skill]) -> Compliance:
    """Check a CS reply and its action tag against every hard constraint of the chosen skills.

    One check per required group (passed when any regex of the group matches), per forbidden regex (passed when it
    does not match) and per skill that restricts the action (passed when `action` is in its allowed tags).
    """
    checks: list[ConstraintCheck] = []
    for skill in skills:
        compiled = compile_skill(skill)
        for group, patterns in zip(skill.required_any, compiled.required, strict=True):
            ok = any(p.search(reply) for p in patterns)
            checks.append(ConstraintCheck(skill=skill.name, kind="required", target=" | ".join(group), passed=ok))
        for raw, pattern in zip(skill.forbidden, compiled.forbidden, strict=True):
            checks.append(
                ConstraintCheck(skill=skill.name, kind="forbidden", target=raw, passed=pattern.search(reply) is None)
            )
        if skill.allowed_actions:
            checks.append(
                ConstraintCheck(
                    skill=skill.name,
                    kind="action",
                    target=",".join(skill.allowed_actions),
                    passed=action in skill.allowed_actions,
                )
            )
    return Compliance(checks=tuple(checks))


def allowed_actions(skills: Sequence[Skill], default: Sequence[str] = DEFAULT_ACTIONS) -> tuple[str, ...]:
    """Action tags every chosen skill permits (intersection, in `default` order where possible).

    When the skills conflict (empty intersection) the union is returned: the CS agent must still emit some tag,
    and `check_compliance` then counts the violation instead of the decoder hiding it.
    """
    restricting = [s.allowed_actions for s in skills if s.allowed_actions]
    if not restricting:
        return tuple(default)
    common = set(restricting[0]).intersection(*restricting[1:])
    pool = common or set().union(*restricting)
    ordered = [a for a in default if a in pool]
    ordered += sorted(a for a in pool if a not in ordered)
    return tuple(ordered)


def readable_pattern(pattern: str) -> str:
    """A regex shown to a model as plain words: `\\bsorry\\b` -> `sorry`, `refund(ed)?` -> `refund(ed)?`."""
    text = re.sub(r"\\[bBAZ]|\^|\$", "", pattern)
    text = re.sub(r"\\s[+*]?", " ", text)
    text = text.replace(".*", " ... ").replace("\\", "")
    return " ".join(text.split())


def constraint_lines(skill: Skill) -> list[str]:
    """The skill's hard constraints as prompt lines (what the CS system prompt lists under the skill)."""
    lines = []
    for group in skill.required_any:
        words = " / ".join(f'"{readable_pattern(p)}"' for p in group)
        lines.append(f"MUST include {words}" if len(group) == 1 else f"MUST include one of {words}")
    if skill.forbidden:
        lines.append("MUST NOT include " + ", ".join(f'"{readable_pattern(p)}"' for p in skill.forbidden))
    if skill.allowed_actions:
        lines.append("allowed actions: " + ", ".join(skill.allowed_actions))
    return lines


# ----------------------------------------------------------------------------- Expert grammar
def _check_pool(pool: Sequence[str], max_skills: int) -> tuple[str, ...]:
    names = tuple(pool)
    if not names:
        raise ValueError("the skill pool is empty")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"skill names must be lower snake case ([a-z][a-z0-9_]+) to sit in a grammar: {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"the skill pool has duplicates: {sorted(n for n in names if names.count(n) > 1)}")
    if not 1 <= max_skills <= 5:
        raise ValueError(f"max_skills must be in 1..5, got {max_skills}")
    if len(names) > MAX_GRAMMAR_POOL:
        raise ValueError(
            f"pool of {len(names)} skills is above MAX_GRAMMAR_POOL={MAX_GRAMMAR_POOL}: the distinct-skill grammar "
            f"grows as sum C(n, j); split the pool per scenario"
        )
    return names


def grammar_rule_count(n: int, max_skills: int) -> int:
    """Rules of `expert_grammar` for a pool of n: root + one per used set of size 1..max_skills-1."""
    from math import comb

    return 1 + sum(comb(n, j) for j in range(1, min(max_skills, n)))


def _rule_name(used: Iterable[int]) -> str:
    return "u_" + "_".join(str(i) for i in used)


@functools.lru_cache(maxsize=64)
def _grammar(names: tuple[str, ...], max_skills: int) -> str:
    n = len(names)
    k = min(max_skills, n)

    def alternatives(used: tuple[int, ...]) -> str:
        # Each alternative emits one unused skill, then (if the cap allows) the rule of the grown set, optionally.
        alts = []
        for i in range(n):
            if i in used:
                continue
            grown = tuple(sorted((*used, i)))
            tail = f" {_rule_name(grown)}?" if len(grown) < k else ""
            alts.append(f'"{names[i]}"{tail}')
        return " | ".join(alts)

    lines = [f"root ::= {alternatives(())}"]
    for size in range(1, k):
        for used in combinations(range(n), size):
            lines.append(f'{_rule_name(used)} ::= "{SKILL_SEPARATOR}" ({alternatives(used)})')
    return "\n".join(lines) + "\n"


def expert_grammar(pool: Sequence[str], max_skills: int = 5) -> str:
    """EBNF admitting exactly `s1, s2, ...`: 1..max_skills distinct names from `pool`, any order. Cached per pool.

    Uses xgrammar's EBNF dialect (`::=`, `|`, `?`), which vLLM's `structured_outputs.grammar` accepts on CPU.
    """
    return _grammar(_check_pool(pool, max_skills), max_skills)


def parse_expert_output(text: str, pool: Sequence[str], max_skills: int = 5) -> tuple[str, ...]:
    """Skills named in an Expert output `a, b, c`; ValueError when it is not 1..max_skills distinct pool skills.

    Tolerates surrounding whitespace and a trailing period, nothing else: a constrained decode never needs more.
    """
    body = text.strip().rstrip(".").strip()
    if not body:
        raise ValueError("empty expert output")
    skills = tuple(part.strip() for part in body.split(","))
    known = set(pool)
    unknown = [s for s in skills if s not in known]
    if unknown:
        raise ValueError(f"expert output names skills outside the pool: {unknown} (output {text!r})")
    if len(set(skills)) != len(skills):
        raise ValueError(f"expert output repeats a skill: {list(skills)}")
    if len(skills) > max_skills:
        raise ValueError(f"expert output has {len(skills)} skills, more than {max_skills}")
    return skills
