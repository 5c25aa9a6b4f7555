"""The records that travel between processes: skills, generations, turns and the `Trajectory`.

One frozen, versioned `Trajectory` goes from a rollout worker through the broker to the learner as
JSON. Only the learner's collate step turns it into tensors. Validators state the invariants; they
never rewrite a value.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TRAJECTORY_SCHEMA_VERSION = 2
"""2 added `Trajectory.repairs`; version 1 records (no repairs) still load."""
MAX_SKILLS = 5
"""Both predicted and teacher skill sequences are capped at 5 (gopo §3.3)."""

ActionTag = str
"""A CS action tag, e.g. "chat", "voucher", "refund", "escalate" (the scenario lists the allowed ones)."""


class Record(BaseModel):
    """Base for every wire record: frozen, no unknown keys, no NaN/inf."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class Skill(Record):
    """One skill of a scenario's skill pool, and the hard constraints it compiles to (DESIGN §1)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    """Identifier the Expert emits; lower snake case so a grammar can list it verbatim."""
    description: str = Field(min_length=1)
    """What the skill asks of the reply; also embedded for the skill-compliance distance d (gopo eq 9c)."""
    required_any: tuple[tuple[str, ...], ...] = ()
    """Required content: each inner tuple is one constraint met when ANY of its regexes matches the reply."""
    forbidden: tuple[str, ...] = ()
    """Forbidden content: regexes that must NOT match the reply."""
    allowed_actions: tuple[ActionTag, ...] = ()
    """Action tags this skill permits; empty means it does not restrict the action tag."""


class GrammarRef(Record):
    """What a constrained decode was constrained by, compact enough for the wire: the learner rebuilds the same
    grammar from it and applies the same allowed-token mask when it scores the completion again."""

    kind: Literal["expert_skills", "cs_action"]
    """`expert_skills`: `gopo_online.skills.expert_grammar(choices, max_items)`; `cs_action`:
    `gopo_online.serving.agents.cs_grammar(choices)`."""
    choices: tuple[str, ...] = Field(min_length=1)
    """The words the grammar admitted, in the order given to it: the skill pool as the decoder wrote it (its skill
    codes when `agents.expert.skill_codes` is on, else the names) for the expert; the allowed action tags for CS."""
    max_items: int = Field(default=0, ge=0)
    """Expert: the most skills the grammar admits; 0 for the CS grammar."""


class Generation(Record):
    """One completion sampled from a served policy, with what the learner needs to score it again.

    Token ids come from vLLM (`return_token_ids`), never from re-tokenising text. `logprobs` are vLLM's
    sampled-token logprobs after any grammar mask and after the temperature (`--logprobs-mode
    processed_logprobs`): log π of the policy that sampled.
    """

    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    """One per completion token, same length as `completion_token_ids`."""
    text: str
    model: str
    """Served model or adapter name that produced it."""
    policy_version: int = Field(ge=0)
    temperature: float = Field(ge=0.0)
    latency_s: float = Field(ge=0.0)
    finish_reason: str | None = None
    grammar: GrammarRef | None = None
    """The grammar the decode was constrained by (None: unconstrained, every token allowed)."""

    @model_validator(mode="after")
    def _lengths(self) -> Generation:
        if len(self.logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but completion_token_ids has "
                f"{len(self.completion_token_ids)}: they must be equal"
            )
        if any(lp > 0.0 for lp in self.logprobs):
            raise ValueError("a logprob is > 0")
        return self


class UserTurnMeta(Record):
    """The simulator's metadata for one user turn (InteractCS eq 3: utterance + metadata)."""

    intent: str
    emotion: str
    satisfaction: int = Field(ge=1, le=5)
    stop: bool
    completed_tasks: tuple[str, ...] = ()
    """Scenario TSE task ids the simulator says were completed by the agent's previous reply."""
    source: Literal["llm", "template"] = "llm"
    """Who wrote this turn: "llm" = the model (the whole turn in simulator.mode "llm", only the words in "agenda");
    "template" = the agenda user model's template words (the model's text was unusable or rewriting is off)."""
    state: dict[str, Any] | None = None
    """The agenda user model's state after the agent turn this message reacts to (simulator.mode "agenda")."""


