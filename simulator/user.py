"""LLM user simulator (InteractCS §4.1.2, eq 3): role-play conditioned on persona, scenario, hidden goal and history.

This is `simulator.mode = "llm"`, for capable models; the default on the CPU model is the agenda user model of
simulator/agenda.py (`make_user_simulator` picks one, docs/simulator.md). The regex bounds the utterance so that the
whole JSON turn fits `max_tokens` (`utterance_budget`): a turn cut at max_tokens cannot close its JSON.

Each call returns the user's utterance plus metadata (intent, emotion, satisfaction 1-5, stop, completed_tasks) as
one JSON object. Small models write bad JSON, so:

1. against vLLM (`structured="regex"`, default) the request carries `user_turn_regex()` as
   `structured_outputs.regex` (DESIGN §5: `guided_json` is silently ignored by vLLM 0.32). The JSON-schema path
   (`structured_outputs.json`) let SmolLM2 fill the whitespace xgrammar admits until max_tokens ran out (3 of 12
   recorded outputs truncated, tests/simulator/fixtures); the regex admits no free whitespace. Against other
   endpoints use `structured="json"` (`ChatClient(vllm=False)` sends it as `response_format`);
2. the text is repaired (`gopo_online.jsonrepair`: fences, first {...}, quotes, trailing commas, unclosed braces) and
   normalised (satisfaction coerced to an int, "true"/"false" strings to booleans, unknown task ids dropped, an
   intent/emotion outside the listed labels noted) — every change is listed in `UserTurn.repairs`. A satisfaction
   outside 1-5 (7, "10/10", 1e999) is an error, never clamped: the scale was misread, so the turn is re-asked;
3. a reply that still lacks a required field is re-asked with a new seed, at most `json_retries` times;
4. then the call returns a `UserTurnError` naming the failed stage with every raw output. Nothing is invented:
   a missing intent/emotion/satisfaction/stop is an error, never a default. (`completed_tasks` absent = no claim.)

Deterministic for a fixed seed and batch mix (vLLM seeds reproduce only with the same batch, DESIGN §5).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from gopo_online.errors import short_repr
from gopo_online.jsonrepair import JSONRepairError, parse_json_object
from gopo_online.types import UserTurnMeta
from simulator.personas import Persona
from simulator.scenarios import TASK_IDS, ScenarioInstance
from simulator.state import EMOTIONS, INTENTS

OPENING_GREETING = "Hello, this is customer support. How can I help you today?"
REQUIRED_FIELDS = ("utterance", "intent", "emotion", "satisfaction", "stop")


def user_turn_schema() -> dict[str, Any]:
    """JSON schema of one simulator turn (what `structured_outputs.json` enforces on vLLM)."""
    return {
        "type": "object",
        "properties": {
            "utterance": {"type": "string"},
            "intent": {"type": "string", "enum": list(INTENTS)},
            "emotion": {"type": "string", "enum": list(EMOTIONS)},
            "satisfaction": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
            "stop": {"type": "boolean"},
            "completed_tasks": {"type": "array", "items": {"type": "string", "enum": list(TASK_IDS)}, "maxItems": 3},
        },
        "required": [*REQUIRED_FIELDS, "completed_tasks"],
        "additionalProperties": False,
    }


def _ordered_task_lists() -> list[str]:
    from itertools import combinations

    subsets = [c for k in range(1, len(TASK_IDS) + 1) for c in combinations(TASK_IDS, k)]
    return ["\\[\\]"] + ["\\[" + ", ".join(f'"{t}"' for t in c) + "\\]" for c in subsets]


_UTTERANCE_CHARS = "[ !#-\\[\\]-~]"
"""Printable ASCII without the quote and the backslash: one byte per character, so a match of n characters can never
take more than n tokens (every token of a byte-level BPE covers at least one byte)."""
MIN_UTTERANCE_CHARS = 16


def user_turn_regex(max_utterance_chars: int = 240) -> str:
    """The same turn as one regex (vLLM `structured_outputs.regex`): no free whitespace (xgrammar JSON lets a small
    model emit whitespace runs until max_tokens, recorded in the fixtures), a bounded ASCII utterance, closed
    intent/emotion sets and completed_tasks as distinct task ids in sequence order."""
    alt = "|".join
    return (
        '\\{"utterance": "' + _UTTERANCE_CHARS + "{1," + str(max_utterance_chars) + '}", '
        f'"intent": "({alt(INTENTS)})", "emotion": "({alt(EMOTIONS)})", "satisfaction": [1-5], '
        f'"stop": (true|false), "completed_tasks": ({alt(_ordered_task_lists())})\\}}'
    )


def regex_max_chars(regex: str) -> int:
    """The longest string `regex` can match (characters)."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]
    return int(sre_parse.parse(regex).getwidth()[1])


