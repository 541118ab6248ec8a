"""gRPC protocol definitions. The Python modules are generated from the .proto files on first import."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("smcserve.proto", "worker.proto")


def _stale() -> bool:
    for name in PROTOS:
        stem = name[:-6]
        src = PROTO_DIR / name
        for out in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"):
            target = PROTO_DIR / out
            if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
                return True
    return False


def generate() -> None:
    """Compile the .proto files into ``protos/*_pb2*.py`` (atomically, safe across processes)."""
    from grpc_tools import protoc

    with open(PROTO_DIR / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _stale():
            return
        with tempfile.TemporaryDirectory() as tmp:
            # compile under the import root's path, so the generated modules import each other as
            # ``smcserve.protos.*`` (worker.proto imports "smcserve/protos/smcserve.proto")
            src = Path(tmp, "src", "smcserve", "protos")
            src.mkdir(parents=True)
            for name in PROTOS:
                shutil.copyfile(PROTO_DIR / name, src / name)
            out = Path(tmp, "out")
            out.mkdir()
            include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
            args = [
                "protoc",
                f"-I{Path(tmp, 'src')}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
            ] + [f"smcserve/protos/{p}" for p in PROTOS]
            if protoc.main(args) != 0:
                raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
            for f in Path(out, "smcserve", "protos").iterdir():
                tmp_file = PROTO_DIR / f".{f.name}.tmp"
                shutil.copyfile(f, tmp_file)
                os.replace(tmp_file, PROTO_DIR / f.name)


if _stale():
    generate()

from smcserve.protos import smcserve_pb2, smcserve_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

__all__ = ["smcserve_pb2", "smcserve_pb2_grpc", "worker_pb2", "worker_pb2_grpc", "generate"]
