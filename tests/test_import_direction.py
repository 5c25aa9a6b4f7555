"""The rooms' import direction (STYLE.md "The shape of the house"), checked by parsing every module with `ast`.

gopo_online is the base and imports none of the upper rooms; simulator and trainer import only gopo_online;
workers imports gopo_online and simulator; workers and trainer never import each other (they meet through the
broker and the weight transport). Every import counts, including ones inside functions.
Also: the light modules import nothing heavy at top level, so `gopo-online --help` stays instant.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("gopo_online", "simulator", "workers", "trainer")
ALLOWED = {
    "gopo_online": set(),
    "simulator": {"gopo_online"},
    "trainer": {"gopo_online"},
    "workers": {"gopo_online", "simulator"},
}
HEAVY = ("torch", "vllm", "deepspeed", "transformers", "openai", "celery")
LIGHT_MODULES = (
    "gopo_online",
    "gopo_online.config",
    "gopo_online.types",
    "gopo_online.cli",
    "gopo_online.rewards",
    "gopo_online.metrics",
)


def _imported_rooms(path: Path, room: str) -> dict[str, int]:
    """Room -> first line number, for every import in `path` that lands in one of the four rooms."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # a relative import stays inside the module's own room
            names = [room] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ROOMS:
                found.setdefault(top, node.lineno)
    return found


def _modules(room: str) -> list[Path]:
    return sorted(p for p in (ROOT / room).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_exists():
    for room in ROOMS:
        assert (ROOT / room / "__init__.py").is_file(), f"{room}/ is not a package"


@pytest.mark.parametrize("room", ROOMS)
def test_import_direction(room: str):
    bad = []
    for path in _modules(room):
        for other, line in _imported_rooms(path, room).items():
            if other != room and other not in ALLOWED[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {other}")
    assert not bad, f"{room} may import only {sorted(ALLOWED[room]) or 'no other room'}:\n" + "\n".join(bad)


def test_checker_sees_imports(tmp_path: Path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nimport trainer.learner\nfrom simulator import user\n"
        "def f():\n    from workers.tasks import x\nfrom . import sibling\n"
    )
    assert _imported_rooms(src, "gopo_online") == {"trainer": 2, "simulator": 3, "workers": 5, "gopo_online": 6}


def test_light_modules_import_nothing_heavy():
    code = (
        "import importlib, json, sys\n"
        f"for m in {LIGHT_MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [], f"importing {LIGHT_MODULES} pulled in heavy modules {heavy}"
