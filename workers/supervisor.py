"""Supervision of `gopo-online train`'s parts: a part that dies is restarted with backoff, within a budget.

A *part* is anything the controller started and can start again: a `gopo-online worker` / `learner` child
process (`Child`), the vLLM policy server, the embedded Redis. `Supervisor.check()` is called from the
controller's loop (never blocks for a backoff): it notices a dead part, waits out its backoff, restarts it, and
returns one `Restart` record per restart, which the controller writes as a kind "restart" event (metrics.jsonl,
dashboard). A part that dies more than `max_restarts` times within `window_s` seconds makes `check()` raise
`GaveUp`, whose message is the report: which part, how often, its exit codes and the tail of its log.

What a restart must also do (refit a restarted server before it serves, re-dispatch the episodes a dead worker
held) is the part's `after_restart` hook / the controller's `on_death` hook, so this module knows no broker
and no server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gopo_online.procutil import die_with_parent, tail_lines

log = logging.getLogger("gopo.supervisor")


class Child:
    """A `gopo-online <job>` child process with its log file; dies with the controller (PR_SET_PDEATHSIG).

    `spawn()` (called by the constructor) starts it again after it died: same arguments, same log file (appended).
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str],
        grace_s: float,
        *,
        stop_signal: int = signal.SIGINT,
        argv0: list[str] | None = None,
    ) -> None:
        self.grace_s = grace_s
        self.name = name
        self.args = list(args)
        self.env = env
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.argv0 = argv0 if argv0 is not None else [sys.executable, "-m", "gopo_online.cli"]
        self._log: Any = None
        self.proc: subprocess.Popen[bytes]
        self.spawn()

    def spawn(self) -> None:
        if self._log is not None:
            self._log.close()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [*self.argv0, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # Ctrl-C in the terminal reaches only the controller, which stops us in order
            preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509 - last resort; Child.stop is the normal path
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        return tail_lines(self.log_path, n)

    def stop(self) -> int | None:
        """`stop_signal` (SIGINT: the learner checkpoints), then SIGTERM, then SIGKILL, each after its grace period.
        SIGQUIT (a worker: Celery's cold shutdown) or SIGKILL skip SIGTERM. Idempotent."""
        if self.alive():
            steps = [(self.stop_signal, self.grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)]
            if self.stop_signal in (signal.SIGKILL, signal.SIGQUIT):
                # a cold stop (a Celery worker: its episodes are handed back, not finished): no SIGTERM, whose
                # warm shutdown would wait for them
                steps = [(self.stop_signal, self.grace_s), (signal.SIGKILL, 5.0)]
                if self.stop_signal == signal.SIGKILL:
                    steps = steps[1:]
            for sig, wait in steps:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what the child itself started (none today) goes too
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def stop_all(children: list[Child]) -> None:
    """Stop several children concurrently (each with its own signal sequence and grace periods)."""
    import threading

    threads = [threading.Thread(target=c.stop, name=f"stop-{c.name}") for c in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class RestartPolicy:
    """Exponential backoff with jitter between restarts of one part, and a budget of restarts per window."""

    max_restarts: int = 5
    """Restarts of ONE part allowed within `window_s`; one more death and the run gives up."""
    window_s: float = 600.0
    backoff_s: float = 1.0
    """Delay before the first restart; doubled for each further restart within the window."""
    max_backoff_s: float = 30.0
    jitter: float = 0.2
    """Each delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""

    def delay(self, recent: int, rng: random.Random | None = None) -> float:
        """Backoff before the restart that follows `recent` restarts within the window."""
        base = min(self.max_backoff_s, self.backoff_s * 2**recent)
        r = (rng or random).uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        return base * r


@dataclass
class Part:
    """One supervised part. `alive()` / `restart()` / `exit_code()` / `log_tail()` are plain callables.

    `done()` True means the part ended on purpose (the learner reached its budget): not a death, no restart.
    `after_restart()` runs right after a successful restart (e.g. refit the restarted server).
    """

    name: str
    alive: Callable[[], bool]
    restart: Callable[[], Any]
    exit_code: Callable[[], int | None] = lambda: None
    log_tail: Callable[[], str] = lambda: ""
    done: Callable[[], bool] = lambda: False
    after_restart: Callable[[], Any] | None = None
    restarts: deque[float] = field(default_factory=deque)
    """Times of this part's restarts (pruned to the policy window)."""
    died_at: float | None = None
    restart_at: float | None = None
    exit_codes: list[int | None] = field(default_factory=list)

    @classmethod
    def of_child(
        cls, child: Child, *, done_on_success: bool = False, restart: Callable[[], Any] | None = None, **kw: Any
    ) -> Part:
        """A Child as a part; `restart` defaults to `child.spawn` (a wrapper may redeliver first, then spawn)."""
        return cls(
            name=child.name,
            alive=child.alive,
            restart=restart or child.spawn,
            exit_code=lambda: child.returncode,
            log_tail=child.log_tail,
            done=(lambda: child.returncode == 0) if done_on_success else (lambda: False),
            **kw,
        )


@dataclass
class Restart:
    """What `Supervisor.check()` reports for one restart (the payload of a "restart" event)."""

    part: str
    exit_code: int | None
    attempt: int
    """1 for the first restart of this part within the window."""
    backoff_s: float
    downtime_s: float
    """From noticing the death to the part running again (backoff + start, + refit for a server)."""
    total_restarts: int

    def payload(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "exit_code": self.exit_code,
            "attempt": self.attempt,
            "backoff_s": round(self.backoff_s, 2),
            "downtime_s": round(self.downtime_s, 2),
            "source": "supervisor",
            "error": f"{self.part} died (exit code {self.exit_code}); restarted after {self.downtime_s:.1f}s "
            f"(restart {self.attempt} in the window)",
        }


class GaveUp(RuntimeError):
    """A part died more often than the restart budget allows; the message is the report."""


class Supervisor:
    """Restarts dead parts (see the module docstring). Not thread-safe: call from the controller loop only."""

    def __init__(
        self,
        policy: RestartPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_death: Callable[[Part], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.on_death = on_death
        self.rng = rng or random.Random()
        self.parts: dict[str, Part] = {}
        self.total_restarts = 0

    def add(self, part: Part) -> Part:
        if part.name in self.parts:
            raise ValueError(f"a part named {part.name!r} is already supervised")
        self.parts[part.name] = part
        return part

    def remove(self, name: str) -> None:
        self.parts.pop(name, None)

    def _recent(self, part: Part, now: float) -> int:
        while part.restarts and now - part.restarts[0] > self.policy.window_s:
            part.restarts.popleft()
        return len(part.restarts)

    def check(self) -> list[Restart]:
        """Notice deaths, restart the parts whose backoff is over. Raises GaveUp past the restart budget."""
        out: list[Restart] = []
        for part in list(self.parts.values()):
            if part.died_at is None:
                if part.alive() or part.done():
                    continue
                now = self.clock()
                part.died_at = now
                code = part.exit_code()
                part.exit_codes.append(code)
                recent = self._recent(part, now)
                if recent >= self.policy.max_restarts:
                    raise GaveUp(self._report(part, recent))
                delay = self.policy.delay(recent, self.rng)
                part.restart_at = now + delay
                log.warning("%s died (exit code %s); restarting in %.1fs", part.name, code, delay)
                if self.on_death is not None:
                    self.on_death(part)
            now = self.clock()
            if part.restart_at is None or now < part.restart_at:
                continue
            died_at, backoff = part.died_at, part.restart_at - part.died_at
            try:
                part.restart()
                if part.after_restart is not None:
                    part.after_restart()
            except Exception as e:  # noqa: BLE001 - a failed restart counts as one more death
                log.warning("restart of %s failed: %r", part.name, e)
                part.restarts.append(now)
                recent = self._recent(part, now)
                part.exit_codes.append(None)
                if recent >= self.policy.max_restarts:
                    raise GaveUp(self._report(part, recent, failure=repr(e))) from e
                part.restart_at = now + self.policy.delay(recent, self.rng)
                continue
            part.restarts.append(now)
            self.total_restarts += 1
            part.died_at = part.restart_at = None
            out.append(
                Restart(
                    part=part.name,
                    exit_code=part.exit_codes[-1],
                    attempt=self._recent(part, now),
                    backoff_s=backoff,
                    downtime_s=self.clock() - died_at,
                    total_restarts=self.total_restarts,
                )
            )
        return out

    def _report(self, part: Part, recent: int, failure: str | None = None) -> str:
        p = self.policy
        lines = [
            f"{part.name} died {recent + 1} times within {p.window_s:.0f}s (restart budget: {p.max_restarts}); "
            f"giving up. Exit codes: {part.exit_codes}.",
        ]
        if failure:
            lines.append(f"The last restart failed: {failure}")
        tail = part.log_tail()
        if tail:
            lines.append(f"Last lines of its log:\n{tail}")
        return "\n".join(lines)
