"""restore_unacked and the hold marks on a real Redis (the machine's, as tests/workers/test_worker_app.py uses):
a consumer takes tasks without acking and vanishes; only the named tasks go back on their queue, at once."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
import redis

from gopo_online.config import BrokerConfig, GopoConfig
from gopo_online.stream import Topology, delete_topology, queue_depth
from workers.app import DoneMarks, held_episodes
from workers.controller import _celery_client, _done_without_event
from workers.dispatch import InFlight, restore_unacked

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("GOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str) -> bool:
    host, port = url.split("://")[-1].split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def cfg():
    if not _reachable(REDIS_URL):
        if os.environ.get("CI"):
            pytest.fail(f"redis not reachable at {REDIS_URL}")
        pytest.skip("redis not reachable")
    tag = uuid.uuid4().hex[:10]
    b = BrokerConfig(url=REDIS_URL, trajectory_queue=f"t.traj.{tag}", dead_letter_queue=f"t.dlq.{tag}",
                     weights_exchange=f"t.w.{tag}", events_exchange=f"t.ev.{tag}",
                     task_queue=f"t.tasks.{tag}")  # fmt: skip
    c = GopoConfig(broker=b)
    yield c
    delete_topology(REDIS_URL, c)


def test_restore_moves_only_named_unacked_tasks(cfg: GopoConfig) -> None:
    from kombu import Connection

    topo = Topology(cfg)
    celery = _celery_client(cfg, REDIS_URL)
    for i in range(3):
        celery.send_task("gopo.run_episode", args=[{"episode_id": f"ep-{i}"}], task_id=f"ep-{i}",
                         queue=cfg.broker.task_queue, serializer="json")  # fmt: skip
    assert queue_depth(REDIS_URL, cfg)["task"] == 3
    # a consumer that takes all three and dies without acking (its socket just goes away)
    dead = Connection(REDIS_URL)
    q = dead.SimpleQueue(topo.task_queue, no_ack=False)
    taken = [q.get(timeout=5) for _ in range(3)]
    assert sorted(m.headers["id"] for m in taken) == ["ep-0", "ep-1", "ep-2"]
    assert queue_depth(REDIS_URL, cfg)["task"] == 0
    # never closed (a clean close would let kombu restore them itself): like a worker killed with SIGKILL

    assert restore_unacked(REDIS_URL, cfg, queue=topo.trajectory_queue.name) == []  # other exchange
    assert restore_unacked(REDIS_URL, cfg, queue=topo.task_queue.name, task_ids={"ep-1"}) == ["ep-1"]
    assert queue_depth(REDIS_URL, cfg)["task"] == 1
    assert restore_unacked(REDIS_URL, cfg, queue=topo.task_queue.name, task_ids={"ep-1"}) == []  # moved once
    assert sorted(restore_unacked(REDIS_URL, cfg, queue=topo.task_queue.name)) == ["ep-0", "ep-2"]
    assert queue_depth(REDIS_URL, cfg)["task"] == 3
    with Connection(REDIS_URL) as conn:
        q2 = conn.SimpleQueue(topo.task_queue, no_ack=True)
        ids = sorted(q2.get(timeout=5).headers["id"] for _ in range(3))
        q2.close()
    assert ids == ["ep-0", "ep-1", "ep-2"]


def test_hold_marks_and_done_marks_seen_twice(cfg: GopoConfig) -> None:
    ns = cfg.broker.task_queue
    marks = DoneMarks(REDIS_URL, ns, timeout_s=2.0)
    try:
        marks.hold("ep-a", "host:11", 60)
        marks.hold("ep-b", "host:11", 60)
        marks.hold("ep-c", "host:12", 60)
        assert held_episodes(REDIS_URL, ns, "host:11") == ["ep-a", "ep-b"]
        marks.release("ep-a")
        assert held_episodes(REDIS_URL, ns, "host:11") == ["ep-b"]
        assert held_episodes("amqp://guest:guest@127.0.0.1:5672//", ns, "host:11") == []  # RabbitMQ redelivers itself

        inflight = InFlight(lambda i, v: None, lambda p: None, max_in_flight=3, deadline_s=60)
        inflight.adopt([{"episode_id": "ep-a"}, {"episode_id": "ep-b"}], resend=False)
        seen: set[str] = set()
        assert _done_without_event(REDIS_URL, cfg, inflight, seen) == []
        marks.mark_done("ep-b")
        assert _done_without_event(REDIS_URL, cfg, inflight, seen) == []  # first sighting: its event may be coming
        assert _done_without_event(REDIS_URL, cfg, inflight, seen) == ["ep-b"]
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{ns}:*"):
            client.delete(key)
        client.close()
        marks.close()
