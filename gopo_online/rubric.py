"""Rubric judge: the gopo eq 8 dimensions scored from checkable evidence, not from a model's opinion.

A small judge model ranks replies but barely separates them (on SmolLM2-135M the good-rude margin of R^A was 0.004 on
[0, 1]). This judge reads what can be checked about a CS reply and keeps every piece of that evidence:

* hard constraints: the skills' required/forbidden content and allowed action tags, and the scenario's SOP checks
  (the `Compliance` the episode computed, or the skills checked here);
* task evidence: which sequential TSE tasks the scenario's detectors credit to this reply (gopo §4.1.2);
* reference overlap: content-word F1 (ROUGE-1 style) against the scenario's reference replies;
* supported facts: every number / id the reply states must come from the business context or the dialogue;
* relevance to the user's last message and to the case (content-word stems shared with either);
* structure: prose sentences vs keyword lists, repeated n-grams (product name stuffing), a copy of the user's text;
* lexicons: politeness, empathy, toxicity.

Scores: each dimension is a graded score in [0, 1] built from that evidence; a reply that fails a GATE (empty,
toxic, keyword-stuffed, a copy of the user's text, unrelated to the user and the case, stating an unsupported
number, or breaking a hard constraint) has every dimension multiplied by `JudgeConfig.rubric_gate_factor`. Skills
are hard constraints of the CS agent (gopo §3.3): a reply that breaks one is not a somewhat worse reply, it is not
an acceptable one.

The text primitives (`words`, `prose_sentences`, `structure`, `relevant`) are shared with the scenario task
detectors (simulator/scenarios.py), so a keyword list cannot satisfy either. Imports only the standard library and
the base package: this module sits in the base and must stay light.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gopo_online.skills import check_compliance
from gopo_online.types import Compliance, JudgeScores, Skill

# ----------------------------------------------------------------------------------------------------------- text
_WORD = re.compile(r"[a-z0-9$#][a-z0-9$#'.\-]*[a-z0-9]|[a-z0-9]", re.I)
_SEGMENT = re.compile(r"(?<=[.!?;:])\s+|\n+|\s+(?=[*•·]\s)|(?<=\S)\s+-\s+|\s*[|\[\]]\s*")
_BULLET = re.compile(r"^\s*([*•·\-]|\d+[.)])\s*")

FUNCTION_WORDS = frozenset(
    """a an the i i'm i'll i've i'd you you're you'll your yours we we're we'll we've our us me my mine it it's its is
    are was were be been being am will would can could shall should may might must do does did done have has had
    having to of for in on at with from by about as into over after before until than then this that these those
    there here and or but so if when where what which who whom whose how why not no yes please let let's just also
    very any some all each more most other such only own same too up down out off again once now still yet already
    he she they them their his her him isn't aren't wasn't don't doesn't didn't can't won't couldn't""".split()
)
"""Closed-class English words: prose is ~40-55 % of them, a keyword list almost none."""
ANCHOR_WORDS = frozenset(
    """i i'm i'll i've i'd you you're you'll we we're we'll we've it it's they he she this that these those there here
    is are was were be been am will would can could shall should may might must do does did have has had let let's
    please isn't aren't don't doesn't didn't can't won't me us my your our them their his her him its thank thanks
    """.split()
)
"""Pronouns and auxiliaries: a sentence has a subject or a verb among them; a keyword list has none."""
GENERIC_WORDS = frozenset(
    """week weeks day days today tomorrow yesterday time times next last now again soon later good great nice new
    thing things want need like know get got make see look help thank thanks hello hi hey okay ok yes sure really
    lot much many well way one two""".split()
)
"""Content words too common to show that a reply is about the user's message ("last week" / "next week")."""

