"""Supervisor: a dead part is restarted after its backoff, within a budget; past it the run gives up with a report.

Real child processes (a sleeping Python) killed with SIGKILL, as the fault suite does with the real parts.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from workers.supervisor import Child, GaveUp, Part, RestartPolicy, Supervisor, stop_all

SLEEPER = [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"]


def _child(tmp_path: Path, name: str = "worker-0", code: str | None = None) -> Child:
    argv0 = SLEEPER if code is None else [sys.executable, "-c", code]
    return Child(name, [], tmp_path / f"{name}.log", dict(os.environ), 1.0, argv0=argv0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _wait_dead(child: Child) -> None:
    deadline = time.time() + 10
    while child.alive() and time.time() < deadline:
        time.sleep(0.02)
    assert not child.alive()


def test_killed_child_is_restarted_after_backoff(tmp_path: Path) -> None:
    clock = Clock()
    deaths: list[str] = []
    sup = Supervisor(RestartPolicy(max_restarts=3, backoff_s=2.0, jitter=0.0), clock=clock,
                     on_death=lambda p: deaths.append(p.name))  # fmt: skip
    child = _child(tmp_path)
    sup.add(Part.of_child(child))
    try:
        assert sup.check() == []
        first_pid = child.pid
        os.kill(child.pid, signal.SIGKILL)
        _wait_dead(child)
        assert sup.check() == []  # noticed, but the backoff (2 s) is not over
        assert deaths == ["worker-0"] and child.returncode == -signal.SIGKILL
        clock.t += 1.0
        assert sup.check() == []
        clock.t += 1.5
        (r,) = sup.check()
        assert child.alive() and child.pid != first_pid
        assert (r.part, r.exit_code, r.attempt, r.backoff_s) == ("worker-0", -9, 1, 2.0)
        assert r.downtime_s == pytest.approx(2.5)
        assert "worker-0 died (exit code -9)" in r.payload()["error"]
        # the second death within the window waits twice as long
        os.kill(child.pid, signal.SIGKILL)
        _wait_dead(child)
        assert sup.check() == []
        clock.t += 3.9
        assert sup.check() == []
        clock.t += 0.2
        (r2,) = sup.check()
        assert r2.attempt == 2 and r2.backoff_s == 4.0 and sup.total_restarts == 2
    finally:
        child.stop()


def test_restart_budget_exhausted_gives_up_with_report(tmp_path: Path) -> None:
    clock = Clock()
    sup = Supervisor(RestartPolicy(max_restarts=2, backoff_s=0.0, jitter=0.0, window_s=100.0), clock=clock)
    # a part that dies at once every time, saying why
    child = _child(tmp_path, "learner", "import sys; print('boom: no checkpoint dir', flush=True); sys.exit(3)")
    sup.add(Part.of_child(child))
    restarts = 0
    with pytest.raises(GaveUp) as info:
        for _ in range(50):
            _wait_dead(child)
            restarts += len(sup.check())
            clock.t += 1.0
    assert restarts == 2
    msg = str(info.value)
    assert "learner died 3 times within 100s (restart budget: 2)" in msg
    assert "Exit codes: [3, 3, 3]" in msg and "boom: no checkpoint dir" in msg


def test_window_forgets_old_restarts(tmp_path: Path) -> None:
    clock = Clock()
    sup = Supervisor(RestartPolicy(max_restarts=1, backoff_s=0.0, jitter=0.0, window_s=10.0), clock=clock)
    child = _child(tmp_path)
    sup.add(Part.of_child(child))
    try:
        for _ in range(3):  # one death every 20 s never exceeds 1 restart per 10 s
            os.kill(child.pid, signal.SIGKILL)
            _wait_dead(child)
            assert len(sup.check()) == 1
            clock.t += 20.0
    finally:
        child.stop()


def test_part_done_on_success_is_not_restarted(tmp_path: Path) -> None:
    sup = Supervisor(RestartPolicy(backoff_s=0.0, jitter=0.0))
    child = _child(tmp_path, "learner", "pass")
    sup.add(Part.of_child(child, done_on_success=True))
    _wait_dead(child)
    assert sup.check() == [] and child.returncode == 0 and not child.alive()


def test_failed_restart_counts_and_after_restart_runs() -> None:
    clock = Clock()
    state = {"alive": False, "tries": 0, "refits": 0}

    def restart() -> None:
        state["tries"] += 1
        if state["tries"] == 1:
            raise OSError("port in use")
        state["alive"] = True

    sup = Supervisor(RestartPolicy(max_restarts=3, backoff_s=1.0, jitter=0.0), clock=clock)
    sup.add(Part("policy-server", alive=lambda: state["alive"], restart=restart,
                 after_restart=lambda: state.__setitem__("refits", state["refits"] + 1)))  # fmt: skip
    assert sup.check() == []
    clock.t += 1.0
    assert sup.check() == []  # first restart raised: counted, retried after a longer backoff
    assert state["tries"] == 1 and state["refits"] == 0
    clock.t += 2.0
    (r,) = sup.check()
    assert state == {"alive": True, "tries": 2, "refits": 1} and r.attempt == 2


def test_backoff_is_capped_and_jittered() -> None:
    import random

    p = RestartPolicy(backoff_s=1.0, max_backoff_s=8.0, jitter=0.25)
    rng = random.Random(0)
    delays = [p.delay(n, rng) for n in range(6)]
    for n, d in enumerate(delays):
        base = min(8.0, 2.0**n)
        assert 0.75 * base <= d <= 1.25 * base
    assert len(set(delays)) == len(delays)


def test_stop_kill_signal_is_immediate(tmp_path: Path) -> None:
    child = Child("worker-0", [], tmp_path / "w.log", dict(os.environ), 30.0, stop_signal=signal.SIGKILL,
                  argv0=[sys.executable, "-c", "import signal,time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                         "time.sleep(60)"])  # fmt: skip
    t0 = time.monotonic()
    assert child.stop() == -signal.SIGKILL
    assert time.monotonic() - t0 < 5.0


def test_cold_stop_skips_warm_shutdown(tmp_path: Path) -> None:
    # a worker whose cold shutdown hangs (SIGQUIT ignored) and whose warm shutdown would wait (SIGTERM ignored)
    code = ("import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_IGN); "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)")  # fmt: skip
    child = Child("worker-0", [], tmp_path / "w.log", dict(os.environ), 1.0, stop_signal=signal.SIGQUIT,
                  argv0=[sys.executable, "-c", code])  # fmt: skip
    deadline = time.time() + 10
    while "up" not in child.log_tail() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    assert child.stop() == -signal.SIGKILL
    assert time.monotonic() - t0 < 4.0  # 1 s grace, then SIGKILL: no 10 s SIGTERM step


def test_of_child_with_a_restart_wrapper(tmp_path: Path) -> None:
    child = _child(tmp_path)
    calls: list[int] = []

    def restart() -> None:  # what the controller does for a worker: redeliver what it held, then spawn
        calls.append(child.pid)
        child.spawn()

    sup = Supervisor(RestartPolicy(backoff_s=0.0, jitter=0.0))
    sup.add(Part.of_child(child, restart=restart))
    try:
        dead_pid = child.pid
        os.kill(dead_pid, signal.SIGKILL)
        _wait_dead(child)
        (r,) = sup.check()
        assert calls == [dead_pid] and child.alive() and child.pid != dead_pid and r.exit_code == -9
    finally:
        child.stop()


def test_stop_all_stops_workers_concurrently(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    kids = [Child(f"worker-{i}", [], tmp_path / f"w{i}.log", dict(os.environ), 1.5, stop_signal=signal.SIGQUIT,
                  argv0=[sys.executable, "-c", code]) for i in range(3)]  # fmt: skip
    for c in kids:
        deadline = time.time() + 10
        while "up" not in c.log_tail() and time.time() < deadline:
            time.sleep(0.05)
    t0 = time.monotonic()
    stop_all(kids)
    assert all(not c.alive() for c in kids)
    assert time.monotonic() - t0 < 4.0  # one 1.5 s grace for all three, not 4.5 s
