"""Prefix-cache benchmark: a scaled slice of the Mooncake trace through the real stack, with the
global prefix cache (``cache_global``) and with the prefix cache off, side by side.

    python -m bench.prefix_cache [--rows 60] [--start 1960] [--block-tokens 24] [--concurrency 1]

Rows are those of at most ``--max-blocks`` 512-token blocks (the CPU keeps prompts short), taken from
``--start``; each trace block becomes ``--block-tokens`` words (one token each with SmolLM2's
tokenizer), outputs are capped at ``--max-output`` tokens and requests run ``--concurrency`` at a
time. Prints one JSON object: TTFT p50/p99 with and without the cache and their ratio, the server's
hit rate (cached prompt tokens / prompt tokens) and the hit rate an unbounded cache reaches on the
same slice (token-weighted, and at block granularity).
"""

from __future__ import annotations

import argparse
import json

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--start", type=int, default=1960)
    p.add_argument("--max-blocks", type=int, default=24)
    p.add_argument("--block-tokens", type=int, default=24)
    p.add_argument("--max-output", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1)
    args = p.parse_args()
    rows = select_rows(load_trace(args.trace), max_blocks=args.max_blocks)[args.start : args.start + args.rows]
    scaling = TraceScaling(block_tokens=args.block_tokens, time_scale=0.0, output_scale=1.0, max_output=args.max_output)
    cache = replay(rows, scaling, args.concurrency, "--policy", "cache_global")
    nocache = replay(rows, scaling, args.concurrency, "--policy", "load", "--no-prefix-cache")
    unbounded = scaled_token_hit_rate(rows, scaling)
    print(
        json.dumps(
            {
                "slice": {"rows": len(rows), "start": args.start, "max_blocks": args.max_blocks},
                "scaling": scaling.describe(),
                "concurrency": args.concurrency,
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
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
