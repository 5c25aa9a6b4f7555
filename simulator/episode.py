"""One episode, turn by turn: simulated user ⇄ Expert ⇄ CS agent ⇄ judge -> `gopo_online.types.Trajectory`.

`play_episode` is the plain function both the Celery rollout task (workers/) and `stress` call. The agents and the
judge are INJECTED objects following the small Protocols below, so a test passes fakes and production passes the
served agents (gopo_online.serving) or the single-agent adapter `OpenAIChatAgent` for any OpenAI-compatible chat
endpoint.

Turn t: the user speaks (U_t + metadata) -> the Expert picks skills a^E_t -> the CS agent replies under them ->
hard constraints (skills + scenario SOP) are checked -> the judge scores -> rewards. The user's NEXT message
carries its verdict on reply t (satisfaction, stop, completed_tasks). When the user stops, that last message ends
the episode and is not a Turn (it has no agent reply); after `max_turns` replies the user is asked once more so
`final_satisfaction` reflects the last reply. A stop on the opening message is ignored (there is nothing to react
to yet); the metadata is still recorded as written.

Single agent (no Expert): `expert=None`. `Turn` needs >= 1 expert skill, so the turn records the marker
`SINGLE_AGENT_SKILL` ("single_agent"), the CS agent is constrained only by the scenario SOP, and the joint reward
uses w^E = 0, w^A = 1 (there is no strategy decision to reward); the teacher sequence is still recorded so ESNDCG
against it is 0 and visible as such.

Failures: an exception anywhere (agent, judge, store, …) or a simulator turn that could not be produced within its
retry budget ends the episode as `Trajectory(status="error", error="turn N <stage>: <what>")` with every completed
turn kept — never raised, never dropped.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from gopo_online.config import GopoConfig
from gopo_online.rewards import esndcg, joint_reward, process_reward, weighted_judge_reward
from gopo_online.skills import check_compliance
from gopo_online.types import (
    Compliance,
    ConstraintCheck,
    Generation,
    JudgeScores,
    Trajectory,
    Turn,
    TurnRewards,
    UserTurnMeta,
)
from simulator.personas import Persona
from simulator.scenarios import TASK_IDS, ScenarioInstance, detect_task, sop_violations
from simulator.state import DialogueState
from simulator.teacher import teacher_skills as default_teacher
from simulator.user import UserResult, UserTurnError

SINGLE_AGENT_SKILL = "single_agent"
"""Marker recorded as the Expert's skills when a single agent (no Expert) played the episode."""
TSESource = Literal["rule", "simulator", "both", "either"]


@runtime_checkable
class Expert(Protocol):
    def decide(self, state: DialogueState) -> tuple[tuple[str, ...], Generation | None]:
        """a^E_t: 1-5 distinct pool skills, plus the sampled generation (None when not from a served policy)."""
        ...


@runtime_checkable
class CS(Protocol):
    def respond(self, state: DialogueState) -> tuple[str, str, Generation | None, Compliance | None]:
        """(reply, action tag, generation or None, compliance or None). `state.expert_skills` holds a^E_t.
        When compliance is None the episode checks the chosen skills itself (`gopo_online.skills`)."""
        ...


@runtime_checkable
class Judge(Protocol):
    def score(self, state: DialogueState, reply: str, action: str) -> JudgeScores:
        """Rubric scores of one CS reply (`state.expert_skills` = the skills it had to follow)."""
        ...


@runtime_checkable
class UserSim(Protocol):
    def respond(
        self, *, persona: Persona, instance: ScenarioInstance, history: Any, turn: int, seed: int | None = None
    ) -> UserResult: ...


Teacher = Callable[[ScenarioInstance, DialogueState], tuple[str, ...]]


class EpisodeError(RuntimeError):
    """Raised inside the loop to end an episode with a located reason (caught in `play_episode`)."""


def _accept(task: str, rule: set[str], claims: set[str], source: TSESource) -> bool:
    r, s = task in rule, task in claims
    return {"rule": r, "simulator": s, "both": r and s, "either": r or s}[source]


def _sop_checks(
    instance: ScenarioInstance, turn: int, action: str, prior: tuple[str, ...], user_texts: tuple[str, ...]
) -> tuple[ConstraintCheck, ...]:
    fam = instance.scenario
    checks = [
        ConstraintCheck(
            skill="scenario", kind="action", target=",".join(fam.action_tags), passed=action in fam.action_tags
        )
    ]
    broken = set(sop_violations(instance, turn=turn, action=action, prior_actions=prior, user_texts=user_texts))
    # one check per rule that the action could touch, so compliance.score has a stable denominator per family
    for rule in fam.sop_rules:
        rid = rule.split(":", 1)[0]
        checks.append(ConstraintCheck(skill="sop", kind="action", target=rid, passed=rid not in broken))
    return tuple(checks)


