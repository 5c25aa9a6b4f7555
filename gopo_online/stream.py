"""The trajectory stream: every exchange and queue the system uses, declared here and nowhere else.

Topology (names come from `BrokerConfig`):

- `trajectory_queue`: durable queue bound to a durable direct exchange of the same name. Rollout workers publish
  finished (or failed) `Trajectory` records; the learner consumes them.
- `dead_letter_queue`: durable queue (direct exchange of the same name) for messages the consumer could not use:
  a foreign content type, invalid JSON, or JSON that is not a valid `Trajectory`. Each dead letter is a JSON
  record with the reason and the original body (base64), so nothing is logged-and-dropped.
- `weights_exchange`: fanout exchange carrying `weights.updated` events. Every subscriber (learner, each worker,
  the controller) gets its own auto-delete queue; an event reaches only the subscribers alive when it is sent
  (the serving layer's loaded version stays the source of truth for late joiners).
- `events_exchange`: direct exchange of monitoring events (episodes, learner steps, pushes, errors) with one
  durable queue, `<events_exchange>.controller`, which the controller reads. Events wait there while the
  controller is not subscribed (starting, resubscribing after a broker restart), and the Redis AOF keeps them
  across a restart of the broker; a publisher keeps an event it could not send in an outbox and sends it again
  once the broker is back. On RabbitMQ the queue holds at most `EVENTS_QUEUE_MAX` events (the oldest go first)
  for a run whose controller never comes.
- `task_queue`: the Celery queue of episode tasks; declared by Celery itself (workers/app.py), only measured here.

Everything is JSON (`application/json`), never pickle. Entities are declared before every first publish because
kombu's virtual transports (Redis) silently drop a message routed to a queue nobody declared. Publishes use
`retry=True` with a bounded policy; on RabbitMQ the connection has publisher confirms (`confirm_publish`), on
Redis an LPUSH reply is the confirm. Every socket operation has a timeout from `broker.connect_timeout_s`.

Delivery is at-least-once (acks_late, Redis visibility timeout, RabbitMQ redelivery), so the consumer drops
duplicates by `episode_id`.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.mixins import ConsumerProducerMixin
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gopo_online.config import BrokerConfig
from gopo_online.events import Event
from gopo_online.types import TRAJECTORY_SCHEMA_VERSION, Trajectory

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig

log = logging.getLogger(__name__)

JSON = "application/json"
EPISODE_TASK_NAME = "gopo.run_episode"
"""Celery task name of one episode; the controller may dispatch by name (`app.send_task`)."""
WEIGHTS_ROUTING_KEY = "weights.updated"
EVENTS_ROUTING_KEY = "events"
EVENTS_QUEUE_MAX = 100_000
"""RabbitMQ: the events queue keeps at most this many unread events (a learner or worker with no controller)."""
EVENTS_OUTBOX_MAX = 10_000
"""Events a publisher keeps while the broker is unreachable; beyond this the oldest are dropped and counted."""
RETRY_POLICY: dict[str, Any] = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}
"""Bounded publish retry: 4 attempts over ~3 s, then the error propagates to the caller."""
MAX_REASON_CHARS = 4000
OVERSIZE_BODY_KEPT = 64 * 1024
"""An oversized message's dead letter keeps its first 64 KiB (and its true size), not the whole body."""


# --------------------------------------------------------------------------- wire records
class EpisodeRequest(BaseModel):
    """Input of one `run_episode` task (what the controller dispatches). Lives here so the controller
    (gopo_online/) and the workers (workers/) share it without importing each other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    episode_id: str = Field(min_length=1, max_length=200)
    """Unique id; also the Celery task id and the idempotency key."""
    scenario_id: str = Field(min_length=1)
    """Scenario family (e.g. "ecommerce"); the instance is sampled from (family, seed, case_type)."""
    case_type: str | None = None
    """Case type within the family; None lets the seed choose."""
    persona_id: str = Field(min_length=1)
    persona_group: str = ""
    seed: int | None = None
    policy_version: int = Field(default=0, ge=0)
    """Policy version the controller expected when dispatching (a hint for logs; the served version wins)."""
    max_turns: int | None = Field(default=None, ge=1)
    """Override of `simulator.max_turns` for this episode."""
    group_id: str = Field(default="", max_length=200)
    """GRPO group (workers/groups.py): the G requests of one (persona, scenario instance, seed) share it."""
    sample_index: int = Field(default=0, ge=0)
    """Place in the group: offsets the agents' sampling seeds, so members are different draws of the policy."""
    dispatched_at: float | None = None
    """Unix time the controller sent it (the worker's `queue` timing); None when not known."""


