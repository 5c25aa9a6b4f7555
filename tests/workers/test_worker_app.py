"""`run_episode` through a REAL Celery worker (threads pool) on a real broker, with a stub rollout.

Checks the task plumbing — JSON serialization, acks, retries with backoff, the explicit error record, the
dead-letter path for a bad payload, and the done-mark skip of a redelivered episode. The real rollout
(simulator ⇄ agents ⇄ judge) is covered by the loop's integration test.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import Counter

import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun

from gopo_online.config import BrokerConfig, GopoConfig, WorkersConfig
from gopo_online.stream import EpisodeRequest, TrajectoryConsumer, delete_topology, get_dead_letters, queue_depth
from gopo_online.types import Trajectory, Turn, UserTurnMeta
from workers.app import make_app, submit_episode
from workers.rollout import WorkerContext

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("GOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("GOPO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> bool:
    host, port = url.split("@")[-1].split("://")[-1].split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def ok_traj(req: EpisodeRequest) -> Trajectory:
    turn = Turn(index=1, user_utterance="hi", user_meta=UserTurnMeta(intent="greet", emotion="calm", satisfaction=4,
                stop=True), expert_skills=("greet",), cs_reply="Hello!", cs_action="chat")  # fmt: skip
    return Trajectory(episode_id=req.episode_id, scenario_id=req.scenario_id, persona_id=req.persona_id,
                      seed=req.seed, turns=(turn,), finished=True)  # fmt: skip


class StubRollout:
    """persona_id picks the behaviour: ok, flaky (1 connection error, then ok), down (always), bug (ValueError)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, req: EpisodeRequest, ctx: WorkerContext) -> Trajectory:
        with self.lock:
            self.calls[req.episode_id] += 1
            n = self.calls[req.episode_id]
        if req.persona_id == "flaky" and n == 1:
            raise ConnectionError("vLLM connection refused")
        if req.persona_id == "down":
            raise TimeoutError("policy server timed out")
        if req.persona_id == "bug":
            raise ValueError("scenario has no skills")
        return ok_traj(req)


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_run_episode_end_to_end_on_real_worker(kind: str) -> None:
    url = REDIS_URL if kind == "redis" else AMQP_URL
    if not _reachable(url):
        if os.environ.get("CI"):  # CI machines run both brokers: missing one is a failure there
            pytest.fail(f"{kind} broker not reachable at {url.split('@')[-1]}")
        pytest.skip(f"{kind} broker not reachable")
    tag = uuid.uuid4().hex[:10]
    cfg = GopoConfig(
        broker=BrokerConfig(url=url, trajectory_queue=f"test.traj.{tag}", dead_letter_queue=f"test.dlq.{tag}",
                            weights_exchange=f"test.weights.{tag}", events_exchange=f"test.events.{tag}",
                            task_queue=f"test.tasks.{tag}",
                            connect_timeout_s=5.0, visibility_timeout_s=60.0),
        workers=WorkersConfig(max_retries=2, concurrency=2),
    )  # fmt: skip
    stub = StubRollout()
    app = make_app(cfg, url, WorkerContext(cfg=cfg, broker_url=url, rollout_fn=stub, retry_backoff_s=0.05))
    # Private test queues only: no remote-control fanout shared with other users of the broker.
    app.conf.worker_enable_remote_control = False
    # The worker's event loop sleeps until its next timer; a short AMQP heartbeat makes shutdown take < 1 s, not 10.
    app.conf.broker_heartbeat = 2
    results: list[dict] = []

    def on_postrun(sender=None, task_id=None, retval=None, **_: object) -> None:
        if sender is not None and sender.app is app and isinstance(retval, dict):
            results.append(retval)

    task_postrun.connect(on_postrun, weak=False)
    reqs = {p: EpisodeRequest(episode_id=f"{tag}-{p}", scenario_id="ecommerce", persona_id=p, seed=7)
            for p in ("ok", "flaky", "down", "bug")}  # fmt: skip
    try:
        with (
            start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING",
                         shutdown_timeout=20),
            TrajectoryConsumer(url, cfg) as consumer,
        ):  # fmt: skip
            for req in reqs.values():
                assert submit_episode(app, req) == req.episode_id
            app.send_task("gopo.run_episode", args=[{"episode_id": "", "persona_id": 3}],
                          queue=cfg.broker.task_queue, routing_key=cfg.broker.task_queue)  # fmt: skip

            got: dict[str, Trajectory] = {}
            deadline = time.monotonic() + 30
            while len(got) < 4 and time.monotonic() < deadline:
                for t in consumer.get_batch(4, timeout_s=0.5):
                    got[t.persona_id] = t

            # A redelivered (or resubmitted) episode that was already published is skipped, not replayed.
            submit_episode(app, reqs["ok"])
            deadline = time.monotonic() + 15
            while not any(r.get("status") == "duplicate" for r in results) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert consumer.get_batch(1, timeout_s=0.3) == []
    finally:
        task_postrun.disconnect(on_postrun)
        app.gopo_ctx.close()
        letters = get_dead_letters(url, cfg)
        depth = queue_depth(url, cfg)
        delete_topology(url, cfg)
        if app.gopo_done._redis is not None:
            for key in app.gopo_done._redis.scan_iter(match=f"{cfg.broker.task_queue}:done:*"):
                app.gopo_done._redis.delete(key)
        app.gopo_done.close()

    assert set(got) == {"ok", "flaky", "down", "bug"}
    assert got["ok"].status == "ok" and got["ok"].turns[0].cs_reply == "Hello!"
    assert got["flaky"].status == "ok"
    assert stub.calls[reqs["flaky"].episode_id] == 2  # one transient failure, one retry
    # Transient forever: 1 try + max_retries retries, then an explicit error record.
    assert stub.calls[reqs["down"].episode_id] == 3
    assert got["down"].status == "error" and "retries exhausted after 2 retries" in got["down"].error
    assert "TimeoutError" in got["down"].error
    # A non-transient failure is not retried: error record at once.
    assert stub.calls[reqs["bug"].episode_id] == 1
    assert got["bug"].status == "error" and "ValueError: scenario has no skills" in got["bug"].error
    assert stub.calls[reqs["ok"].episode_id] == 1  # the duplicate was skipped
    assert all(t.worker for t in got.values())
    assert [r["reason"].split(":")[0] for r in letters] == ["invalid EpisodeRequest"]
    assert depth["task"] == 0 and depth["trajectory"] == 0  # everything acked