def _rewards(
    cfg: GopoConfig,
    turn: int,
    skills: tuple[str, ...],
    teacher: tuple[str, ...],
    judge: JudgeScores | None,
    compliance: Compliance,
    single_agent: bool,
    distance: float | None = None,
) -> TurnRewards | None:
    """TurnRewards of gopo eq 10, or None when the judge gave no usable verdict (recorded as judge.ok=False)."""
    if judge is None or not judge.ok or any(d not in judge.scores for d in cfg.judge.dimensions):
        return None
    r_a = weighted_judge_reward(judge.scores, cfg.judge.dimensions)  # gopo eq 8
    proc = (
        process_reward(judge.principles, cfg.judge.principles)
        if all(p in judge.principles for p in cfg.judge.principles)
        else 0.0
    )
    if single_agent:
        return TurnRewards(
            r_expert=0.0, r_cs=r_a, w_expert=0.0, w_cs=1.0, joint=r_a, process=proc, compliance=compliance.score
        )
    r_e = esndcg(skills, teacher)  # gopo eq 6
    return joint_reward(r_e, r_a, turn, cfg.rewards).to_turn_rewards(
        process=proc, compliance=compliance.score, skill_distance=distance
    )


def _judge_reply(
    judge: Judge | None,
    state: DialogueState,
    reply: str,
    action: str,
    instance: ScenarioInstance,
    compliance: Compliance,
) -> JudgeScores | None:
    """The judge's verdict; a judge with `score_case` (simulator.judging: rubric / mixed modes) also gets the
    scenario instance and the turn's hard-constraint checks."""
    if judge is None:
        return None
    score_case = getattr(judge, "score_case", None)
    if score_case is not None:
        return score_case(state, reply, action, instance=instance, compliance=compliance)
    return judge.score(state, reply, action)