class WeightsAnnouncement(BaseModel):
    """One `weights.updated` event on the fanout exchange."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: str = WEIGHTS_ROUTING_KEY
    version: int = Field(ge=0)
    transport: str
    """How the weights travel: "full" (reload from `path`) or "lora" (hot-load the adapter at `path`)."""
    path: str
    served_models: dict[str, Any] = Field(default_factory=dict)
    """Role -> served model/adapter name after the update, e.g. {"expert": "expert-v3", "cs": "cs-v3"}."""
    announced_at: float
    """Unix time of the announcement."""
    source: str = ""
    """host:pid of the announcer."""


class MonitorEvent(Event):
    """One monitoring event on the events queue: the record of gopo_online.events (kinds and keys defined there)."""


# --------------------------------------------------------------------------- topology
def _bcfg(cfg: GopoConfig | BrokerConfig) -> BrokerConfig:
    return cfg if isinstance(cfg, BrokerConfig) else cfg.broker


def is_redis(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def is_amqp(url: str) -> bool:
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


class Topology:
    """The broker entities of one config (unbound kombu objects)."""

    def __init__(self, cfg: GopoConfig | BrokerConfig) -> None:
        b = _bcfg(cfg)
        self.trajectory_exchange = Exchange(b.trajectory_queue, type="direct", durable=True)
        self.trajectory_queue = Queue(
            b.trajectory_queue, self.trajectory_exchange, routing_key=b.trajectory_queue, durable=True
        )
        self.dead_letter_exchange = Exchange(b.dead_letter_queue, type="direct", durable=True)
        self.dead_letter_queue = Queue(
            b.dead_letter_queue, self.dead_letter_exchange, routing_key=b.dead_letter_queue, durable=True
        )
        self.weights_exchange = Exchange(b.weights_exchange, type="fanout", durable=True)
        self.events_exchange = Exchange(b.events_exchange, type="direct", durable=True)
        self.events_queue = Queue(
            f"{b.events_exchange}.controller",
            self.events_exchange,
            routing_key=EVENTS_ROUTING_KEY,
            durable=True,
            queue_arguments={"x-max-length": EVENTS_QUEUE_MAX},  # RabbitMQ; kombu's Redis ignores it
        )
        # Celery's episode queue, spelled out so the Celery app (task_queues) and queue_depth agree on it.
        self.task_exchange = Exchange(b.task_queue, type="direct", durable=True)
        self.task_queue = Queue(b.task_queue, self.task_exchange, routing_key=b.task_queue, durable=True)

    def fanout_queue(self, exchange: Exchange, role: str, routing_key: str) -> Queue:
        """A private auto-delete queue on a fanout exchange for one subscriber."""
        name = f"{exchange.name}.{role}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        return Queue(
            name,
            exchange,
            routing_key=routing_key,
            durable=False,
            auto_delete=True,
            # RabbitMQ: a subscriber that dies before consuming must not leave its queue behind forever.
            queue_arguments={"x-expires": 600_000},
        )

    def declare(self, channel: Any) -> None:
        """Declare exchanges and durable queues (idempotent)."""
        for entity in (self.trajectory_queue, self.dead_letter_queue, self.weights_exchange, self.events_queue):
            entity.bind(channel).declare()


def connect(url: str, cfg: GopoConfig | BrokerConfig) -> Connection:
    """A kombu Connection with timeouts everywhere and publisher confirms on RabbitMQ (not yet connected)."""
    b = _bcfg(cfg)
    t = b.connect_timeout_s
    if is_redis(url):
        opts: dict[str, Any] = {
            "visibility_timeout": b.visibility_timeout_s,
            "socket_timeout": t,
            "socket_connect_timeout": t,
        }
    elif is_amqp(url):
        opts = {"confirm_publish": True, "read_timeout": t, "write_timeout": t}
    else:
        opts = {}
    return Connection(url, connect_timeout=t, transport_options=opts)


def _ensure_connected(conn: Connection, cfg: BrokerConfig) -> None:
    conn.ensure_connection(max_retries=RETRY_POLICY["max_retries"], interval_start=0.2, interval_step=0.5,
                           interval_max=2.0, timeout=cfg.connect_timeout_s)  # fmt: skip


def _source() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- publishing
class TrajectoryPublisher:
    """Publishes `Trajectory` records to the durable trajectory queue. Thread-safe (one lock around publish).

    The wire body is exactly `Trajectory.to_json()` (pydantic's JSON, `application/json`, UTF-8), so the
    consumer validates the same bytes the worker produced. Headers: episode_id, schema_version, status and
    min_policy_version (absent when no generation was recorded).
    """

    def __init__(self, url: str, cfg: GopoConfig | BrokerConfig) -> None:
        self.cfg = _bcfg(cfg)
        self.url = url
        self.topology = Topology(self.cfg)
        self._conn = connect(url, self.cfg)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self.published = 0

    def _get_producer(self) -> Producer:
        if self._producer is None:
            _ensure_connected(self._conn, self.cfg)
            self.topology.declare(self._conn.default_channel)
            self._producer = Producer(self._conn, exchange=self.topology.trajectory_exchange, auto_declare=False)
        return self._producer

    def publish(self, traj: Trajectory) -> None:
        """Publish one trajectory; returns once the broker has it (RabbitMQ confirm / Redis reply).

        Raises kombu's OperationalError (or the transport's connection error) after the bounded retries.
        """
        body = traj.to_json().encode("utf-8")
        headers: dict[str, Any] = {
            "episode_id": traj.episode_id,
            "schema_version": traj.schema_version,
            "status": traj.status,
        }
        if traj.min_policy_version is not None:
            headers["min_policy_version"] = traj.min_policy_version
        with self._lock:
            producer = self._get_producer()
            producer.publish(
                body,
                exchange=self.topology.trajectory_exchange,
                routing_key=self.topology.trajectory_queue.routing_key,
                content_type=JSON,
                content_encoding="utf-8",
                headers=headers,
                delivery_mode=2,  # persistent: survives a RabbitMQ restart (Redis: the AOF)
                message_id=traj.episode_id,
                declare=[self.topology.trajectory_queue],
                retry=True,
                retry_policy=RETRY_POLICY,
                timeout=self.cfg.connect_timeout_s,
                confirm_timeout=self.cfg.connect_timeout_s,
            )
            self.published += 1

    def close(self) -> None:
        with self._lock:
            self._producer = None
            self._conn.release()

    def __enter__(self) -> TrajectoryPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def dead_letter_record(
    reason: str,
    source_queue: str,
    body: bytes | str,
    content_type: str | None,
    content_encoding: str | None = None,
    headers: dict[str, Any] | None = None,
    keep_bytes: int | None = None,
) -> dict[str, Any]:
    """The JSON record a dead letter carries: the reason and the original body (base64, byte-exact; for a body
    over `keep_bytes` its first `keep_bytes`, with `body_truncated` set)."""
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
    kept = raw if keep_bytes is None else raw[:keep_bytes]
    return {
        "reason": reason[:MAX_REASON_CHARS],
        "source_queue": source_queue,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "headers": _json_safe(headers or {}),
        "body_b64": base64.b64encode(kept).decode("ascii"),
        "body_bytes": len(raw),
        "body_truncated": len(kept) < len(raw),
        "dead_lettered_at": time.time(),
        "consumer": _source(),
    }


def _send_dead_letter(producer: Producer, topo: Topology, cfg: BrokerConfig, record: dict[str, Any]) -> None:
    producer.publish(
        record,
        serializer="json",
        exchange=topo.dead_letter_exchange,
        routing_key=topo.dead_letter_queue.routing_key,
        headers={"reason": record["reason"][:200], "source_queue": record["source_queue"]},
        delivery_mode=2,
        declare=[topo.dead_letter_queue],
        retry=True,
        retry_policy=RETRY_POLICY,
        timeout=cfg.connect_timeout_s,
        confirm_timeout=cfg.connect_timeout_s,
    )


def _publish_dead_letter(
    producer: Producer, topo: Topology, cfg: BrokerConfig, message: Any, reason: str, source_queue: str
) -> None:
    too_big = len(message.body or b"") > cfg.max_trajectory_bytes
    record = dead_letter_record(
        reason, source_queue, message.body, message.content_type, message.content_encoding, message.headers,
        keep_bytes=OVERSIZE_BODY_KEPT if too_big else None,
    )  # fmt: skip
    _send_dead_letter(producer, topo, cfg, record)


class DeadLetterPublisher:
    """Sends dead letters from outside a consumer (e.g. a Celery task whose input failed validation). Thread-safe."""

    def __init__(self, url: str, cfg: GopoConfig | BrokerConfig) -> None:
        self.cfg = _bcfg(cfg)
        self.topology = Topology(self.cfg)
        self._conn = connect(url, self.cfg)
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def send(self, reason: str, source_queue: str, body: bytes | str, content_type: str | None = JSON,
             headers: dict[str, Any] | None = None) -> None:  # fmt: skip
        record = dead_letter_record(reason, source_queue, body, content_type, "utf-8", headers)
        with self._lock:
            if self._producer is None:
                _ensure_connected(self._conn, self.cfg)
                self.topology.declare(self._conn.default_channel)
                self._producer = Producer(self._conn, auto_declare=False)
            _send_dead_letter(self._producer, self.topology, self.cfg, record)

    def close(self) -> None:
        with self._lock:
            self._producer = None
            self._conn.release()


def validate_message(message: Any, max_bytes: int | None = None) -> tuple[Trajectory | None, str | None]:
    """(trajectory, None) when the message is a valid Trajectory of at most `max_bytes`, else (None, reason)."""
    if message.content_type != JSON:
        return None, f"foreign content type {message.content_type!r} (only {JSON} is accepted)"
    size = len(message.body or b"")
    if max_bytes is not None and size > max_bytes:
        # checked before parsing: the learner must not parse and hold whatever size a worker sends
        return None, f"trajectory message of {size} bytes exceeds broker.max_trajectory_bytes = {max_bytes}"
    try:
        return Trajectory.model_validate_json(message.body), None
    except ValidationError as e:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            return None, f"invalid JSON: {e.errors()[0].get('msg', e)}"
        return None, f"not a valid Trajectory (schema_version {TRAJECTORY_SCHEMA_VERSION}): {e}"


# --------------------------------------------------------------------------- consuming
class TrajectoryConsumer:
    """Pulls batches of validated trajectories from the trajectory queue. One thread per consumer.

    Acknowledgement: with `auto_ack=True` (default) a message is acked as it is handed over from `get_batch`
    (after validation and dedupe). With `auto_ack=False` the caller acks after its step with `ack()`; until
    then the messages stay unacked (redelivered if this process dies: at once on RabbitMQ, after
    `visibility_timeout_s` on Redis). Keep the unacked window well under the visibility timeout on Redis.

    Invalid messages go to the dead-letter queue with the reason and original body, then are acked.
    Duplicates (same episode_id within the last `dedupe_size` ids) are counted, acked and dropped.
    `counts` holds consumed / dead_lettered / duplicates / restored_sweeps.
    """

    def __init__(
        self,
        url: str,
        cfg: GopoConfig | BrokerConfig,
        *,
        auto_ack: bool = True,
        dedupe_size: int = 100_000,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.cfg = _bcfg(cfg)
        self.url = url
        self.auto_ack = auto_ack
        self.poll_interval_s = poll_interval_s
        self.topology = Topology(self.cfg)
        self._conn = connect(url, self.cfg)
        self._queue: Queue | None = None
        self._producer: Producer | None = None
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dedupe_size = dedupe_size
        self._pending: dict[str, Any] = {}
        self._last_restore = 0.0
        # Redis: kombu only sweeps unacked messages back into queues from its event loop; a basic_get
        # consumer must do it itself or a killed consumer's messages would stay hidden for good.
        self._restore_every_s = min(10.0, self.cfg.visibility_timeout_s / 2)
        self.counts: dict[str, int] = {"consumed": 0, "dead_lettered": 0, "duplicates": 0, "restored_sweeps": 0}
        self.on_dead_letter: Callable[[str, bytes], Any] | None = None
        """Called with (reason, body) after a message went to the dead-letter queue (e.g. the trajectory store)."""

    # --- connection
    def _bind(self) -> Queue:
        if self._queue is None:
            _ensure_connected(self._conn, self.cfg)
            channel = self._conn.channel()
            self.topology.declare(channel)
            self._queue = self.topology.trajectory_queue.bind(channel)
            self._producer = Producer(self._conn.channel(), auto_declare=False)
        return self._queue

    def _reset(self) -> None:
        self._queue = None
        self._producer = None
        # Unacked messages of the dead connection are redelivered by the broker; forget our handles to them.
        self._pending.clear()
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may raise anything; we reconnect anyway
            pass
        self._conn = connect(self.url, self.cfg)

    def _get_one(self) -> Any:
        for attempt in range(2):
            try:
                queue = self._bind()
                self._maybe_restore(queue)
                return queue.get(no_ack=False)
            except (*self._conn.recoverable_connection_errors, *self._conn.connection_errors, OperationalError) as e:
                if attempt:
                    raise
                # one line, not a traceback: the broker going away is an expected event, and the caller sees
                # the final error if the reconnect fails too
                log.warning("trajectory consumer lost its broker connection (%s: %s); reconnecting",
                            type(e).__name__, e)  # fmt: skip
                self._reset()
        return None

    def _maybe_restore(self, queue: Queue) -> None:
        if not is_redis(self.url):
            return
        now = time.monotonic()
        if now - self._last_restore < self._restore_every_s:
            return
        self._last_restore = now
        queue.channel.qos.restore_visible(num=1000, interval=1)
        self.counts["restored_sweeps"] += 1

    # --- dedupe
    def _seen(self, episode_id: str) -> bool:
        return episode_id in self._recent

    def remember(self, episode_ids: Iterable[str]) -> None:
        """Mark ids as seen (e.g. restored from a learner checkpoint so a restart still drops duplicates)."""
        for eid in episode_ids:
            self._recent[eid] = None
            self._recent.move_to_end(eid)
        while len(self._recent) > self._dedupe_size:
            self._recent.popitem(last=False)

    def recent_ids(self) -> list[str]:
        """The remembered episode ids, oldest first (what a checkpoint may store)."""
        return list(self._recent)

    # --- API
    def get_batch(self, max_n: int, timeout_s: float) -> list[Trajectory]:
        """Up to `max_n` valid, new trajectories, collected for at most `timeout_s` seconds.

        Returns as soon as `max_n` are collected, else what it has (maybe []) at the deadline.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        out: list[Trajectory] = []
        while len(out) < max_n:
            message = self._get_one()
            if message is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(self.poll_interval_s, remaining))
                continue
            traj = self._handle(message)
            if traj is not None:
                out.append(traj)
        return out

    def _handle(self, message: Any) -> Trajectory | None:
        traj, reason = validate_message(message, self.cfg.max_trajectory_bytes)
        if traj is None:
            assert reason is not None and self._producer is not None
            # Publish first, ack second: if the dead-letter publish fails the message stays on the queue.
            _publish_dead_letter(self._producer, self.topology, self.cfg, message, reason, self.cfg.trajectory_queue)
            message.ack()
            self.counts["dead_lettered"] += 1
            log.warning("dead-lettered a trajectory message: %s", reason[:200])
            if self.on_dead_letter is not None:
                self.on_dead_letter(reason, message.body)
            return None
        if self._seen(traj.episode_id) or traj.episode_id in self._pending:
            message.ack()
            self.counts["duplicates"] += 1
            return None
        self.remember([traj.episode_id])
        self.counts["consumed"] += 1
        if self.auto_ack:
            message.ack()
        else:
            self._pending[traj.episode_id] = message
        return traj

    def ack(self, episode_ids: Iterable[str] | None = None) -> int:
        """auto_ack=False: ack the handed-over messages of these episodes (all pending when None). Returns count."""
        ids = list(self._pending) if episode_ids is None else list(episode_ids)
        n = 0
        for eid in ids:
            message = self._pending.pop(eid, None)
            if message is not None:
                message.ack()
                n += 1
        return n

    def requeue(self, episode_ids: Iterable[str] | None = None) -> int:
        """auto_ack=False: give pending messages back to the queue (e.g. a failed learner step). Returns count."""
        ids = list(self._pending) if episode_ids is None else list(episode_ids)
        n = 0
        for eid in ids:
            message = self._pending.pop(eid, None)
            if message is not None:
                self._recent.pop(eid, None)  # it must be accepted again when it comes back
                message.requeue()
                n += 1
        return n

    @property
    def pending(self) -> list[str]:
        return list(self._pending)

    @property
    def broker_errors(self) -> tuple[type[BaseException], ...]:
        """What `get_batch` raises when the broker is unreachable (down, restarting, paused), not a bad message."""
        return (OperationalError, *self._conn.recoverable_connection_errors, *self._conn.connection_errors)

    def close(self) -> None:
        self._queue = None
        self._producer = None
        self._pending.clear()
        self._conn.release()

    def __enter__(self) -> TrajectoryConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_dead_letters(url: str, cfg: GopoConfig | BrokerConfig, max_n: int = 100) -> list[dict[str, Any]]:
    """Take up to `max_n` dead-letter records off the dead-letter queue (acked: the caller owns them now)."""
    b = _bcfg(cfg)
    topo = Topology(b)
    out: list[dict[str, Any]] = []
    with connect(url, b) as conn:
        _ensure_connected(conn, b)
        channel = conn.channel()
        topo.declare(channel)
        queue = topo.dead_letter_queue.bind(channel)
        while len(out) < max_n:
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            out.append(message.decode())
            message.ack()
    return out


