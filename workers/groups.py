"""GRPO groups at dispatch time: G rollouts of the same (persona, scenario instance, simulator seed).

A GRPO baseline compares rollouts of ONE situation (InteractCS samples G = 4 per prompt). The scenario instance
is sampled from (family, seed) and the user simulator's seeds derive from the same seed, so the G members of a
group share the episode seed; they differ only in `sample_index`, which offsets the AGENTS' sampling seeds
(simulator/episode.py), so the G rollouts are G different draws of the policy in the same situation. Every
member carries the group id, and the learner normalises advantages within it (trainer/advantages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupSlot", "group_slot"]


@dataclass(frozen=True)
class GroupSlot:
    """Where episode `index` sits: its group, its place in the group, and what the group shares."""

    group: int
    """0-based group number (episodes index // G)."""
    member: int
    """0-based place in the group: the agents' seed offset (`EpisodeRequest.sample_index`)."""
    group_id: str
    """Stamped on every member's request and trajectory."""
    seed: int
    """Episode seed shared by the whole group: scenario instance and simulator seeds derive from it."""


def group_slot(index: int, group_size: int, run_seed: int) -> GroupSlot:
    """The group slot of the `index`-th dispatched episode (pure: a resumed controller rebuilds the same groups).

    Consecutive indices fill one group: episodes g·G … g·G + G − 1 form group g, which takes the persona and
    scenario family of slot g and the seed `run_seed · 1 000 003 + g`. `group_size = 1` reproduces one episode
    per situation (every group a singleton).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    g, j = divmod(index, group_size)
    return GroupSlot(group=g, member=j, group_id=f"grp-{run_seed}-{g:07d}", seed=run_seed * 1_000_003 + g)
