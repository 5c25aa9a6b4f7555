"""Console tables at 80 columns or in a pipe: numbers are never cut ("0.…"); wide tables are transposed."""

from __future__ import annotations

import io
import re

from gopo_online.tables import console, print_table

STRESS_COLS = ("episodes", "tse", "satisfaction", "finish_rate", "cost_rate", "turns", "failures", "esndcg", "gre",
               "compliance", "bleu", "tse_agreement")  # fmt: skip


def _report() -> dict:
    def m(i: int) -> dict:
        return {c: (40 + i if c in ("episodes", "failures") else 0.123456 * (i + 1)) for c in STRESS_COLS}

    groups = {"cooperative": m(0), "impatient-and-demanding": m(1), "deadline": m(2)}
    return {"setup": {"target": "two-agent"}, "groups": groups, "overall": m(3)}


def _render(width: int) -> str:
    from simulator.stress import print_report

    buf = io.StringIO()
    print_report(_report(), console(buf, width))
    return buf.getvalue()


def test_stress_table_at_80_columns_keeps_every_number_and_name_whole() -> None:
    text = _render(80)
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines()), text
    assert "…" not in text
    for i in range(4):
        assert f"{0.123456 * (i + 1):.3f}" in text  # every value whole
    for name in ("cooperative", "impatient-and-demanding", "deadline", "ALL", *STRESS_COLS):
        assert re.search(rf"\b{re.escape(name)}\b", text), name


def test_wide_console_gets_a_plain_table_and_narrow_text_wraps_not_cuts() -> None:
    text = _render(220)
    header = next(line for line in text.splitlines() if "tse_agreement" in line)
    assert all(c in header for c in STRESS_COLS)  # one header line: an ordinary table
    buf = io.StringIO()
    layout = print_table(console(buf, 30), "t", ("name", "value"), [["a very long persona group name", "0.123456"]])
    assert layout == "wrapped" and "0.123456" in buf.getvalue() and "…" not in buf.getvalue()


def test_pipe_width_is_80_or_columns(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert console(io.StringIO()).width == 100
    monkeypatch.delenv("COLUMNS")
    assert console(io.StringIO()).width == 80