POLITE = re.compile(
    r"\b(please|thank(s| you)?|happy to help|glad to|my pleasure|appreciate|kind(ly)?|of course|certainly|"
    r"welcome|hello|hi|dear|let me)\b",
    re.I,
)
EMPATHY = re.compile(
    r"(sorry|apolog|understand|frustrat|inconvenien|appreciate your patience|i can imagine|that must be|"
    r"i know how|completely fair|thank you for your patience)",
    re.I,
)
TOXIC = re.compile(
    r"\b(stupid|idiot(ic)?|dumb|moron|shut up|ridiculous|pathetic|whin(e|ing|y)|stop complaining|calm down|"
    r"your (own )?(fault|problem)|not (our|my) (fault|problem)|deal with it|get lost|go away|nonsense|"
    r"waste of (my )?time|i don'?t care|who cares|useless|annoying|damn|hell|crap)\b",
    re.I,
)
NEXT_STEP = re.compile(
    r"(i will|i'll|we will|we'll|i can|shall i|would you like|let me|next step|you will receive|you'll receive|"
    r"within \d+|as soon as|please send|could you (send|share|upload)|notify you|update you|i recommend|"
    r"i suggest|you (might|may) (like|try)|anything else)",
    re.I,
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (keeps $12.50, #123456, order ids)."""
    return [w.lower() for w in _WORD.findall(text or "")]


def stem(word: str) -> str:
    """A crude stem for overlap: the first 5 characters of a word (refunds/refunded/refund -> refun)."""
    w = word.lower().strip(".'-$#")
    return w[:5] if len(w) > 5 and not any(c.isdigit() for c in w) else w


def content_stems(text: str) -> set[str]:
    """Stems of the content (non-function) words of `text`."""
    return {stem(w) for w in words(text) if w not in FUNCTION_WORDS and w not in GENERIC_WORDS and len(w) > 1}


def segments(text: str) -> list[str]:
    """Sentences and list items: split at sentence ends, line breaks, bullets and bracket/pipe separators."""
    return [s.strip() for s in _SEGMENT.split(text or "") if s and s.strip(" *•·-")]


def is_prose(segment: str) -> bool:
    """A segment reads as a sentence: >= 3 words, >= 20 % of them function words, at least one a pronoun or an
    auxiliary (`ANCHOR_WORDS`). A sentence may sit inside a bullet; "It costs $19." is one, "BassPro Over-Ear
    Headphones in stock" is not."""
    ws = words(_BULLET.sub("", segment))
    if len(ws) < 3 or not any(w in ANCHOR_WORDS for w in ws):
        return False
    return sum(w in FUNCTION_WORDS for w in ws) / len(ws) >= 0.2


def prose_sentences(text: str) -> list[str]:
    """The segments of `text` that read as sentences (see `is_prose`)."""
    return [s for s in segments(text) if is_prose(s)]


def max_ngram_repeat(text: str, n: int = 2) -> tuple[int, str]:
    """(count, n-gram) of the most repeated content n-gram of `text` (function-word-only n-grams ignored)."""
    ws = words(text)
    grams = Counter(
        " ".join(ws[i : i + n]) for i in range(len(ws) - n + 1) if any(w not in FUNCTION_WORDS for w in ws[i : i + n])
    )
    if not grams:
        return 0, ""
    gram, count = grams.most_common(1)[0]
    return count, gram


@dataclass(frozen=True)
class Structure:
    """How a reply is built: the evidence behind `stuffed`."""

    n_words: int
    prose_fraction: float
    """Share of the reply's words that sit in prose sentences."""
    function_share: float
    """Share of function words over the whole reply."""
    repeat: int
    """Count of the most repeated content bigram."""
    repeated: str
    stuffed: bool
    """A keyword list, a repeated name or bullet fragments rather than sentences."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_words": self.n_words,
            "prose_fraction": round(self.prose_fraction, 3),
            "function_share": round(self.function_share, 3),
            "max_bigram_repeat": self.repeat,
            "repeated": self.repeated,
            "stuffed": self.stuffed,
        }


def structure(text: str) -> Structure:
    """Structure evidence of a reply. Stuffed when: a content bigram occurs 3+ times, or under half of the words sit in
    prose sentences, or under 15 % of the words are function words (a reply of >= 6 words)."""
    ws = words(text)
    n = len(ws)
    prose_words = sum(len(words(s)) for s in prose_sentences(text))
    frac = prose_words / n if n else 0.0
    fshare = sum(w in FUNCTION_WORDS for w in ws) / n if n else 0.0
    rep, gram = max_ngram_repeat(text, 2)
    stuffed = n > 0 and (rep >= 3 or frac < 0.5 or (n >= 6 and fshare < 0.15))
    return Structure(n, frac, fshare, rep, gram, stuffed)


def overlap(a: str, b: str) -> float:
    """Share of a's content stems that also occur in b (0 when a has none)."""
    sa = content_stems(a)
    return len(sa & content_stems(b)) / len(sa) if sa else 0.0


def relevant(reply: str, user_text: str, case_terms: Sequence[str] = ()) -> bool:
    """The reply shares a content stem with the user's last message or mentions the case (order id, product,
    restaurant, dish, problem words)."""
    stems = content_stems(reply)
    if stems & content_stems(user_text):
        return True
    return any(stems & content_stems(t) for t in case_terms if t)


def is_copy(reply: str, user_text: str) -> bool:
    """The reply mostly repeats the user's own words: >= 60 % of its word bigrams occur in the user's message (a reply
    of >= 3 words). Naming the same order or product shares a bigram or two; a copy shares nearly all."""
    rw, uw = words(reply), words(user_text)
    grams = [tuple(rw[i : i + 2]) for i in range(len(rw) - 1)]
    if len(rw) < 3 or not grams:
        return False
    user_grams = {tuple(uw[i : i + 2]) for i in range(len(uw) - 1)}
    return sum(g in user_grams for g in grams) / len(grams) >= 0.6


def reference_f1(reply: str, references: Sequence[str]) -> float:
    """Best content-stem F1 of the reply against any reference reply (ROUGE-1 style on stems)."""
    sr = content_stems(reply)
    best = 0.0
    for ref in references:
        sf = content_stems(ref)
        common = len(sr & sf)
        if common:
            p, r = common / len(sr), common / len(sf)
            best = max(best, 2 * p * r / (p + r))
    return best


_NUMBER = re.compile(r"(?<![\w.])\$?(\d+(?:\.\d+)?)")
_ID = re.compile(r"\b([A-Z]{1,4}-?\d{3,}|\d{5,})\b")


def _numbers(text: str) -> set[float]:
    return {float(m) for m in _NUMBER.findall(text or "")}


def _flat(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _flat(v)]
    return [value]


def _differences(value: Any) -> set[float]:
    """|a - b| of the numbers of one record that share a unit suffix (promised_min / actual_min -> minutes late)."""
    out: set[float] = set()
    if isinstance(value, Mapping):
        groups: dict[str, list[float]] = {}
        for k, v in value.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                groups.setdefault(str(k).rsplit("_", 1)[-1], []).append(float(v))
            else:
                out |= _differences(v)
        for nums in groups.values():
            out |= {abs(a - b) for a in nums for b in nums if a != b}
    elif isinstance(value, list | tuple):
        for v in value:
            out |= _differences(v)
    return out


def unsupported_facts(reply: str, context: Mapping[str, Any], dialogue: Sequence[str] = ()) -> list[str]:
    """Numbers and ids the reply states that neither the business context nor the dialogue supports (a wrong delay,
    price, window or order id). Supported: any number of the context or the dialogue, differences of numbers of one
    record in the same unit (minutes late = actual_min - promised_min), fractions as percentages and small counts
    (0-3)."""
    leaves = _flat(context)
    known = {float(v) for v in leaves if isinstance(v, int | float) and not isinstance(v, bool)}
    text_known = " ".join(str(v) for v in leaves if isinstance(v, str)) + " " + " ".join(dialogue)
    known |= _numbers(text_known) | _differences(context)
    known |= {round(k * 100, 6) for k in known if 0 < k < 1}  # partial_refund_max_fraction 0.5 -> "50%"
    ids_known = set(_ID.findall(text_known))
    out = [m for m in _ID.findall(reply or "") if m not in ids_known]
    for x in _numbers(_ID.sub(" ", reply or "")):
        if x > 3 and not any(abs(x - k) < 0.006 for k in known):
            out.append(f"{x:g}")
    return out


def distinct2(text: str) -> float:
    """Distinct-2: unique bigrams / bigrams (1.0 for replies under 3 words)."""
    ws = words(text)
    grams = [tuple(ws[i : i + 2]) for i in range(len(ws) - 1)]
    return len(set(grams)) / len(grams) if len(grams) >= 2 else 1.0


# ---------------------------------------------------------------------------------------------------------- judge
@dataclass(frozen=True)
class RubricCase:
    """Everything the rubric judge checks for one CS reply. Built by the episode side (simulator/judging.py), which
    knows the scenario instance; this module knows no scenario."""

    user_utterance: str
    reply: str
    action: str
    skills: tuple[Skill, ...] = ()
    compliance: Compliance | None = None
    """Hard-constraint checks of the turn (skills + scenario SOP); None: the skills are checked here."""
    tasks_hit: tuple[str, ...] = ()
    """TSE tasks whose (structure- and relevance-gated) detector this reply satisfies."""
    task_pending: str | None = None
    """The next sequential task not yet done before this reply (None when all are done)."""
    references: tuple[str, ...] = ()
    """The scenario's reference replies."""
    case_terms: tuple[str, ...] = ()
    """Words of the case the reply may mention: order id, product, restaurant, dish, problem."""
    earlier_replies: tuple[str, ...] = ()
    """The agent's earlier replies in this dialogue (for diversity)."""
    guidance_actions: tuple[str, ...] = ()
    """Action tags that count as proactive guidance in this case."""
    context: Mapping[str, Any] = field(default_factory=dict)
    """B_t, the business context: numbers the reply states must come from it (or from the dialogue)."""
    dialogue: tuple[str, ...] = ()
    """Earlier messages of both sides (numbers quoted from them are supported)."""


@dataclass(frozen=True)
class RubricWeights:
    """Knobs of the rubric (from `JudgeConfig`)."""

    gate_factor: float = 0.25
    """Every dimension of a gated reply is multiplied by this."""
    extra: Mapping[str, float] = field(default_factory=dict)


def evidence(case: RubricCase) -> dict[str, Any]:
    """The raw, checkable evidence of a reply (kept per turn on the verdict)."""
    reply = case.reply or ""
    comp = case.compliance if case.compliance is not None else check_compliance(reply, case.action, case.skills)
    st = structure(reply)
    failed = [f"{c.skill}:{c.kind}:{c.target}" for c in comp.checks if not c.passed]
    toxic = sorted({m.group(0).lower() for m in TOXIC.finditer(reply)})
    return {
        "empty": st.n_words == 0,
        "structure": st.as_dict(),
        "copy_of_user": is_copy(reply, case.user_utterance),
        "relevant": relevant(reply, case.user_utterance, case.case_terms),
        "user_overlap": round(overlap(reply, case.user_utterance), 3),
        "reference_f1": round(reference_f1(reply, case.references), 3),
        "hard_checks": len(comp.checks),
        "hard_failed": failed,
        "tasks_hit": list(case.tasks_hit),
        "task_pending": case.task_pending,
        "toxic": toxic,
        "polite": len(POLITE.findall(reply)),
        "empathy": len(EMPATHY.findall(reply)),
        "next_step": bool(NEXT_STEP.search(reply)),
        "distinct2": round(distinct2(reply), 3),
        "max_earlier_overlap": round(max((overlap(reply, e) for e in case.earlier_replies), default=0.0), 3),
        "unsupported": unsupported_facts(reply, case.context, (case.user_utterance, *case.dialogue))
        if case.context
        else [],
        "action": case.action,
        "guidance_action": case.action in case.guidance_actions,
    }


def gates(ev: Mapping[str, Any]) -> list[str]:
    """The gates a reply fails, by name (empty list: none)."""
    out = []
    if ev["empty"]:
        out.append("empty")
    if ev["toxic"]:
        out.append("toxic")
    if ev["structure"]["stuffed"]:
        out.append("stuffed")
    if ev["copy_of_user"]:
        out.append("copy_of_user")
    if not ev["relevant"] and not ev["empty"]:
        out.append("off_topic")
    if ev["hard_failed"]:
        out.append("hard_constraint")
    if ev["unsupported"]:
        out.append("unsupported_fact")
    return out


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def dimension_scores(ev: Mapping[str, Any]) -> dict[str, float]:
    """Every dimension the judge config may name, in [0, 1], before the gates (gopo eq 8 and §4.1.2)."""
    task_progress = (
        1.0
        if ev["task_pending"] and ev["task_pending"] in ev["tasks_hit"]
        else (0.6 if ev["tasks_hit"] or ev["task_pending"] is None else 0.0)
    )
    relevance = 1.0 if ev["relevant"] else 0.0
    ref = _clip(ev["reference_f1"] / 0.5)  # F1 0.5 against a one-sentence reference already means the same content
    hard = 1.0 - len(ev["hard_failed"]) / ev["hard_checks"] if ev["hard_checks"] else 1.0
    polite = 0.0 if ev["toxic"] else _clip(0.6 + 0.2 * ev["polite"])
    empathy = 0.0 if ev["toxic"] else _clip(0.5 + 0.25 * ev["empathy"])
    diversity = _clip(ev["distinct2"] * (1.0 - 0.7 * ev["max_earlier_overlap"]))
    guidance = 1.0 if ev["next_step"] or "proactive_guidance" in ev["tasks_hit"] else (0.5 if ev["tasks_hit"] else 0.2)
    return {
        "quality": _clip(0.4 * relevance + 0.3 * ref + 0.3 * task_progress),
        "skill_compliance": hard,
        "empathy": empathy,
        "diversity": diversity,
        "politeness": polite,
        "product_appropriateness": _clip(0.5 * hard + 0.3 * relevance + 0.2 * (1.0 if ev["tasks_hit"] else 0.0)),
        "action_guidance": guidance,
        "logic": _clip(0.5 * relevance + 0.5 * task_progress),
        "compliance": hard,
    }


def _snap(x: float) -> float:
    return min((0.0, 0.5, 1.0), key=lambda v: abs(v - x))


def rubric_verdict(
    case: RubricCase,
    dimensions: Sequence[str],
    principles: Sequence[str],
    gate_factor: float = 0.25,
) -> JudgeScores:
    """The rubric's verdict: `dimensions` and `principles` scored from `evidence(case)`; the evidence, the gates hit
    and the pre-gate scores are kept on the verdict. A name the rubric has no rule for is an error naming it."""
    ev = evidence(case)
    hit = gates(ev)
    raw = dimension_scores(ev)
    unknown = [d for d in (*dimensions, *principles) if d not in raw]
    if unknown:
        raise ValueError(f"rubric judge has no rule for {unknown}; it scores {sorted(raw)}")
    factor = 0.0 if ev["empty"] else gate_factor if hit else 1.0  # an empty reply has nothing to credit
    scores = {d: round(raw[d] * factor, 6) for d in dimensions}
    # principles are discrete (InteractCS eq 6): a gated reply violates them
    verdicts = {p: 0.0 if hit else _snap(raw[p]) for p in principles}
    return JudgeScores(
        scores=scores,
        principles=verdicts,
        raw="",
        ok=True,
        mode="rubric",
        evidence={**ev, "gates": hit, "pre_gate": {k: round(v, 4) for k, v in raw.items()}},
    )


def mix_verdicts(rubric: JudgeScores, llm: JudgeScores, rubric_weight: float) -> JudgeScores:
    """mixed mode: per dimension w * rubric + (1 - w) * llm; principles the same mix snapped to {0, 0.5, 1}.

    When the LLM verdict failed, the rubric verdict stands alone and the LLM's error is kept in `notes`."""
    if not llm.ok:
        return rubric.model_copy(
            update={
                "mode": "mixed",
                "notes": (*rubric.notes, f"llm judge failed, rubric alone: {llm.error}"),
                "raw": llm.raw,
            }  # fmt: skip
        )
    w = rubric_weight
    scores = {d: round(w * s + (1 - w) * llm.scores.get(d, s), 6) for d, s in rubric.scores.items()}
    prins = {p: _snap(w * v + (1 - w) * llm.principles.get(p, v)) for p, v in rubric.principles.items()}
    return JudgeScores(
        scores=scores,
        principles=prins,
        raw=llm.raw,
        ok=True,
        mode="mixed",
        notes=(*rubric.notes, *llm.notes),
        evidence={**rubric.evidence, "rubric_scores": rubric.scores, "llm_scores": llm.scores, "rubric_weight": w},
    )


def judge_dimensions(dimensions: Sequence[str], gre_dimensions: Sequence[str]) -> list[str]:
    """Rubric dimensions of gopo eq 8, then the GRE dimensions not already among them (what every judge mode scores)."""
    dims = list(dimensions)
    return dims + [d for d in gre_dimensions if d not in dims]


def resolve_mode(cfg: Any) -> str:
    """`JudgeConfig.mode` with "auto" resolved (cfg: a GopoConfig): the rubric when the judge model is the small
    default (no `model.path`, simulator backend not external), the LLM judge when a capable judge is configured."""
    mode = cfg.judge.mode
    if mode != "auto":
        return mode
    return "rubric" if cfg.small_simulator_model else "llm"
