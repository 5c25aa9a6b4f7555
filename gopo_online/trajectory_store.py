"""Every finished trajectory of a run, kept: ``run_dir/trajectories/part-NNNNNN.jsonl`` (rotated JSONL).

The consumer side writes it (the learner, right after the step that saw the batch and before it acks the
messages), so a trajectory the learner drops as stale, or an error episode it skips, is kept all the same. Each
line is one record::

    {"stored_at", "outcome", "learner_version", "episode_id", "trajectory": {...the Trajectory JSON...}}

with ``outcome`` one of `OUTCOMES`: "trained", "dropped_stale" (older than ``learner.max_staleness`` versions),
"rejected_future" (a policy version the learner never published), "sim_flagged" (excluded: the simulator's
quality gates flagged it),
"error" (an error episode: nothing to train on) or "dead_lettered" (a message that was not a valid trajectory:
the record has ``reason`` and the first bytes of the ``body`` instead of a trajectory).

Appends are one `os.write` of a whole line on an ``O_APPEND`` descriptor, so a reader never sees two records
interleaved; a part is closed and the next one started once it passes ``max_bytes``. A redelivered message (the
learner died between writing and acking) is written again: readers keep the LAST record of an episode id.
`gopo-online show` reads it (`read_records`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from gopo_online.types import Trajectory

__all__ = ["OUTCOMES", "Outcome", "TrajectoryStore", "read_records"]

Outcome = Literal["trained", "dropped_stale", "rejected_future", "sim_flagged", "error", "dead_lettered"]
OUTCOMES: tuple[str, ...] = ("trained", "dropped_stale", "rejected_future", "sim_flagged", "error", "dead_lettered")
STORE_DIR = "trajectories"
MAX_PART_BYTES = 64 * 1024 * 1024
MAX_DEAD_BODY = 64 * 1024
"""Bytes of a dead letter's body kept (the broker's dead-letter queue keeps the whole message)."""
_PART_RE = re.compile(r"^part-(\d{6})\.jsonl$")


def _parts(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _PART_RE.match(p.name))


class TrajectoryStore:
    """Appends trajectory records to ``run_dir/trajectories``; one writer per run (the learner)."""

    def __init__(self, run_dir: Path | str, *, max_bytes: int = MAX_PART_BYTES, fsync: bool = False) -> None:
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
        self.root = Path(run_dir) / STORE_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._fsync = fsync
        parts = _parts(self.root)
        self._index = int(_PART_RE.match(parts[-1].name).group(1)) if parts else 1  # type: ignore[union-attr]
        self._fd: int | None = None
        self._open()

    @property
    def path(self) -> Path:
        return self.root / f"part-{self._index:06d}.jsonl"

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:  # a crash mid-line: isolate the fragment so readers skip it
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError("the trajectory store is closed")
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()
        size = os.fstat(self._fd).st_size
        if size and size + len(line) > self.max_bytes:
            os.fsync(self._fd)
            os.close(self._fd)
            self._index += 1
            self._open()
        os.write(self._fd, line)
        if self._fsync:
            os.fsync(self._fd)

    def append(self, traj: Trajectory, outcome: Outcome, learner_version: int | None = None) -> None:
        if outcome not in OUTCOMES or outcome == "dead_lettered":
            raise ValueError(
                f"a trajectory's outcome is one of {[o for o in OUTCOMES if o != 'dead_lettered']}, got {outcome!r}"
            )
        self._write(
            {
                "stored_at": time.time(),
                "outcome": outcome,
                "learner_version": learner_version,
                "episode_id": traj.episode_id,
                "trajectory": json.loads(traj.to_json()),
            }
        )

    def append_batch(self, outcomes: Iterable[tuple[Trajectory, Outcome]], learner_version: int | None) -> None:
        for traj, outcome in outcomes:
            self.append(traj, outcome, learner_version)

    def dead_letter(self, reason: str, body: bytes | str | None) -> None:
        """A message the consumer could not use (kept with its reason and the start of its body)."""
        if isinstance(body, bytes):
            text = body[:MAX_DEAD_BODY].decode("utf-8", errors="replace")
        else:
            text = (body or "")[:MAX_DEAD_BODY]
        self._write({"stored_at": time.time(), "outcome": "dead_lettered", "reason": reason[:4000], "body": text})

    def recorded(self, episode_ids: Iterable[str], parts: int = 2) -> set[str]:
        """Which of `episode_ids` have a record in the newest `parts` part files (a resumed learner asks about its
        checkpoint's last batch, written moments before it died: never further back)."""
        want = set(episode_ids)
        found: set[str] = set()
        for part in _parts(self.root)[-parts:]:
            with open(part, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        continue
                    try:
                        eid = json.loads(raw).get("episode_id")
                    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                        continue
                    if eid in want:
                        found.add(eid)
        return found

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(run_dir: Path | str, *, dedupe: bool = True) -> Iterator[dict[str, Any]]:
    """The store's records in write order; with `dedupe`, only the LAST record of each episode id (in the
    position of its first one). Incomplete or unreadable lines (a crash mid-write) are skipped."""
    records: list[dict[str, Any]] = []
    where: dict[str, int] = {}
    for part in _parts(Path(run_dir) / STORE_DIR):
        with open(part, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if not isinstance(rec, dict) or rec.get("outcome") not in OUTCOMES:
                    continue
                eid = rec.get("episode_id")
                if dedupe and eid is not None and eid in where:
                    records[where[eid]] = rec
                    continue
                if eid is not None:
                    where[eid] = len(records)
                records.append(rec)
    yield from records
