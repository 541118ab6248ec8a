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
    # seed 0 at 0.5 req/s sends 6 requests in the 6 s (2 of them steering): fewer than the fixture's
    # --max-inflight 8 and its 91 KV blocks hold even if all were in flight at once, on any machine
    cmd = [sys.executable, "-m", "bench.soak", "--address", server.address, "--minutes", "0.1", "--rate", "0.5"]
    cmd += ["--steer-fraction", "0.5", "--seed", "0", "--quiet"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # one JSON object, nothing else on stdout

    assert result["requests_by_kind"] == {"text": 4, "smc": 2} and result["requests"] == 6
    assert result["errors"] == 0 and result["errors_by_code"] == {}
    assert result["kv_blocks_in_use_end"] == 0
    for key in ("p99_ttft_ms_first_minute", "p99_ttft_ms_last_minute"):
        assert isinstance(result[key], float) and result[key] > 0, (key, result)
    # a run shorter than a minute: its first and last minute are the same requests
    assert result["p99_ttft_ms_first_minute"] == result["p99_ttft_ms_last_minute"]
    assert result["rate_rps"] == 0.5 and result["capacity_rps"] is None and result["calibration"] == []
    assert result["minutes"] == 0.1 and result["dtype"] == "float32" and isinstance(result["cpu"], str)
    if sys.platform == "linux":  # the fixture's server is local: its processes are found by its port
        assert result["rss_workers"] == 2, result  # one prefill and one decode worker
        assert result["rss_start_mb"] > 0 and result["rss_end_mb"] > 0
        assert all(isinstance(x, float) for x in result["rss_ray_other_mb"])
    assert result["targets"]["zero_errors"] is True and result["targets"]["zero_blocks_in_use_end"] is True
    assert set(result["targets"]) == {
        "zero_errors",
        "rss_growth_le_10pct",
        "zero_blocks_in_use_end",
        "p99_ttft_last_le_1_5x_first",
    }
