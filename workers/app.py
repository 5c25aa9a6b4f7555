"""The Celery app of the rollout workers: one thin task, `run_episode`.

The task validates its input (`EpisodeRequest`), skips an episode whose trajectory was already published, calls
the plain `rollout(request, ctx) -> Trajectory` (workers/rollout.py), publishes the trajectory to the stream and
returns. Transient failures (lost connections, timeouts) retry with exponential backoff up to
`workers.max_retries`; after the last retry, or at once for a non-transient failure, the episode is published as an
explicit error Trajectory (status="error") — never dropped. An invalid payload goes to the dead-letter queue.

Delivery and idempotency. `task_acks_late` + `task_reject_on_worker_lost`: a task is acked only when it returns,
so a worker that dies mid-episode gives the episode back to the queue (RabbitMQ at once, Redis after
`broker.visibility_timeout_s`). The same episode can therefore run twice; two layers make that harmless:
1. Done marks. After publishing, the worker records the episode id as done; a redelivered task whose id is marked
   done returns without playing. On Redis the mark is a key `<task_queue>:done:<episode_id>` set with
   `SET ... EX <ttl>` on the broker's own Redis, so it holds across workers. On RabbitMQ there is no shared store:
   the mark is an in-process LRU (it catches redeliveries to the same worker only).
2. The trajectory consumer drops duplicate episode ids (gopo_online.stream.TrajectoryConsumer), which covers
   RabbitMQ across workers and the race where two deliveries play concurrently (an episode running longer than the
   Redis visibility timeout is handed to a second worker while the first still plays it).

JSON only: task and result serializers and accept_content are ["json"]. No result backend: the controller never
waits on task results; progress comes back through the trajectory stream.
Time limits: the threads pool cannot enforce Celery time limits, so `workers.episode_timeout_s` is bounded by the
clients' request timeouts inside the episode.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from pydantic import ValidationError

from gopo_online.stream import (
    EPISODE_TASK_NAME,
    RETRY_POLICY,
    DeadLetterPublisher,
    EpisodeRequest,
    Topology,
    is_amqp,
    is_redis,
)
from gopo_online.types import Trajectory
from workers.rollout import TransientError, WorkerContext, is_transient

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig

log = logging.getLogger(__name__)

DONE_TTL_S = 24 * 3600
"""How long a done mark lives: far longer than any redelivery delay (visibility timeout, worker restarts)."""


class DoneMarks:
    """Which episode ids already have a published trajectory (see the module docstring)."""

    def __init__(self, broker_url: str, namespace: str, *, timeout_s: float, local_size: int = 50_000) -> None:
        self.namespace = namespace
        self._local: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._local_size = local_size
        self._lock = threading.Lock()
        self._redis = (
            redis.Redis.from_url(broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            if is_redis(broker_url)
            else None
        )

    def _key(self, episode_id: str) -> str:
        return f"{self.namespace}:done:{episode_id}"

    def is_done(self, episode_id: str) -> bool:
        with self._lock:
            if episode_id in self._local:
                return True
        if self._redis is None:
            return False
        try:
            return bool(self._redis.exists(self._key(episode_id)))
        except redis.RedisError:
            # Replaying is safe (the consumer dedupes); skipping on a guess could lose the episode.
            log.warning("done-mark lookup failed for %s; playing it", episode_id, exc_info=True)
            return False

    def mark_done(self, episode_id: str) -> None:
        with self._lock:
            self._local[episode_id] = None
            while len(self._local) > self._local_size:
                self._local.popitem(last=False)
        if self._redis is not None:
            try:
                self._redis.set(self._key(episode_id), "1", ex=DONE_TTL_S)
            except redis.RedisError:
                log.warning("could not record done mark for %s (a redelivery would replay it)", episode_id)

    # --- hold marks: which worker plays which episode right now (Redis only; see held_episodes)
    def _hold_key(self, episode_id: str) -> str:
        return f"{self.namespace}:held:{episode_id}"

    def hold(self, episode_id: str, worker: str, ttl_s: float) -> None:
        """Record that `worker` (host:pid) plays this episode, so a controller that sees the worker die can
        re-dispatch it at once instead of after the visibility timeout. Best effort, like the done mark."""
        if self._redis is None:
            return
        try:
            self._redis.set(self._hold_key(episode_id), worker, ex=max(1, int(ttl_s)))
        except redis.RedisError:
            log.warning("could not record the hold mark of %s", episode_id)

    def release(self, episode_id: str) -> None:
        if self._redis is None:
            return
        try:
            self._redis.delete(self._hold_key(episode_id))
        except redis.RedisError:
            log.warning("could not drop the hold mark of %s (it expires)", episode_id)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def worker_name(pid: int | None = None) -> str:
    """How a worker process names itself in hold marks and trajectories: host:pid."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def held_episodes(broker_url: str, namespace: str, worker: str, *, timeout_s: float = 5.0) -> list[str]:
    """Episode ids whose hold mark names `worker` (a worker that died: its tasks sit unacked in Redis until the
    visibility timeout). [] on a broker without hold marks (RabbitMQ gives a dead consumer's tasks back at once)."""
    if not is_redis(broker_url):
        return []
    prefix = f"{namespace}:held:"
    client = redis.Redis.from_url(broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if not keys:
            return []
        owners = client.mget(keys)
        return sorted(
            k.decode()[len(prefix) :] for k, w in zip(keys, owners, strict=True) if w and w.decode() == worker
        )
    finally:
        client.close()


def _transport_options(cfg: GopoConfig, broker_url: str) -> dict[str, Any]:
    t = cfg.broker.connect_timeout_s
    if is_redis(broker_url):
        return {
            "visibility_timeout": cfg.broker.visibility_timeout_s,
            "socket_timeout": t,
            "socket_connect_timeout": t,
            # Sweep abandoned (unacked) tasks back at the pace of the visibility timeout, not every ~100 s.
            "unacked_restore_interval": max(1, int(min(10.0, cfg.broker.visibility_timeout_s / 2))),
            "unacked_restore_throttle": 1,
        }
    if is_amqp(broker_url):
        return {"confirm_publish": True, "read_timeout": t, "write_timeout": t}
    return {}


def error_trajectory(request: EpisodeRequest, reason: str, *, worker: str, started_at: float) -> Trajectory:
    """The explicit record of an episode that could not be played."""
    return Trajectory(
        episode_id=request.episode_id,
        scenario_id=request.scenario_id,
        persona_id=request.persona_id,
        persona_group=request.persona_group,
        seed=request.seed,
        status="error",
        error=reason,
        worker=worker,
        started_at=started_at,
        duration_s=max(0.0, time.time() - started_at),
    )


def make_app(cfg: GopoConfig, broker_url: str, ctx: WorkerContext | None = None) -> Celery:
    """A fresh Celery app on `broker_url` with the `run_episode` task registered (name `EPISODE_TASK_NAME`).

    `ctx` carries the per-process state (rollout function, dependency factory, publisher); tests inject a stub
    rollout through it. The context is reachable as `app.gopo_ctx`.
    """
    topo = Topology(cfg)
    app = Celery("gopo-workers", broker=broker_url, set_as_current=False)
    if is_redis(broker_url) and cfg.broker.visibility_timeout_s < cfg.workers.episode_timeout_s:
        log.info(
            "broker.visibility_timeout_s (%.0f) < workers.episode_timeout_s (%.0f): a long episode may be redelivered "
            "while it still runs; the trajectory consumer drops the duplicate",
            cfg.broker.visibility_timeout_s,
            cfg.workers.episode_timeout_s,
        )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[topo.task_queue],
        task_default_queue=topo.task_queue.name,
        task_default_exchange=topo.task_exchange.name,
        task_default_routing_key=topo.task_queue.routing_key,
        task_routes={EPISODE_TASK_NAME: {"queue": topo.task_queue.name}},
        task_publish_retry=True,
        task_publish_retry_policy=dict(RETRY_POLICY),
        broker_transport_options=_transport_options(cfg, broker_url),
        broker_connection_timeout=cfg.broker.connect_timeout_s,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=30,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # The threads pool cannot cancel a running thread, so cancelling on connection loss would only warn. The
        # redelivered copy of such an episode is skipped by the done mark or dropped by the consumer's dedupe.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    ctx = ctx or WorkerContext(cfg=cfg, broker_url=broker_url)
    app.gopo_ctx = ctx  # type: ignore[attr-defined]
    done = DoneMarks(broker_url, cfg.broker.task_queue, timeout_s=cfg.broker.connect_timeout_s)
    app.gopo_done = done  # type: ignore[attr-defined]
    dead_letters = DeadLetterPublisher(broker_url, cfg)
    max_retries = cfg.workers.max_retries
    hold_ttl_s = cfg.workers.episode_timeout_s * (max_retries + 1) + 120.0

    # shared=False: a shared task would be registered into every later Celery app too, closure and all.
    # Retries are Celery's own: a TransientError raised out of the task is retried after an exponential backoff
    # (retry_backoff * 2**retries s, at most 60 s, full jitter), at most max_retries times; the task turns the
    # last failure into an error Trajectory itself, so autoretry never has to give up on it.
    @app.task(bind=True, name=EPISODE_TASK_NAME, max_retries=max_retries, acks_late=True, reject_on_worker_lost=True,
              shared=False, autoretry_for=(TransientError,), retry_backoff=max(1.0, ctx.retry_backoff_s),
              retry_backoff_max=60, retry_jitter=True)  # fmt: skip
    def run_episode(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        """Play and publish one episode. Returns a small status dict (for logs; no result backend)."""
        started_at = time.time()
        try:
            request = EpisodeRequest.model_validate(payload)
        except ValidationError as e:
            # Retrying cannot fix a bad request, and without a valid id there is no episode to record: DLQ it.
            import json

            dead_letters.send(
                f"invalid EpisodeRequest: {e}", topo.task_queue.name, json.dumps(payload, default=str),
                headers={"task_id": self.request.id},
            )  # fmt: skip
            return {"status": "dead_lettered", "task_id": self.request.id}
        eid = request.episode_id
        if done.is_done(eid):
            log.info("episode %s already published; skipping the redelivered task", eid)
            return {"status": "duplicate", "episode_id": eid}
        retries = self.request.retries
        done.hold(eid, ctx.worker_name, hold_ttl_s)
        try:
            traj = ctx.rollout_fn(request, ctx)
            if not isinstance(traj, Trajectory) or traj.episode_id != eid:
                raise TypeError(f"rollout returned {type(traj).__name__} for {eid!r}, not its Trajectory")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a retry or an explicit error record
            if is_transient(exc) and retries < max_retries:
                log.warning("episode %s: transient %r; retry %d/%d", eid, exc, retries + 1, max_retries)
                raise TransientError(f"{type(exc).__name__}: {exc}") from exc
            kind = "transient failure, retries exhausted" if is_transient(exc) else "failure"
            reason = f"{kind} after {retries} retr{'y' if retries == 1 else 'ies'}: {type(exc).__name__}: {exc}"
            traj = error_trajectory(request, reason, worker=ctx.worker_name, started_at=started_at)
        if not traj.worker:
            traj = traj.model_copy(update={"worker": ctx.worker_name})
        t_publish = time.monotonic()
        try:
            ctx.get_publisher().publish(traj)
        except Exception as exc:  # noqa: BLE001 - broker trouble: retry the whole task (redelivery covers the rest)
            if retries < max_retries:
                raise TransientError(f"publish failed: {type(exc).__name__}: {exc}") from exc
            raise
        done.mark_done(eid)
        done.release(eid)
        ctx.emit_episode(traj, publish_s=time.monotonic() - t_publish)
        return {"status": traj.status, "episode_id": eid, "turns": len(traj.turns)}

    return app


def submit_episode(app: Celery, request: EpisodeRequest) -> str:
    """Dispatch one episode (task id = episode id); returns the task id. Does not wait for anything."""
    result = app.send_task(
        EPISODE_TASK_NAME,
        args=[request.model_dump(mode="json")],
        task_id=request.episode_id,
        queue=app.conf.task_default_queue,
        routing_key=app.conf.task_default_routing_key,
        serializer="json",
    )
    return str(result.id)


def resolve_broker_url(cfg: GopoConfig) -> str:
    """The broker a worker joins: `broker.url`, else $GOPO_BROKER_URL (set by the controller that started the
    embedded Redis), else the embedded Redis on `broker.embedded_port`."""
    url = cfg.broker.url or os.environ.get("GOPO_BROKER_URL")
    if url:
        return url
    if cfg.broker.embedded_port:
        return f"redis://127.0.0.1:{cfg.broker.embedded_port}/0"
    raise SystemExit(
        "gopo-online worker: no broker to join. Set broker.url (--set broker.url=redis://…), GOPO_BROKER_URL, "
        "or broker.embedded_port of the running controller's embedded Redis."
    )


EPISODE_MODULES = (
    "httpx",
    "openai",
    "gopo_online.dashboard",
    "gopo_online.requestlog",
    "gopo_online.rubric",
    "gopo_online.serving.agents",
    "gopo_online.serving.client",
    "gopo_online.serving.judge",
    "gopo_online.serving.weights",
    "gopo_online.stream",
    "gopo_online.timings",
    "gopo_online.types",
    "simulator.agenda",
    "simulator.episode",
    "simulator.judging",
    "simulator.personas",
    "simulator.scenarios",
    "simulator.serving_adapters",
    "simulator.user",
    "workers.rollout",
)
"""What the episode path imports inside functions. `preimport` loads them before the pool's threads start: two
threads importing one module at once can see it half initialised (a loop run lost an episode to "partially
initialized module 'httpx' has no attribute 'Response'")."""


def preimport(modules: tuple[str, ...] = EPISODE_MODULES) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def run_worker(cfg: GopoConfig, ctx: WorkerContext | None = None) -> None:
    """Run a Celery worker (threads pool, `workers.concurrency` threads) on the episode queue until stopped.

    SIGTERM stops warm (the episodes being played finish first); SIGQUIT stops cold: the episodes being played go
    back to the queue unacked and the process exits at once (workers/pool.py)."""
    from workers.pool import EpisodeThreadPool, cold_stopped, exit_after_cold_stop

    preimport()
    url = resolve_broker_url(cfg)
    app = make_app(cfg, url, ctx)
    worker = app.Worker(
        pool=EpisodeThreadPool,
        concurrency=cfg.workers.concurrency,
        queues=[cfg.broker.task_queue],
        hostname=f"gopo-worker-{os.getpid()}@{socket.gethostname()}",
        loglevel="INFO",
        without_gossip=True,  # no peer chatter on the broker: workers never talk to each other
        without_mingle=True,
    )
    try:
        worker.start()
    finally:
        app.gopo_ctx.close()  # type: ignore[attr-defined]
        app.gopo_done.close()  # type: ignore[attr-defined]
        if cold_stopped():
            exit_after_cold_stop(worker.exitcode or 0)
