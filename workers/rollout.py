"""The plain function behind the `run_episode` task: request in, `Trajectory` out. No Celery here.

`rollout(request, ctx)` looks up the persona, samples the scenario instance from (family, seed), builds (once per
worker process, cached in `ctx.state`) the user simulator, the Expert and CS agents and the judge, and calls
`simulator.episode.play_episode`. Everything it talks to is injected through `WorkerContext.deps_factory`, so a
test passes fakes (or a whole stub `rollout_fn`) and production passes the served agents.

Errors: `play_episode` turns failures inside the dialogue into an error Trajectory itself. What raises out of
here is a failure to set up (unknown persona, a dependency that cannot be built, a server that cannot be reached):
transient ones (connection errors, timeouts) are retried by the task, the rest become an error record at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gopo_online.stream import EpisodeRequest
from gopo_online.types import Trajectory

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig
    from gopo_online.stream import EventPublisher, TrajectoryPublisher


class TransientError(RuntimeError):
    """Raise (or wrap) to make the task retry with backoff: the same request may succeed later."""


_TRANSIENT_NAMES = frozenset(
    {
        # openai / httpx names, matched by name so workers/ need not import them to classify.
        "APIConnectionError",
        "APITimeoutError",
        "InternalServerError",
        "RateLimitError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "RemoteProtocolError",
        # kombu / redis
        "OperationalError",
        "ConnectionError",
        "TimeoutError",
        "TransientError",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: lost connections, timeouts, overloaded servers (5xx, 429)."""
    if isinstance(exc, ConnectionError | TimeoutError | TransientError):  # socket.timeout is TimeoutError
        return True
    if getattr(exc, "transient", False):
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


@dataclass
class EpisodeDeps:
    """What one episode talks to (simulator.episode Protocols: UserSim, Expert | None, CS, Judge | None)."""

    user_sim: Any
    expert: Any
    cs: Any
    judge: Any
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for play_episode (e.g. teacher, tse_source)."""


AGENTS = ("expert", "cs")


def _sim_backend(cfg: GopoConfig, policy_client: Any) -> tuple[Any, str, str, bool]:
    """(client, model, structured-output mode, is_vllm) of the simulator/judge backend per `serving.simulator`."""
    from gopo_online.serving.client import client_from_config

    if cfg.serving.simulator == "same":
        return policy_client, cfg.model.served_name, "regex", True
    if cfg.serving.simulator == "separate":
        url = cfg.serving.simulator_server.url
        if not url:
            raise ValueError("serving.simulator = 'separate' needs serving.simulator_server.url (train sets it)")
        return client_from_config(cfg, url.rstrip("/") + "/v1"), cfg.model.served_name, "regex", True
    client = client_from_config(cfg, cfg.serving.external_url, external=True)
    return client, cfg.serving.external_model, "json", False


def default_deps(ctx: WorkerContext) -> EpisodeDeps:
    """The served agents, simulator and judge of the config (built once per worker process).

    The policy server is `serving.policy.url` (the controller passes it with --set). Before every agent request
    the agents take the served model and version from the newest `weights.updated` announcement
    (`served_weights`; no server call per request), so a turn after a weight push uses, and records, the new
    version (gopo_online.serving.weights: the recorded version is never newer than the one that produced it).
    """
    from gopo_online.serving.agents import ExpertAgent
    from gopo_online.serving.client import client_from_config
    from simulator.serving_adapters import ServedCS, ServedExpert, judge_or_none
    from simulator.user import make_user_simulator

    cfg = ctx.cfg
    root = cfg.serving.policy.url
    if not root:
        raise ValueError(
            "serving.policy.url is not set: a worker needs the policy server "
            "(gopo-online train passes it; standalone: --set serving.policy.url=http://HOST:PORT)"
        )
    root = root.rstrip("/").removesuffix("/v1")
    policy_client = client_from_config(cfg, root + "/v1")
    sim_client, sim_model, structured, sim_vllm = _sim_backend(cfg, policy_client)
    if cfg.workers.request_log:
        from gopo_online.requestlog import RequestLog

        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in ctx.worker_name)
        rlog = RequestLog(cfg.run.run_dir / "requests" / f"{name}.jsonl")
        for client in {id(policy_client): policy_client, id(sim_client): sim_client}.values():
            client.request_log = rlog
    user_sim = make_user_simulator(cfg, sim_client, sim_model, structured=structured)
    judge = judge_or_none(cfg, sim_client, sim_model, vllm=sim_vllm)

    weights = served_weights(ctx, root)

    def resolver(agent: str) -> Callable[[], tuple[str, int]]:
        return lambda: weights.served(agent)

    expert = ServedExpert(ExpertAgent(policy_client, model=cfg.model.served_name, cfg=cfg.agents.expert),
                          resolve=resolver("expert"))  # fmt: skip
    cs = ServedCS(policy_client, cfg, resolve=resolver("cs"))

    return EpisodeDeps(user_sim=user_sim, expert=expert, cs=cs, judge=judge, extra=reward_extras(cfg))


def reward_extras(cfg: GopoConfig) -> dict[str, Any]:
    """play_episode keyword arguments for the reward terms the config switches on: the skill-compliance
    distance of gopo eq 9c (`rewards.skill_distance`, all-MiniLM-L6-v2, loaded offline on first use)."""
    if not cfg.rewards.skill_distance:
        return {}
    from gopo_online.serving.embedding import SkillDistance

    return {"skill_distance": SkillDistance().distance}


def served_weights(ctx: WorkerContext, root_url: str) -> Any:
    """This process's view of the served versions: a `WeightSync` fed by a `weights.updated` listener (started
    before the first read, so no announcement is missed between the server read and the subscription)."""
    from gopo_online.serving.weights import WeightSync
    from gopo_online.stream import WeightsListener

    sync = WeightSync.from_config(ctx.cfg, servers=[root_url])
    listener = WeightsListener(ctx.broker_url, ctx.cfg, role="worker", on_update=sync.observe).start()
    ctx.state["weights_listener"] = listener
    return sync


def _rollout_type() -> Callable[[EpisodeRequest, WorkerContext], Trajectory]:
    return rollout


@dataclass
class WorkerContext:
    """Per-worker-process state shared by every task the process runs (threads pool: guard with `lock`)."""

    cfg: GopoConfig
    broker_url: str
    rollout_fn: Callable[[EpisodeRequest, WorkerContext], Trajectory] = field(default_factory=_rollout_type)
    """The plain function the task calls; tests inject a stub."""
    deps_factory: Callable[[WorkerContext], EpisodeDeps] = default_deps
    """Builds the episode's dependencies once per process (cached in `state["deps"]`)."""
    retry_backoff_s: float = 2.0
    """Base of the exponential retry countdown: base * 2**retries seconds (capped at 60 s)."""
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    state: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    publisher: TrajectoryPublisher | None = None
    events: EventPublisher | None = None

    def emit_episode(self, traj: Trajectory, publish_s: float | None = None) -> None:
        """Best effort: tell the controller (dashboard, metrics log) that an episode finished. The trajectory itself
        already travelled on the durable queue, so a lost event costs one dashboard sample, nothing else.

        The event's metrics carry the per-phase seconds (`time/<phase>_s`, gopo_online.timings), `publish_s`
        (the trajectory's publish, measured after it was sealed) among them."""
        from gopo_online.dashboard import episode_event
        from gopo_online.stream import EventPublisher
        from gopo_online.timings import phase_metrics

        try:
            with self.lock:
                if self.events is None:
                    self.events = EventPublisher(self.broker_url, self.cfg)
            metrics, payload = episode_event(
                traj, self.cfg.rewards.tse_weights, self.cfg.rewards.tse_gamma, self.cfg.dashboard.excerpt_turns
            )
            metrics.update(phase_metrics(traj, {"publish": publish_s} if publish_s is not None else None))
            self.events.emit("episode", metrics, payload)
        except Exception as e:  # noqa: BLE001 - monitoring must never fail an episode
            import logging

            logging.getLogger(__name__).warning("could not emit the episode event of %s: %r", traj.episode_id, e)

    def get_publisher(self) -> TrajectoryPublisher:
        from gopo_online.stream import TrajectoryPublisher

        with self.lock:
            if self.publisher is None:
                self.publisher = TrajectoryPublisher(self.broker_url, self.cfg)
            return self.publisher

    def get_deps(self) -> EpisodeDeps:
        with self.lock:
            if "deps" not in self.state:
                self.state["deps"] = self.deps_factory(self)
            return self.state["deps"]

    def close(self) -> None:
        with self.lock:
            if self.publisher is not None:
                self.publisher.close()
                self.publisher = None
            if self.events is not None:
                self.events.close()
                self.events = None
            listener = self.state.pop("weights_listener", None)
            if listener is not None:
                listener.stop()


