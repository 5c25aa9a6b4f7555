"""`bench --only scale`: the orchestration ceiling, with the model taken out.

The instant-reply load server (`gopo_online.loadserver`: a real HTTP server on loopback answering well-formed
completions with token ids and logprobs) replaces vLLM. Everything else is the production path: the controller's
`Dispatcher` makes the requests, a real Celery worker (threads pool, concurrency N) on a real embedded Redis plays
them with the real served agents, user simulator and judge (`workers.rollout.default_deps`), publishes the
trajectories, and the learner's `TrajectoryConsumer` takes them in. For N in 1, 2, 4, 8, 16, 64 concurrent episodes
it measures episodes/min end to end (N kept in flight), then the broker -> learner ingest rate of a backlog of the
same trajectories. Lives in workers/ (it drives the worker and the simulator; gopo_online/ may not import them).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig

LEVELS = (1, 2, 4, 8, 16, 64)


def _episodes_for(n: int) -> int:
    return 2 * n + 8


def run_level(
    cfg: GopoConfig, redis_url: str, load_root: str, n: int, run_dir: Path, episodes: int | None = None
) -> dict[str, Any]:
    """Play `episodes` (default `_episodes_for(n)`) episodes with n in flight through a real worker; returns the
    measurements."""
    from celery.contrib.testing.worker import start_worker

    from gopo_online.stream import TrajectoryConsumer, TrajectoryPublisher, delete_topology
    from gopo_online.timings import episode_phases
    from workers.app import make_app
    from workers.controller import Dispatcher

    tag = uuid.uuid4().hex[:8]
    data = cfg.model_dump(mode="json")
    data["broker"].update(
        url=redis_url,
        trajectory_queue=f"bench.traj.{tag}",
        dead_letter_queue=f"bench.dlq.{tag}",
        weights_exchange=f"bench.weights.{tag}",
        events_exchange=f"bench.events.{tag}",
        task_queue=f"bench.tasks.{tag}",
    )
    data["workers"].update(count=1, concurrency=n, max_in_flight=None)
    data["serving"]["policy"]["url"] = load_root
    data["run"].update(output_dir=str(run_dir), name=f"scale-{n}")
    c = GopoConfig.model_validate(data)
    total = episodes or _episodes_for(n)
    app = make_app(c, redis_url)
    app.conf.worker_enable_remote_control = False
    dispatcher = Dispatcher(c)
    got: list[Any] = []
    try:
        with (
            start_worker(app, pool="threads", concurrency=n, perform_ping_check=False, loglevel="WARNING",
                         shutdown_timeout=30),
            TrajectoryConsumer(redis_url, c) as consumer,
        ):  # fmt: skip
            sent = 0

            def send() -> None:
                nonlocal sent
                req = dispatcher.request(sent, 0).model_copy(update={"dispatched_at": time.time()})
                app.send_task("gopo.run_episode", args=[req.model_dump(mode="json")], task_id=req.episode_id,
                              queue=c.broker.task_queue, serializer="json")  # fmt: skip
                sent += 1

            t0 = time.perf_counter()
            for _ in range(min(n, total)):
                send()
            deadline = time.monotonic() + 600
            while len(got) < total and time.monotonic() < deadline:
                batch = consumer.get_batch(n, timeout_s=0.2)
                got += batch
                for _ in batch:
                    if sent < total:
                        send()
            wall = time.perf_counter() - t0
            if len(got) < total:
                raise RuntimeError(f"scale N={n}: {len(got)}/{total} episodes within 600 s")

            # ingest: a backlog of the same trajectories (fresh ids), drained by the learner's consumer
            with TrajectoryPublisher(redis_url, c) as pub:
                for i, t in enumerate(got):
                    pub.publish(t.model_copy(update={"episode_id": f"{t.episode_id}-copy{i}"}))
            t1 = time.perf_counter()
            drained = 0
            while drained < len(got) and time.perf_counter() - t1 < 120:
                drained += len(consumer.get_batch(64, timeout_s=0.2))
            ingest_s = time.perf_counter() - t1
    finally:
        app.gopo_ctx.close()
        app.gopo_done.close()
        delete_topology(redis_url, c)
    errors = [t.error for t in got if t.status != "ok"]
    phases = [episode_phases(t) for t in got]
    size = statistics.mean(len(t.to_json()) for t in got)
    return {
        "n": n,
        "episodes": len(got),
        "wall_s": wall,
        "episodes_per_min": 60.0 * len(got) / wall,
        "turns_per_episode": statistics.mean(len(t.turns) for t in got),
        "errors": len(errors),
        "first_error": errors[0][:300] if errors else None,
        "ingest_per_s": drained / ingest_s if ingest_s > 0 else float("inf"),
        "traj_bytes": size,
        "queue_s_p50": statistics.median(p.get("queue", 0.0) for p in phases),
        "episode_s_p50": statistics.median(p["episode"] for p in phases),
    }


def bench_scale(
    cfg: GopoConfig, levels: tuple[int, ...] = LEVELS, broker: str | None = None, episodes: int | None = None
) -> list[Row]:
    """Rows `scale.N<n>.episodes_per_min` and `scale.N<n>.ingest_traj_per_s` per concurrency level. `broker`: a
    broker URL to use instead of a fresh embedded Redis."""
    import contextlib
    import logging

    from gopo_online.broker import EmbeddedRedis
    from gopo_online.loadserver import LoadServer

    logging.getLogger("celery").setLevel(logging.ERROR)
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="gopo-scale-") as tmp,
        EmbeddedRedis(Path(tmp) / "redis") if broker is None else contextlib.nullcontext() as redis,
        LoadServer((cfg.model.served_name,)) as load,
    ):
        url = broker or redis.url
        for n in levels:
            r = run_level(cfg, url, load.root_url, n, Path(tmp) / "runs", episodes)
            ctx = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "episodes_per_min"}
            rows.append(_row("scale", f"N{n}.episodes_per_min", r["episodes_per_min"], "episodes/min", **ctx))
            rows.append(_row("scale", f"N{n}.ingest_traj_per_s", r["ingest_per_s"], "traj/s", n=n,
                             traj_bytes=round(r["traj_bytes"])))  # fmt: skip
        rows.append(_row("scale", "load_server_requests", load.requests, "requests"))
    return rows
