"""run.sh's check that the shared venv's editable install imports THIS checkout (else it is re-pointed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_function() -> str:
    text = (ROOT / "run.sh").read_text()
    m = re.search(r"^editable_points_at\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert m, "run.sh defines editable_points_at"
    return m.group(0)


def _ask(root: Path, cwd: Path) -> int:
    script = f'VENV="{Path(sys.executable).parent.parent}"\n{_check_function()}\neditable_points_at "$1"'
    return subprocess.run(["bash", "-c", script, "check", str(root)], cwd=cwd, timeout=60).returncode


def test_another_checkout_is_not_taken_for_the_installed_one(tmp_path: Path) -> None:
    """Seen on this box: a second clone's `./run.sh bench` ran the FIRST clone's code, because the check ran
    `python -c` inside the second clone, where the current directory shadows the install."""
    other = tmp_path / "other-clone"
    for pkg in ("gopo_online", "simulator", "trainer", "workers"):
        (other / pkg).mkdir(parents=True)
        (other / pkg / "__init__.py").write_text("")
    assert _ask(other, cwd=other) == 1  # run from inside the other clone: still "not installed here"
    where = "import gopo_online, pathlib; print(pathlib.Path(gopo_online.__file__).resolve().parents[1])"
    installed = subprocess.run([sys.executable, "-c", where], cwd="/", capture_output=True, text=True, timeout=60)
    installed = Path(installed.stdout.strip())
    assert _ask(installed, cwd=other) == 0  # the checkout the venv does import
