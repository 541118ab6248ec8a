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
ROOT = "smcserve"  # the installed import root (smcserve/__init__.py; the folders are mapped under it)


def packages() -> list[str]:
    return sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name not in ("tests", ROOT))


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(package(alias.name), node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == ROOT:  # from smcserve import x
            out |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((package(node.module), node.lineno))
    return out


def package(module: str) -> str:
    """The repository folder a module lives in: ``smcserve.decode.loop`` → ``decode``, ``bench.timing`` → ``bench``."""
    parts = module.split(".")
    return parts[1] if parts[0] == ROOT and len(parts) > 1 else parts[0]


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
        "client": "def f():\n    from smcserve.entrypoints.cli import main\n",
        "decode": "import smcserve.prefill.worker\n",
        "loadtest": "from bench import timing\nfrom smcserve.client import Client\n",
        "smc": "from smcserve import scheduler\n",
    }.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(text)
    assert violations("client", tmp_path) == ["client/m.py:2 imports entrypoints"]
    assert violations("decode", tmp_path) == ["decode/m.py:1 imports prefill"]
    assert violations("smc", tmp_path) == ["smc/m.py:1 imports scheduler"]
    assert violations("loadtest", tmp_path) == []  # bench is loadtest's sibling, client below it


def test_installed_code_does_not_import_repository_only_code():
    """``bench/`` and ``tests/`` are not installed (only ``smcserve`` is): nothing installed may import them."""
    for pkg in packages():
        if pkg == "bench":
            continue
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.name.endswith(GENERATED):
                continue
            found = {other for other, _ in imported_packages(path)} & {"bench", "tests"}
            assert not found, f"{path.relative_to(REPO)} imports {found}"
