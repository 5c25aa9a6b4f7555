"""Paired bootstrap statistics of `gopo-online eval` (gopo_online/paired.py): numbers derived by hand, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gopo_online.paired import (
    bootstrap_mean_ci,
    compare_by_group,
    compare_metrics,
    complete_pairs,
    paired_summary,
)

# --------------------------------------------------------------------------- by hand


def test_two_pairs_ci_spans_both_resample_extremes():
    # run = (1, 2), against = (1, 1): d = (0, 1), mean d = 0.5, means 1.5 and 1.0.
    # A bootstrap resample of 2 pairs is one of 4 equally likely index pairs: (0,0) mean 0, (0,1)/(1,0) mean 0.5,
    # (1,1) mean 1. P(mean* = 0) = P(mean* = 1) = 1/4 > 2.5 %, so the 2.5 % quantile is 0 and the 97.5 % one is 1.
    s = paired_summary([1.0, 2.0], [1.0, 1.0])
    assert (s.n, s.mean_a, s.mean_b, s.diff) == (2, 1.5, 1.0, 0.5)
    assert (s.ci_low, s.ci_high) == (0.0, 1.0)
    assert not s.excludes_zero


def test_skewed_three_pairs():
    # d = (0, 0, 3): a resample's mean is k (k = times index 2 is drawn), k ~ Binomial(3, 1/3).
    # P(k=0) = (2/3)^3 = 8/27 ≈ 0.30 -> 2.5 % quantile 0; P(k=3) = 1/27 ≈ 0.037 > 0.025 -> 97.5 % quantile 3.
    # The interval is asymmetric around the mean 1, as the percentile bootstrap of a skewed sample should be.
    s = paired_summary([0.0, 0.0, 3.0], [0.0, 0.0, 0.0])
    assert s.diff == 1.0
    assert (s.ci_low, s.ci_high) == (0.0, 3.0)


def test_constant_difference_gives_a_point_interval_that_excludes_zero():
    # every pair differs by +0.25: every resample mean is 0.25, so the CI is [0.25, 0.25] and lies above 0
    s = paired_summary([0.5, 0.75, 1.0, 0.25], [0.25, 0.5, 0.75, 0.0])
    assert s.diff == pytest.approx(0.25)
    assert s.ci_low == pytest.approx(0.25) and s.ci_high == pytest.approx(0.25)
    assert s.excludes_zero


def test_missing_values_drop_the_pair_not_the_arm():
    # pair 0: (1, 0); pair 1: A missing; pair 2: B missing -> only pair 0 counts: n = 1, d = 1, CI = [1, 1]
    s = paired_summary([1.0, None, 3.0], [0.0, 5.0, None])
    assert (s.n, s.mean_a, s.mean_b, s.diff, s.ci_low, s.ci_high) == (1, 1.0, 0.0, 1.0, 1.0, 1.0)
    assert paired_summary([None, float("nan")], [1.0, 2.0]).n == 0
    empty = paired_summary([], [])
    assert (empty.n, empty.diff, empty.ci_low) == (0, None, None)


def test_groups_by_hand():
    # easy/price: d = 0.5-0.2 = 0.3 and 0.7-0.4 = 0.3 -> diff 0.3, CI [0.3, 0.3]
    # hard/refund: one pair, d = 0.1-0.3 = -0.2 -> CI [-0.2, -0.2]
    # all three pairs: diff = (0.3 + 0.3 - 0.2) / 3 = 0.1333...
    rows = [
        ("easy/price", {"esndcg": 0.5}, {"esndcg": 0.2}),
        ("hard/refund", {"esndcg": 0.1}, {"esndcg": 0.3}),
        ("easy/price", {"esndcg": 0.7}, {"esndcg": 0.4}),
    ]
    by = compare_by_group(rows, ["esndcg"])
    assert list(by) == ["easy/price", "hard/refund"]
    easy, hard = by["easy/price"]["esndcg"], by["hard/refund"]["esndcg"]
    assert easy.n == 2 and easy.diff == pytest.approx(0.3) and easy.ci_low == pytest.approx(0.3)
    assert hard.n == 1 and hard.diff == pytest.approx(-0.2) and hard.ci_high == pytest.approx(-0.2)
    overall = compare_metrics([(a, b) for _, a, b in rows], ["esndcg"])["esndcg"]
    assert overall.n == 3 and overall.diff == pytest.approx(0.4 / 3)


def test_a_metric_missing_from_one_arm_has_no_pairs():
    out = compare_metrics([({"tse": 1.0}, {"tse": 0.5, "esndcg": 0.2})], ["tse", "esndcg"])
    assert out["tse"].n == 1 and out["esndcg"].n == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equal-length"):
        complete_pairs([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0, 2.0], level=1.0)


def test_vectorised_bootstrap_matches_a_plain_loop():
    d = [0.3, -0.1, 0.8, 0.0, 0.25]
    lo, hi = bootstrap_mean_ci(d, resamples=500, seed=7)
    idx = np.random.default_rng(7).integers(0, len(d), size=(500, len(d)))
    means = sorted(sum(d[j] for j in row) / len(d) for row in idx)
    # numpy's default quantile interpolates linearly between order statistics at position q * (B - 1)
    pos_lo, pos_hi = 0.025 * 499, 0.975 * 499
    loop_lo = means[int(pos_lo)] + (pos_lo - int(pos_lo)) * (means[int(pos_lo) + 1] - means[int(pos_lo)])
    loop_hi = means[int(pos_hi)] + (pos_hi - int(pos_hi)) * (means[int(pos_hi) + 1] - means[int(pos_hi)])
    assert lo == pytest.approx(loop_lo) and hi == pytest.approx(loop_hi)


def test_more_pairs_narrow_the_interval():
    # the same spread of differences, 4x the pairs: the CI width shrinks roughly by sqrt(4) = 2
    base = [0.0, 1.0, 0.5, 0.2, 0.9, 0.4, 0.6, 0.3]
    w_small = np.subtract(*reversed(bootstrap_mean_ci(base, resamples=4000)))
    w_big = np.subtract(*reversed(bootstrap_mean_ci(base * 4, resamples=4000)))
    assert 1.6 < w_small / w_big < 2.5


# --------------------------------------------------------------------------- properties

values = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)
pairs_st = st.integers(min_value=1, max_value=25).flatmap(
    lambda n: st.tuples(st.lists(values, min_size=n, max_size=n), st.lists(values, min_size=n, max_size=n))
)
TOL = 1e-9


@given(pairs_st, st.integers(min_value=0, max_value=1000))
def test_ci_contains_the_mean_difference(ab, seed):
    a, b = ab
    s = paired_summary(a, b, resamples=400, seed=seed)
    assert s.n == len(a)
    assert s.ci_low - TOL <= s.diff <= s.ci_high + TOL
    d = np.subtract(a, b)
    assert d.min() - TOL <= s.ci_low and s.ci_high <= d.max() + TOL
    assert math.isclose(s.diff, s.mean_a - s.mean_b, abs_tol=1e-9)


@given(st.lists(values, min_size=1, max_size=25), st.integers(min_value=0, max_value=1000))
def test_identical_arms_give_a_ci_at_zero(a, seed):
    s = paired_summary(a, list(a), resamples=400, seed=seed)
    assert s.diff == 0.0 and s.ci_low == 0.0 and s.ci_high == 0.0
    assert not s.excludes_zero


@given(pairs_st, st.floats(min_value=-5, max_value=5, allow_nan=False), st.integers(min_value=0, max_value=1000))
def test_shifting_one_arm_by_c_shifts_the_difference_by_c(ab, c, seed):
    a, b = ab
    s = paired_summary(a, b, resamples=400, seed=seed)
    shifted = paired_summary([x + c for x in a], b, resamples=400, seed=seed)
    down = paired_summary(a, [y + c for y in b], resamples=400, seed=seed)
    tol = 1e-8 * (1 + abs(c))
    assert shifted.diff == pytest.approx(s.diff + c, abs=tol)
    assert shifted.ci_low == pytest.approx(s.ci_low + c, abs=tol)
    assert shifted.ci_high == pytest.approx(s.ci_high + c, abs=tol)
    assert down.diff == pytest.approx(s.diff - c, abs=tol)
    assert down.ci_low == pytest.approx(s.ci_low - c, abs=tol)


@given(pairs_st)
def test_swapping_the_arms_mirrors_the_interval(ab):
    a, b = ab
    s, r = paired_summary(a, b, resamples=400), paired_summary(b, a, resamples=400)
    assert r.diff == pytest.approx(-s.diff, abs=1e-9)
    assert r.ci_low == pytest.approx(-s.ci_high, abs=1e-9) and r.ci_high == pytest.approx(-s.ci_low, abs=1e-9)
