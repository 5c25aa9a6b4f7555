"""Metrics on disk: one JSON line per event in `run_dir/metrics.jsonl`, and TensorBoard scalars in `run_dir/tb`.

The JSONL file is the job's record and what `gopo-online dashboard` follows, so it is append-only (a resumed
run continues it) and each event is written with a single `os.write` of a whole line on an `O_APPEND` file
descriptor: a reader never sees two events interleaved, and at worst sees a half-written last line after a
crash, which `read_metrics` leaves unread until it is complete.

TensorBoard events are written with tensorboard's own `EventFileWriter` and protobufs (no torch import), loaded
on first use so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gopo_online.events import EVENT_KINDS, EventKind

if TYPE_CHECKING:
    from gopo_online.events import Event

__all__ = ["EVENT_KINDS", "EventKind", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _clean(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Floats only; non-finite values are left out (JSON has no NaN, and a NaN point only breaks a plot)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"metric keys must be non-empty strings, got {k!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"metric {k!r} is not a number: {v!r}") from None
        if math.isfinite(f):
            out[k] = f
    return out


class MetricsLogger:
    """Appends events to `run_dir/metrics.jsonl` and scalars to `run_dir/tb`.

    `fsync=True` makes every event durable before `log` returns (one disk sync per event); by default the
    line reaches the OS at once (readers see it) and is synced on `sync()` / `close()`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        jsonl: bool = True,
        tensorboard: bool = True,
        *,
        fsync: bool = False,
        filename: str = METRICS_FILE,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.tb_dir = self.run_dir / TB_DIR
        self._fsync = fsync
        self._fd: int | None = None
        self._tb: Any = None
        self._tb_enabled = tensorboard
        if jsonl:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._seal_partial_line()

    def _seal_partial_line(self) -> None:
        # A crash mid-write can leave a line without its newline; appending straight after it would glue the
        # next event onto the fragment and lose both. A newline isolates the fragment (readers skip it).
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def _writer(self) -> Any:
        if self._tb is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.tb_dir.mkdir(parents=True, exist_ok=True)
            self._tb = EventFileWriter(str(self.tb_dir))
        return self._tb

    def log(
        self,
        step: int,
        metrics: Mapping[str, float],
        kind: EventKind,
        payload: Mapping[str, Any] | None = None,
        *,
        time_s: float | None = None,
    ) -> dict[str, Any]:
        """Record one event and return it as written.

        step: the event's own counter (episode index for "episode", learner step for "learner", policy
        version for "push", any monotone counter for "system"); it is TensorBoard's x axis.
        metrics: namespaced keys (`reward/…`, `loss/…`, `episode/…`, `sys/…`) -> numbers; non-finite dropped.
        payload: optional JSON-able extras (dialogue excerpt, error text, persona group).
        """
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
        event: dict[str, Any] = {
            "time": time.time() if time_s is None else float(time_s),
            "step": int(step),
            "kind": kind,
            "metrics": _clean(metrics),
        }
        if payload:
            event["payload"] = dict(payload)
        if self._fd is not None:
            line = (json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()
            os.write(self._fd, line)  # one write of a whole line on O_APPEND: line-atomic for readers
            if self._fsync:
                os.fsync(self._fd)
        if self._tb_enabled and event["metrics"]:
            self._write_scalars(event)
        return event

    def log_event(self, event: Event) -> dict[str, Any]:
        """Record a gopo_online.events `Event` (its own time); returns the line as written."""
        return self.log(event.step, event.metrics, event.kind, event.payload, time_s=event.time)

    def _write_scalars(self, event: dict[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in event["metrics"].items()]
        )
        self._writer().add_event(event_pb2.Event(wall_time=event["time"], step=event["step"], summary=summary))

    def sync(self) -> None:
        """Make everything logged so far durable (JSONL fsync, TensorBoard flush)."""
        if self._fd is not None:
            os.fsync(self._fd)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path, from_offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events of complete lines from byte `from_offset` on, and the offset to continue from.

    A last line without its newline (a writer mid-write, or a crash) is not consumed: the returned offset
    points at its start so the next call reads it once complete. A complete line that is not a JSON object
    with a `kind` (a fragment sealed off after a crash) is skipped. A missing file is `FileNotFoundError`.
    """
    with open(path, "rb") as f:
        f.seek(from_offset)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], from_offset
    events = []
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            ev = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(ev, dict) and "kind" in ev:
            events.append(ev)
    return events, from_offset + end + 1
