"""The installed distribution has one import root, ``smcserve``: a wheel built from this repository
installs into a fresh virtual environment and ``pip show -f`` lists nothing outside it."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    (whl,) = out.glob("smcserve-*.whl")
    return whl


def test_wheel_installs_one_import_root(wheel: Path, tmp_path: Path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    # --no-deps: the dependencies are not what this checks, and the test must not need the network
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, cwd=tmp_path)
    show = subprocess.run([py, "-m", "pip", "show", "-f", "smcserve"], check=True, capture_output=True, text=True)
    files = show.stdout.split("Files:", 1)[1].split()
    assert files, show.stdout
    outside = [
        f
        for f in files
        if not f.startswith(("smcserve/", "smcserve-"))  # the package and its .dist-info
        and f != "../../../bin/smcserve"  # the console script
    ]
    assert outside == [], f"installed outside the smcserve root: {outside}"
    # every package of the repository is in the wheel, under the root
    for name in ("engine", "kvstore", "smc", "protos", "decode", "prefill", "scheduler", "client", "loadtest"):
        assert f"smcserve/{name}/__init__.py" in files, name
    assert "smcserve/protos/smcserve.proto" in files
    assert any(f.startswith("smcserve/loadtest/traces/") for f in files), "the shipped trace"
    top = subprocess.run(
        [py, "-c", "import smcserve, pathlib; print(pathlib.Path(smcserve.__file__).parent.parent)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    site = Path(top)
    assert not (site / "engine").exists() and not (site / "decode").exists()


def test_every_package_is_mapped():
    """A new folder with an ``__init__.py`` must be listed in pyproject's packages, or the wheel misses it."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    on_disk = set()
    for top in dirs:
        if top == "smcserve":
            continue
        base = ROOT / dirs[top]
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            on_disk.add(".".join((top, *rel)))
    assert on_disk - listed == set(), "folders missing from [tool.setuptools] packages"