def skeleton_chars() -> int:
    """Characters of the longest turn JSON with an empty utterance (what the metadata alone can take)."""
    return regex_max_chars(user_turn_regex(1)) - 1


def utterance_budget(max_tokens: int, cap: int = 240) -> int:
    """Utterance characters that fit `max_tokens` whatever else the turn holds: max_tokens - skeleton_chars(),
    at most `cap`. Raises when max_tokens is too small for the llm mode (names the setting and the minimum)."""
    n = min(cap, max_tokens - skeleton_chars())
    if n < MIN_UTTERANCE_CHARS:
        raise ValueError(
            f"simulator.max_tokens={max_tokens} is too small for simulator.mode='llm': the turn's JSON metadata can "
            f"take {skeleton_chars()} tokens, leaving {max(n, 0)} for the utterance; set simulator.max_tokens >= "
            f"{skeleton_chars() + MIN_UTTERANCE_CHARS} (or use simulator.mode='agenda')"
        )
    return n


class ChatLike(Protocol):
    """What the simulator needs from a client: `gopo_online.serving.client.ChatClient.chat`."""

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        structured: dict[str, Any] | None = None,
    ) -> Any: ...


class UserTurn(BaseModel):
    model_config = ConfigDict(frozen=True)
    ok: Literal[True] = True
    utterance: str
    meta: UserTurnMeta
    raw: str
    attempts: int
    repairs: tuple[str, ...] = ()
    """What the repair step changed (empty when the model wrote valid JSON)."""
    latency_s: float = 0.0


class UserTurnError(BaseModel):
    """The simulator could not produce a valid turn within its retry budget."""

    model_config = ConfigDict(frozen=True)
    ok: Literal[False] = False
    stage: Literal["request", "json", "fields"]
    """request: the endpoint failed; json: no object could be recovered; fields: required fields missing/invalid."""
    error: str
    raw_outputs: tuple[str, ...] = ()
    attempts: int = 0
    latency_s: float = 0.0


UserResult = UserTurn | UserTurnError


class FieldError(ValueError):
    pass


def _coerce_satisfaction(v: Any, repairs: list[str]) -> int:
    if isinstance(v, bool):
        raise FieldError(f"satisfaction is a boolean ({v!r})")
    if isinstance(v, int):
        if not 1 <= v <= 5:
            raise FieldError(f"satisfaction {short_repr(v)} is outside 1-5")
        return v
    if isinstance(v, float):
        x = v
    elif isinstance(v, str):
        m = re.search(r"-?\d+(\.\d+)?", v[:200])
        if not m:
            raise FieldError(f"satisfaction {short_repr(v)} has no number")
        if re.search(r"/\s*\d", v[m.end() : m.end() + 20]) and not re.match(r"\s*/\s*5(\D|$)", v[m.end() :]):
            raise FieldError(f"satisfaction {short_repr(v)} is on another scale than 1-5")
        x = float(m.group())
    else:
        raise FieldError(f"satisfaction has type {type(v).__name__}")
    if not (math.isfinite(x) and 1.0 <= x <= 5.0):
        raise FieldError(f"satisfaction {short_repr(v)} is outside 1-5")
    n = round(x)
    repairs.append(f"satisfaction {short_repr(v)} read as {n}")
    return n


def _coerce_bool(v: Any, repairs: list[str]) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "false", "no"):
        repairs.append(f"stop {v!r} read as a boolean")
        return v.strip().lower() in ("true", "yes")
    if isinstance(v, int) and v in (0, 1):
        repairs.append(f"stop {v!r} read as a boolean")
        return bool(v)
    raise FieldError(f"stop {v!r} is not a boolean")


