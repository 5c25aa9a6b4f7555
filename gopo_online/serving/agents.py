"""The two served policies: the Expert (picks 1-5 distinct pool skills) and the CS agent (writes the reply).

Both talk to an injected chat client (a `ChatClient`, or a fake with the same `chat` method in unit tests) and
record the sampled token ids and logprobs as a `Generation` stamped with the policy version.

Expert: state s^E_t = last k turns, user intent, user emotion, previous skills (gopo §3.2). Decoding is
constrained by `expert_grammar`, so the answer is always 1..max distinct pool skills.
CS agent: state s^A_t = the user utterance, the chosen skills written as HARD constraints (their required and
forbidden content, their allowed action tags) and the business context B_t. Decoding is constrained to
`ACTION: <tag>\\n<reply>` with the tag restricted to what the chosen skills allow; the reply is then checked by
`check_compliance`, which counts every violated constraint.
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
        """The chat messages of s^E_t (exposed so tests and the learner can see exactly what was asked)."""
        pool_text = "\n".join(f"- {s.name}: {s.description}" for s in pool)
        system = EXPERT_SYSTEM.format(max_skills=min(self.cfg.max_skills, len(pool)), pool=pool_text)
        user = (
            f"Dialogue so far:\n{format_history(history, self.cfg.history_k)}\n\n"
            f"User intent: {intent}\nUser emotion: {emotion}\n"
            f"Previous skills: {', '.join(previous_skills) if previous_skills else 'none'}\n\n"
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
        grammar = expert_grammar(names, self.cfg.max_skills)
        result = self.client.chat(
            self.messages(pool, history, intent, emotion, previous_skills),
            model=model or self.model,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            seed=seed,
            structured={"grammar": grammar},
        )
        try:
            skills = parse_expert_output(result.text, names, self.cfg.max_skills)
        except ValueError as e:
            raise AgentOutputError(f"expert output failed its grammar ({result.finish_reason}): {e}") from e
        version = self.policy_version if policy_version is None else policy_version
        ref = GrammarRef(kind="expert_skills", choices=tuple(names), max_items=self.cfg.max_skills)
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
    "You are a polite customer-service agent of an online shop. Write the next reply to the customer.\n\n"
    "HARD CONSTRAINTS: follow every skill below. A reply that breaks one is a failure.\n{skills}\n\n"
    "Business context:\n{context}\n\n"
    "Output format: the first line is `ACTION: <tag>` with the tag chosen from: {actions}. "
    "Then the reply to the customer, in a few sentences."
)

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
        """The chat messages of s^A_t: system prompt with constraints and B_t, past turns, then the utterance."""
        actions = tuple(actions) if actions is not None else allowed_actions(skills, self.default_actions)
        blocks = []
        for i, s in enumerate(skills, 1):
            lines = "".join(f"\n   - {line}" for line in constraint_lines(s))
            blocks.append(f"{i}. {s.name}: {s.description}{lines}")
        system = CS_SYSTEM.format(
            skills="\n".join(blocks) or "(no skills)", context=format_context(context), actions=", ".join(actions)
        )
        msgs = [{"role": "system", "content": system}]
        for turn in list(history)[-self.cfg.history_k :]:
            msgs.append({"role": "user", "content": turn.user})
            if turn.agent:
                msgs.append({"role": "assistant", "content": turn.agent})
        msgs.append({"role": "user", "content": utterance})
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
