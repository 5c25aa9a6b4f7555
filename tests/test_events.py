"""The event contract: one record from producer to metrics.jsonl, TensorBoard and the dashboard, no renaming."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from gopo_online import events
from gopo_online.dashboard import DashboardState
from gopo_online.events import EVENT_KINDS, KIND_KEYS, Event, Key
from gopo_online.metrics_log import MetricsLogger, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_constructors_set_their_kinds_keys_and_reject_bad_input() -> None:
    built = [
        events.learner({"loss/cs": 0.5, Key.LEARNER_VERSION: 2, "flag": True, "bad": math.nan}, step=3, wall_s=1.5),
        events.push(4, 0.25, {"expert": "expert", "cs": "cs"}),
        events.restart("worker-1", "exit code -9", restarts=2),
        events.system({Key.QUEUE_DEPTH: 3}),
        events.error("learner", "boom"),
    ]
    for ev in built:
        assert ev.kind in EVENT_KINDS and set(KIND_KEYS[ev.kind]) <= set(ev.metrics), ev
    assert set(built[0].metrics) == {"loss/cs", Key.LEARNER_VERSION, Key.STEP_WALL_S}  # NaN and bools dropped
    with pytest.raises(ValidationError):
        Event(kind="learnr")
    with pytest.raises(ValidationError):
        Event(kind="system", metrics={"x": math.inf})
    assert set(KIND_KEYS) == set(EVENT_KINDS)


def test_one_event_reaches_the_file_tensorboard_and_the_dashboard_unchanged(tmp_path: Path) -> None:
    stats = {Key.LOSS_EXPERT: 0.4, Key.TRAINED_VERSION: 1, Key.COST_LAMBDA: 0.2, Key.STALE_DROPPED: 5}
    sent = [
        events.push(2, 0.3, {"expert": "expert"}),
        events.learner(stats, step=7, wall_s=2.0),
        events.restart("worker-0", "killed", restarts=1),
        events.system({Key.SERVER_TOKENS_PER_S: 812.0}),
    ]
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        for ev in sent:
            log.log_event(ev)
    lines, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert lines == [ev.record() for ev in sent]  # the line IS the event
    assert any((tmp_path / "tb").iterdir())
    live, attached = DashboardState(start_time=0.0), DashboardState(start_time=0.0)
    for ev in sent:
        live.fold(ev.record())
    for line in lines:
        attached.fold(line)
    for state in (live, attached):
        # the learner's own keys are read as they are: no dashboard-only names
        assert state.trained_version == 1 and state.lam == 0.2 and state.stale_dropped == 5
        assert state.policy_version == 2 and state.version_lag == 1 and state.losses == {Key.LOSS_EXPERT: 0.4}
        assert state.restarts == 1 and "worker-0 restarted: killed" in state.errors[-1][2]
        assert state.server_tokens_per_s == 812.0
    assert "server_tok/s=812" in live.summary_line(now=10.0) and "restarts=1" in live.summary_line(now=10.0)


def test_event_kinds_are_spelled_only_in_events_py() -> None:
    """No module keeps its own list of kinds (they were in three places)."""
    offenders = []
    for pkg in ("gopo_online", "trainer", "workers", "simulator"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name == "events.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Tuple | ast.List | ast.Set):
                    names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                    if {"episode", "learner", "push"} <= names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and "episode|learner" in node.value:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