def _label(v: Any, name: str, allowed: Sequence[str], repairs: list[str]) -> str:
    if not isinstance(v, str) or not v.strip():
        raise FieldError(f"{name} {short_repr(v)} is not a non-empty string")
    label = v.strip().lower()
    if label not in allowed:
        # kept as written (the state maps it to "other"), but never silently: the note reaches the Trajectory
        repairs.append(f"{name} {short_repr(label)} is not one of the listed {name}s")
    return label


def parse_user_output(text: str) -> tuple[str, UserTurnMeta, tuple[str, ...]]:
    """Raw model text -> (utterance, metadata, repairs). Raises `JSONRepairError` or `FieldError`."""
    obj = parse_json_object(text)
    repairs: list[str] = []
    try:
        json.loads(text.strip())
    except json.JSONDecodeError:
        repairs.append("JSON repaired")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise FieldError(f"missing field(s) {missing}; got keys {sorted(map(str, obj))[:20]}")
    utterance = obj["utterance"]
    if not isinstance(utterance, str) or not utterance.strip():
        raise FieldError(f"utterance {short_repr(utterance)} is empty or not a string")
    tasks_raw = obj.get("completed_tasks") or []
    if isinstance(tasks_raw, str):
        tasks_raw = [tasks_raw]
        repairs.append("completed_tasks string wrapped in a list")
    if not isinstance(tasks_raw, list):
        raise FieldError(f"completed_tasks {short_repr(tasks_raw)} is not a list")
    tasks = tuple(dict.fromkeys(str(t) for t in tasks_raw if str(t) in TASK_IDS))
    if len(tasks) != len(tasks_raw):
        repairs.append(f"completed_tasks {short_repr(tasks_raw)} filtered to {list(tasks)}")
    meta = UserTurnMeta(
        intent=_label(obj["intent"], "intent", INTENTS, repairs),
        emotion=_label(obj["emotion"], "emotion", EMOTIONS, repairs),
        satisfaction=_coerce_satisfaction(obj["satisfaction"], repairs),
        stop=_coerce_bool(obj["stop"], repairs),
        completed_tasks=tasks,
    )
    return utterance.strip(), meta, tuple(repairs)


def _facts(d: dict[str, Any]) -> str:
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in d.items())


def build_messages(
    persona: Persona, instance: ScenarioInstance, history: Sequence[tuple[str, str]], turn: int, max_turns: int
) -> list[dict[str, str]]:
    """The role-play prompt. Roles are flipped: the agent's replies are the 'user' side of this chat."""
    fam = instance.scenario
    system = (
        f"You are a CUSTOMER talking to a {fam.title} agent. Stay in character.\n"
        f"Your profile:\n{persona.prompt_profile()}\n"
        f"Your situation: {_facts(instance.user_facts)}.\n"
        f"Your hidden goal (never say it is hidden): {instance.goal.text}\n"
        f"The agent should (1) understand your need, (2) give you the facts, (3) propose a next step. "
        f"Task ids: {', '.join(TASK_IDS)}.\n"
        "Answer with ONE JSON object with the keys: utterance (your next message to the agent, in your own words, "
        "in character), intent, emotion, satisfaction (1-5: how satisfied you are with the agent so far), stop "
        "(true when your goal is met or you give up), completed_tasks (the task ids the agent's LAST message "
        "completed; [] if none).\n"
        f"intent is one of: {', '.join(INTENTS)}. emotion is one of: {', '.join(EMOTIONS)}.\n"
        f"Set stop to true when your goal is met or you give up. This is turn {turn} of at most {max_turns}."
    )
    messages = [{"role": "system", "content": system}]
    if not history:
        # the support desk greets first, as real chats do; an instruction here was copied verbatim by SmolLM2
        messages.append({"role": "user", "content": OPENING_GREETING})
    for role, text in history:
        messages.append({"role": "user" if role == "agent" else "assistant", "content": text})
    return messages


