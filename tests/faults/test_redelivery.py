"""Faults on the real delivery path, without vLLM: real Celery workers (real `run_episode` task, stub rollout)
on a real embedded Redis, killed with SIGKILL.

1. A worker killed mid-episode: the controller's recovery (hold marks -> restore the exact unacked tasks) puts its
   episodes back on the queue at once, not after the 900 s visibility timeout; a second worker plays them; each
   episode reaches the learner's consumer exactly once.
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
from gopo_online.stream import EpisodeRequest, Topology, TrajectoryConsumer, queue_depth
from workers.app import held_episodes, worker_name
from workers.controller import _celery_client
from workers.dispatch import InFlight, restore_unacked
from workers.supervisor import Child

pytestmark = [pytest.mark.faults, pytest.mark.integration]

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


def test_killed_worker_and_killed_broker_lose_nothing(tmp_path: Path) -> None:
    redis_srv = EmbeddedRedis(tmp_path / "broker").start()
    tag = uuid.uuid4().hex[:8]
    cfg = GopoConfig(
        broker=BrokerConfig(url=redis_srv.url, trajectory_queue=f"f.traj.{tag}", dead_letter_queue=f"f.dlq.{tag}",
                            weights_exchange=f"f.w.{tag}", events_exchange=f"f.ev.{tag}", task_queue=f"f.tasks.{tag}",
                            connect_timeout_s=3.0),  # visibility timeout: the default 900 s
        workers=WorkersConfig(concurrency=2, max_retries=0),
    )  # fmt: skip
    topo = Topology(cfg)
    url = redis_srv.url
    celery = _celery_client(cfg, url)
    sent: list[str] = []

    def send(payload: dict) -> None:
        sent.append(payload["episode_id"])
        celery.send_task("gopo.run_episode", args=[payload], task_id=payload["episode_id"],
                         queue=cfg.broker.task_queue, serializer="json")  # fmt: skip

    inflight = InFlight(_request, send, max_in_flight=3, deadline_s=600.0)
    a = _worker(tmp_path, "worker-a", cfg, hold_s=120.0)  # holds every episode far past the test
    b = None
    consumer = TrajectoryConsumer(url, cfg, auto_ack=True)
    try:
        assert inflight.fill(0, 0, budget_left=3) == ["ep-f-0000", "ep-f-0001", "ep-f-0002"]
        held = _wait(lambda: held_episodes(url, cfg.broker.task_queue, worker_name(a.pid)) or None
                     if len(held_episodes(url, cfg.broker.task_queue, worker_name(a.pid))) == 2 else None,
                     60, "worker-a to hold 2 episodes")  # fmt: skip
        assert len(held) == 2
        # -- fault 1: kill -9 the worker mid-episode
        os.kill(a.pid, signal.SIGKILL)
        _wait(lambda: not a.alive(), 10, "worker-a to die")
        t_kill = time.monotonic()
        restored = restore_unacked(url, cfg, queue=topo.task_queue.name, task_ids=set(held))
        assert sorted(restored) == held  # the exact messages, no copies
        assert restore_unacked(url, cfg, queue=topo.task_queue.name, task_ids=set(held)) == []
        b = _worker(tmp_path, "worker-b", cfg, hold_s=0.2)
        got: list[str] = []
        _wait(lambda: got.extend(t.episode_id for t in consumer.get_batch(3, 0.5)) or len(got) >= 3, 90,
              "the three episodes' trajectories")  # fmt: skip
        recovered_s = time.monotonic() - t_kill
        assert sorted(got) == sent and recovered_s < 60  # << the 900 s visibility timeout
        for eid in got:
            assert inflight.finished(eid)
        # -- fault 2: kill -9 the broker with trajectories queued; restart it (AOF replays them)
        inflight.fill(3, 0, budget_left=2)
        _wait(lambda: queue_depth(url, cfg)["trajectory"] >= 2, 60, "two more trajectories queued")
        time.sleep(1.5)  # appendfsync everysec
        os.kill(redis_srv.pid, signal.SIGKILL)
        _wait(lambda: not redis_srv.running, 10, "redis to die")
        redis_srv.restart()
        assert redis_srv.url == url
        assert queue_depth(url, cfg)["trajectory"] == 2
        # the surviving worker reconnects by itself and plays the next episode
        inflight.fill(5, 0, budget_left=1)
        more: list[str] = []
        _wait(lambda: more.extend(t.episode_id for t in consumer.get_batch(3, 0.5)) or len(more) >= 3, 90,
              "the trajectories after the broker restart")  # fmt: skip
        assert sorted(more) == sent[3:] and b.alive()
        # trained at most once: nothing duplicated reached the consumer, nothing was lost
        time.sleep(1.0)
        assert consumer.get_batch(5, 1.0) == []
        assert consumer.counts["duplicates"] == 0 and consumer.counts["consumed"] == len(sent) == 6
        report = {"recovered_worker_s": round(recovered_s, 1), "dispatched": len(sent),
                  "trained": consumer.counts["consumed"], "duplicated": consumer.counts["duplicates"]}  # fmt: skip
        print(json.dumps(report))
    finally:
        consumer.close()
        for w in (a, b):
            if w is not None:
                w.stop()
        redis_srv.stop()
