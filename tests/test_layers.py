"""Layers only point down: no module imports a package of a higher layer (imports inside functions included).

Lowest first; packages in one layer may import each other, except ``decode`` and ``prefill`` (the two pools
share only what lies below them). Every top-level package must have a layer."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [["engine"], ["kvstore"], ["smc"], ["protos"], ["decode", "prefill"], ["scheduler"], ["client"],
          ["loadtest", "bench"], ["entrypoints"]]  # fmt: skip
APART = {frozenset({"decode", "prefill"})}  # same layer, yet neither imports the other
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def packages() -> list[str]:
    return sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


def violations(pkg: str, root: Path = REPO) -> list[str]:
    bad = []
    for path in sorted((root / pkg).rglob("*.py")):
        if path.name.endswith(GENERATED) or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        for other, line in sorted(imported_packages(path)):
            if other == pkg or other not in LEVEL:
                continue
            if LEVEL[other] > LEVEL[pkg] or frozenset({pkg, other}) in APART:
                bad.append(f"{path.relative_to(root)}:{line} imports {other}")
    return bad


def test_every_package_has_a_layer():
    assert sorted(LEVEL) == packages()


def test_no_package_imports_a_higher_layer():
    assert [v for pkg in packages() for v in violations(pkg)] == []


def test_the_check_sees_upward_imports(tmp_path):
    """The rule catches what it should: an upward import inside a function, a sibling pool, a plain import."""
    for pkg, text in {
        "client": "def f():\n    from entrypoints.cli import main\n",
        "decode": "import prefill.worker\n",
        "loadtest": "from bench import timing\nfrom client import Client\n",
    }.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(text)
    assert violations("client", tmp_path) == ["client/m.py:2 imports entrypoints"]
    assert violations("decode", tmp_path) == ["decode/m.py:1 imports prefill"]
    assert violations("loadtest", tmp_path) == []  # bench is loadtest's sibling, client below it
