"""LLM judge of CS replies: rubric dimensions (gopo eq 8), GRE dimensions (gopo §4.1.2) and InteractCS principles.

Any OpenAI-compatible model works. The judge is asked for JSON:
`{"scores": {dim: 1..10, ...}, "principles": {name: 0 | 0.5 | 1, ...}}`; on vLLM the answer is constrained by a
JSON schema (`structured_outputs.json`, whitespace disabled: xgrammar otherwise lets a model pad with long runs of
whitespace). A malformed answer is repaired (code fences stripped, the first {...} extracted, "7/10" read as
7); a number outside the asked scale (0.9, 10.5, 11, -3, "80%", a principle other than 0 / 0.5 / 1) is REJECTED,
never rescaled. If a dimension is missing or off scale the judge is asked again, up to `JudgeConfig.retries`
times, and then the verdict is an explicit failure. Scores are never invented, every raw answer is kept, and each
re-ask's reason is kept in `JudgeScores.notes`.

This is the "llm" judge mode; "rubric" and "mixed" live in `gopo_online.rubric` (see `JudgeConfig.mode`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gopo_online.config import JudgeConfig
from gopo_online.jsonrepair import JSONRepairError, parse_json_object
from gopo_online.types import JudgeScores, Skill

from .agents import ChatBackend, format_context

SCORE_MIN, SCORE_MAX = 1, 10
"""The judge scores rubric dimensions on 1..10; stored normalised as (x - 1) / 9."""

JUDGE_SYSTEM = (
    "You are a strict, fair judge of customer-service replies. Read the conversation, the skills the agent had to "
    "follow and the agent's reply, then grade the reply. Answer with one JSON object and nothing else."
)

DIMENSION_HELP = {
    "quality": "helpful, correct and relevant to the customer's request",
    "skill_compliance": "follows every required skill and avoids forbidden content",
    "empathy": "acknowledges the customer's feelings, warm tone",
    "diversity": "natural, non-repetitive wording",
    "politeness": "courteous and respectful",
    "product_appropriateness": "products or solutions offered fit the need",
    "action_guidance": "tells the customer clearly what happens next",
    "logic": "the reply is consistent with the conversation and the business context",
    "compliance": "respects the shop's policy limits",
}


class JudgeParseError(ValueError):
    """A judge answer that could not be repaired into a full verdict."""


class OutOfScale(ValueError):
    """A judge number that is not on the scale the judge was asked for (rejected and re-asked, never rescaled)."""


_PRINCIPLE_WORDS = {"yes": 1.0, "true": 1.0, "met": 1.0, "partial": 0.5, "partly": 0.5, "no": 0.0, "false": 0.0}


def _number(value: Any, *, principle: bool = False) -> float | None:
    """A float from 7, 7.5, "7", "7/10" (rubric scores) or 0/0.5/1, "yes"/"partial"/"no" (principles); None when it is
    not a number. A number written on another explicit scale ("4/5", "80%") raises OutOfScale: guessing which scale a
    judge meant is how 11 became 0.11 (issue 11)."""
    if isinstance(value, bool):
        if principle:
            return float(value)
        raise OutOfScale(f"{value!r} is not a score on {SCORE_MIN}..{SCORE_MAX}")
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        s = value.strip().lower()
        if principle and s in _PRINCIPLE_WORDS:
            return _PRINCIPLE_WORDS[s]
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", s)
        if m:
            if principle or float(m.group(2)) != SCORE_MAX:
                raise OutOfScale(f"{value!r} is on another scale than the one asked")
            return float(m.group(1))  # "7/10" is the asked scale, written out
        if s.endswith("%"):
            raise OutOfScale(f"{value!r} is a percentage, not the scale asked")
        if re.fullmatch(r"-?\d{1,6}(?:\.\d{1,6})?", s):
            return float(s)
    if isinstance(value, Mapping):  # {"score": 7, "reason": "..."}
        for key in ("score", "value", "rating"):
            if key in value:
                return _number(value[key], principle=principle)
    return None


def normalise_score(x: float) -> float:
    """A rubric score on the asked 1..10 scale -> [0, 1] as (x - 1) / 9. Anything outside [1, 10] (0.9, 10.5, 11, -3)
    raises OutOfScale: the judge is re-asked instead of having its number reinterpreted."""
    if not (math.isfinite(x) and SCORE_MIN <= x <= SCORE_MAX):
        raise OutOfScale(f"{x:g} is outside the asked scale {SCORE_MIN}..{SCORE_MAX}")
    return (x - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)


def snap_principle(x: float) -> float:
    """A principle verdict must be 0, 0.5 or 1 (InteractCS eq 6); anything else raises OutOfScale."""
    for v in (0.0, 0.5, 1.0):
        if abs(x - v) < 1e-9:
            return v
    raise OutOfScale(f"{x:g} is not a principle verdict (0, 0.5 or 1)")


def _find(data: Mapping[str, Any], key: str) -> Any:
    """Case/format-insensitive key lookup ('Skill Compliance' matches 'skill_compliance')."""
    if key in data:
        return data[key]
    norm = {re.sub(r"[^a-z0-9]", "", str(k).lower()): v for k, v in data.items()}
    return norm.get(re.sub(r"[^a-z0-9]", "", key.lower()))


def parse_judgement(text: str, dimensions: Sequence[str], principles: Sequence[str]) -> JudgeScores:
    """Repair and parse one judge answer into a full `JudgeScores` (ok=True), or raise JudgeParseError.

    Accepts the nested form `{"scores": {...}, "principles": {...}}` and a flat object holding every key.
    """
    try:
        data = parse_json_object(text)  # the same repair the user simulator's answers get
    except JSONRepairError as e:
        raise JudgeParseError(f"judge answer: {e}") from None
    obj = json.dumps(data)
    score_src = _find(data, "scores")
    if not isinstance(score_src, Mapping):
        score_src = _find(data, "score")  # seen from SmolLM2: {"score": {"quality": "1", ...}}
    score_src = score_src if isinstance(score_src, Mapping) else data
    principle_src = _find(data, "principles")
    principle_src = principle_src if isinstance(principle_src, Mapping) else data

    scores: dict[str, float] = {}
    missing: list[str] = []
    off_scale: list[str] = []
    for dim in dimensions:
        try:
            x = _number(_find(score_src, dim))
            if x is None:
                missing.append(dim)
            else:
                scores[dim] = normalise_score(x)
        except OutOfScale as e:
            off_scale.append(f"{dim}: {e}")
    verdicts: dict[str, float] = {}
    for name in principles:
        try:
            x = _number(_find(principle_src, name), principle=True)
            if x is None:
                missing.append(f"principle:{name}")
            else:
                verdicts[name] = snap_principle(x)
        except OutOfScale as e:
            off_scale.append(f"principle:{name}: {e}")
    if missing or off_scale:
        parts = ([f"lacks {missing}"] if missing else []) + ([f"out of scale: {off_scale}"] if off_scale else [])
        raise JudgeParseError(f"judge answer {'; '.join(parts)}: {obj[:200]!r}")
    return JudgeScores(scores=scores, principles=verdicts, raw=text, ok=True)


def judge_schema(dimensions: Sequence[str], principles: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the judge answer; enums instead of min/max so every backend enforces the range."""

    def obj(keys: Sequence[str], values: list[float]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {k: {"enum": values} for k in keys},
            "required": list(keys),
            "additionalProperties": False,
        }

    return {
        "type": "object",
        "properties": {
            "scores": obj(dimensions, list(range(SCORE_MIN, SCORE_MAX + 1))),
            "principles": obj(principles, [0, 0.5, 1]),
        },
        "required": ["scores", "principles"],
        "additionalProperties": False,
    }