# --------------------------------------------------------------------------- weights fanout
class _FanoutPublisher:
    """Publishes JSON records on one exchange (the weights fanout, the events exchange). Thread-safe; connects
    lazily; `declare` names what each publish makes sure exists (for the events, the queue with its binding: a
    Redis direct exchange with no bound queue drops the message)."""

    def __init__(self, url: str, cfg: GopoConfig | BrokerConfig, exchange: Exchange, routing_key: str) -> None:
        self.url = url
        self.cfg = _bcfg(cfg)
        self.topology = Topology(self.cfg)
        self.exchange = exchange
        self.routing_key = routing_key
        self._conn = connect(url, self.cfg)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self.declare: list[Any] = [exchange]

    def _send(self, body: dict[str, Any]) -> None:
        with self._lock:
            if self._producer is None:
                _ensure_connected(self._conn, self.cfg)
                self.topology.declare(self._conn.default_channel)
                self._producer = Producer(self._conn, exchange=self.exchange, auto_declare=False)
            self._producer.publish(
                body,
                serializer="json",
                exchange=self.exchange,
                routing_key=self.routing_key,
                declare=self.declare,
                retry=True,
                retry_policy=RETRY_POLICY,
                timeout=self.cfg.connect_timeout_s,
                confirm_timeout=self.cfg.connect_timeout_s,
            )

    def close(self) -> None:
        with self._lock:
            self._producer = None
            self._conn.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OutboxPublisher(_FanoutPublisher):
    """A publisher whose sends never block on the broker: `_enqueue` puts the record in an outbox that a background
    thread sends in order. A record the broker did not take (down, restarting) stays first in the outbox and is
    sent again with a capped backoff until it goes through. `close()` (and `flush()`) wait up to `timeout_s` for the
    outbox to empty; what is left then is counted as dropped and reported. Counts: sent, retries, dropped."""

    def __init__(
        self, url: str, cfg: GopoConfig | BrokerConfig, exchange: Exchange, routing_key: str, outbox_max: int
    ) -> None:
        super().__init__(url, cfg, exchange, routing_key)
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._outbox_max = outbox_max
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.counts: dict[str, int] = {"sent": 0, "retries": 0, "dropped": 0}
        self.last_error: str | None = None

    _idle_s: float | None = None
    """After this long with nothing to send, `_on_idle` may give a record to send again (None: never)."""

    def _on_idle(self) -> dict[str, Any] | None:
        return None

    def _enqueue(self, body: dict[str, Any]) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError(f"{type(self).__name__} is closed")
            if len(self._outbox) >= self._outbox_max:
                self._outbox.popleft()
                self.counts["dropped"] += 1
            self._outbox.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._outbox)

    def _run(self) -> None:
        backoff = 0.2
        while True:
            with self._cv:
                while not self._outbox and not self._closing:
                    if not self._cv.wait(self._idle_s) and not self._closing:
                        again = self._on_idle()  # nothing sent for _idle_s: a subclass may repeat its latest
                        if again is not None:
                            self._outbox.append(again)
                if not self._outbox:
                    return
                body = self._outbox[0]
            try:
                self._send(body)
            except Exception as e:  # noqa: BLE001 - any broker failure: keep the event, try again
                self.last_error = repr(e)
                with self._cv:
                    self.counts["retries"] += 1
                    if self.counts["retries"] in (1, 10) or self.counts["retries"] % 100 == 0:
                        log.warning("%s: the broker did not take a record (%r); %d waiting, retrying",
                                    self.exchange.name, e, len(self._outbox))  # fmt: skip
                    self._reset()
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            with self._cv:
                if self._outbox and self._outbox[0] is body:
                    self._outbox.popleft()
                self.counts["sent"] += 1
                self._cv.notify_all()

    def _reset(self) -> None:
        """After a failed publish: a fresh connection for the next try (kombu's may be half-closed)."""
        with self._lock:
            self._producer = None
            try:
                self._conn.release()
            except Exception:  # noqa: BLE001 - best effort on a dead connection
                pass
            self._conn = connect(self.url, self.cfg)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued event was sent (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.cfg.connect_timeout_s * 3)
        with self._cv:
            while self._outbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued (up to `timeout_s`, default 3 x broker.connect_timeout_s), then close."""
        self.flush(timeout_s)
        with self._cv:
            self._closing = True
            left = len(self._outbox)
            if left:
                self.counts["dropped"] += left
                log.warning("%s: %d record(s) not sent before close (broker unreachable: %s)", self.exchange.name,
                            left, self.last_error)  # fmt: skip
                self._outbox.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(self.cfg.connect_timeout_s + 5.0)
            self._thread = None
        super().close()


class WeightsAnnouncer(_OutboxPublisher):
    """Sends `weights.updated` events on the weights fanout exchange (the learner), through an outbox: a broker
    outage delays an announcement instead of failing the learner's step (its push and checkpoint are done by then;
    the server's loaded version stays the source of truth for a subscriber that misses one)."""

    def __init__(
        self, url: str, cfg: GopoConfig | BrokerConfig, outbox_max: int = 100, reannounce_s: float | None = 10.0
    ) -> None:
        super().__init__(url, cfg, Topology(cfg).weights_exchange, WEIGHTS_ROUTING_KEY, outbox_max)
        self._idle_s = reannounce_s
        self._latest: dict[str, Any] | None = None

    def _on_idle(self) -> dict[str, Any] | None:
        """The latest announcement again, every `reannounce_s` while nothing newer comes: a subscriber that was
        resubscribing when it went out (a broker restart; fanout keeps nothing) catches up, instead of playing on
        an old version whose trajectories the learner drops as stale (with max_staleness 0: no step ever again)."""
        return self._latest

    def announce(self, version: int, transport: str, path: str, served_models: dict[str, Any]) -> WeightsAnnouncement:
        event = WeightsAnnouncement(
            version=version,
            transport=transport,
            path=str(path),
            served_models=served_models,
            announced_at=time.time(),
            source=_source(),
        )
        body = event.model_dump(mode="json")
        with self._cv:
            self._latest = body
        self._enqueue(body)
        return event


