"""The cluster layout for real, without Docker: docker-compose.yml's services as separate processes on this box.

Each service is started by its own command, the one compose runs (gopo_online/layout.py): `serve --start policy`
(vLLM with LoRA hot-load), `learner`, two `worker`s and `train --no-spawn`, all with configs/cluster-local.toml,
wired only through the machine's RabbitMQ (per-run queue and exchange names, so runs sharing it never meet) and
the run folder. The workers play one episode at a time each. Once worker A is mid-episode (its task received, a
model request made) it is killed with SIGKILL; RabbitMQ gives its unacked episode back at once and worker B plays
it. The learner steps on 2 trajectories, pushes adapter v1 to the live server (the served version goes up) and
stops at run.max_steps = 1; the controller stops on the same budget with rc 0.

Asserted: the killed worker's episode was received by the other worker and finished there (or handed back at the
stop), nothing lost, no episode finished or trained twice; every process stopped cleanly and no descendant outlives
the test (process groups, killed in a finally).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from gopo_online import layout
from gopo_online.procutil import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cluster-local.toml"
AMQP_URL = os.environ.get("GOPO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
BUDGET = [
    "run.max_steps=1",  # one learner step and one push; the controller and the learner both stop on it
    "run.max_minutes=8",
    "simulator.max_turns=2",
    "simulator.mode=agenda",  # the user model, not the 135M model's JSON, decides a turn
    "simulator.max_tokens=48",
    "agents.cs.max_tokens=32",
    "judge.max_tokens=64",
    "learner.batch_episodes=2",
    "learner.group_size=2",  # GRPO groups of 2: the first batch is episodes 0 and 1, the victim's among them
    "learner.push_every=1",
    "learner.max_staleness=1",
    "learner.checkpoint_every=1",
    "workers.concurrency=1",  # one episode per worker: the killed one holds exactly one
    "workers.max_in_flight=2",
    "dashboard.tensorboard=false",
]
RECEIVED = re.compile(r"Task gopo\.run_episode\[([^\]]+)\] received")
SUCCEEDED = re.compile(r"Task gopo\.run_episode\[([^\]]+)\] succeeded")


def _reachable(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as c:
            c.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:  # noqa: BLE001
        return False


class Service:
    """One `gopo-online <service>` process in its own process group, its output in logs/<name>.out."""

    def __init__(self, name: str, service: str, sets: list[str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.out"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        argv = [sys.executable, "-m", "gopo_online.cli", *layout.argv(service, CONFIG, sets)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
        self.killed = False
        """Set when the test kills it on purpose."""
        self.seen: set[int] = set()
        """Every descendant pid ever seen (vLLM's engine core lives in a session of its own)."""

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def watch(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self) -> list[int]:
        alive = []
        for pid in {self.proc.pid, *self.seen}:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def kill_all(self) -> None:
        self.signal(signal.SIGKILL)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.wait(10)
        self._log.close()


def _until(pred, timeout_s: float, what: str, services: list[Service], step: float = 0.2):
    """Poll `pred` until truthy; fail at once (with every log tail) when a service not yet killed by the test
    exits with an error, since nothing restarts a part in this layout."""
    deadline = time.time() + timeout_s
    failed = None
    while time.time() < deadline and failed is None:
        for s in services:
            s.watch()
        v = pred()
        if v:
            return v
        failed = next((s for s in services if not s.killed and s.proc.poll() not in (None, 0)), None)
        time.sleep(step)
    tails = "\n".join(f"--- {s.name} (rc {s.proc.poll()})\n{s.output()[-2500:]}" for s in services)
    why = f"{failed.name} exited with {failed.proc.returncode}" if failed else f"none within {timeout_s:.0f}s"
    raise AssertionError(f"waiting for {what}: {why}\n{tails}")


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _served_adapters(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return [str(m.get("root", "")) for m in json.loads(r.read())["data"]]


def _delete_entities(names: list[str]) -> None:
    """The run's durable queues and exchanges off the shared RabbitMQ (fanout queues are auto-delete)."""
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=5) as conn:
        for name in names:
            for op in ("queue_delete", "exchange_delete"):
                with contextlib.suppress(Exception):
                    getattr(conn.channel(), op)(name)


@pytest.mark.skipif(not _reachable(AMQP_URL), reason=f"RabbitMQ not reachable at {AMQP_URL}")
def test_cluster_layout_as_processes_survives_a_worker_killed_mid_episode(tmp_path: Path, tiny_model: str) -> None:
    t0 = time.time()
    ns = f"gopo-test-{uuid.uuid4().hex[:10]}"
    names = {k: f"{ns}.{k}" for k in ("episodes", "trajectories", "dead_letter", "weights", "events")}
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "cluster"
    sets = [
        *BUDGET,
        f"run.output_dir={json.dumps(str(tmp_path))}",
        f"run.name={json.dumps(run_dir.name)}",
        f"broker.url={json.dumps(AMQP_URL)}",
        f"broker.task_queue={json.dumps(names['episodes'])}",
        f"broker.trajectory_queue={json.dumps(names['trajectories'])}",
        f"broker.dead_letter_queue={json.dumps(names['dead_letter'])}",
        f"broker.weights_exchange={json.dumps(names['weights'])}",
        f"broker.events_exchange={json.dumps(names['events'])}",
        f"serving.policy.url={json.dumps(url)}",
        f"model.path={json.dumps(tiny_model)}",  # the machinery under test, not what a model writes
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    services: list[Service] = []
    try:
        # the server and the learner take longest to be ready: start them, and the workers, at once
        server = Service("serve", "vllm-policy", sets, logs)
        learner = Service("learner", "learner", sets, logs)
        workers = [Service(f"worker-{i}", "worker", sets, logs) for i in range(2)]
        services += [server, learner, *workers]
        _until(lambda: f"[serve] policy: {url}/v1" in server.output() or server.proc.poll() is not None,
               240, "policy server", services)  # fmt: skip
        assert server.proc.poll() is None, server.output()[-3000:]
        assert not [a for a in _served_adapters(url) if "lora-v" in a]  # the base model only, before any push
        # the controller refits the server to the learner's last push, then dispatches
        controller = Service("controller", "controller", sets, logs)
        services.append(controller)

        def mid_episode() -> tuple[Service, list[str]] | None:
            for w in workers:
                text = w.output()
                held = sorted(set(RECEIVED.findall(text)) - set(SUCCEEDED.findall(text)))
                # a model request logged by this worker process: the episode is being played, not just received
                made_request = any(
                    p.stat().st_size for p in (run_dir / "requests").glob(f"*-{w.proc.pid}.jsonl")
                ) if (run_dir / "requests").is_dir() else False  # fmt: skip
                if held and made_request:
                    return w, held
            return None

        victim, held = _until(mid_episode, 240, "a worker playing an episode", services)
        survivor = next(w for w in workers if w is not victim)
        victim.killed = True
        victim.signal(signal.SIGKILL)
        t_kill = time.time()
        assert victim.wait(10) == -signal.SIGKILL
        # RabbitMQ hands the dead consumer's unacked episode to the other worker at once (no visibility timeout)
        _until(lambda: set(held) <= set(RECEIVED.findall(survivor.output())), 60, "redelivery to the survivor",
               services)  # fmt: skip
        redelivered_s = time.time() - t_kill

        rc = _until(lambda: controller.proc.poll() is not None and (controller.proc.returncode,), 540,
                    "controller stop", services)[0]  # fmt: skip
        out = controller.output()
        assert rc == 0, out[-4000:]
        assert "stopping: max_steps=1 reached" in out, out[-2000:]
        assert learner.wait(120) == 0, learner.output()[-3000:]  # stopped itself at max_steps, checkpoint written
        # the push went live: the server lists the v1 adapters the learner wrote
        assert any(a.endswith("lora-v1") for a in _served_adapters(url)), _served_adapters(url)

        events = _events(run_dir)
        pushes = [e["metrics"]["sys/policy_version"] for e in events if e["kind"] == "push"]
        assert pushes and max(pushes) == 1, pushes
        assert [e["step"] for e in events if e["kind"] == "learner"] == [1]
        finished = Counter(e["payload"]["episode_id"] for e in events if e["kind"] == "episode")
        assert finished and max(finished.values()) == 1, finished  # none finished twice
        state = json.loads((run_dir / "controller.json").read_text())
        handed_back = {p["episode_id"] for p in state["handed_back"]}
        assert state["lost"] == 0, state
        # the held episode: finished by the survivor, or handed back at the stop; never lost
        done_by_survivor = set(SUCCEEDED.findall(survivor.output()))
        for eid in held:
            assert (eid in finished and eid in done_by_survivor) or eid in handed_back, (eid, finished, state)
        from gopo_online.trajectory_store import read_records

        trained = Counter(r["episode_id"] for r in read_records(run_dir, dedupe=False) if r.get("outcome") == "trained")
        assert sum(trained.values()) >= 2 and max(trained.values()) == 1, trained  # trained at most once

        # stop the rest as an operator would: workers cold (SIGQUIT, episodes go back unacked), the server SIGTERM
        for w in [survivor]:
            w.signal(signal.SIGQUIT)
        server.signal(signal.SIGTERM)
        assert survivor.wait(30) is not None, survivor.output()[-2000:]
        assert server.wait(60) == 0, server.output()[-2000:]
        assert "[serve] stopped" in server.output()
        time.sleep(1.0)
        orphans = {s.name: s.leftovers() for s in services if s.leftovers()}
        assert not orphans, orphans
        print(
            f"[cluster] wall {time.time() - t0:.0f}s; killed {victim.name} holding {held}, received by "
            f"{survivor.name} after {redelivered_s:.1f}s; finished {sorted(finished)}, handed back "
            f"{sorted(handed_back)}, trained {sorted(trained)}"
        )
    finally:
        for s in services:
            s.kill_all()
        _delete_entities(list(names.values()))
