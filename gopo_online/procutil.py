"""Child-process helpers shared by everything that starts servers or jobs (broker, vLLM, the controller's children)."""

from __future__ import annotations

import functools
import signal
import socket
import sys
from collections.abc import Callable

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
