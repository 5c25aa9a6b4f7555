"""Faults on the real delivery path, without vLLM: real Celery workers (the real `run_episode` task, a stub
rollout) killed with SIGKILL.

1. A worker killed mid-episode (on the machine's Redis, as tests/workers/test_worker_app.py): the controller's
   recovery (hold marks -> restore the exact unacked tasks) puts its episodes back on the queue at once, not after
   the 900 s visibility timeout; a second worker plays them; each episode reaches the learner's consumer once.
2. The embedded Redis killed with SIGKILL and restarted on the same port: the append-only file keeps the queued
   trajectories (nothing lost), and the surviving worker reconnects and plays the next episode.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from gopo_online.broker import EmbeddedRedis
from gopo_online.config import BrokerConfig, GopoConfig, WorkersConfig
from gopo_online.stream import EpisodeRequest, Topology, TrajectoryConsumer, delete_topology, queue_depth
from workers.app import held_episodes, worker_name
from workers.controller import _celery_client
from workers.dispatch import InFlight, restore_unacked
from workers.supervisor import Child

pytestmark = [pytest.mark.faults, pytest.mark.integration]

REDIS_URL = os.environ.get("GOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

STUB = Path(__file__).with_name("stub_worker.py")


def _wait(pred, timeout_s: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _worker(tmp_path: Path, name: str, cfg: GopoConfig, hold_s: float) -> Child:
    env = {**os.environ, "STUB_CFG": cfg.model_dump_json(), "STUB_HOLD_S": str(hold_s), "OMP_NUM_THREADS": "1"}
    return Child(name, [], tmp_path / f"{name}.log", env, 3.0, stop_signal=signal.SIGKILL,
                 argv0=[sys.executable, str(STUB)])  # fmt: skip


def _request(index: int, version: int) -> EpisodeRequest:
    return EpisodeRequest(episode_id=f"ep-f-{index:04d}", scenario_id="s", persona_id="p", seed=index,
                          policy_version=version)  # fmt: skip


def _cfg(url: str) -> GopoConfig:
    tag = uuid.uuid4().hex[:8]
    return GopoConfig(
        broker=BrokerConfig(url=url, trajectory_queue=f"f.traj.{tag}", dead_letter_queue=f"f.dlq.{tag}",
                            weights_exchange=f"f.w.{tag}", events_exchange=f"f.ev.{tag}", task_queue=f"f.tasks.{tag}",
                            connect_timeout_s=3.0),  # visibility timeout: the default 900 s
        workers=WorkersConfig(concurrency=2, max_retries=0),
    )  # fmt: skip


class _Dispatch:
    def __init__(self, cfg: GopoConfig) -> None:
        self.sent: list[str] = []
        self.celery = _celery_client(cfg, cfg.broker.url)
        self.cfg = cfg
        self.inflight = InFlight(_request, self.send, max_in_flight=3, deadline_s=600.0)

    def send(self, payload: dict) -> None:
        self.sent.append(payload["episode_id"])
        self.celery.send_task("gopo.run_episode", args=[payload], task_id=payload["episode_id"],
                              queue=self.cfg.broker.task_queue, serializer="json")  # fmt: skip


def _collect(consumer: TrajectoryConsumer, n: int, timeout_s: float) -> list[str]:
    got: list[str] = []
    _wait(lambda: got.extend(t.episode_id for t in consumer.get_batch(n, 0.5)) or len(got) >= n, timeout_s,
          f"{n} trajectories")  # fmt: skip
    return got


def _reachable(url: str) -> bool:
    import socket

    host, port = url.split("://")[-1].split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _need_redis() -> None:
    """The machine's Redis: CI must have it, elsewhere a skip."""
    if not _reachable(REDIS_URL):
        if os.environ.get("CI"):
            pytest.fail(f"redis not reachable at {REDIS_URL}")
        pytest.skip("redis not reachable")


class _Rig:
    """The machine's Redis, per-test queue names, a dispatcher, worker-a holding each episode far past the test, a
    consumer of the trajectory stream; `start_b()` adds worker-b, which plays at once. Everything stopped and the
    queues deleted on exit."""

    def __init__(self, tmp_path: Path) -> None:
        _need_redis()
        self.tmp_path, self.cfg = tmp_path, _cfg(REDIS_URL)
        self.d = _Dispatch(self.cfg)
        self.a = _worker(tmp_path, "worker-a", self.cfg, hold_s=120.0)
        self.b: Child | None = None
        self.consumer = TrajectoryConsumer(REDIS_URL, self.cfg, auto_ack=True)

    def start_b(self) -> Child:
        self.b = _worker(self.tmp_path, "worker-b", self.cfg, hold_s=0.2)
        return self.b

    def __enter__(self) -> _Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()
        for w in (self.a, self.b):
            if w is not None:
                w.stop()
        delete_topology(REDIS_URL, self.cfg)


