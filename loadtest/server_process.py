"""Run ``smcserve serve`` in a subprocess and wait until it listens (tests, benchmarks, load tests). The
command runs as a separate process (``python -m entrypoints.cli``), so this module imports nothing above it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smcserve.protos.messages import DEFAULT_HOST


def free_port() -> int:
    with socket.socket() as s:
        s.bind((DEFAULT_HOST, 0))
        return s.getsockname()[1]


class ServeProcess:
    """``smcserve serve ARGS`` exactly as a user starts it, on a free loopback port."""

    def __init__(self, *args: str, timeout: float = 300, log_path: str | Path | None = None, env: dict | None = None):
        """``env``: the server's environment (default: this process's)."""
        self.port = free_port()
        self.address = f"{DEFAULT_HOST}:{self.port}"
        self.log_path = Path(log_path or tempfile.mkstemp(prefix=f"smcserve-{self.port}-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        http = [] if any(a in ("--http-port", "--no-http") for a in args) else ["--http-port", "0"]  # a free one
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smcserve.entrypoints.cli", "serve", "--port", str(self.port), *http, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1"),
            cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.time() + timeout
        while "smcserve listening on" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"smcserve serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"smcserve serve did not start in {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        found = re.search(r"^http (https?://\S+)", self.output(), re.MULTILINE)
        self.http_address = found.group(1) if found else ""  # the OpenAI-compatible API ("" when off)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as Ctrl-C would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def stop_cleanly(self) -> None:
        """:meth:`stop`, and raise (with the end of its output) unless it exited 0."""
        code = self.stop()
        if code != 0:
            raise AssertionError(f"smcserve serve did not shut down cleanly ({code}):\n{self.output()[-3000:]}")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
