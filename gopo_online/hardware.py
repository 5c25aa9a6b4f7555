"""What this CPU can do fast: the weights dtype and the thread counts, chosen from its instruction set and core count.

Everything here is a pure function of a flags string / a core count, so it is tested for CPUs the test box is not
(an AVX2-only EPYC next to an AVX-512 + bf16 one). Only `cpu_flags()` and `cpu_cores()` read the machine.
See docs/throughput.md for the measurements behind the choices. Imports nothing heavy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 flags of native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles). Without one, PyTorch and vLLM emulate
bf16 by converting to fp32 and back: measured on an AVX2-only EPYC, bf16 decoded at half the float32 rate and the
learner step did not finish."""

DTYPES = ("bfloat16", "float32", "float16", "auto")


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU flags of a /proc/cpuinfo text (first `flags` line; ARM kernels call it `Features`). Empty when the
    text has none (an unknown CPU is treated as having no bf16)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: str | Iterable[str]) -> bool:
    """True when the flags (a space-separated string or a set) name a native bf16 instruction set."""
    names = set(flags.split()) if isinstance(flags, str) else set(flags)
    return bool(names & BF16_FLAGS)


def choose_dtype(requested: str, flags: str | Iterable[str], *, device: str = "cpu") -> str:
    """The dtype to load weights in for `requested` (config `model.dtype`) on this device.

    "auto": on a GPU bfloat16; on a CPU bfloat16 only where the flags have avx512_bf16 or amx_bf16, else float32.
    An explicit dtype is returned as given (the user asked for it). A dtype not in DTYPES is a ValueError."""
    if requested not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu' (resolved), got {device!r}")
    if requested != "auto":
        return requested
    if device == "gpu":
        return "bfloat16"
    return "bfloat16" if has_native_bf16(flags) else "float32"


@dataclass(frozen=True)
class ThreadPlan:
    """OpenMP threads per process kind on one machine."""

    cores: int
    server: int
    """Threads of each vLLM CPU server (OMP_NUM_THREADS of its engine process)."""
    learner: int
    """Intra-op threads of the learner (torch.set_num_threads)."""
    worker: int = 1
    """Rollout workers are I/O bound (HTTP to the server): one thread of math each."""


def plan_threads(cores: int, *, servers: int = 1) -> ThreadPlan:
    """Split `cores` between the vLLM server(s) and the learner.

    Up to 2 cores: one thread each. Measured on the 2-core box: two OpenMP threads per process next to a busy
    neighbour spin on each other and run up to 20x slower, so every process keeps one thread and the kernel
    time-slices them. From 3 cores on: one core is left to the rollout workers, broker and controller (Python,
    mostly waiting on HTTP); the rest is split evenly between the server(s) and the learner, the server(s) taking
    the odd core (decode is the rollout's bottleneck)."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    if cores <= 2:
        return ThreadPlan(cores=cores, server=1, learner=1)
    usable = cores - 1
    server_total = math.ceil(usable / 2)
    learner = max(1, usable - server_total)
    return ThreadPlan(cores=cores, server=max(1, server_total // servers), learner=learner)


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags (empty where /proc/cpuinfo is unreadable, e.g. macOS)."""
    try:
        return parse_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def cpu_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_dtype(requested: str, *, device: str = "cpu") -> str:
    """`choose_dtype` with this machine's flags."""
    return choose_dtype(requested, cpu_flags() if device == "cpu" else (), device=device)


def resolve_threads(explicit: int | None, kind: str, *, servers: int = 1) -> int:
    """The thread count of `kind` ("server" or "learner"): `explicit` when the config sets one, else this machine's
    `plan_threads`."""
    if explicit is not None:
        return explicit
    plan = plan_threads(cpu_cores(), servers=servers)
    if kind not in ("server", "learner"):
        raise ValueError(f"kind must be 'server' or 'learner', got {kind!r}")
    return plan.server if kind == "server" else plan.learner
