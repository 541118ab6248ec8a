"""``bench.store_throughput`` runs (tiny sizes, a second or two) and prints every key its target is read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_store_throughput_prints_its_keys():
    cmd = [sys.executable, "-m", "bench.store_throughput", "--shape", "2,2,3,16,64", "--batch", "4"]
    cmd += ["--batches", "2", "--repeats", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # one JSON object, nothing else on stdout
    keys = {"store_put_gbps", "raw_set_gbps", "store_get_gbps", "raw_get_gbps", "store_vs_raw_put", "store_vs_raw_get"}
    for kind in ("single", "cluster"):
        assert keys <= set(result[kind]), result
        assert all(result[kind][k] > 0 for k in keys), result
    assert result["cluster"]["masters"] == 3 and result["block_bytes"] == 60 + 2 * 2 * 3 * 16 * 64 * 4
