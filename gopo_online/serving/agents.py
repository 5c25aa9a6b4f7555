"""The two served policies: the Expert (picks 1-5 distinct pool skills) and the CS agent (writes the reply).

Both talk to an injected chat client (a `ChatClient`, or a fake with the same `chat` method in unit tests) and
record the sampled token ids and logprobs as a `Generation` stamped with the policy version.

Expert: state s^E_t = last k turns, user intent, user emotion, previous skills (gopo §3.2). Decoding is
constrained by `expert_grammar`, so the answer is always 1..max distinct pool skills. By default the Expert writes
short skill codes (`ga, ex, vo`: one token each for SmolLM2), mapped back to the names: ~10 tokens for 5 skills
instead of ~31-63 with the names spelled out. The grammar runs over the codes, the map is one-to-one, so the
guarantee (1..max DISTINCT pool skills) is the same.
CS agent: state s^A_t = the user utterance, the chosen skills written as HARD constraints (their required and
forbidden content, their allowed action tags) and the business context B_t. Decoding is constrained to
`ACTION: <tag>\\n<reply>` with the tag restricted to what the chosen skills allow; the reply is then checked by
`check_compliance`, which counts every violated constraint.

Prompts put what is stable first and what changes last, so vLLM's prefix cache reuses the shared part: the Expert's
system prompt (instructions + the family's pool) is the same for every turn of every episode of a family; the CS
system prompt (instructions + B_t) is the same for every turn of an episode and its past turns are a prefix of the
next turn's, with the per-turn skills in the last message.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gopo_online.config import CSConfig, ExpertConfig
from gopo_online.skills import (
    DEFAULT_ACTIONS,
    allowed_actions,
    check_compliance,
    constraint_lines,
    expert_grammar,
    parse_expert_output,
)
from gopo_online.types import Compliance, Generation, GrammarRef, Skill

from .client import ChatResult


class ChatBackend(Protocol):
    """What the agents need from a client: `ChatClient.chat`."""

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        structured: Mapping[str, Any] | None = None,
    ) -> ChatResult: ...


class AgentOutputError(ValueError):
    """A constrained decode produced something unparsable (a grammar bug: never expected)."""


@dataclass(frozen=True)
class DialogueTurn:
    """One past exchange shown to the agents: what the user said and what the agent answered ('' if not yet)."""

    user: str
    agent: str = ""


# ----------------------------------------------------------------------------- Expert
@dataclass(frozen=True)
class ExpertDecision:
    skills: tuple[str, ...]
    """a^E_t: ordered, distinct pool skill names (most important first)."""
    generation: Generation


EXPERT_SYSTEM = (
    "You are the strategy expert of an e-commerce customer-service team. For the agent's next reply, choose "
    "between 1 and {max_skills} different skills from the skill pool, most important first. "
    "Answer with the skill names only, separated by commas.\n\nSkill pool:\n{pool}"
)
EXPERT_SYSTEM_CODES = (
    "You are the strategy expert of a customer-service team. For the agent's next reply, choose 1 to {max_skills} "
    "different skills, most important first. Answer with their codes only, comma-separated, e.g. `{example}`."
    "\n\nSkills (code: name - when):\n{pool}"
)

# Two-letter codes that SmolLM2's tokenizer writes as ONE token both alone and after a space (computed from its
# vocabulary), minus English words a model might write for their meaning. Any codes would be correct; these are
# the cheap ones. Mnemonic ones (initials of the name's words) are picked first.
_ONE_TOKEN_CODES = tuple(
    """ab ac ad af ag ah ai ak al am ap ar au av aw ax ay az ba bb bc bg bh bi bl bo bp br bs bu ca cb cc cd ce cf
    ch ci cl cm co cp cr cs ct cu cv cy da db dc dd de df dh di dl dm dp dr ds dt du dw dx dy ec ed eg el em en ep eq
    er es et eu ev ex ey fa fc fd fe ff fg fh fi fl fn fo fp fr fs ft fu ga gc ge gh gi gl gn go gp gr gt gu gy ha hi
    ho hp hr hy ib ic id ie ig ii il im io ip ir iv ix ja je jo js ju ka kb ke kg kh ki km kn ko kw la lb le li ll lo
    lr ls ly ma mc md mg mi mk ml mm mo mp ms mt mu mx na nb nd ne ng ni nm nn np nr ns nt nu nx ny ob oc od oe ol om
    oo op os ot ou ov ow ox oy oz pa pc pd pe pg ph pi pk pl pm po pp pr ps pt pu pv py qu ra rc rd re rh rm ro rs rt
    ru rv sa sc se sf sg sh si sk sl sm sn sp sq sr ss st su sv sw sy ta tb te tf th ti tk tm tr ts tu tv tw tx ty tz
    ub uk ul um un ur ut uv va ve vi vm vo vs wa wh wr ws wt wx xi xs xx xy ya ye yr ze zo zu""".split()
)


@functools.lru_cache(maxsize=64)
def _skill_codes(names: tuple[str, ...]) -> tuple[str, ...]:
    free = dict.fromkeys(_ONE_TOKEN_CODES)
    codes: list[str] = []
    for name in names:
        words = [w for w in name.split("_") if w]
        wanted = [
            words[0][0] + words[1][0] if len(words) > 1 else "",  # greet_and_acknowledge -> ga
            words[0][:2],  # express_empathy -> ex
            words[0][0] + words[-1][0] if len(words) > 1 else "",
            *(words[0][0] + c for c in name[1:] if c != "_"),
        ]
        code = next((c for c in wanted if c in free), None) or next(iter(free), None)
        if code is None:
            raise ValueError(f"no skill code left for {name!r}: a pool of {len(names)} is too large")
        del free[code]
        codes.append(code)
    return tuple(codes)


def skill_codes(names: Sequence[str]) -> dict[str, str]:
    """name -> short code, one-to-one, stable for a given pool order (a pure function of the names)."""
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ValueError(f"the skill pool has duplicates: {sorted(n for n in names if names.count(n) > 1)}")
    return dict(zip(names, _skill_codes(names), strict=True))


def format_history(history: Sequence[DialogueTurn], k: int) -> str:
    lines = []
    for turn in list(history)[-k:]:
        lines.append(f"User: {turn.user}")
        if turn.agent:
            lines.append(f"Agent: {turn.agent}")
    return "\n".join(lines) if lines else "(no earlier turns)"


class ExpertAgent:
    """Chooses a^E_t. `model` is the served name or LoRA adapter name; `policy_version` stamps the Generation.

    Both can be changed between calls (after a weight push) or overridden per call.
    """

    def __init__(
        self,
        client: ChatBackend,
        *,
        model: str = "policy",
        policy_version: int = 0,
        cfg: ExpertConfig | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.policy_version = policy_version
        self.cfg = cfg or ExpertConfig()

    def messages(
        self,
        pool: Sequence[Skill],
        history: Sequence[DialogueTurn],
        intent: str,
        emotion: str,
        previous_skills: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        """The chat messages of s^E_t (exposed so tests and the learner can see exactly what was asked).

        System: instructions and the pool only (stable across turns and episodes: the prefix cache's part); user:
        this turn's state."""
        k = min(self.cfg.max_skills, len(pool))
        if self.cfg.skill_codes:
            codes = skill_codes([s.name for s in pool])
            pool_text = "\n".join(f"{codes[s.name]}: {s.name} - {s.description}" for s in pool)
            example = ", ".join(list(codes.values())[: min(2, k)])
            system = EXPERT_SYSTEM_CODES.format(max_skills=k, pool=pool_text, example=example)
            prev = ", ".join(codes.get(p, p) for p in previous_skills) if previous_skills else "none"
        else:
            pool_text = "\n".join(f"- {s.name}: {s.description}" for s in pool)
            system = EXPERT_SYSTEM.format(max_skills=k, pool=pool_text)
            prev = ", ".join(previous_skills) if previous_skills else "none"
        user = (
            f"Dialogue so far:\n{format_history(history, self.cfg.history_k)}\n\n"
            f"User intent: {intent}\nUser emotion: {emotion}\n"
            f"Previous skills: {prev}\n\n"
            "Skills for the next reply:"
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def decide(
        self,
        pool: Sequence[Skill],
        history: Sequence[DialogueTurn],
        intent: str,
        emotion: str,
        previous_skills: Sequence[str] = (),
        *,
        seed: int | None = None,
        model: str | None = None,
        policy_version: int | None = None,
    ) -> ExpertDecision:
        names = [s.name for s in pool]
        codes = skill_codes(names) if self.cfg.skill_codes else {n: n for n in names}
        words = list(codes.values())
        grammar = expert_grammar(words, self.cfg.max_skills)
        result = self.client.chat(
            self.messages(pool, history, intent, emotion, previous_skills),
            model=model or self.model,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            seed=seed,
            structured={"grammar": grammar},
        )
        try:
            by_code = {c: n for n, c in codes.items()}
            skills = tuple(by_code[c] for c in parse_expert_output(result.text, words, self.cfg.max_skills))
        except ValueError as e:
            raise AgentOutputError(f"expert output failed its grammar ({result.finish_reason}): {e}") from e
        version = self.policy_version if policy_version is None else policy_version
        # the grammar the decoder ran under: over the codes when skill codes are on (the learner replays it)
        ref = GrammarRef(kind="expert_skills", choices=tuple(words), max_items=self.cfg.max_skills)
        generation = result.to_generation(version).model_copy(update={"grammar": ref})
        return ExpertDecision(skills=skills, generation=generation)


# ----------------------------------------------------------------------------- CS agent
@dataclass(frozen=True)
class CSReply:
    reply: str
    action: str
    allowed_actions: tuple[str, ...]
    """Tags the decoder was allowed to choose from (what the chosen skills permit)."""
    generation: Generation
    compliance: Compliance


CS_SYSTEM = (
    "You are a polite customer-service agent of an online shop. Write the next reply to the customer.\n"
    "Each customer message ends with the skills for that reply: they are HARD CONSTRAINTS, a reply that breaks one "
    "is a failure.\n"
    "Output format: the first line is `ACTION: <tag>` with a tag the skills allow, then the reply to the customer "
    "in a few sentences.\n\n"
    "Business context:\n{context}"
)
CS_TURN = "{utterance}\n\n[HARD CONSTRAINTS for this reply]\n{skills}\nACTION tag, one of: {actions}"

_CS_PATTERN = re.compile(r"\AACTION: ([a-z][a-z0-9_]*)\n(.*)\Z", re.DOTALL)
_TAG = re.compile(r"^[a-z][a-z0-9_]*$")


@functools.lru_cache(maxsize=256)
def cs_grammar(actions: tuple[str, ...]) -> str:
    """EBNF forcing `ACTION: <tag>\\n<reply>`: the tag one of `actions`, the reply non-empty and starting with a
    visible character (so it cannot be only whitespace)."""
    bad = [a for a in actions if not _TAG.match(a)]
    if not actions or bad:
        raise ValueError(f"action tags must be non-empty lower snake case, got {list(actions)}")
    tags = " | ".join(f'"{a}"' for a in actions)
    return f'root ::= "ACTION: " ({tags}) "\\n" reply\nreply ::= [^ \\t\\n] [^\\x00]*\n'


def parse_cs_output(text: str, actions: Sequence[str]) -> tuple[str, str]:
    """(action, reply) from `ACTION: tag\\nreply`; AgentOutputError when the format or the tag is wrong."""
    m = _CS_PATTERN.match(text)
    if m is None:
        raise AgentOutputError(f"CS output is not 'ACTION: <tag>\\n<reply>': {text[:200]!r}")
    action, reply = m.group(1), m.group(2).strip()
    if action not in actions:
        raise AgentOutputError(f"CS action {action!r} not in the allowed {list(actions)}")
    if not reply:
        raise AgentOutputError("CS reply is empty")
    return action, reply


def format_context(context: Mapping[str, Any]) -> str:
    if not context:
        return "(none)"
    return "\n".join(
        f"- {k}: {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}" for k, v in context.items()
    )


class CSAgent:
    """Writes the reply under the Expert's skills as hard constraints and checks it against them."""

    def __init__(
        self,
        client: ChatBackend,
        *,
        model: str = "policy",
        policy_version: int = 0,
        cfg: CSConfig | None = None,
        default_actions: Sequence[str] = DEFAULT_ACTIONS,
    ) -> None:
        self.client = client
        self.model = model
        self.policy_version = policy_version
        self.cfg = cfg or CSConfig()
        self.default_actions = tuple(default_actions)

    def messages(
        self,
        utterance: str,
        skills: Sequence[Skill],
        context: Mapping[str, Any],
        history: Sequence[DialogueTurn] = (),
        actions: Sequence[str] | None = None,
    ) -> list[dict[str, str]]:
        """The chat messages of s^A_t: system prompt with the instructions and B_t (stable for the episode), past turns
        (a prefix of the next turn's), then the utterance with this turn's skills as hard constraints."""
        actions = tuple(actions) if actions is not None else allowed_actions(skills, self.default_actions)
        blocks = []
        for i, s in enumerate(skills, 1):
            lines = "".join(f"\n   - {line}" for line in constraint_lines(s))
            blocks.append(f"{i}. {s.name}: {s.description}{lines}")
        msgs = [{"role": "system", "content": CS_SYSTEM.format(context=format_context(context))}]
        for turn in list(history)[-self.cfg.history_k :]:
            msgs.append({"role": "user", "content": turn.user})
            if turn.agent:
                msgs.append({"role": "assistant", "content": turn.agent})
        last = CS_TURN.format(
            utterance=utterance, skills="\n".join(blocks) or "(no skills)", actions=", ".join(actions)
        )
        msgs.append({"role": "user", "content": last})
        return msgs

    def reply(
        self,
        utterance: str,
        skills: Sequence[Skill],
        context: Mapping[str, Any],
        history: Sequence[DialogueTurn] = (),
        *,
        seed: int | None = None,
        model: str | None = None,
        policy_version: int | None = None,
    ) -> CSReply:
        actions = allowed_actions(skills, self.default_actions)
        result = self.client.chat(
            self.messages(utterance, skills, context, history, actions),
            model=model or self.model,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            seed=seed,
            structured={"grammar": cs_grammar(actions)},
        )
        action, text = parse_cs_output(result.text, actions)
        version = self.policy_version if policy_version is None else policy_version
        return CSReply(
            reply=text,
            action=action,
            allowed_actions=actions,
            generation=result.to_generation(version).model_copy(
                update={"grammar": GrammarRef(kind="cs_action", choices=tuple(actions))}
            ),
            compliance=check_compliance(text, action, skills),
        )
