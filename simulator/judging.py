"""The episode's judge in every `judge.mode`: rubric (checkable evidence), llm (the judge model) or mixed.

The rubric judge (`gopo_online.rubric`) needs what only the episode side knows: the scenario instance (task
detectors, reference replies, the case's words) and the turn's hard-constraint checks (skills + SOP). `rubric_case`
gathers them; `EpisodeJudge.score_case` is what `play_episode` calls when a judge offers it.
"""

from __future__ import annotations

from typing import Any

from gopo_online.config import GopoConfig
from gopo_online.rubric import RubricCase, judge_dimensions, mix_verdicts, resolve_mode, rubric_verdict
from gopo_online.types import Compliance, JudgeScores
from simulator.scenarios import TASK_IDS, ScenarioInstance, detect_task, get_family, next_task
from simulator.state import DialogueState


def rubric_case(
    instance: ScenarioInstance,
    state: DialogueState,
    reply: str,
    action: str,
    compliance: Compliance | None = None,
) -> RubricCase:
    """The rubric's view of one CS reply: detectors run with the user's last message (structure + relevance gated)."""
    fam = get_family(instance.family)
    skills = tuple(fam.skill(s) for s in state.expert_skills if s in fam.skill_names)
    hit = tuple(t for t in TASK_IDS if detect_task(instance, t, reply, action, state.user_utterance))
    return RubricCase(
        user_utterance=state.user_utterance,
        reply=reply,
        action=action,
        skills=skills,
        compliance=compliance,
        tasks_hit=hit,
        task_pending=next_task(tuple(state.tasks_done)),
        references=tuple(instance.reference_replies.values()),
        case_terms=instance.case_terms,
        earlier_replies=tuple(text for role, text in state.history if role == "agent"),
        guidance_actions=instance.guidance_actions,
        context=instance.business_context(),
        dialogue=tuple(text for _, text in state.history),
    )


class EpisodeJudge:
    """Scores CS replies in `mode` ("rubric", "llm", "mixed"); `llm` is an episode judge with `score(state, reply,
    action)` (simulator.serving_adapters.ServedJudge), needed by the llm and mixed modes."""

    def __init__(self, cfg: GopoConfig, mode: str | None = None, llm: Any = None) -> None:
        self.cfg = cfg
        self.mode = mode or resolve_mode(cfg)
        if self.mode not in ("rubric", "llm", "mixed"):
            raise ValueError(f"judge mode must be rubric, llm or mixed, got {self.mode!r}")
        if self.mode != "rubric" and llm is None:
            raise ValueError(f"judge mode {self.mode!r} needs an LLM judge (none was given)")
        self.llm = llm
        self.dimensions = judge_dimensions(cfg.judge.dimensions, cfg.judge.gre_dimensions)
        self.principles = list(cfg.judge.principles)

    def score(self, state: DialogueState, reply: str, action: str) -> JudgeScores:
        """Without the scenario instance only the LLM judge can score."""
        if self.mode != "llm":
            raise TypeError(f"judge mode {self.mode!r} needs the scenario instance: call score_case")
        return self.llm.score(state, reply, action)

    def score_case(
        self,
        state: DialogueState,
        reply: str,
        action: str,
        *,
        instance: ScenarioInstance,
        compliance: Compliance | None = None,
    ) -> JudgeScores:
        if self.mode == "llm":
            return self.llm.score(state, reply, action).model_copy(update={"mode": "llm"})
        case = rubric_case(instance, state, reply, action, compliance)
        verdict = rubric_verdict(case, self.dimensions, self.principles, self.cfg.judge.rubric_gate_factor)
        if self.mode == "rubric":
            return verdict
        return mix_verdicts(verdict, self.llm.score(state, reply, action), self.cfg.judge.mixed_rubric_weight)