EXPECTED_MAX = 9
"""Expected scoring asks for one digit 1..9 per rubric dimension (one token each), and 0/1/2 per principle."""


def judge_regex(dimensions: Sequence[str], principles: Sequence[str]) -> str:
    """Answer format of expected scoring: one `k=D` line per item, numbered as the prompt lists them (D in 1-9 for
    dimensions, 0-2 for principles). Numbers, not names: forced name tokens still cost a decode step each."""
    lines = [f"{i}=[1-{EXPECTED_MAX}]" for i in range(1, len(dimensions) + 1)]
    lines += [f"{i}=[0-2]" for i in range(len(dimensions) + 1, len(dimensions) + len(principles) + 1)]
    return "\n".join(lines)


def expected_digit(top: Mapping[str, float], allowed: Sequence[int]) -> float | None:
    """Probability-weighted digit over the candidates at one position (G-Eval): sum_d p(d) * d / sum_d p(d).

    Candidates are grouped by their first character (a token may be "7" or "7\n"); disallowed ones are ignored,
    and the weights are renormalised over the allowed digits. None when no allowed digit is among the candidates.
    """
    mass: dict[int, float] = {}
    for token, lp in top.items():
        head = token.strip()[:1]
        if head.isdigit() and int(head) in allowed and math.isfinite(lp):
            mass[int(head)] = mass.get(int(head), 0.0) + math.exp(lp)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return sum(d * p for d, p in mass.items()) / total