class UserSimulator:
    """Simulated user over any `ChatLike` client (`ChatClient` against vLLM or another OpenAI-compatible API)."""

    def __init__(
        self,
        client: ChatLike,
        model: str,
        *,
        temperature: float = 0.7,
        max_tokens: int = 320,
        json_retries: int = 2,
        structured: Literal["regex", "json", "none"] = "regex",
        max_turns: int = 6,
    ) -> None:
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_retries = json_retries
        self.structured = structured
        self.max_turns = max_turns
        # the regex bounds the utterance so that the whole JSON turn always fits max_tokens (a turn cut at
        # max_tokens cannot close its JSON; the 240-character bound overflowed 160 tokens, issue 8)
        self.utterance_chars = utterance_budget(max_tokens) if structured == "regex" else 240

    @classmethod
    def from_config(
        cls, sim_cfg: Any, client: ChatLike, model: str, *, structured: Literal["regex", "json", "none"] = "regex"
    ) -> UserSimulator:
        """From a `SimulatorConfig`."""
        return cls(
            client,
            model,
            temperature=sim_cfg.temperature,
            max_tokens=sim_cfg.max_tokens,
            json_retries=sim_cfg.json_retries,
            structured=structured,
            max_turns=sim_cfg.max_turns,
        )

    def respond(
        self,
        *,
        persona: Persona,
        instance: ScenarioInstance,
        history: Sequence[tuple[str, str]],
        turn: int,
        seed: int | None = None,
    ) -> UserResult:
        """The user's next message. `history` = earlier (role, text) pairs, role "user" or "agent"."""
        messages = build_messages(persona, instance, history, turn, self.max_turns)
        structured = {"regex": user_turn_regex(self.utterance_chars), "json": user_turn_schema()}.get(self.structured)
        structured = {self.structured: structured} if structured is not None else None
        raws: list[str] = []
        last_error = ""
        stage: Literal["json", "fields"] = "json"
        t0 = time.monotonic()
        for attempt in range(self.json_retries + 1):
            try:
                res = self.client.chat(
                    messages,
                    model=self.model,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    seed=None if seed is None else seed + 7919 * attempt,
                    structured=structured,
                )
            except Exception as e:  # noqa: BLE001 - the endpoint failing is a typed error turn, not a crash
                return UserTurnError(
                    stage="request",
                    error=f"{type(e).__name__}: {e}",
                    raw_outputs=tuple(raws),
                    attempts=attempt + 1,
                    latency_s=time.monotonic() - t0,
                )
            text = getattr(res, "text", res if isinstance(res, str) else "")
            raws.append(text)
            try:
                utterance, meta, repairs = parse_user_output(text)
            except JSONRepairError as e:
                stage, last_error = "json", str(e)
                continue
            except (FieldError, ValueError, TypeError, ArithmeticError, RecursionError) as e:
                # anything the model wrote is a re-ask with the raw text kept, never a crash of the episode
                stage, last_error = "fields", f"{type(e).__name__}: {e}" if not isinstance(e, FieldError) else str(e)
                continue
            return UserTurn(
                utterance=utterance,
                meta=meta,
                raw=text,
                attempts=attempt + 1,
                repairs=repairs,
                latency_s=time.monotonic() - t0,
            )
        return UserTurnError(
            stage=stage,
            error=f"no valid turn after {len(raws)} attempt(s): {last_error}",
            raw_outputs=tuple(raws),
            attempts=len(raws),
            latency_s=time.monotonic() - t0,
        )


def simulator_mode(cfg: Any) -> Literal["agenda", "llm"]:
    """`simulator.mode` resolved: "auto" is "llm" for an external (capable) simulator endpoint, else "agenda"."""
    mode = cfg.simulator.mode
    if mode == "auto":
        return "llm" if cfg.serving.simulator == "external" else "agenda"
    return mode


def agenda_rewrite(cfg: Any) -> bool:
    """`simulator.agenda_rewrite` resolved: "auto" rewords with the LLM only when the simulator model is a capable
    one (a configured `model.path` or an external endpoint), the same rule as the judge's "auto"."""
    value = cfg.simulator.agenda_rewrite
    return not cfg.small_simulator_model if value == "auto" else bool(value)


def make_user_simulator(
    cfg: Any, client: ChatLike, model: str, *, structured: Literal["regex", "json", "none"] = "regex"
) -> Any:
    """The configured simulated user: `simulator.agenda.AgendaUserSimulator` or the LLM role-play `UserSimulator`."""
    if simulator_mode(cfg) == "agenda":
        from simulator.agenda import AgendaUserSimulator

        return AgendaUserSimulator.from_config(
            cfg.simulator, client, model, regex=structured == "regex", rewrite=agenda_rewrite(cfg)
        )
    return UserSimulator.from_config(cfg.simulator, client, model, structured=structured)