def play_episode(
    *,
    episode_id: str,
    scenario_instance: ScenarioInstance,
    persona: Persona,
    user_sim: UserSim,
    expert: Expert | None,
    cs: CS,
    judge: Judge | None,
    cfg: GopoConfig,
    seed: int = 0,
    teacher: Teacher = default_teacher,
    tse_source: TSESource = "rule",
    worker: str = "",
    max_turns: int | None = None,
    on_turn: Callable[[Turn], None] | None = None,
    agent_seed_offset: int = 0,
    skill_distance: Callable[[str, Sequence[str]], float] | None = None,
) -> Trajectory:
    """Play one episode and return its Trajectory (status "error" with the turns so far on any failure).

    `seed` derives every per-call seed (simulator, agents via `DialogueState.seed`). `tse_source` picks which
    task-completion signal counts (see simulator.scenarios). `max_turns` overrides `cfg.simulator.max_turns`.
    `judge=None` records no judge verdict and no rewards. `on_turn` is called with each finished Turn (progress).
    `agent_seed_offset` shifts only the agents' seeds (a GRPO group's members, workers/groups.py);
    `skill_distance(reply, skill descriptions)` fills `TurnRewards.skill_distance` (gopo eq 9c) when given.
    """
    inst = scenario_instance
    fam = inst.scenario
    limit = max_turns or cfg.simulator.max_turns
    started = time.time()
    t0 = time.monotonic()
    turns: list[Turn] = []
    history: list[tuple[str, str]] = []
    done: list[str] = []
    completion: dict[str, int] = {}
    actions: list[str] = []
    user_texts: list[str] = []
    prev_skills: tuple[str, ...] = ()
    rule_pending: set[str] = set()
    final_sat: int | None = None
    finished = False
    repairs: list[str] = []  # the simulator's repair notes, kept on the Trajectory
    stage = "simulator"
    t = 0

    def resolve(turn_idx: int, claims: set[str]) -> None:
        # finalise TSE completions of agent reply `turn_idx` now that the user's verdict on it is known
        for task in TASK_IDS:
            if task in done:
                continue
            if not _accept(task, rule_pending, claims, tse_source):
                break  # sequential: a later task cannot complete before this one
            done.append(task)
            completion[task] = turn_idx

    gate = {"flags": [], "regenerated": 0}

    def ask_user(turn_idx: int, seed_: int) -> Any:
        if getattr(user_sim, "agenda", False):  # the agenda user model replays the agent's action tags
            return user_sim.respond(persona=persona, instance=inst, history=tuple(history), turn=turn_idx, seed=seed_,
                                    actions=tuple(actions), episode_seed=seed)  # fmt: skip
        return user_sim.respond(persona=persona, instance=inst, history=tuple(history), turn=turn_idx, seed=seed_)

    def checked(res: Any, turn_idx: int) -> Any:
        if isinstance(res, UserTurnError) or not getattr(res, "ok", False):
            raws = " | ".join(repr(r[:300]) for r in getattr(res, "raw_outputs", ()))
            raise EpisodeError(
                f"{getattr(res, 'stage', '?')} failed after {getattr(res, 'attempts', '?')} "
                f"attempt(s): {getattr(res, 'error', res)}; raw outputs: {raws}"
            )
        repairs.extend(f"turn {turn_idx} simulator: {r}" for r in getattr(res, "repairs", ()))
        return res

    def user_turn(turn_idx: int) -> tuple[str, UserTurnMeta, float]:
        t_s = time.monotonic()
        res = checked(ask_user(turn_idx, seed * 100_003 + turn_idx * 101), turn_idx)
        st = res.meta.state or {}
        if getattr(user_sim, "agenda", False):
            # the agenda simulator gates and regenerates its LLM words itself (template fallback)
            gate["regenerated"] += int(bool(st.get("llm_rejected")))
            issues = list(st.get("gate_issues") or ())
        else:
            issues = _gate(res.utterance)
            if issues:  # quality gate failed: regenerate once with another seed
                gate["regenerated"] += 1
                res = checked(ask_user(turn_idx, seed * 100_003 + turn_idx * 101 + 50_021), turn_idx)
                issues = _gate(res.utterance)
        if issues:
            gate["flags"].append(f"turn {turn_idx}: {','.join(issues)}")
        return res.utterance, res.meta, time.monotonic() - t_s

    def _gate(utterance: str) -> list[str]:
        from simulator.agenda import llm_turn_issues

        return llm_turn_issues(utterance, persona=persona, instance=inst, history=tuple(history), actions=actions)

    try:
        utterance, meta, sim_s = user_turn(1)
        while True:
            t += 1
            stage = "state"
            state = DialogueState(
                episode_id=episode_id,
                turn=t,
                family=inst.family,
                case_type=inst.case_type,
                user_utterance=utterance,
                user_intent=meta.intent,
                user_emotion=meta.emotion,
                history=tuple(history),
                prev_skills=prev_skills,
                skill_pool=fam.skills,
                action_tags=fam.action_tags,
                business_context=inst.business_context(),
                tasks_done=tuple(done),
                # the agents' seeds: a GRPO group's members share `seed` and differ here (workers/groups.py)
                seed=seed * 100_003 + t * 101 + 1 + agent_seed_offset * 7_919,
            )
            user_texts.append(utterance)
            stage = "teacher"
            teach = tuple(teacher(inst, state))
            timings = {"simulator": sim_s}
            stage = "expert"
            t_s = time.monotonic()
            if expert is None:
                skills, expert_gen = (SINGLE_AGENT_SKILL,), None
            else:
                skills, expert_gen = expert.decide(state)
                skills = tuple(skills)
                unknown = [s for s in skills if s not in state.skill_names]
                if unknown:
                    raise EpisodeError(f"expert chose skills outside the pool: {unknown}")
            timings["expert"] = time.monotonic() - t_s
            stage = "cs"
            t_s = time.monotonic()
            cs_state = state.model_copy(update={"expert_skills": () if expert is None else skills})
            reply, action, cs_gen, compliance = cs.respond(cs_state)
            timings["cs"] = time.monotonic() - t_s
            stage = "compliance"
            if compliance is None:
                chosen = [fam.skill(s) for s in skills if expert is not None]
                compliance = check_compliance(reply, action, chosen)
            compliance = Compliance(
                checks=compliance.checks + _sop_checks(inst, t, action, tuple(actions), tuple(user_texts))
            )
            stage = "judge"
            t_s = time.monotonic()
            verdict = _judge_reply(judge, cs_state, reply, action, inst, compliance)
            timings["judge"] = time.monotonic() - t_s
            stage = "rewards"
            # d(a^A, a^E) of gopo eq 9c: the reply against the chosen skills' descriptions
            dist = None
            if skill_distance is not None and expert is not None:
                dist = skill_distance(reply, [fam.skill(s).description for s in skills])
            rewards = _rewards(cfg, t, skills, teach, verdict, compliance, expert is None, dist)
            rule_pending = {task for task in TASK_IDS if detect_task(inst, task, reply, action, utterance)}
            turn = Turn(
                index=t,
                user_utterance=utterance,
                user_meta=meta,
                expert_skills=skills,
                teacher_skills=teach,
                expert_gen=expert_gen,
                cs_reply=reply,
                cs_action=action,
                cs_gen=cs_gen,
                compliance=compliance,
                judge=verdict,
                rewards=rewards,
                cost=fam.action_cost(action),
                timings=timings,
            )
            turns.append(turn)
            actions.append(action)
            history += [("user", utterance), ("agent", reply)]
            prev_skills = skills
            if on_turn is not None:
                on_turn(turn)
            stage = "simulator"
            utterance, meta, sim_s = user_turn(t + 1)
            resolve(t, set(meta.completed_tasks))
            final_sat = meta.satisfaction
            if meta.stop:
                finished = True
                break
            if t >= limit:
                break
    except Exception as e:  # noqa: BLE001 - every failure becomes an explicit error record (STYLE: never dropped)
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"turn {t or 1} {stage}: {type(e).__name__}: {e}"
        if not isinstance(e, EpisodeError):
            msg += f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        n = len(turns)
        return Trajectory(
            episode_id=episode_id,
            scenario_id=inst.instance_id,
            persona_id=persona.id,
            persona_group=persona.group,
            seed=seed,
            turns=tuple(turns),
            status="error",
            error=msg[:4000],
            task_completion_turns=tuple(
                completion.get(task) if completion.get(task, n + 1) <= n else None for task in TASK_IDS
            ),
            worker=worker,
            started_at=started,
            duration_s=time.monotonic() - t0,
            repairs=tuple(repairs),
            sim_flags=tuple(gate["flags"]),
            sim_regenerated=gate["regenerated"],
        )
    return Trajectory(
        episode_id=episode_id,
        scenario_id=inst.instance_id,
        persona_id=persona.id,
        persona_group=persona.group,
        seed=seed,
        turns=tuple(turns),
        final_satisfaction=final_sat,
        finished=finished,
        task_completion_turns=tuple(completion.get(task) for task in TASK_IDS),
        worker=worker,
        started_at=started,
        duration_s=time.monotonic() - t0,
        repairs=tuple(repairs),
        sim_flags=tuple(gate["flags"]),
        sim_regenerated=gate["regenerated"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Single-agent adapter: any OpenAI-compatible chat endpoint as the CS agent (the stress "any agent" target)
# ---------------------------------------------------------------------------------------------------------------------


def _context_lines(ctx: dict[str, Any]) -> str:
    return json.dumps(ctx, default=str)[:1500]


class OpenAIChatAgent:
    """A plain chat model playing the whole agent: it sees the business context and the action tags and ends its
    reply with `ACTION: <tag>` (missing -> "chat"; an unknown tag is kept and counted as a violation)."""

    ACTION_RE = re.compile(r"\n?\s*\**ACTION\**\s*[:=]\s*\**\s*([A-Za-z_]+)\**\s*$", re.I)

    def __init__(
        self, client: Any, model: str, *, temperature: float = 0.7, max_tokens: int = 128, history_k: int = 4
    ) -> None:
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.history_k = history_k

    def messages(self, state: DialogueState) -> list[dict[str, str]]:
        system = (
            f"You are a customer-service agent ({state.family.replace('_', ' ')}). Be polite, accurate and helpful; "
            f"use only facts from the business context.\nBusiness context: {_context_lines(state.business_context)}\n"
            f"Available actions: {', '.join(state.action_tags)}. End your reply with a last line 'ACTION: <action>'."
        )
        msgs = [{"role": "system", "content": system}]
        for role, text in state.last_k(self.history_k):
            msgs.append({"role": "user" if role == "user" else "assistant", "content": text})
        msgs.append({"role": "user", "content": state.user_utterance})
        return msgs

    def respond(self, state: DialogueState) -> tuple[str, str, Generation | None, Compliance | None]:
        res = self.client.chat(
            self.messages(state),
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=state.seed,
        )
        text = getattr(res, "text", "") or ""
        m = self.ACTION_RE.search(text.strip())
        action = m.group(1).lower() if m else "chat"
        reply = text.strip()[: m.start()].strip() if m else text.strip()
        return reply or text.strip(), action, None, None
