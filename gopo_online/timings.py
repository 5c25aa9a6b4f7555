"""Where an episode's wall-clock time went: per-phase seconds from a Trajectory, and the episode event's metrics.

Turn-level phases (`Turn.timings`, measured by the episode loop): simulator, expert, cs, judge. Episode-level ones
(`Trajectory.timings`, measured by the worker): queue = dispatch -> the worker starts the episode. Publish (the
trajectory's own publish to the broker) is measured after the record is sealed, so it travels in the episode
event only. `other` = the episode's duration minus its phases (state building, rewards, the simulator's closing
turn). Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gopo_online.types import Trajectory

TURN_PHASES = ("simulator", "expert", "cs", "judge")
EPISODE_PHASES = ("queue",)


def episode_phases(traj: Trajectory) -> dict[str, float]:
    """Seconds per phase of one episode: the turn phases summed over its turns, the episode-level ones, `episode`
    (its duration) and `other` (duration minus the turn phases, never negative)."""
    out = {p: 0.0 for p in TURN_PHASES}
    for turn in traj.turns:
        for phase, s in turn.timings.items():
            out[phase] = out.get(phase, 0.0) + float(s)
    in_turns = sum(out.values())
    for phase, s in traj.timings.items():
        out[phase] = out.get(phase, 0.0) + float(s)
    out["episode"] = traj.duration_s
    out["other"] = max(0.0, traj.duration_s - in_turns)
    return out


def phase_metrics(traj: Trajectory, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """`time/<phase>_s` metrics of the episode event (plus `extra` phases such as publish)."""
    phases = episode_phases(traj)
    phases.update({k: float(v) for k, v in (extra or {}).items()})
    return {f"time/{p}_s": round(s, 6) for p, s in phases.items()}
