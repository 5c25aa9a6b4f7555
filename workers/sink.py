"""The controller's event sink: every event -> run_dir/metrics.jsonl (+ TensorBoard) and the live dashboard.

`consume(events)` folds the events the other parts sent on the events fanout (episodes from workers, steps and
pushes from the learner) and keeps what the controller steers by: the learner's step, the served policy
version, the recent token rate. `restart(r)` records a supervisor restart as a kind "restart" event and says so
on the console. `finish(run_dir)` leaves the dashboard's last frame in run_dir/dashboard.txt.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class EventSink:
    def __init__(self, metrics: Any, dashboard: Any, *, print_fn: Callable[[str], Any] | None = None) -> None:
        """`metrics`: a MetricsLogger (`.log(step, metrics, kind, payload)` returns the event written);
        `dashboard`: a Dashboard (`.feed(event)`)."""
        self.metrics = metrics
        self.dashboard = dashboard
        self.print = print_fn or (lambda s: print(s, flush=True))
        self.learner_step = 0
        self.version = 0
        self.restarts = 0
        self._tokens: deque[tuple[float, float]] = deque(maxlen=512)

    def record(self, kind: str, m: dict[str, float], payload: dict[str, Any] | None = None, step: int = 0) -> dict:
        event = self.metrics.log(step, m, kind, payload)
        self.dashboard.feed(event)
        return event

    def consume(self, events: Iterable[Any], on_episode: Callable[[str, str], Any] | None = None) -> int:
        """Record MonitorEvents from the fanout; `on_episode(episode_id, status)` for each episode event.
        Returns how many were recorded."""
        n = 0
        for ev in events:
            payload = ev.payload or {}
            if ev.kind == "episode":
                if on_episode is not None:
                    on_episode(str(payload.get("episode_id")), str(payload.get("status", "ok")))
                self._tokens.append((ev.time, ev.metrics.get("episode/tokens", 0.0)))
            elif ev.kind == "learner":
                self.learner_step = max(self.learner_step, ev.step)
            elif ev.kind == "push":
                self.version = max(self.version, int(ev.metrics.get("sys/policy_version", self.version)))
            self.record(ev.kind, dict(ev.metrics), payload or None, ev.step)
            n += 1
        return n

    def tokens_per_s(self, now: float | None = None, window_s: float = 60.0) -> float:
        now = time.time() if now is None else now
        recent = [k for t, k in self._tokens if now - t <= window_s]
        return sum(recent) / window_s if recent else 0.0

    def restart(self, r: Any, **extra: Any) -> dict:
        """A supervisor `Restart` -> one "restart" event and a console line."""
        self.restarts += 1
        payload = {**r.payload(), **extra}
        # the event contract's names (gopo_online.events.restart) beside the supervisor's own
        payload.setdefault("component", payload.get("part", "?"))
        payload.setdefault("reason", payload.get("error", ""))
        self.print(f"[train] restart: {payload['error']}")
        return self.record(
            "restart",
            {"sys/restarts": float(self.restarts), "sys/restart_downtime_s": float(r.downtime_s)},
            payload,
            step=self.restarts,
        )

    def error(self, text: str, source: str = "controller", **extra: Any) -> dict:
        """One "error" event; `extra` keys go into its payload beside `error` and `source`."""
        return self.record("error", {}, {**extra, "error": text[:4000], "source": source})

    def finish(self, run_dir: Path) -> None:
        (run_dir / "dashboard.txt").write_text(self.dashboard.snapshot_text())
