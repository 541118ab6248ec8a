"""Soak: a long run at 80 % of measured capacity; does the server stay healthy, flat and fast?

    python -m bench.soak [--minutes 10] [--steer-fraction 0.2] [--address HOST:PORT] [--rate R] [--seed 0]

The mix: plain generations (64-word random prompts, 32 tokens, ignore_eos) and, a seeded coin's
``--steer-fraction`` of them, SMC steering (4 particles, ``max_word_length``, 16 tokens), sent by
``loadtest.runner`` (the ``smcserve bench`` driver). Every phase has prompts of its own (a salt), so
nothing the soak sends is in the prefix cache before it is sent.

1. Capacity (``--rate`` skips it): closed loops of the mix at concurrency 4, 8, 16, ... (at most 64),
   each sending 2C + W requests (W = max(3C, 24)). Until the (C + W)-th completion every slot is
   busy, so the completions between the C-th (the first wave, started together, excluded) and the
   (C + W)-th measure the throughput at a steady C. Doubling stops when it gains less than 10 % or a
   level has a failure; the capacity is the best throughput (a closed loop's saturation throughput is
   the highest rate an open loop can sustain). With ``--rate`` a short closed loop
   (``--warmup-requests``) warms the server up instead.
2. Soak: Poisson arrivals at ``--load`` (0.8) × capacity for ``--minutes``, then ``--drain`` seconds
   for the requests still running (any left are cancelled, and count as errors).
3. KV: the decode workers' ``kv_blocks_in_use`` (``GetModelInfo``) summed, polled until 0 (60 s at most).

Errors: every request that does not end with a final message of ``stop`` or ``length`` (gRPC errors,
RESOURCE_EXHAUSTED included, ``abort``, cut off). TTFT is the client's (send → first token, or first
steering step); the first and last minute are chosen by send time.

RSS (``rss_start_mb`` after the warm-up or calibration, ``rss_end_mb`` after the drain) is the
scheduler process plus the Ray actor processes of its prefill and decode workers, found under the
process that listens on the server's port (the server this starts, or with ``--address`` a local one;
null when none is found). Ray's own processes (GCS, raylet, dashboard, idle workers) are reported
apart (``rss_ray_other_mb``); the embedded Redis is not counted: it is a cache that fills up to its
``maxmemory`` by design. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import psutil

from smcserve.client import Client
from smcserve.loadtest.metrics import RequestRecord
from smcserve.loadtest.runner import address_host, cpu_model, run_workload
from smcserve.loadtest.server_process import ServeProcess
from smcserve.loadtest.workloads import SmcMix, concurrency_workload, poisson_workload

NORMAL_FINISH = ("stop", "length")
WORKER_TITLES = ("ray::PrefillWorker", "ray::DecodeWorker")  # a Ray actor's process title starts with its class
MAX_CALIBRATE_CONCURRENCY = 64


def mix(args, salt: str, steer_fraction: float | None = None) -> dict:
    """The request mix, with prompts of their own per ``salt``."""
    ratio = args.steer_fraction if steer_fraction is None else steer_fraction
    return dict(
        input_len=64,
        max_tokens=32,
        seed=args.seed,
        salt=salt,
        smc=SmcMix(ratio=ratio, particles=4, max_tokens=16),
    )


def normal(rec: RequestRecord) -> bool:
    return rec.ok and rec.finish_reason in NORMAL_FINISH


def error_code(rec: RequestRecord) -> str:
    """A failed request's gRPC status code, ``INCOMPLETE``/``CANCELLED``, or ``finish:REASON``."""
    return rec.code or (f"finish:{rec.finish_reason}" if rec.ok else rec.status)


# --- capacity -----------------------------------------------------------------------------------------
@dataclass
class Level:
    """One closed-loop calibration level."""

    concurrency: int
    rps: float  # normal completions per second at a steady concurrency
    failed: int  # requests that did not finish normally


def closed_loop(address: str, concurrency: int, args) -> Level:
    window = max(3 * concurrency, 24)
    workload = concurrency_workload(
        concurrency, num_requests=2 * concurrency + window, **mix(args, f"calibrate{concurrency}")
    )
    run = run_workload(address, workload, progress=not args.quiet, label=f"calibrate c={concurrency}")
    done = sorted((r.send_s + r.end_s, normal(r)) for r in run.records if r.end_s is not None)
    t0, t1 = done[concurrency - 1][0], done[concurrency + window - 1][0]
    ok = sum(good for t, good in done[concurrency : concurrency + window])
    return Level(concurrency, ok / max(t1 - t0, 1e-9), sum(not normal(r) for r in run.records))


def measure_capacity(address: str, args) -> tuple[float, list[Level]]:
    """Double the concurrency until the throughput gains < 10 % or a level fails; the best throughput."""
    levels: list[Level] = []
    concurrency = 4
    while concurrency <= MAX_CALIBRATE_CONCURRENCY:
        level = closed_loop(address, concurrency, args)
        best = max((lv.rps for lv in levels), default=0.0)
        levels.append(level)
        if level.failed or level.rps < 1.1 * best:
            break
        concurrency *= 2
    clean = [lv.rps for lv in levels if not lv.failed]
    return max(clean or [levels[0].rps]), levels


def warm_up(address: str, n: int, args) -> None:
    """``n`` requests, 4 at a time, half of them steering (when the mix has any): both paths warm."""
    if n > 0:
        half = 0.5 if args.steer_fraction > 0 else 0.0
        workload = concurrency_workload(min(4, n), num_requests=n, **mix(args, "warmup", half))
        run_workload(address, workload, progress=not args.quiet, label="warm-up")


