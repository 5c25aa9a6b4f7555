"""The request log of a run: one JSON line per model request a worker made, so a bench can replay the same engine
work against a bare server (`bench --only loop`) and a person can see what each turn cost.

A line is either a request
    {"type": "request", "t": unix start, "model": served name or adapter, "prompt_tokens": n,
     "prompt_token_ids": [...], "completion_tokens": n, "max_tokens": n, "temperature": x,
     "structured": "grammar" | "regex" | "json" | "choice" | null, "structured_id": sha1 or null,
     "latency_s": x, "finish_reason": "..."}
or, the first time a structured-output spec is seen in this file, its text
    {"type": "spec", "id": sha1, "structured": {...}}.
Files live under run_dir/requests/, one per worker process (no two processes append to one file). Writing is best
effort: a full disk costs log lines, never an episode. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STRUCTURED_KINDS = ("grammar", "regex", "json", "choice")


def structured_kind(structured: Mapping[str, Any] | None) -> str | None:
    """Which structured-output kind a vLLM `structured_outputs` dict asks for (None: free text)."""
    if not structured:
        return None
    return next((k for k in STRUCTURED_KINDS if k in structured), "other")


def spec_id(structured: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(structured, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RequestLog:
    """Thread-safe JSONL appender of model requests (`ChatClient.request_log`)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._specs: set[str] = set()
        self._warned = False
        self.count = 0

    def record(
        self,
        *,
        model: str,
        prompt_token_ids: Sequence[int],
        prompt_tokens: int | None,
        completion_tokens: int,
        max_tokens: int,
        temperature: float,
        structured: Mapping[str, Any] | None,
        latency_s: float,
        finish_reason: str | None,
        started_at: float | None = None,
    ) -> None:
        kind = structured_kind(structured)
        sid = spec_id(structured) if structured else None
        line = {
            "type": "request",
            "t": round(started_at if started_at is not None else time.time() - latency_s, 3),
            "model": model,
            "prompt_tokens": int(prompt_tokens if prompt_tokens is not None else len(prompt_token_ids)),
            "prompt_token_ids": [int(t) for t in prompt_token_ids],
            "completion_tokens": int(completion_tokens),
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "structured": kind,
            "structured_id": sid,
            "latency_s": round(latency_s, 4),
            "finish_reason": finish_reason,
        }
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    if sid is not None and sid not in self._specs:
                        f.write(json.dumps({"type": "spec", "id": sid, "structured": dict(structured or {})}) + "\n")
                        self._specs.add(sid)
                    f.write(json.dumps(line) + "\n")
                self.count += 1
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("request log %s: cannot write (%r); further lines are dropped silently", self.path, e)


def read_requests(paths: Sequence[Path | str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(requests sorted by start time, spec id -> structured dict) of one or more request-log files. A line that
    is not JSON or has no `type` is a ValueError naming the file and line."""
    reqs: list[dict[str, Any]] = []
    specs: dict[str, dict[str, Any]] = {}
    for p in paths:
        for i, line in enumerate(_lines(Path(p)), 1):
            try:
                obj = json.loads(line)
                kind = obj["type"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{i}: not a request-log line ({e}): {line[:120]!r}") from None
            if kind == "spec":
                specs[obj["id"]] = obj["structured"]
            elif kind == "request":
                reqs.append(obj)
    reqs.sort(key=lambda r: r["t"])
    return reqs, specs


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def summarize(reqs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per model/adapter and structured kind: requests, mean prompt tokens, mean completion tokens, mean latency."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in reqs:
        groups.setdefault(f"{r['model']}/{r['structured'] or 'text'}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in sorted(groups.items()):
        n = len(rs)
        out[key] = {
            "requests": n,
            "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / n, 1),
            "completion_tokens": round(sum(r["completion_tokens"] for r in rs) / n, 1),
            "max_tokens": max(r["max_tokens"] for r in rs),
            "latency_s": round(sum(r["latency_s"] for r in rs) / n, 3),
        }
    return out