class ConstraintCheck(Record):
    """One hard constraint of one skill, checked against a CS reply."""

    skill: str
    kind: Literal["required", "forbidden", "action"]
    target: str
    passed: bool


class Compliance(Record):
    """All hard-constraint checks of a turn. `score` = passed / total (1.0 when there is nothing to check)."""

    checks: tuple[ConstraintCheck, ...] = ()

    @property
    def violations(self) -> int:
        return sum(not c.passed for c in self.checks)

    @property
    def score(self) -> float:
        return 1.0 if not self.checks else 1.0 - self.violations / len(self.checks)


class JudgeScores(Record):
    """The judge's verdict on one CS reply: rubric scores in [0, 1], principles in {0, 0.5, 1}, raw text kept."""

    scores: dict[str, float] = Field(default_factory=dict)
    """Rubric dimension (gopo eq 8 and GRE dimensions) -> score normalised to [0, 1]."""
    principles: dict[str, float] = Field(default_factory=dict)
    """InteractCS principle -> {0, 0.5, 1} (InteractCS eq 6)."""
    raw: str = ""
    ok: bool = True
    error: str | None = None
    mode: str = "llm"
    """Which judge produced it: "llm", "rubric" or "mixed" (gopo_online.rubric)."""
    notes: tuple[str, ...] = ()
    """Repairs and re-asks on the way to this verdict (e.g. a score outside the asked scale), in order."""
    evidence: dict[str, Any] = Field(default_factory=dict)
    """The rubric judge's raw evidence for this reply (checks, overlaps, gates), kept per turn."""

    @field_validator("scores")
    @classmethod
    def _unit_scores(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: s for k, s in v.items() if not 0.0 <= s <= 1.0}
        if bad:
            raise ValueError(f"judge scores outside [0, 1]: {bad}")
        return v

    @field_validator("principles")
    @classmethod
    def _discrete(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: s for k, s in v.items() if s not in (0.0, 0.5, 1.0)}
        if bad:
            raise ValueError(f"principle scores must be 0, 0.5 or 1: {bad}")
        return v


class TurnRewards(Record):
    """Every reward component of a turn, so the dashboard and the learner can show/recompute each one."""

    r_expert: float = Field(ge=0.0, le=1.0)
    """R^E_t = ESNDCG(P, T) (gopo eq 6)."""
    r_cs: float
    """R^A_t, weighted judge score (gopo eq 8)."""
    w_expert: float = Field(ge=0.0)
    w_cs: float = Field(gt=0.0)
    joint: float
    """R_t = w^E_t R^E_t + w^A_t R^A_t (gopo eq 10)."""
    process: float = 0.0
    """InteractCS turn-level process reward (weighted principle scores, eq 6)."""
    compliance: float = Field(default=1.0, ge=0.0, le=1.0)
    skill_distance: float | None = None
    """d(a^A, a^E) (gopo eq 9c), cosine distance in [0, 2]; None when not computed."""


class Turn(Record):
    """One dialogue turn: the user speaks, the Expert picks skills, the CS agent replies, the judge scores."""

    index: int = Field(ge=1)
    """Turn index t, 1-based (the joint-reward schedule and TSE count turns from 1)."""
    user_utterance: str
    user_meta: UserTurnMeta
    expert_skills: tuple[str, ...] = Field(min_length=1, max_length=MAX_SKILLS)
    teacher_skills: tuple[str, ...] = Field(default=(), max_length=MAX_SKILLS)
    expert_gen: Generation | None = None
    cs_reply: str
    cs_action: ActionTag
    cs_gen: Generation | None = None
    compliance: Compliance = Compliance()
    judge: JudgeScores | None = None
    rewards: TurnRewards | None = None
    cost: float = Field(default=0.0, ge=0.0)
    """Operational cost of the CS action (e.g. 1.0 for a voucher), InteractCS eq 2."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent per stage: simulator, expert, cs, judge."""

    @field_validator("expert_skills", "teacher_skills")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"skills must be distinct, got {list(v)}")
        return v

    @property
    def policy_version(self) -> int | None:
        """Oldest policy version that produced this turn's agent outputs (None if no generation recorded)."""
        versions = [g.policy_version for g in (self.expert_gen, self.cs_gen) if g is not None]
        return min(versions) if versions else None


