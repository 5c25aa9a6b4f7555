"""One module owns the weights: no other product module builds the weight folders, names the registry, or calls a
vLLM admin endpoint (it parses the code, so a new path spelled out by hand anywhere fails here)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gopo_online", "trainer", "workers", "simulator")
OWNER = "gopo_online/serving/weights.py"
ADMIN_ROUTES = (
    "/pause",
    "/resume",
    "/collective_rpc",
    "/update_weight_version",
    "/weight_info",
    "/reset_prefix_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/v1/models",
)
READINESS_PROBES = {"gopo_online/serving/process.py": {"/v1/models"}, "gopo_online/loadserver.py": {"/v1/models"}}
"""The server process waits for its model list to answer before it calls itself started: not a version read. The
instant-reply load server (bench only) SERVES the route, as vLLM does; it calls nothing."""
LAYOUT_STRINGS = ("versions.json", "lora-v", "weights/")
OWNER_ONLY_NAMES = {"AdminClient", "LoRATransport", "FullReloadTransport", "VersionRegistry", "atomic_dir"}
BENCH = "gopo_online/bench_weights.py"
"""The push benchmark picks a transport for its one-agent WeightSync (it builds no path, calls no route)."""


def violations(root: Path) -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == OWNER:
                continue
            tree = ast.parse(path.read_text(), rel)
            allowed_routes = READINESS_PROBES.get(rel, set())
            docstrings = {
                id(n.body[0].value)
                for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.body
                and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    s = node.value
                    for route in ADMIN_ROUTES:
                        if route not in allowed_routes and (s == route or s.startswith(route + "?")):
                            out.append(f"{rel}:{node.lineno}: admin route {s!r}")
                    out += [f"{rel}:{node.lineno}: weights layout {s!r}" for t in LAYOUT_STRINGS if t in s]
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                    for side in (node.left, node.right):
                        if isinstance(side, ast.Constant) and side.value == "weights":
                            out.append(f"{rel}:{node.lineno}: builds a path with 'weights'")
                if isinstance(node, ast.ImportFrom) and node.module == "gopo_online.serving.weights" and rel != BENCH:
                    out += [f"{rel}:{node.lineno}: imports {a.name}" for a in node.names if a.name in OWNER_ONLY_NAMES]
    return out


def test_no_module_but_weights_builds_weight_paths_or_calls_admin_routes() -> None:
    assert violations(ROOT) == []


def test_the_scan_sees_a_hand_built_path_and_an_admin_call(tmp_path: Path) -> None:
    bad = tmp_path / "workers"
    bad.mkdir()
    (bad / "w.py").write_text(
        "from gopo_online.serving.weights import AdminClient\n"
        "def f(run_dir, a):\n"
        "    p = run_dir / 'weights' / 'serving'\n"
        "    return AdminClient('http://x').get('/v1/models'), p / 'versions.json'\n"
    )
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    found = violations(tmp_path)
    assert len(found) == 4, found
