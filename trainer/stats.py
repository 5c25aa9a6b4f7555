"""The typed record one `Learner.step` returns: every field is one metric, its key is the metric's name.

`StepStats` is a read-only mapping {metric name: value} (what the metrics log, the dashboard events and the tests
read); fields left at None are absent from it. Per-agent fields live in `AgentStats`, whose key templates name
the agent (`loss/{a}` -> `loss/expert`). Namespaces: `loss/` (loss terms, KL), `reward/` (batch means of the
reward components), `learner/` (counts, ratios, controller state), `sys/` (timings, memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields


def _m(key: str):
    return field(default=None, metadata={"key": key})


@dataclass
class AgentStats:
    """One agent's part of a step. Means are row-weighted over the agent's micro-batches."""

    rows: int | None = _m("learner/rows_{a}")
    skipped_turns: int | None = _m("learner/skipped_turns_{a}")
    completion_tokens: int | None = _m("learner/completion_tokens_{a}")
    """Completion tokens trained on (the policy-gradient targets)."""
    tokens: int | None = _m("learner/tokens_{a}")
    """Tokens through each forward and backward pass: prompts + completions, padding excluded."""
    loss: float | None = _m("loss/{a}")
    pg: float | None = _m("loss/{a}_pg")
    skill: float | None = _m("loss/{a}_skill")
    """CS only: the REINFORCE surrogate of the skill distance (gopo eq 9c)."""
    entropy: float | None = _m("loss/{a}_entropy")
    """Mean per-sequence entropy over the tokens the grammar admitted (nats)."""
    kl: float | None = _m("loss/kl_{a}")
    """Mean per-sequence KL(π ‖ π_ref) (k3 estimator, step eq 5)."""
    beta: float | None = _m("learner/kl_beta_{a}")
    """Adaptive KL coefficient after this step's update (step eq 7)."""
    ratio_mean: float | None = _m("learner/ratio_{a}")
    ratio_max: float | None = _m("learner/ratio_max_{a}")
    clip_frac: float | None = _m("learner/clip_frac_{a}")
    logprob_gap: float | None = _m("learner/logprob_gap_{a}")
    """Mean |log π_new − recorded log π_old| per completion token: the size of the off-policy (or scoring) gap."""
    adv_mean: float | None = _m("learner/adv_{a}")
    forced_frac: float | None = _m("learner/forced_frac_{a}")
    """Fraction of completion tokens the grammar forced (one admitted token: log π = 0, no gradient)."""
    grammar_mismatch: int | None = _m("learner/grammar_mismatch_{a}")
    """Rows whose recorded tokens the grammar replay rejected (scored unmasked from there on)."""

    def metrics(self, agent: str) -> Iterator[tuple[str, float]]:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                yield f.metadata["key"].format(a=agent), float(v)


@dataclass
class StepStats(Mapping[str, float]):
    """Everything one `Learner.step` measured, readable as {metric name: value}."""

    episodes: int | None = _m("learner/episodes")
    error_episodes: int | None = _m("learner/error_episodes")
    dropped_stale: int | None = _m("learner/dropped_stale")
    dropped_stale_total: int | None = _m("learner/dropped_stale_total")
    dropped_future: int | None = _m("learner/dropped_future")
    """Trajectories with a policy version above the learner's (negative age), rejected this step."""
    dropped_future_total: int | None = _m("learner/dropped_future_total")
    sim_flagged: int | None = _m("learner/sim_flagged")
    """Episodes excluded because the simulator's quality gates flagged them (`Trajectory.sim_flags`)."""
    version: int | None = _m("learner/version")
    trained_version: int | None = _m("learner/trained_version")
    """Oldest policy version this update learns from."""
    step: int | None = _m("learner/step")
    groups: int | None = _m("learner/groups")
    """Advantage groups in the batch (GRPO groups of >= 2 members, plus one batch-wide group of the rest)."""
    cost_rate: float | None = _m("reward/cost_rate")
    cost_lambda: float | None = _m("learner/cost_lambda")
    reward_joint: float | None = _m("reward/joint")
    reward_esndcg: float | None = _m("reward/esndcg")
    reward_cs: float | None = _m("reward/cs")
    reward_process: float | None = _m("reward/process")
    reward_skill_distance: float | None = _m("reward/skill_distance")
    kl_total: float | None = _m("loss/kl")
    critic: float | None = _m("loss/critic")
    ref_time_s: float | None = _m("sys/ref_time_s")
    policy_time_s: float | None = _m("sys/policy_time_s")
    push_time_s: float | None = _m("sys/push_time_s")
    checkpoint_time_s: float | None = _m("sys/checkpoint_time_s")
    step_time_s: float | None = _m("sys/step_time_s")
    trained_completion_tok_per_s: float | None = _m("sys/trained_completion_tok_per_s")
    """Completion tokens trained on per second of the step (both agents)."""
    trained_tok_per_s: float | None = _m("sys/trained_tok_per_s")
    """Tokens through the policy's forward+backward per second of the step (prompts + completions, both agents)."""
    peak_rss_mb: float | None = _m("sys/peak_rss_mb")
    agents: dict[str, AgentStats] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for f in fields(self):
            if f.name == "agents":
                continue
            v = getattr(self, f.name)
            if v is not None:
                out[f.metadata["key"]] = float(v)
        for a, s in self.agents.items():
            out.update(s.metrics(a))
        return out

    def __getitem__(self, key: str) -> float:
        return self.metrics()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics())

    def __len__(self) -> int:
        return len(self.metrics())
