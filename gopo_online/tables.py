"""Console tables that stay readable in an 80-column terminal or a pipe: numbers are never cut.

`print_table` draws an ordinary table when every number fits whole (text columns may wrap); when even that does
not fit, it TRANSPOSES: one block per row, ``header value`` pairs folded onto as many lines as the width needs.
A pipe (not a terminal) gets the width of ``$COLUMNS`` or 80, never rich's guess of a wide virtual console.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

MIN_TEXT_WIDTH = 8
"""The narrowest a wrapping text column may become before the table is transposed instead."""


def console(file: Any = None, width: int | None = None, **kw: Any) -> Any:
    """A rich Console that writes plain text to a pipe, at `width` / $COLUMNS / the terminal's width (80 for a pipe)."""
    from rich.console import Console

    out = file or sys.stdout
    if width is None and not (hasattr(out, "isatty") and out.isatty()):
        width = int(os.environ.get("COLUMNS", "80") or 80)
    return Console(file=out, width=width, highlight=False, soft_wrap=False, **kw)


def _is_number(cell: str) -> bool:
    s = cell.strip().replace(",", "").rstrip("%")
    if s in ("-", "nan", ""):
        return True
    try:
        float(s)
    except ValueError:
        return False
    return True


def table_width(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> tuple[int, int]:
    """(width with every cell whole, narrowest width with numbers whole and text columns at MIN_TEXT_WIDTH)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    overhead = 2 * (len(headers) - 1)  # no box: two spaces between columns
    narrow = [w if num else min(w, MIN_TEXT_WIDTH) for w, num in zip(widths, numeric, strict=True)]
    return sum(widths) + overhead, sum(narrow) + overhead


def print_table(
    out: Any, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, transpose: bool | None = None
) -> str:
    """Print `rows` under `headers` on the rich console `out`; returns "table", "wrapped" or "transposed".

    Cells are shown as given (format numbers before). A column whose every cell is a number is never wrapped.
    `transpose` forces the layout (None: decide from the console's width).
    """
    from rich.table import Table
    from rich.text import Text

    cells = [[str(c) for c in r] for r in rows]
    numeric = [all(_is_number(r[i]) for r in cells) if cells else True for i in range(len(headers))]
    full, narrow = table_width(headers, cells, numeric)
    width = out.width
    if transpose is None:
        transpose = narrow > width
    if not transpose:
        t = Table(title=title, box=None, padding=(0, 1), pad_edge=False, title_justify="left", header_style="bold u")
        for h, num in zip(headers, numeric, strict=True):
            if num:
                t.add_column(h, justify="right", no_wrap=True)
            else:
                t.add_column(h, overflow="fold")
        for r in cells:
            t.add_row(*r)
        out.print(t)
        return "table" if full <= width else "wrapped"
    out.print(Text(title, style="bold"))
    for r in cells:
        head, rest = r[0], list(zip(headers[1:], r[1:], strict=True))
        line = Text(f"{headers[0]} {head}", style="bold")
        out.print(line)
        # key/value pairs folded to the width, a pair never split across lines
        cur = "  "
        for h, v in rest:
            pair = f"{h} {v}"
            if len(cur) > 2 and len(cur) + 3 + len(pair) > width:
                out.print(cur, soft_wrap=True)
                cur = "  "
            cur += ("   " if len(cur) > 2 else "") + pair
        if len(cur) > 2:
            out.print(cur, soft_wrap=True)
    return "transposed"