class Trajectory(Record):
    """One finished (or failed) episode: a persona in a scenario talking to the served agents."""

    schema_version: Literal[1, 2] = TRAJECTORY_SCHEMA_VERSION
    episode_id: str = Field(min_length=1)
    scenario_id: str
    persona_id: str
    persona_group: str = ""
    group_id: str = ""
    """GRPO group: the G rollouts of one (persona, scenario instance, simulator seed) share it; '' = no group."""
    """Group label for per-group tables (e.g. cooperation level or extrinsic demand)."""
    seed: int | None = None
    turns: tuple[Turn, ...] = ()
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    """Reason of an error episode (what failed, where)."""
    final_satisfaction: int | None = Field(default=None, ge=1, le=5)
    """Outcome utility source: the simulator's satisfaction at the end (InteractCS §4.2.1)."""
    finished: bool = False
    """True when the user ended the dialogue (stop signal) rather than the max-turn limit."""
    task_completion_turns: tuple[int | None, ...] = ()
    """N_i for the scenario's sequential TSE tasks (gopo eq 11); None when task i never completed."""
    worker: str = ""
    started_at: float = 0.0
    """Unix time the episode started."""
    duration_s: float = Field(default=0.0, ge=0.0)
    repairs: tuple[str, ...] = ()
    """What was repaired in the model outputs of this episode, e.g. "turn 2 simulator: JSON repaired" (schema 2):
    a repaired reply is kept, and so is the note that it was repaired."""
    sim_flags: tuple[str, ...] = ()
    """Simulator quality-gate failures that stayed in the dialogue after one regeneration, as "turn N: issue"
    (speaks_as_agent, repeats_turn, breaks_disclosure, contradicts_state). Non-empty = `sim_flagged`: a learner
    should exclude the episode."""
    sim_regenerated: int = Field(default=0, ge=0)
    """User turns regenerated once because a quality gate failed."""

    @property
    def sim_flagged(self) -> bool:
        return bool(self.sim_flags)

    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds of the episode-level phases outside its turns (`queue`: dispatch -> the worker started it); the turn
    phases are in `Turn.timings`, `gopo_online.timings.episode_phases` adds them up. Optional and defaulted: records
    written before it existed still read (schema_version 1)."""

    @model_validator(mode="after")
    def _invariants(self) -> Trajectory:
        if self.status == "error" and not self.error:
            raise ValueError("an error trajectory must say why (error is empty)")
        if self.status == "ok" and self.error:
            raise ValueError("an ok trajectory carries an error message")
        idx = [t.index for t in self.turns]
        if idx != list(range(1, len(idx) + 1)):
            raise ValueError(f"turn indices must be 1..n in order, got {idx}")
        if self.status == "ok" and not self.turns:
            raise ValueError("an ok trajectory has no turns")
        for n in self.task_completion_turns:
            if n is not None and not 1 <= n <= max(len(self.turns), 1):
                raise ValueError(f"task completion turn {n} outside 1..{len(self.turns)}")
        done = [n for n in self.task_completion_turns if n is not None]
        if done != sorted(done):
            raise ValueError(f"sequential tasks must complete in order, got {self.task_completion_turns}")
        bad = {k: v for k, v in self.timings.items() if v < 0}
        if bad:
            raise ValueError(f"negative phase timings: {bad}")
        for t in self.turns:
            if t.rewards is not None and not math.isfinite(t.rewards.joint):
                raise ValueError(f"turn {t.index}: joint reward is not finite")
        return self

    @property
    def policy_versions(self) -> tuple[int, ...]:
        """Distinct policy versions seen in this trajectory, ascending."""
        return tuple(sorted({v for t in self.turns if (v := t.policy_version) is not None}))

    @property
    def min_policy_version(self) -> int | None:
        return self.policy_versions[0] if self.policy_versions else None

    @property
    def total_cost(self) -> float:
        return sum(t.cost for t in self.turns)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> Trajectory:
        return cls.model_validate_json(data)
