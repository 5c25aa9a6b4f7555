"""EventSink: events -> metrics.jsonl and the dashboard; restarts as kind "restart" events (real logger)."""

from __future__ import annotations

import json
from pathlib import Path

from gopo_online.config import DashboardConfig
from gopo_online.dashboard import Dashboard
from gopo_online.metrics_log import MetricsLogger
from gopo_online.stream import MonitorEvent
from workers.supervisor import Restart


def _sink(tmp_path: Path):
    from workers.sink import EventSink

    printed: list[str] = []
    m = MetricsLogger(tmp_path, jsonl=True, tensorboard=False)
    return EventSink(m, Dashboard(DashboardConfig(), "t"), print_fn=printed.append), m, printed


def test_consume_tracks_step_version_episodes(tmp_path: Path) -> None:
    sink, m, _ = _sink(tmp_path)
    seen: list[tuple[str, str]] = []
    evs = [
        MonitorEvent(
            kind="episode",
            time=100.0,
            metrics={"episode/tokens": 120.0},
            payload={"episode_id": "ep-1", "status": "ok"},
        ),  # fmt: skip
        MonitorEvent(kind="learner", step=3, time=101.0, metrics={"loss/policy": 0.5}),
        MonitorEvent(kind="push", step=2, time=102.0, metrics={"sys/policy_version": 2.0}),
        MonitorEvent(kind="push", step=1, time=103.0, metrics={"sys/policy_version": 1.0}),  # late, older
        MonitorEvent(kind="episode", time=104.0, payload={"episode_id": "ep-2", "status": "error"}),
    ]
    assert sink.consume(evs, lambda e, s: seen.append((e, s))) == 5
    assert seen == [("ep-1", "ok"), ("ep-2", "error")]
    assert sink.learner_step == 3 and sink.version == 2  # versions only move forward
    assert sink.tokens_per_s(now=130.0) == 2.0 and sink.tokens_per_s(now=500.0) == 0.0
    m.close()
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["episode", "learner", "push", "push", "episode"]


def test_restart_event_in_metrics_and_dashboard(tmp_path: Path) -> None:
    sink, m, printed = _sink(tmp_path)
    r = Restart(part="worker-0", exit_code=-9, attempt=1, backoff_s=1.0, downtime_s=1.4, total_restarts=1)
    sink.restart(r, redelivered=["ep-7"])
    m.close()
    (ev,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ev["kind"] == "restart" and ev["payload"]["part"] == "worker-0" and ev["payload"]["redelivered"] == ["ep-7"]
    assert ev["metrics"]["sys/restarts"] == 1.0 and ev["metrics"]["sys/restart_downtime_s"] == 1.4
    assert printed and "worker-0 died (exit code -9)" in printed[0]
    text = sink.dashboard.snapshot_text()
    assert "1 restarts" in text and "restart worker-0" in text
    sink.finish(tmp_path)
    assert "1 restarts" in (tmp_path / "dashboard.txt").read_text()
