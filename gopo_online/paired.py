"""Paired comparison of two policies ("arms") on the same episodes: means, paired differences and bootstrap CIs.

`gopo-online eval` plays every held-out episode twice, once per arm, with the same persona, scenario instance and
simulator seed, so the arms differ only in the policy. Per metric the unit of analysis is then the PAIR: the
difference d_i = x_i(run) - x_i(against) of episode i. Pairing removes the persona / scenario difficulty that both
arms share from the spread, which is what makes a small sample informative.

The CI is the percentile bootstrap of the mean difference (Efron & Tibshirani 1993, ch. 13): resample the n pairs
with replacement B times, take each resample's mean of d, report the 2.5 % and 97.5 % quantiles. The resampling
indices depend only on (n, B, seed), so two metrics with the same pairs see the same resamples and a constant shift
of one arm shifts the interval by exactly that constant.

Pure functions: floats in, named results out. Nothing here knows about trajectories (see simulator/evaluate.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


class EvalError(ValueError):
    """Bad `gopo-online eval` input (a run folder without adapters, an unknown version, a bad --against); the
    message names what is wrong. Defined here, in the base room, so the CLI can catch it without importing eval."""


def _finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


@dataclass(frozen=True)
class PairedSummary:
    """One metric compared over n complete pairs (both arms have a value)."""

    n: int
    """Pairs with a value in both arms (an episode that errored or has no value in either arm is left out)."""
    mean_a: float | None
    """Mean of arm A (the evaluated run) over those pairs."""
    mean_b: float | None
    """Mean of arm B (the comparison arm) over the same pairs."""
    diff: float | None
    """Mean paired difference A - B (= mean_a - mean_b)."""
    ci_low: float | None
    ci_high: float | None
    """Percentile-bootstrap CI of `diff` at `level`; equal to `diff` when n == 1, None when n == 0."""
    level: float = DEFAULT_LEVEL

    @property
    def excludes_zero(self) -> bool:
        """True when the whole CI lies on one side of 0 (the arms differ at this level)."""
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def complete_pairs(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both arms have a finite value, as two float arrays of equal length."""
    if len(a) != len(b):
        raise ValueError(f"paired metric needs equal-length arms, got {len(a)} and {len(b)} values")
    keep = [(x, y) for x, y in zip(a, b, strict=True) if _finite(x) and _finite(y)]
    xs = np.array([float(x) for x, _ in keep], dtype=float)
    ys = np.array([float(y) for _, y in keep], dtype=float)
    return xs, ys


def bootstrap_mean_ci(
    d: Sequence[float] | np.ndarray,
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `d` (n >= 1 values). Deterministic in (len(d), resamples, seed).

    Each of `resamples` rows draws n indices with replacement; the CI is the ((1-level)/2, (1+level)/2) quantile
    of the rows' means. n == 1 gives (d0, d0): one pair carries no spread to resample.
    """
    arr = np.asarray(d, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"bootstrap_mean_ci needs a non-empty 1-d sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_mean_ci: values must be finite (drop missing pairs first)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"bootstrap_mean_ci: resamples must be >= 1, got {resamples}")
    n = arr.size
    if n == 1:
        return float(arr[0]), float(arr[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    # the resample means are averages of the data, so the CI cannot leave [min, max]; clamp float noise
    return float(max(lo, arr.min())), float(min(hi, arr.max()))


def paired_summary(
    a: Sequence[float | None],
    b: Sequence[float | None],
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedSummary:
    """Compare arm A with arm B on aligned per-pair values (`a[i]`, `b[i]` are the same pair; None = missing)."""
    xs, ys = complete_pairs(a, b)
    n = int(xs.size)
    if n == 0:
        return PairedSummary(0, None, None, None, None, None, level)
    d = xs - ys
    lo, hi = bootstrap_mean_ci(d, level=level, resamples=resamples, seed=seed)
    return PairedSummary(n, float(xs.mean()), float(ys.mean()), float(d.mean()), lo, hi, level)


def compare_metrics(
    pairs: Sequence[tuple[Mapping[str, float | None], Mapping[str, float | None]]],
    metrics: Sequence[str],
    **kw: Any,
) -> dict[str, PairedSummary]:
    """Per metric, `paired_summary` over `pairs` = [(arm A's values, arm B's values) of one pair, ...]."""
    return {m: paired_summary([pa.get(m) for pa, _ in pairs], [pb.get(m) for _, pb in pairs], **kw) for m in metrics}


def group_pairs(
    pairs: Iterable[tuple[str, Mapping[str, float | None], Mapping[str, float | None]]],
) -> dict[str, list[tuple[Mapping[str, float | None], Mapping[str, float | None]]]]:
    """[(group label, A values, B values), ...] -> {group: [(A values, B values), ...]}, groups sorted by name."""
    out: dict[str, list[tuple[Mapping[str, float | None], Mapping[str, float | None]]]] = defaultdict(list)
    for g, pa, pb in pairs:
        out[g].append((pa, pb))
    return {g: out[g] for g in sorted(out)}


def compare_by_group(
    pairs: Iterable[tuple[str, Mapping[str, float | None], Mapping[str, float | None]]],
    metrics: Sequence[str],
    **kw: Any,
) -> dict[str, dict[str, PairedSummary]]:
    """`compare_metrics` within each group of `group_pairs(pairs)`."""
    return {g: compare_metrics(ps, metrics, **kw) for g, ps in group_pairs(pairs).items()}
