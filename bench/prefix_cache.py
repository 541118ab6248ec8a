"""Prefix-cache benchmark: a scaled slice of the Mooncake trace through the real stack, with the
global prefix cache (``cache_global``) and with the prefix cache off, side by side.

    python -m bench.prefix_cache [--rows 60] [--start 1960] [--block-tokens 24] [--concurrency 1]
                                 [--prefill-chunk N] [--compare-unchunked]

Rows are those of at most ``--max-blocks`` 512-token blocks (the CPU keeps prompts short), taken from
``--start``; each trace block becomes ``--block-tokens`` words (one token each with SmolLM2's
tokenizer), outputs are capped at ``--max-output`` tokens and requests run ``--concurrency`` at a
time. Prints one JSON object: TTFT p50/p99 with and without the cache and their ratio, the server's
hit rate (cached prompt tokens / prompt tokens) and the hit rate an unbounded cache reaches on the
same slice (token-weighted, and at block granularity).

With two requests in flight a cached request can wait behind the other one's uncached prefill on the
(one) prefill worker; chunked prefill (``--prefill-chunk``, passed to the servers) lets it run between
that prompt's chunks. So the slice is also replayed 2 at a time (the same runs when ``--concurrency``
is 2): ``ttft_p50_ratio_2_in_flight``; ``--compare-unchunked`` adds the 2-in-flight pair with
``--prefill-chunk 0`` (each prompt whole, in arrival order): ``ttft_p50_ratio_2_in_flight_unchunked``.
"""

from __future__ import annotations

import argparse
import json

from smcserve.engine.config import DEFAULT_PREFILL_CHUNK
from smcserve.loadtest.runner import run_workload
from smcserve.loadtest.server_process import ServeProcess
from smcserve.loadtest.trace import (
    DEFAULT_TRACE,
    TraceScaling,
    load_trace,
    scaled_token_hit_rate,
    select_rows,
    trace_workload,
    unbounded_hit_rate,
)

TRACE = DEFAULT_TRACE  # loadtest/traces/synthetic_trace.jsonl, shipped in the repository


def replay(rows, scaling, concurrency: int, *serve_args: str) -> dict:
    with ServeProcess("--dtype", "float32", "--redis-maxmemory", "512mb", *serve_args) as srv:
        result = run_workload(srv.address, trace_workload(rows, scaling, max_concurrency=concurrency), progress=False)
    return result.metrics()


def replay_pair(rows, scaling, concurrency: int, *serve_args: str) -> tuple[dict, dict]:
    """The slice with the global prefix cache, then with the prefix cache off (two fresh servers)."""
    cache = replay(rows, scaling, concurrency, "--policy", "cache_global", *serve_args)
    nocache = replay(rows, scaling, concurrency, "--policy", "load", "--no-prefix-cache", *serve_args)
    return cache, nocache


def ttft_figures(cache: dict, nocache: dict, suffix: str) -> dict:
    return {
        f"ttft_p50_ms_cache{suffix}": round(cache["median_ttft_ms"], 1),
        f"ttft_p50_ms_nocache{suffix}": round(nocache["median_ttft_ms"], 1),
        f"ttft_p50_ratio{suffix}": round(cache["median_ttft_ms"] / nocache["median_ttft_ms"], 3),
        f"ttft_p99_ratio{suffix}": round(cache["p99_ttft_ms"] / nocache["p99_ttft_ms"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--start", type=int, default=1960)
    p.add_argument("--max-blocks", type=int, default=24)
    p.add_argument("--block-tokens", type=int, default=24)
    p.add_argument("--max-output", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=None, help="the servers' --prefill-chunk (default: theirs)")
    p.add_argument("--compare-unchunked", action="store_true", help="also 2 in flight with --prefill-chunk 0")
    args = p.parse_args()
    rows = select_rows(load_trace(args.trace), max_blocks=args.max_blocks)[args.start : args.start + args.rows]
    scaling = TraceScaling(block_tokens=args.block_tokens, time_scale=0.0, output_scale=1.0, max_output=args.max_output)
    chunk = () if args.prefill_chunk is None else ("--prefill-chunk", str(args.prefill_chunk))
    cache, nocache = replay_pair(rows, scaling, args.concurrency, *chunk)
    two = (cache, nocache) if args.concurrency == 2 else replay_pair(rows, scaling, 2, *chunk)
    unchunked = replay_pair(rows, scaling, 2, "--prefill-chunk", "0") if args.compare_unchunked else None
    unbounded = scaled_token_hit_rate(rows, scaling)
    print(
        json.dumps(
            {
                "slice": {"rows": len(rows), "start": args.start, "max_blocks": args.max_blocks},
                "scaling": scaling.describe(),
                "concurrency": args.concurrency,
                "prefill_chunk": args.prefill_chunk if args.prefill_chunk is not None else DEFAULT_PREFILL_CHUNK,
                "completed": [cache["completed"], nocache["completed"]],
                "ttft_p50_ms_cache": round(cache["median_ttft_ms"], 1),
                "ttft_p50_ms_nocache": round(nocache["median_ttft_ms"], 1),
                "ttft_p99_ms_cache": round(cache["p99_ttft_ms"], 1),
                "ttft_p99_ms_nocache": round(nocache["p99_ttft_ms"], 1),
                "ttft_p50_ratio": round(cache["median_ttft_ms"] / nocache["median_ttft_ms"], 3),
                "ttft_p99_ratio": round(cache["p99_ttft_ms"] / nocache["p99_ttft_ms"], 3),
                "hit_rate": round(cache["cache_hit_rate"], 4),
                "hit_rate_nocache": round(nocache["cache_hit_rate"], 4),
                "unbounded_hit_rate": round(unbounded, 4),
                "unbounded_block_hit_rate": round(unbounded_hit_rate(rows), 4),
                "hit_rate_vs_unbounded": round(cache["cache_hit_rate"] / unbounded, 3) if unbounded else None,
                **ttft_figures(*two, "_2_in_flight"),
                **(ttft_figures(*unchunked, "_2_in_flight_unchunked") if unchunked else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
