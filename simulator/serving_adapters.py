"""Adapters from the episode Protocols (`simulator.episode`: Expert, CS, Judge over a `DialogueState`) to the served
agents and judge of `gopo_online.serving`. The Celery worker (workers/) and `stress` both build their episode
dependencies here, so the two see the agents the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gopo_online.config import GopoConfig
from gopo_online.types import Compliance, Generation, JudgeScores
from simulator.scenarios import get_family
from simulator.state import DialogueState


def _history(state: DialogueState, k: int) -> list[Any]:
    from gopo_online.serving.agents import DialogueTurn

    pairs = state.last_k(k)
    out = []
    for i in range(0, len(pairs) - 1, 2):
        (_, user), (_, agent) = pairs[i], pairs[i + 1]
        out.append(DialogueTurn(user=user, agent=agent))
    return out


def _history_text(state: DialogueState, k: int) -> str:
    return "\n".join(f"{'Customer' if r == 'user' else 'Agent'}: {t}" for r, t in state.last_k(k))


Resolver = Callable[[], tuple[str, int]]
"""() -> (model name, policy version) the server serves for an agent right now (asked before every request)."""


class ServedExpert:
    """`gopo_online.serving.agents.ExpertAgent` as an episode `Expert`. With `resolve`, every decision asks which
    model/version is served at that moment, so a turn after a weight push uses, and records, the new version."""

    def __init__(self, agent: Any, resolve: Resolver | None = None) -> None:
        self.agent = agent
        self.resolve = resolve

    def decide(self, state: DialogueState) -> tuple[tuple[str, ...], Generation | None]:
        model, version = self.resolve() if self.resolve is not None else (None, None)
        d = self.agent.decide(
            state.skill_pool,
            _history(state, self.agent.cfg.history_k),
            state.user_intent,
            state.user_emotion,
            state.prev_skills,
            seed=state.seed,
            model=model,
            policy_version=version,
        )
        return d.skills, d.generation


class ServedCS:
    """`gopo_online.serving.agents.CSAgent` as an episode `CS`; one agent per scenario family so the decoder's action
    tags are the family's."""

    def __init__(self, client: Any, cfg: GopoConfig, policy_version: int = 0, resolve: Resolver | None = None) -> None:
        from gopo_online.serving.agents import CSAgent

        self.agents: dict[str, Any] = {}
        self.resolve = resolve
        self._make = lambda tags: CSAgent(
            client, model=cfg.model.served_name, policy_version=policy_version, cfg=cfg.agents.cs, default_actions=tags
        )

    def respond(self, state: DialogueState) -> tuple[str, str, Generation | None, Compliance | None]:
        agent = self.agents.get(state.family)
        if agent is None:
            agent = self.agents.setdefault(state.family, self._make(state.action_tags))
        fam = get_family(state.family)
        skills = [fam.skill(s) for s in state.expert_skills]
        model, version = self.resolve() if self.resolve is not None else (None, None)
        r = agent.reply(
            state.user_utterance,
            skills,
            state.business_context,
            _history(state, agent.cfg.history_k),
            seed=state.seed,
            model=model,
            policy_version=version,
        )
        return r.reply, r.action, r.generation, r.compliance


class ServedJudge:
    """`gopo_online.serving.judge.Judge` as an episode `Judge`."""

    def __init__(self, judge: Any, history_k: int = 4) -> None:
        self.judge = judge
        self.history_k = history_k

    def score(self, state: DialogueState, reply: str, action: str) -> JudgeScores:
        fam = get_family(state.family)
        skills = [fam.skill(s) for s in state.expert_skills]
        return self.judge.score(
            state.user_utterance,
            reply,
            action,
            skills,
            state.business_context,
            _history_text(state, self.history_k),
            seed=state.seed,
        )


def judge_or_none(cfg: GopoConfig, sim_client: Any, sim_model: str, *, vllm: bool = True) -> Any:
    """The episode judge of `judge.mode` (simulator.judging.EpisodeJudge): the rubric alone, or with the LLM judge on
    the simulator backend (llm / mixed). None when an LLM mode is asked and gopo_online.serving.judge is missing."""
    from gopo_online.rubric import resolve_mode
    from simulator.judging import EpisodeJudge

    mode = resolve_mode(cfg)
    if mode == "rubric":
        return EpisodeJudge(cfg, mode)
    try:
        from gopo_online.serving.judge import Judge
    except ImportError:
        return None
    llm = ServedJudge(Judge(sim_client, model=sim_model, cfg=cfg.judge, structured=vllm), cfg.agents.cs.history_k)
    return EpisodeJudge(cfg, mode, llm)


def two_agent_factory(
    cfg: GopoConfig, policy_url: str, sim_client: Any, sim_model: str, *, sim_vllm: bool = True, policy_version: int = 0
) -> Any:
    """() -> (expert, cs, judge) sharing one policy client (the clients are thread-safe)."""
    from gopo_online.serving.agents import ExpertAgent
    from gopo_online.serving.client import client_from_config

    pc = client_from_config(cfg, policy_url)
    expert = ServedExpert(
        ExpertAgent(pc, model=cfg.model.served_name, policy_version=policy_version, cfg=cfg.agents.expert)
    )
    cs = ServedCS(pc, cfg, policy_version)
    judge = judge_or_none(cfg, sim_client, sim_model, vllm=sim_vllm)

    def factory() -> tuple[ServedExpert, ServedCS, Any]:
        return expert, cs, judge

    return factory
