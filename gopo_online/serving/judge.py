"""LLM judge of CS replies: rubric dimensions (gopo eq 8), GRE dimensions (gopo §4.1.2) and InteractCS principles.

Any OpenAI-compatible model works. The judge is asked for JSON:
`{"scores": {dim: 1..10, ...}, "principles": {name: 0 | 0.5 | 1, ...}}`; on vLLM the answer is constrained by a
JSON schema (`structured_outputs.json`, whitespace disabled: xgrammar otherwise lets a model pad with long runs of
whitespace, DESIGN §5). A malformed answer is repaired (code fences stripped, the first {...} extracted, numbers on
other scales mapped to [0, 1], principles snapped to {0, 0.5, 1}); if a dimension is still missing the judge is
asked again, up to `JudgeConfig.retries` times, and then the verdict is an explicit failure. Scores are never
invented, and every raw answer is kept.
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


def _number(value: Any) -> float | None:
    """A float from 7, 7.5, "7", "7/10", "80%"; None when it is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        s = value.strip().lower()
        words = {"yes": 1.0, "true": 1.0, "partial": 0.5, "partly": 0.5, "no": 0.0, "false": 0.0}
        if s in words:
            return words[s]
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", s)
        if m and float(m.group(2)) > 0:
            return float(m.group(1)) / float(m.group(2)) * SCORE_MAX  # "7/10" -> 7 on the 1..10 scale
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*%", s)
        if m:
            return float(m.group(1)) / 100 * SCORE_MAX
        m = re.fullmatch(r"-?\d+(?:\.\d+)?", s)
        if m:
            return float(s)
    if isinstance(value, Mapping):  # {"score": 7, "reason": "..."}
        for key in ("score", "value", "rating"):
            if key in value:
                return _number(value[key])
    return None


def normalise_score(x: float) -> float:
    """A rubric score on the asked 1..10 scale -> [0, 1]. Fractions in (0, 1) are taken as already normalised;
    values in (10, 100] as percentages; everything is clamped into [0, 1]."""
    if 0.0 < x < 1.0 and x != int(x):
        return x
    if SCORE_MAX < x <= 100.0:
        return x / 100.0
    return min(1.0, max(0.0, (x - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)))


def snap_principle(x: float) -> float:
    """A principle verdict -> {0, 0.5, 1}. Values above 1 are read on the 1..10 scale first."""
    if x > 1.0:
        x = normalise_score(x)
    x = min(1.0, max(0.0, x))
    return min((0.0, 0.5, 1.0), key=lambda v: abs(v - x))


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
    for dim in dimensions:
        x = _number(_find(score_src, dim))
        if x is None:
            missing.append(dim)
        else:
            scores[dim] = normalise_score(x)
    verdicts: dict[str, float] = {}
    for name in principles:
        x = _number(_find(principle_src, name))
        if x is None:
            missing.append(f"principle:{name}")
        else:
            verdicts[name] = snap_principle(x)
    if missing:
        raise JudgeParseError(f"judge answer lacks {missing}: {obj[:200]!r}")
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
    verdicts = {p: snap_principle(v / 2.0) for p, v in zip(principles, values[len(dimensions) :], strict=True)}
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
            # Keep every raw answer (the failed ones too), in order, so a repaired verdict can be audited.
            return verdict.model_copy(update={"raw": "\n---\n".join(raws)})
        return JudgeScores(ok=False, error="; ".join(errors), raw="\n---\n".join(raws))


def _help(name: str) -> str:
    return DIMENSION_HELP.get(name, name.replace("_", " "))
