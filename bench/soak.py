"""Soak: a long run at 80 % of measured capacity; does the server stay healthy, flat and fast?

    python -m bench.soak [--minutes 10] [--steer-fraction 0.2] [--address HOST:PORT] [--rate R]

1. Capacity: a closed loop of the same mix (``--calibrate-concurrency`` requests in flight for
   ``--calibrate-s``) → completed requests per second. ``--rate`` skips it.
2. Soak: Poisson arrivals at ``--load`` (0.8) × capacity for ``--minutes``, a mix of plain
   generations (64-word prompts, 32 tokens) and SMC steering (``--steer-fraction``: 4 particles,
   max_word_length, 16 tokens), through ``loadtest.runner`` (the ``smcserve bench`` driver).
3. After the run drains: every decode worker's KV blocks in use (polled until 0, 60 s at most).

RSS is the whole server's (the scheduler process and its worker processes; the process tree of the
server this starts, or with ``--address`` none: null), after calibration (warm) and after the run.
Every request that does not finish normally counts as an error. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import psutil

from smcserve.client import Client
from smcserve.loadtest.runner import cpu_model, run_workload
from smcserve.loadtest.server_process import ServeProcess
from smcserve.loadtest.workloads import SmcMix, concurrency_workload, poisson_workload


def mix(args) -> dict:
    return dict(
        input_len=64,
        max_tokens=32,
        seed=args.seed,
        smc=SmcMix(ratio=args.steer_fraction, particles=4, max_tokens=16),
    )


def server_rss_mb(pid: int | None) -> float | None:
    """RSS of the server process and every process under it (Ray's workers included), MB."""
    if pid is None:
        return None
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def p99_ms(records, lo: float, hi: float) -> float | None:
    ttfts = [r.ttft_s for r in records if r.ok and lo <= r.send_s < hi and r.ttft_s is not None]
    return float(np.percentile(ttfts, 99) * 1e3) if ttfts else None


def kv_in_use(address: str, bound_s: float = 60.0) -> int:
    with Client(address) as c:
        deadline = time.monotonic() + bound_s
        while True:
            n = sum(w.kv_blocks_in_use for w in c.info().decode_workers)
            if n == 0 or time.monotonic() > deadline:
                return n
            time.sleep(0.5)


def soak(args, address: str, pid: int | None) -> dict:
    if args.rate:
        capacity = None
        rate = args.rate
    else:
        cal = run_workload(
            address,
            concurrency_workload(args.calibrate_concurrency, **mix(args)),
            max_duration=args.calibrate_s,
            drain_s=120,
            progress=False,
            label="calibrate",
        )
        done = [r for r in cal.records if r.ok]
        capacity = len(done) / cal.duration_s
        rate = args.load * capacity
    rss_start = server_rss_mb(pid)
    result = run_workload(
        address,
        poisson_workload(rate, **mix(args)),
        max_duration=args.minutes * 60,
        drain_s=120,
        progress=not args.quiet,
        label="soak",
    )
    records = result.records
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.code or r.status] = errors.get(r.code or r.status, 0) + 1
    kv_end = kv_in_use(address)
    rss_end = server_rss_mb(pid)
    span = args.minutes * 60
    first, last = p99_ms(records, 0, 60), p99_ms(records, span - 60, span)
    out = {
        "requests": len(records),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "kv_blocks_in_use_end": kv_end,
        "p99_ttft_ms_first_minute": first,
        "p99_ttft_ms_last_minute": last,
        "capacity_rps": capacity,
        "rate_rps": rate,
        "minutes": args.minutes,
        "steer_fraction": args.steer_fraction,
        "cpu": cpu_model(),
        "dtype": args.dtype,
    }
    out["targets"] = {
        "zero_errors": out["errors"] == 0,
        "rss_growth_le_10pct": None if rss_start is None else rss_end <= 1.10 * rss_start,
        "zero_blocks_in_use_end": kv_end == 0,
        "p99_ttft_last_le_1_5x_first": None if not (first and last) else last <= 1.5 * first,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (skips measuring capacity)")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity to run at")
    ap.add_argument("--steer-fraction", type=float, default=0.2)
    ap.add_argument("--calibrate-s", type=float, default=60.0)
    ap.add_argument("--calibrate-concurrency", type=int, default=8)
    ap.add_argument("--address", default=None, help="a running server (default: start one)")
    ap.add_argument("--dtype", default="auto", help="for the server this starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.address:
        out = soak(args, args.address, None)
    else:
        with ServeProcess("--dtype", args.dtype, "--max-inflight", "512") as server:
            out = soak(args, server.address, server.proc.pid)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