class EventPublisher(_OutboxPublisher):
    """Sends monitoring events (episode summaries, learner steps, pushes, errors) to the controller's events queue,
    through the outbox: a learner step taken during a broker outage still reaches the run's log."""

    def __init__(self, url: str, cfg: GopoConfig | BrokerConfig, outbox_max: int = EVENTS_OUTBOX_MAX) -> None:
        topology = Topology(cfg)
        super().__init__(url, cfg, topology.events_exchange, EVENTS_ROUTING_KEY, outbox_max)
        self.declare = [topology.events_queue]

    def emit(
        self, kind: str, metrics: dict[str, float], payload: dict[str, Any] | None = None, step: int = 0
    ) -> MonitorEvent:
        return self.send(Event(kind=kind, step=step, metrics=metrics, payload=payload))  # type: ignore[arg-type]

    def send(self, event: Event) -> MonitorEvent:
        """Queue an event built with gopo_online.events' constructors, stamped with this process as its source."""
        out = MonitorEvent(**{**event.model_dump(), "source": _source()})
        self._enqueue(out.model_dump(mode="json"))
        return out


class _ListenerMixin(ConsumerProducerMixin):
    """One `_FanoutListener`'s kombu consumer: a private queue on the fanout exchange, records handed to the
    listener, foreign or undecodable messages dead-lettered through the mixin's producer connection."""

    connect_max_retries = RETRY_POLICY["max_retries"]  # then run() raises and the listener's loop backs off

    def __init__(self, listener: _FanoutListener) -> None:
        self.listener = listener
        self._iterations = 0  # consume-loop iterations since the consumers were registered (readiness on Redis)
        self.connection = connect(listener.url, listener.cfg)

    @property
    def should_stop(self) -> bool:  # type: ignore[override]
        return self.listener._stop.is_set()

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        if value:
            self.listener._stop.set()

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        """The mixin's, with the project's short retry intervals and connect timeout (kombu's default waits up to
        30 s between tries, during which a stop is not seen)."""
        with self.create_connection() as conn:
            conn.ensure_connection(self.on_connection_error, self.connect_max_retries,
                                   interval_start=RETRY_POLICY["interval_start"],
                                   interval_step=RETRY_POLICY["interval_step"],
                                   interval_max=RETRY_POLICY["interval_max"],
                                   timeout=self.listener.cfg.connect_timeout_s)  # fmt: skip
            yield conn

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:  # noqa: N803 - kombu's signature
        lst = self.listener
        lst.topology.declare(channel)
        queue = lst._queue()
        consumer = Consumer([queue], callbacks=[self.on_message], no_ack=True, accept=["json"])
        # kombu reports a foreign content type through on_decode_error: route it to the DLQ too.
        consumer.on_decode_error = self.on_decode_error
        return [consumer]

    def on_message(self, body: Any, message: Any) -> None:
        self.listener._on_message(message, self.producer)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.listener._dead_letter(self.producer, message, f"undecodable {self.listener.exchange.name} record: {exc}")

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self.listener._backoff = 0.2  # the next failure starts from the short wait again
        self._iterations = 0
        # AMQP: basic_consume has returned, the queue is bound: a record sent from now on is received. kombu's
        # Redis subscribes a fanout queue (PSUBSCRIBE) lazily, inside the first drain_events: ready after it.
        if not (is_redis(self.listener.url) and self.listener.exchange.type == "fanout"):
            self.listener._ready.set()

    def on_iteration(self) -> None:
        self._iterations += 1
        if self._iterations >= 2:  # one drain_events (<= 1 s) has run since the consumers were registered
            self.listener._ready.set()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        lst = self.listener
        lst.last_error = repr(exc)
        lst.counts["reconnects"] += 1
        log.warning("%s listener (%s) lost the broker: %r; retrying in %.1fs", lst.exchange.name, lst.role, exc,
                    interval)  # fmt: skip

    def close(self) -> None:
        for conn in (self._producer_connection, self.connection):
            try:
                if conn is not None:
                    conn.release()
            except Exception:  # noqa: BLE001 - best effort on a connection that may be dead
                pass
        self._producer_connection = None