# --- the server's processes ---------------------------------------------------------------------------
@dataclass
class ServerRss:
    scheduler_mb: float
    workers_mb: float  # the prefill and decode workers' Ray actor processes
    workers: int
    ray_other_mb: float  # Ray's own processes under the scheduler: GCS, raylet, dashboard, idle workers

    @property
    def total_mb(self) -> float:
        return self.scheduler_mb + self.workers_mb


def listener_pid(address: str) -> int | None:
    """The local process listening on ``address``'s port, or None (not local, or not visible to us)."""
    host, port = address_host(address), address.rsplit(":", 1)[-1]
    if host is None or not port.isdigit():
        return None
    try:
        conns = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port) and c.pid:
            return c.pid
    return None


def server_rss(pid: int | None) -> ServerRss | None:
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        rss = ServerRss(root.memory_info().rss / 2**20, 0.0, 0, 0.0)
        children = root.children(recursive=True)
    except psutil.Error:
        return None
    for p in children:
        try:
            mb = p.memory_info().rss / 2**20
            title = (p.cmdline() or [""])[0]
        except psutil.Error:
            continue  # ended meanwhile
        if title.startswith(WORKER_TITLES):
            rss.workers_mb += mb
            rss.workers += 1
        else:
            rss.ray_other_mb += mb
    return rss


def kv_in_use(address: str, bound_s: float = 60.0) -> int:
    """Decode workers' KV blocks in use, summed; polled until 0 (a sequence is freed just after its last
    token is sent) or ``bound_s``."""
    with Client(address) as c:
        deadline = time.monotonic() + bound_s
        while True:
            n = sum(w.kv_blocks_in_use for w in c.info().decode_workers)
            if n == 0 or time.monotonic() > deadline:
                return n
            time.sleep(0.5)


def p99_ttft_ms(records: list[RequestRecord], lo: float, hi: float) -> float | None:
    """p99 TTFT of the requests sent in [lo, hi) s that finished normally."""
    ttfts = [r.ttft_s for r in records if normal(r) and lo <= r.send_s < hi and r.ttft_s is not None]
    return float(np.percentile(ttfts, 99) * 1e3) if ttfts else None


def soak(args, address: str, pid: int | None) -> dict:
    if args.rate:
        capacity, levels, rate = None, [], args.rate
        warm_up(address, args.warmup_requests, args)
    else:
        capacity, levels = measure_capacity(address, args)
        rate = args.load * capacity
    with Client(address) as c:
        dtype = c.info().dtype
    rss_start = server_rss(pid)
    span = args.minutes * 60
    run = run_workload(
        address,
        poisson_workload(rate, **mix(args, "soak")),
        max_duration=span,
        drain_s=args.drain,
        progress=not args.quiet,
        label="soak",
    )
    records = run.records
    errors: dict[str, int] = {}
    for r in records:
        if not normal(r):
            errors[error_code(r)] = errors.get(error_code(r), 0) + 1
    kv_end = kv_in_use(address)
    rss_end = server_rss(pid)
    first, last = p99_ttft_ms(records, 0, 60), p99_ttft_ms(records, span - 60, span)
    out = {
        "requests": len(records),
        "requests_by_kind": dict(Counter(r.kind for r in records)),
        "errors": sum(errors.values()),
        "errors_by_code": dict(sorted(errors.items())),
        "rss_start_mb": rss_start and round(rss_start.total_mb, 1),
        "rss_end_mb": rss_end and round(rss_end.total_mb, 1),
        "rss_workers": rss_start and rss_start.workers,
        "rss_ray_other_mb": [rss and round(rss.ray_other_mb, 1) for rss in (rss_start, rss_end)],
        "kv_blocks_in_use_end": kv_end,
        "p99_ttft_ms_first_minute": first,
        "p99_ttft_ms_last_minute": last,
        "capacity_rps": capacity,
        "calibration": [asdict(lv) for lv in levels],
        "rate_rps": rate,
        "minutes": args.minutes,
        "steer_fraction": args.steer_fraction,
        "seed": args.seed,
        "cpu": cpu_model(),
        "dtype": dtype,
    }
    out["targets"] = {
        "zero_errors": out["errors"] == 0,
        "rss_growth_le_10pct": None if not (rss_start and rss_end) else rss_end.total_mb <= 1.10 * rss_start.total_mb,
        "zero_blocks_in_use_end": kv_end == 0,
        "p99_ttft_last_le_1_5x_first": None if not (first and last) else last <= 1.5 * first,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default: 10)")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s; skips measuring the capacity")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity (default: 0.8)")
    ap.add_argument("--steer-fraction", type=float, default=0.2, help="share of SMC steering requests (default: 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="arrivals, prompts, the steering coin and sampling seeds")
    ap.add_argument("--address", default=None, help="a running server (default: start one)")
    ap.add_argument("--dtype", default="auto", help="of the server this starts (default: auto)")
    ap.add_argument("--drain", type=float, default=120.0, help="s to wait for requests running at the end")
    ap.add_argument("--warmup-requests", type=int, default=8, help="with --rate: closed-loop requests first")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if not 0.0 <= args.steer_fraction <= 1.0:
        ap.error(f"--steer-fraction: must be in [0, 1], got {args.steer_fraction}")
    if args.minutes <= 0 or args.rate < 0 or not 0 < args.load <= 1:
        ap.error("--minutes must be > 0, --rate >= 0, --load in (0, 1]")
    if args.address:
        out = soak(args, args.address, listener_pid(args.address))
    else:
        with ServeProcess("--dtype", args.dtype) as server:
            out = soak(args, server.address, server.proc.pid)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
