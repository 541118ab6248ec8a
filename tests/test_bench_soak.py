"""``bench.soak`` runs end to end (seconds, not minutes) and prints every key its targets are read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def test_soak_prints_its_keys(server):
    out = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--address", server.address, "--minutes", "0.1", "--rate", "1", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("requests", "errors", "kv_blocks_in_use_end", "p99_ttft_ms_first_minute", "p99_ttft_ms_last_minute"):
        assert isinstance(result[key], (int, float)), (key, result)
    assert "rss_start_mb" in result and "rss_end_mb" in result  # null against a server it did not start
    assert result["requests"] >= 1 and result["errors"] == 0 and result["kv_blocks_in_use_end"] == 0
