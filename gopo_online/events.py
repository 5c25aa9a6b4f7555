"""The event contract: every monitoring event's kind and metric keys, defined once.

Producers (workers, learner, controller, supervisor) build an `Event` with the constructors below and send it on
the events fanout (gopo_online.stream.EventPublisher); the controller writes each one as a line of
``run_dir/metrics.jsonl`` and as TensorBoard scalars (gopo_online.metrics_log.MetricsLogger) and folds the same
record into the live dashboard (gopo_online.dashboard). A line of metrics.jsonl IS an event (`Event.record`), so
a console attached later from the file shows what the live one showed.

Kinds and the keys each carries (`KIND_KEYS`; a producer may add more keys, consumers ignore what they do not
know):

- "episode": one per finished or failed episode (`gopo_online.dashboard.episode_event`): reward and episode
  means of `metrics.summarize`, `episode/tokens`, `episode/policy_version`; payload `episode_id`, `status`,
  `persona_group`, `scenario_id`, `error`, `excerpt`.
- "learner": one per optimizer step: the learner's stats record as it is (its keys are metric names: `loss/*`,
  `learner/*`, `sys/*_time_s`) plus `sys/step_wall_s`.
- "push": one per confirmed weight push: `sys/policy_version`, `sys/push_latency_s`; payload `served`.
- "restart": a supervised part restarted: `sys/restarts` (its count so far); payload `component`, `reason`.
- "system": periodic samples: `sys/queue_depth`, `sys/in_flight`, `sys/tokens_per_s`,
  `sys/server_tokens_per_s` (the policy server's own generation throughput), `sys/policy_version`.
- "error": payload `source`, `error`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EVENT_KINDS", "KIND_KEYS", "Event", "EventKind", "Key", "error", "learner", "push", "restart", "system"]

EventKind = Literal["episode", "learner", "push", "restart", "system", "error"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


class Key:
    """Metric keys read by a consumer somewhere (dashboard, tests, `show`): spell them through these names."""

    # episode
    TOKENS = "episode/tokens"
    EPISODE_POLICY_VERSION = "episode/policy_version"
    TSE = "episode/tse"
    SATISFACTION = "episode/satisfaction"
    FINISH_RATE = "episode/finish_rate"
    COST_RATE = "episode/cost_rate"
    ERROR_RATE = "episode/error_rate"
    COMPLIANCE = "reward/compliance"
    # learner (the learner's own stats keys)
    LOSS_EXPERT = "loss/expert"
    LOSS_CS = "loss/cs"
    LOSS_KL = "loss/kl"
    LEARNER_VERSION = "learner/version"
    TRAINED_VERSION = "learner/trained_version"
    """Oldest policy version in the batch just trained on."""
    STALE_DROPPED = "learner/dropped_stale_total"
    """Trajectories dropped as too stale so far (cumulative)."""
    COST_LAMBDA = "learner/cost_lambda"
    """The PID-Lagrangian multiplier λ of the cost constraint."""
    STEP_TIME_S = "sys/step_time_s"
    STEP_WALL_S = "sys/step_wall_s"
    # push / system
    POLICY_VERSION = "sys/policy_version"
    PUSH_LATENCY_S = "sys/push_latency_s"
    QUEUE_DEPTH = "sys/queue_depth"
    IN_FLIGHT = "sys/in_flight"
    TOKENS_PER_S = "sys/tokens_per_s"
    SERVER_TOKENS_PER_S = "sys/server_tokens_per_s"
    PREFIX_CACHE_HIT_RATE = "sys/prefix_cache_hit_rate"
    # restart
    RESTARTS = "sys/restarts"


KIND_KEYS: dict[str, tuple[str, ...]] = {
    "episode": (Key.TOKENS, Key.EPISODE_POLICY_VERSION),
    "learner": (Key.LEARNER_VERSION, Key.STEP_WALL_S),
    "push": (Key.POLICY_VERSION, Key.PUSH_LATENCY_S),
    "restart": (Key.RESTARTS,),
    "system": (),
    "error": (),
}
"""The keys each kind's constructor always sets (tests hold producers to them)."""


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries as floats (JSON has no NaN; a NaN point only breaks a plot). Bools are left out."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        f = float(v)
        if math.isfinite(f):
            out[str(k)] = f
    return out


class Event(BaseModel):
    """One monitoring event: on the events fanout, and as a line of run_dir/metrics.jsonl."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: EventKind
    step: int = 0
    """The kind's own counter: episode index, learner step, policy version (push), restart count."""
    time: float = Field(default_factory=time.time)
    metrics: dict[str, float] = Field(default_factory=dict)
    payload: dict[str, Any] | None = None
    source: str = ""
    """host:pid of the producer (set by the publisher)."""

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line (and the dict the dashboard folds)."""
        out: dict[str, Any] = {"time": self.time, "step": self.step, "kind": self.kind, "metrics": dict(self.metrics)}
        if self.payload:
            out["payload"] = dict(self.payload)
        return out


def learner(stats: Mapping[str, Any], step: int, wall_s: float) -> Event:
    """A "learner" event from the learner's stats record (keys are already metric names) and the step's wall time."""
    return Event(kind="learner", step=step, metrics={**finite_metrics(stats), Key.STEP_WALL_S: float(wall_s)})


def push(version: int, latency_s: float | None, served: Mapping[str, str]) -> Event:
    metrics = {Key.POLICY_VERSION: float(version)}
    if latency_s is not None:
        metrics[Key.PUSH_LATENCY_S] = float(latency_s)
    return Event(kind="push", step=version, metrics=metrics, payload={"served": dict(served)})


def restart(component: str, reason: str, restarts: int) -> Event:
    """A supervised part (a worker, the learner, a server) was restarted; `restarts` counts them so far."""
    return Event(
        kind="restart",
        step=restarts,
        metrics={Key.RESTARTS: float(restarts)},
        payload={"component": component, "reason": reason},
    )


def system(metrics: Mapping[str, Any], step: int = 0) -> Event:
    return Event(kind="system", step=step, metrics=finite_metrics(metrics))


def error(source: str, text: str) -> Event:
    return Event(kind="error", payload={"source": source, "error": text})
