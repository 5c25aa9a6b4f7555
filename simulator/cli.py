"""`gopo-online personas …` commands: list, show, validate, generate (called by module path from gopo_online.cli)."""

from __future__ import annotations

import sys
from pathlib import Path

from simulator.personas import (
    DEFAULT_PERSONA_FILE,
    balance_report,
    dump_personas,
    generate_bank_personas,
    load_personas,
    validate_file,
)


def _console():
    from rich.console import Console

    return Console()


def list_personas(file: Path | None = None, split: str = "all") -> None:
    from rich.table import Table

    personas = load_personas(file, split=split)
    table = Table(title=f"{file or DEFAULT_PERSONA_FILE} ({split}: {len(personas)})")
    for col in ("id", "split", "coop", "demand", "communication", "disclosure", "problem solving", "affect"):
        table.add_column(col)
    for p in personas:
        t = p.intrinsic
        table.add_row(
            p.id,
            p.split,
            str(p.cooperation),
            p.extrinsic_demand,
            t.communication_style.level,
            t.information_disclosure.level,
            t.problem_solving_style.level,
            t.affective_style.level,
        )
    _console().print(table)


def show_persona(persona_id: str, file: Path | None = None) -> None:
    for p in load_personas(file):
        if p.id == persona_id:
            _console().print_json(p.model_dump_json())
            _console().print(f"difficulty: {p.difficulty}, group: {p.group}\n\nprompt profile:\n{p.prompt_profile()}")
            return
    print(f"no persona {persona_id!r} in {file or DEFAULT_PERSONA_FILE}", file=sys.stderr)
    raise SystemExit(1)


def validate_files(files: list[Path]) -> None:
    """Validate each file; prints every issue (file, record, field) and exits 1 when any was found."""
    bad = 0
    for f in files:
        personas, issues = validate_file(f)
        for i in issues:
            print(str(i), file=sys.stderr)
        bad += len(issues)
        print(f"{f}: {len(personas)} valid persona(s), {len(issues)} issue(s)")
    if bad:
        raise SystemExit(1)


def generate_bank(out: Path, n: int = 240, seed: int = 0) -> None:
    personas = generate_bank_personas(n=n, seed=seed)
    dump_personas(personas, out)
    print(f"wrote {len(personas)} personas to {out}: {balance_report(personas)}")