def _persona(ctx: WorkerContext, persona_id: str) -> Any:
    from simulator.personas import load_personas

    with ctx.lock:
        bank = ctx.state.get("personas")
        if bank is None:
            bank = {p.id: p for p in load_personas(ctx.cfg.simulator.persona_file, split="all")}
            ctx.state["personas"] = bank
    try:
        return bank[persona_id]
    except KeyError:
        raise ValueError(f"unknown persona_id {persona_id!r} (bank has {len(bank)} personas)") from None


def rollout(request: EpisodeRequest, ctx: WorkerContext) -> Trajectory:
    """Play one episode for `request` and return its Trajectory (status "error" for failures inside the dialogue)."""
    from simulator.episode import play_episode
    from simulator.scenarios import sample_instance

    started = time.time()
    persona = _persona(ctx, request.persona_id)
    instance = sample_instance(
        request.scenario_id, seed=request.seed or 0, demand=persona.extrinsic_demand, case_type=request.case_type
    )
    deps = ctx.get_deps()
    traj = play_episode(
        episode_id=request.episode_id,
        scenario_instance=instance,
        persona=persona,
        user_sim=deps.user_sim,
        expert=deps.expert,
        cs=deps.cs,
        judge=deps.judge,
        cfg=ctx.cfg,
        seed=request.seed or 0,
        worker=ctx.worker_name,
        max_turns=request.max_turns,
        agent_seed_offset=request.sample_index,
        **deps.extra,
    )
    if request.group_id:
        traj = traj.model_copy(update={"group_id": request.group_id})
    if request.dispatched_at is None:
        return traj
    # queue = dispatch -> this worker started it (clocks of one box, or NTP-synced ones in a cluster; never < 0)
    return traj.model_copy(update={"timings": {**traj.timings, "queue": max(0.0, started - request.dispatched_at)}})