def parse_expected(result: Any, dimensions: Sequence[str], principles: Sequence[str]) -> JudgeScores:
    """Expected scores from a regex-constrained answer and its per-position top logprobs (`judge_regex` format).

    The k-th digit written right after a '=' belongs to the k-th item of dimensions + principles. Rubric scores are
    mapped to [0, 1] as (E - 1) / 8; principles as E / 2, snapped to {0, 0.5, 1} (InteractCS eq 6 is discrete).
    """
    names = [*dimensions, *principles]
    values: list[float] = []
    text = ""
    for token, top in zip(result.tokens, result.top_logprobs, strict=False):
        if text.endswith("=") and token.strip()[:1].isdigit() and len(values) < len(names):
            allowed = range(1, EXPECTED_MAX + 1) if len(values) < len(dimensions) else range(0, 3)
            e = expected_digit(top, list(allowed))
            values.append(float(token.strip()[0]) if e is None else e)
        text += token
    if len(values) != len(names):
        raise JudgeParseError(f"expected {len(names)} scores in the judge answer, found {len(values)}: {text[:200]!r}")
    scores = {d: (v - 1.0) / (EXPECTED_MAX - 1.0) for d, v in zip(dimensions, values, strict=False)}
    # the expectation over {0, 1, 2} is continuous: round it to the nearest verdict (the grammar keeps it on scale)
    verdicts = {
        p: min((0.0, 0.5, 1.0), key=lambda x, v=v: abs(x - v / 2.0))
        for p, v in zip(principles, values[len(dimensions) :], strict=True)
    }
    return JudgeScores(scores=scores, principles=verdicts, raw=result.text, ok=True)