class _FanoutListener:
    """Receives one fanout exchange's JSON records in a background thread; subclasses keep what they need.

    `start()` returns once the private queue is subscribed, so a record sent afterwards is received.
    Records are not acked individually (no_ack): they are notifications, superseded by the next one.
    A record that is not valid JSON of `record_type` goes to the dead-letter queue with the reason.
    """

    record_type: type[BaseModel]

    def __init__(
        self, url: str, cfg: GopoConfig | BrokerConfig, exchange: Exchange, routing_key: str, role: str
    ) -> None:
        self.cfg = _bcfg(cfg)
        self.url = url
        self.role = role
        self.topology = Topology(self.cfg)
        self.exchange = exchange
        self.routing_key = routing_key
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._backoff = 0.2
        self._thread: threading.Thread | None = None
        self.counts: dict[str, int] = {"received": 0, "dead_lettered": 0, "reconnects": 0}
        self.last_error: str | None = None

    def start(self, timeout_s: float | None = None):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.exchange.name}-{self.role}", daemon=True)
            self._thread.start()
        if not self._ready.wait(timeout_s if timeout_s is not None else self.cfg.connect_timeout_s * 2):
            self.stop()
            raise TimeoutError(f"listener could not subscribe to {self.exchange.name}: {self.last_error}")
        return self

    def _run(self) -> None:
        """kombu's ConsumerProducerMixin does the consuming: connect with retries, (re)subscribe, drain events,
        reconnect on a connection or channel error, stop on `should_stop`. Around it only what kombu does not
        cover: any other exception is reported and the mixin started again after a capped backoff."""
        self._backoff = 0.2
        while not self._stop.is_set():
            mixin = _ListenerMixin(self)
            try:
                mixin.run()
            except Exception as e:  # noqa: BLE001 - outside kombu's connection errors: report, back off, again
                if self._stop.is_set():
                    break
                self.last_error = repr(e)
                self.counts["reconnects"] += 1
                log.warning("%s listener (%s) failed: %r; reconnecting", self.exchange.name, self.role, e)
                self._stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)
            finally:
                mixin.close()

    def _queue(self) -> Queue:
        """The queue this listener consumes: its own auto-delete queue on the fanout exchange."""
        return self.topology.fanout_queue(self.exchange, self.role, self.routing_key)

    def _dead_letter(self, producer: Producer, message: Any, reason: str) -> None:
        self.counts["dead_lettered"] += 1
        log.warning("dead-lettered a %s record: %s", self.exchange.name, reason[:200])
        _publish_dead_letter(producer, self.topology, self.cfg, message, reason, self.exchange.name)

    def _on_message(self, message: Any, producer: Producer) -> None:
        if message.content_type != JSON:
            self._dead_letter(producer, message, f"foreign content type {message.content_type!r}")
            return
        try:
            record = self.record_type.model_validate_json(message.body)
        except ValidationError as e:
            self._dead_letter(producer, message, f"not a valid {self.record_type.__name__}: {e}")
            return
        with self._lock:
            self.counts["received"] += 1
            self._keep(record)
        self._notify(record)

    def _keep(self, record: Any) -> None:
        """Store a valid record (called under the lock)."""
        raise NotImplementedError

    def _notify(self, record: Any) -> None:
        """Hook called from the listener thread after a record is kept (outside the lock)."""

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WeightsListener(_FanoutListener):
    """Receives `weights.updated` events; `poll()` never blocks and returns only something newer.

    `on_update`, if given, is called from the listener thread with each valid announcement.
    """

    record_type = WeightsAnnouncement

    def __init__(
        self,
        url: str,
        cfg: GopoConfig | BrokerConfig,
        role: str = "listener",
        on_update: Callable[[WeightsAnnouncement], None] | None = None,
    ) -> None:
        super().__init__(url, cfg, Topology(cfg).weights_exchange, WEIGHTS_ROUTING_KEY, role)
        self.on_update = on_update
        self._latest: WeightsAnnouncement | None = None
        self._last_polled_version: int | None = None

    def _keep(self, record: WeightsAnnouncement) -> None:
        if self._latest is None or record.version >= self._latest.version:
            self._latest = record

    def _notify(self, record: WeightsAnnouncement) -> None:
        if self.on_update is not None:
            self.on_update(record)

    @property
    def latest(self) -> WeightsAnnouncement | None:
        with self._lock:
            return self._latest

    def poll(self) -> WeightsAnnouncement | None:
        """The latest announcement if its version is newer than the one the previous poll returned, else None."""
        with self._lock:
            event = self._latest
            if event is None or (self._last_polled_version is not None and event.version <= self._last_polled_version):
                return None
            self._last_polled_version = event.version
            return event

    def wait_for(self, version: int, timeout_s: float) -> WeightsAnnouncement | None:
        """Block up to `timeout_s` until an announcement with at least `version` arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = self.latest
            if event is not None and event.version >= version:
                return event
            time.sleep(0.02)
        return None


class EventListener(_FanoutListener):
    """Receives monitoring events into a bounded buffer; `drain()` returns and clears what arrived.

    It reads the durable events queue (one reader per run: the controller), so events sent while it was not
    subscribed (before `start()`, or while it resubscribes after a broker restart) still arrive, in order.
    """

    record_type = MonitorEvent

    def __init__(self, url: str, cfg: GopoConfig | BrokerConfig, role: str = "controller", maxlen: int = 100_000):
        super().__init__(url, cfg, Topology(cfg).events_exchange, EVENTS_ROUTING_KEY, role)
        self._events: collections.deque[MonitorEvent] = collections.deque(maxlen=maxlen)
        self.counts["duplicates"] = 0
        self._seen: set[tuple[Any, ...]] = set()
        self._seen_order: collections.deque[tuple[Any, ...]] = collections.deque()
        self._seen_max = 10_000

    def _queue(self) -> Queue:
        return self.topology.events_queue

    def _keep(self, record: MonitorEvent) -> None:
        # A publish the broker took but did not confirm (killed in between) is sent again: keep it once.
        key = (record.source, record.time, record.kind, record.step)
        if key in self._seen:
            self.counts["duplicates"] += 1
            return
        self._seen.add(key)
        self._seen_order.append(key)
        if len(self._seen_order) > self._seen_max:
            self._seen.discard(self._seen_order.popleft())
        self._events.append(record)

    def drain(self) -> list[MonitorEvent]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out


# --------------------------------------------------------------------------- dashboard / ops
def queue_depth(url: str, cfg: GopoConfig | BrokerConfig) -> dict[str, int]:
    """Ready (not in-flight) messages per queue: {"trajectory", "dead_letter", "task"}; 0 for a missing queue."""
    b = _bcfg(cfg)
    names = {"trajectory": b.trajectory_queue, "dead_letter": b.dead_letter_queue, "task": b.task_queue}
    out: dict[str, int] = {}
    with connect(url, b) as conn:
        _ensure_connected(conn, b)
        channel = conn.channel()
        for key, name in names.items():
            try:
                ok = channel.queue_declare(queue=name, passive=True)
                out[key] = int(ok.message_count)
            except conn.channel_errors:
                # Not declared yet. AMQP closes the channel on a failed passive declare: open a new one.
                out[key] = 0
                channel = conn.channel()
    return out


def purge_events(url: str, cfg: GopoConfig | BrokerConfig) -> int:
    """Drop the events waiting on the events queue (a new run's controller: they belong to an earlier run)."""
    b = _bcfg(cfg)
    with connect(url, b) as conn:
        _ensure_connected(conn, b)
        channel = conn.channel()
        queue = Topology(b).events_queue.bind(channel)
        queue.declare()
        return int(queue.purge() or 0)


def delete_topology(url: str, cfg: GopoConfig | BrokerConfig, *, include_task_queue: bool = True) -> None:
    """Delete this config's queues and exchanges (tests and benchmarks with unique names clean up with it)."""
    b = _bcfg(cfg)
    topo = Topology(b)
    queues = [topo.trajectory_queue, topo.dead_letter_queue, topo.events_queue]
    queues += [topo.task_queue] if include_task_queue else []
    exchanges = [topo.trajectory_exchange, topo.dead_letter_exchange, topo.weights_exchange, topo.events_exchange]
    exchanges += [topo.task_exchange] if include_task_queue else []
    with connect(url, b) as conn:
        _ensure_connected(conn, b)
        channel = conn.channel()
        for queue in queues:
            # Redis keeps bindings in Redis but deletes only those its channel state knows: declare, then delete.
            bound = queue.bind(channel)
            bound.declare()
            bound.delete()
        for exchange in exchanges:
            try:
                exchange.bind(channel).delete()
            except conn.channel_errors:
                channel = conn.channel()


# --------------------------------------------------------------------------- benchmark
def bench_stream(url: str, n: int = 1000, size_bytes: int = 50_000, cfg: BrokerConfig | None = None) -> dict[str, Any]:
    """Publish `n` trajectories of about `size_bytes` JSON each, then consume them all; rates in messages/s.

    Uses unique queue names and deletes them afterwards. Single publisher and single consumer in this process
    (separate connections); publish includes `to_json`, consume includes validation and dedupe.
    """
    from gopo_online.types import Generation, Turn, UserTurnMeta

    tag = uuid.uuid4().hex[:8]
    base = cfg or BrokerConfig()
    b = base.model_copy(
        update={
            "trajectory_queue": f"bench.traj.{tag}",
            "dead_letter_queue": f"bench.dlq.{tag}",
            "weights_exchange": f"bench.weights.{tag}",
            "events_exchange": f"bench.events.{tag}",
            "task_queue": f"bench.tasks.{tag}",
        }
    )
    # Token ids + logprobs make up most of a real trajectory: size the payload with them.
    n_tokens = max(1, size_bytes // 18)  # ~18 JSON bytes per (token id, logprob) pair
    gen = Generation(
        prompt_token_ids=(1, 2, 3),
        completion_token_ids=tuple(range(n_tokens)),
        logprobs=tuple(-0.123456789 for _ in range(n_tokens)),
        text="x",
        model="policy",
        policy_version=0,
        temperature=1.0,
        latency_s=0.1,
    )
    turn = Turn(
        index=1,
        user_utterance="hello",
        user_meta=UserTurnMeta(intent="ask", emotion="neutral", satisfaction=3, stop=True),
        expert_skills=("greet",),
        cs_reply="hi",
        cs_action="chat",
        cs_gen=gen,
    )
    template = Trajectory(episode_id="bench", scenario_id="bench", persona_id="p", turns=(turn,))
    actual_size = len(template.to_json())
    try:
        publisher = TrajectoryPublisher(url, b)
        t0 = time.perf_counter()
        for i in range(n):
            publisher.publish(template.model_copy(update={"episode_id": f"bench-{tag}-{i}"}))
        publish_s = time.perf_counter() - t0
        publisher.close()
        consumer = TrajectoryConsumer(url, b)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            batch = consumer.get_batch(min(100, n - got), timeout_s=5.0)
            if not batch:
                break
            got += len(batch)
        consume_s = time.perf_counter() - t0
        consumer.close()
    finally:
        delete_topology(url, b)
    return {
        "url": url.split("@")[-1],
        "n": n,
        "size_bytes": actual_size,
        "published": n,
        "consumed": got,
        "publish_per_s": n / publish_s,
        "consume_per_s": got / consume_s if consume_s > 0 else float("nan"),
        "publish_mb_per_s": n * actual_size / publish_s / 1e6,
    }
