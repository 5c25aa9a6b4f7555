"""What an agent sees at one decision: the `DialogueState` the episode loop hands to the Expert and the CS agent,
and the closed vocabularies of user intent and emotion the simulator writes (and the teacher table is keyed by)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gopo_online.types import Skill

INTENTS = (
    "greet",
    "inquire_status",
    "request_refund",
    "request_return",
    "ask_product_info",
    "ask_recommendation",
    "complain",
    "provide_info",
    "provide_evidence",
    "demand_compensation",
    "accept_offer",
    "reject_offer",
    "thank",
    "other",
)
"""User intents the simulator may report; anything else is kept verbatim but looked up as "other"."""
EMOTIONS = ("calm", "neutral", "confused", "anxious", "frustrated", "angry", "satisfied")
NEGATIVE_EMOTIONS = frozenset({"anxious", "frustrated", "angry"})


def emotion_bucket(emotion: str) -> str:
    e = emotion.strip().lower()
    if e in NEGATIVE_EMOTIONS:
        return "negative"
    return "positive" if e == "satisfied" else "neutral"


def normalise_intent(intent: str) -> str:
    i = intent.strip().lower().replace(" ", "_").replace("-", "_")
    return i if i in INTENTS else "other"


class DialogueState(BaseModel):
    """s_t for both agents. s^E_t uses history (last k), intent, emotion and prev_skills; s^A_t uses the user
    utterance, `expert_skills` (hard constraints, filled in before the CS agent is called) and `business_context`."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    episode_id: str
    turn: int = Field(ge=1)
    """1-based turn index."""
    family: str
    case_type: str
    user_utterance: str
    user_intent: str
    user_emotion: str
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (role, text) pairs, role "user" or "agent", oldest first; the current utterance is NOT included."""
    prev_skills: tuple[str, ...] = ()
    """a^E_{t-1}: the Expert's previous skills."""
    skill_pool: tuple[Skill, ...]
    action_tags: tuple[str, ...]
    business_context: dict[str, Any]
    tasks_done: tuple[str, ...] = ()
    expert_skills: tuple[str, ...] = ()
    """a^E_t, set before the CS agent is called; empty for the Expert's own call."""
    seed: int | None = None
    """Per-decision seed for reproducible sampling."""

    def last_k(self, k: int) -> tuple[tuple[str, str], ...]:
        return self.history[-2 * k :] if k > 0 else ()

    @property
    def skill_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.skill_pool)
