"""Personas that show (issue 8): the same fixed, scripted agent against personas that differ in one trait gives
outcomes in the expected direction (simulator/traits.py, also `gopo-online bench --only traits`)."""

from __future__ import annotations

from gopo_online.config import GopoConfig
from simulator.traits import EXPECTED, ROWS, bench_traits, run


def test_hard_users_are_less_satisfied_and_finish_less():
    hard, easy = run(ROWS[0][1]), run(ROWS[0][2])
    assert hard["satisfaction"] < easy["satisfaction"]
    assert hard["finish_rate"] < easy["finish_rate"]
    low, high = run(ROWS[1][1]), run(ROWS[1][2])
    assert low["satisfaction"] < high["satisfaction"]


def test_incentive_open_accepts_vouchers_more():
    rigid, open_ = run(ROWS[2][1]), run(ROWS[2][2])
    assert open_["voucher_accept"] > rigid["voucher_accept"]
    assert rigid["voucher_accept"] == 0.0  # rigid pursuit: only the exact outcome


def test_withholding_users_disclose_later():
    withholding, proactive = run(ROWS[3][1]), run(ROWS[3][2])
    assert proactive["disclosure_turn"] == 1.0
    assert withholding["disclosure_turn"] > proactive["disclosure_turn"] + 1


def test_volatile_users_are_less_satisfied():
    volatile, calm = run(ROWS[4][1]), run(ROWS[4][2])
    assert volatile["satisfaction"] <= calm["satisfaction"]


def test_the_bench_rows_say_every_expected_direction_holds():
    rows = bench_traits(GopoConfig(), n_seeds=2)
    assert {r["metric"].split(":")[0] for r in rows} == set(EXPECTED)
    assert all(r["holds"] for r in rows), [r for r in rows if not r["holds"]]
