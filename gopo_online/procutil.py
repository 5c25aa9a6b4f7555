"""Child-process helpers shared by everything that starts servers or jobs (broker, vLLM, the controller's children)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it; a small race with other processes remains)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], object] | None:
    """A `preexec_fn` that makes the kernel send `sig` to the child when its parent dies, even by SIGKILL (atexit
    hooks do not run then). Linux only, else None (atexit hooks are then the only net).

    The signal fires when the *thread* that forked exits: start long-lived children from the main thread.
    libc's prctl is looked up here, before the fork: the child must not import or load anything.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, _PR_SET_PDEATHSIG, int(sig))


class LiveChildren:
    """The children of one kind that are running now, stopped by an atexit hook if the program exits without
    stopping them (an exception, sys.exit). PDEATHSIG covers the parent being killed; this covers normal exits."""

    def __init__(self, stop_timeout_s: float) -> None:
        import atexit
        import threading

        self._live: set = set()
        self._lock = threading.Lock()
        self.stop_timeout_s = stop_timeout_s
        atexit.register(self.stop_all)

    def add(self, child: object) -> None:
        with self._lock:
            self._live.add(child)

    def discard(self, child: object) -> None:
        with self._lock:
            self._live.discard(child)

    def stop_all(self) -> None:
        with self._lock:
            children = list(self._live)
        for child in children:
            child.stop(timeout=self.stop_timeout_s)  # type: ignore[attr-defined]


def tail_lines(path: object, n: int) -> str:
    """The last `n` lines of a child's log file ('' when there is none yet), read without loading the whole file."""
    import collections
    from pathlib import Path

    if path is None or not Path(path).is_file():  # type: ignore[arg-type]
        return ""
    with open(path, errors="replace") as f:  # type: ignore[call-overload]
        return "".join(collections.deque(f, maxlen=n))


def tree_rss_mb(root_pid: int, proc: Path = Path("/proc")) -> float:
    """Resident memory (MiB) of a process and all its descendants now, from /proc (Linux); 0 if it is gone. Shared
    pages count once per process (RSS), so this is an upper bound of what the tree holds."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            statm = (d / "statm").read_text().split()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(d.name))
        rss[int(d.name)] = int(statm[1])
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total * page / 2**20