def test_every_module_the_episode_path_imports_lazily_is_preimported() -> None:
    """The rollout threads must find every lazily imported module already loaded (see workers.app.preimport):
    scan the episode path's function-level imports and check each is in EPISODE_MODULES (or the stdlib)."""
    import ast
    import sys
    from pathlib import Path

    from workers.app import EPISODE_MODULES, preimport

    root = Path(__file__).resolve().parents[2]
    files = ["workers/rollout.py", "simulator/episode.py", "simulator/agenda.py", "simulator/user.py",
             "simulator/serving_adapters.py", "simulator/judging.py", "gopo_online/serving/client.py",
             "gopo_online/serving/agents.py", "gopo_online/serving/judge.py", "gopo_online/stream.py"]  # fmt: skip
    lazy = set()
    for rel in files:
        tree = ast.parse((root / rel).read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        lazy.add(node.module)
                    elif isinstance(node, ast.Import):
                        lazy.update(a.name for a in node.names)
    third_party = {m for m in lazy if m.split(".")[0] not in sys.stdlib_module_names}
    # the sentence-embedding model (torch) loads under SkillDistance's own lock, once per process
    missing = sorted(m for m in third_party - set(EPISODE_MODULES) if m != "gopo_online.serving.embedding")
    assert missing == [], f"add to workers.app.EPISODE_MODULES: {missing}"
    preimport()