class Judge:
    """Scores one CS reply. `structured=True` constrains the answer with the JSON schema (vLLM backends).

    `model` is the judge's model name at the client's URL.
    """

    def __init__(
        self,
        client: ChatBackend,
        *,
        model: str,
        cfg: JudgeConfig | None = None,
        structured: bool = True,
    ) -> None:
        self.client = client
        self.model = model
        self.cfg = cfg or JudgeConfig()
        self.structured = structured

    @property
    def dimensions(self) -> list[str]:
        """Rubric dimensions of gopo eq 8, then the GRE dimensions not already among them."""
        dims = list(self.cfg.dimensions)
        return dims + [d for d in self.cfg.gre_dimensions if d not in dims]

    @property
    def principles(self) -> list[str]:
        return list(self.cfg.principles)

    def messages(
        self,
        utterance: str,
        reply: str,
        action: str,
        skills: Sequence[Skill] = (),
        context: Mapping[str, Any] | None = None,
        history: str = "",
        expected: bool = False,
    ) -> list[dict[str, str]]:
        """The judge prompt: the case, then the rubric in the answer format of the scoring mode."""
        skill_text = "\n".join(f"- {s.name}: {s.description}" for s in skills) or "(none)"
        case = (
            f"Conversation so far:\n{history or '(start)'}\n\nCustomer: {utterance}\n\n"
            f"Skills the agent had to follow:\n{skill_text}\n\n"
            f"Business context:\n{format_context(context or {})}\n\n"
            f"Agent action: {action}\nAgent reply: {reply}\n\n"
        )
        if expected:
            items = list(enumerate([*self.dimensions, *self.principles], 1))
            n = len(self.dimensions)
            dims = "\n".join(f"{i}. {d}: {_help(d)}" for i, d in items[:n])
            prins = "\n".join(f"{i}. {p}: {_help(p)}" for i, p in items[n:])
            rubric = (
                f"Grade each dimension with one digit from 1 (very bad) to {EXPECTED_MAX} (excellent):\n{dims}\n\n"
                f"Grade each principle 0 (violated), 1 (partly met) or 2 (met):\n{prins}\n\n"
                "Answer one line per item, as number=digit, in the order listed."
            )
            system = JUDGE_SYSTEM.replace("Answer with one JSON object and nothing else.", "Answer as asked.")
        else:
            dims = "\n".join(f"- {d}: {_help(d)}" for d in self.dimensions)
            prins = "\n".join(f"- {p}: {_help(p)}" for p in self.principles)
            # Placeholders, not numbers: a small judge copies example numbers verbatim (seen with SmolLM2: all 7s).
            example = (
                '{"scores": {'
                + ", ".join(f'"{d}": <{SCORE_MIN}-{SCORE_MAX}>' for d in self.dimensions)
                + '}, "principles": {'
                + ", ".join(f'"{p}": <0|0.5|1>' for p in self.principles)
                + "}}"
            )
            rubric = (
                f"Score each dimension from {SCORE_MIN} (very bad) to {SCORE_MAX} (excellent):\n{dims}\n\n"
                f"Rate each principle 0 (violated), 0.5 (partly met) or 1 (met):\n{prins}\n\n"
                f"Answer with JSON only, in exactly this form:\n{example}"
            )
            system = JUDGE_SYSTEM
        return [{"role": "system", "content": system}, {"role": "user", "content": case + rubric}]

    def score(
        self,
        utterance: str,
        reply: str,
        action: str,
        skills: Sequence[Skill] = (),
        context: Mapping[str, Any] | None = None,
        history: str = "",
        *,
        seed: int | None = None,
    ) -> JudgeScores:
        """The verdict, or JudgeScores(ok=False, error=...) after 1 + cfg.retries unparsable answers.

        On vLLM with `scoring = "expected"` (G-Eval): the answer is forced into numbered `k=D` lines and each score
        is the expectation of the digit under the judge's own distribution at that position (top logprobs, after
        the grammar mask). Otherwise the answer is JSON (schema-constrained on vLLM), repaired and parsed.
        A client failure (server down) propagates as ClientError: it is not the judge's verdict.
        """
        expected = self.structured and self.cfg.scoring == "expected"
        msgs = self.messages(utterance, reply, action, skills, context, history, expected=expected)
        request: dict[str, Any] = {}
        if expected:
            request = {
                "structured": {"regex": judge_regex(self.dimensions, self.principles)},
                "top_logprobs": EXPECTED_MAX + 1,
            }
        elif self.structured:
            request = {"structured": {"json": judge_schema(self.dimensions, self.principles),
                                      "disable_any_whitespace": True}}  # fmt: skip
        raws: list[str] = []
        errors: list[str] = []
        for attempt in range(self.cfg.retries + 1):
            result = self.client.chat(
                msgs,
                model=self.model,
                # A greedy re-ask would repeat the same bad answer: sample on retries (the expected score reads the
                # distribution, which the sampling temperature does not change).
                temperature=self.cfg.temperature if attempt == 0 else max(self.cfg.temperature, 0.7),
                max_tokens=self.cfg.max_tokens,
                seed=None if seed is None else seed + attempt,
                **request,
            )
            raws.append(result.text)
            try:
                if expected:
                    verdict = parse_expected(result, self.dimensions, self.principles)
                else:
                    verdict = parse_judgement(result.text, self.dimensions, self.principles)
            except JudgeParseError as e:
                errors.append(f"attempt {attempt + 1}: {e}")
                continue
            # Keep every raw answer (the failed ones too), in order, and why each was re-asked, so a verdict can be
            # audited: a re-ask after an out-of-scale number is a note on the verdict, not a silent rescale.
            return verdict.model_copy(
                update={"raw": "\n---\n".join(raws), "notes": (*verdict.notes, *(f"re-asked: {e}" for e in errors))}
            )
        return JudgeScores(ok=False, error="; ".join(errors), raw="\n---\n".join(raws), notes=tuple(errors))


def _help(name: str) -> str:
    return DIMENSION_HELP.get(name, name.replace("_", " "))