def test_killed_worker_episodes_redelivered_at_once_and_once(tmp_path: Path) -> None:
    with _Rig(tmp_path) as rig:
        cfg, d, a, consumer = rig.cfg, rig.d, rig.a, rig.consumer
        topo = Topology(cfg)
        assert d.inflight.fill(0, 0, budget_left=3) == ["ep-f-0000", "ep-f-0001", "ep-f-0002"]

        def held_two() -> list[str] | None:
            held = held_episodes(REDIS_URL, cfg.broker.task_queue, worker_name(a.pid))
            return held if len(held) == 2 else None

        held = _wait(held_two, 60, "worker-a to hold 2 episodes")
        os.kill(a.pid, signal.SIGKILL)  # mid-episode
        _wait(lambda: not a.alive(), 10, "worker-a to die")
        t_kill = time.monotonic()
        restored = restore_unacked(REDIS_URL, cfg, queue=topo.task_queue.name, task_ids=set(held))
        assert sorted(restored) == held  # the exact messages, no copies
        assert restore_unacked(REDIS_URL, cfg, queue=topo.task_queue.name, task_ids=set(held)) == []
        rig.start_b()
        got = _collect(consumer, 3, 90)
        recovered_s = time.monotonic() - t_kill
        assert sorted(got) == d.sent and recovered_s < 60  # << the 900 s visibility timeout
        assert all(d.inflight.finished(e) for e in got)
        time.sleep(1.0)
        assert consumer.get_batch(5, 1.0) == []
        assert consumer.counts["duplicates"] == 0 and consumer.counts["consumed"] == 3
        print(json.dumps({"fault": "worker", "dispatched": 3, "trained": 3, "lost": 0, "duplicated": 0,
                          "recovered_s": round(recovered_s, 1)}))  # fmt: skip


def test_cold_shutdown_while_playing_exits_and_gives_the_episodes_back(tmp_path: Path) -> None:
    """SIGQUIT (Celery's cold shutdown, what `train` and an operator send) to a worker that is playing episodes: it
    exits within seconds without waiting for them, and their unacked messages go back to the queue for the next
    worker, with no restore by the controller. Celery's own threads pool raised NotImplementedError from
    terminate_job here and the worker then waited for the episode's thread (a cluster test's teardown hung)."""
    with _Rig(tmp_path) as rig:
        d, a, consumer = rig.d, rig.a, rig.consumer
        assert d.inflight.fill(0, 0, budget_left=2) == ["ep-f-0000", "ep-f-0001"]
        log_a = lambda: a.log_path.read_text(errors="replace")  # noqa: E731
        _wait(lambda: log_a().count("playing ep-f-") == 2, 60, "worker-a to play both episodes")
        os.kill(a.pid, signal.SIGQUIT)
        t_quit = time.monotonic()
        _wait(lambda: not a.alive(), 20, "worker-a to exit after SIGQUIT")
        exit_s = time.monotonic() - t_quit
        assert "NotImplementedError" not in log_a() and "cold stop: 2 episode thread(s)" in log_a(), log_a()[-3000:]
        rig.start_b()
        got = _collect(consumer, 2, 90)
        assert sorted(got) == d.sent  # both given back and played by worker-b, each once
        time.sleep(1.0)
        assert consumer.get_batch(5, 1.0) == [] and consumer.counts["duplicates"] == 0
        print(json.dumps({"fault": "cold stop", "exit_s": round(exit_s, 1), "given_back": len(got)}))


def test_killed_broker_restarts_with_its_queue(tmp_path: Path) -> None:
    redis_srv = EmbeddedRedis(tmp_path / "broker").start()
    url = redis_srv.url
    cfg = _cfg(url)
    d = _Dispatch(cfg)
    b = _worker(tmp_path, "worker-b", cfg, hold_s=0.2)
    consumer = TrajectoryConsumer(url, cfg, auto_ack=True)
    try:
        d.inflight.fill(0, 0, budget_left=2)
        _wait(lambda: queue_depth(url, cfg)["trajectory"] >= 2, 60, "two trajectories queued")
        time.sleep(1.5)  # appendfsync everysec
        os.kill(redis_srv.pid, signal.SIGKILL)
        _wait(lambda: not redis_srv.running, 10, "redis to die")
        t_kill = time.monotonic()
        redis_srv.restart()
        assert redis_srv.url == url
        assert queue_depth(url, cfg)["trajectory"] == 2  # the AOF kept them
        # the surviving worker reconnects by itself and plays the next episode
        d.inflight.fill(2, 0, budget_left=1)
        got = _collect(consumer, 3, 90)
        recovered_s = time.monotonic() - t_kill
        assert sorted(got) == d.sent and b.alive()
        time.sleep(1.0)
        assert consumer.get_batch(5, 1.0) == []
        assert consumer.counts["duplicates"] == 0 and consumer.counts["consumed"] == 3
        print(json.dumps({"fault": "broker", "dispatched": 3, "trained": 3, "lost": 0, "duplicated": 0,
                          "recovered_s": round(recovered_s, 1)}))  # fmt: skip
    finally:
        consumer.close()
        b.stop()
        redis_srv.stop()
