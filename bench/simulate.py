"""Replay the Mooncake synthetic trace through the simulator under the five placement policies.

    python -m bench.simulate [--trace loadtest/traces/synthetic_trace.jsonl] [--prefill 8] [--decode 8]
                             [--cache-blocks 4096] [--slo-ttft-s 30] [--slo-tbt-ms 100] [--no-sweep]

The policies are the real ``scheduler.conductor`` objects; the costs come from a stated, ASSUMED
hardware profile (``scheduler.conductor.simulator.DEFAULT_PROFILE``: 8×A800 nodes serving a 70B-class model,
512-token KV blocks). Prints one JSON object:

- ``policies``: per policy, with early rejection on (TTFT / TBT SLOs): mean and p90 TTFT of the
  served requests, SLO attainment (fraction of ALL requests served within both SLOs), rejections by
  reason, prefix-cache hit rate (fraction of the served prompts' blocks reused);
- ``no_rejection``: the same runs with every request admitted, the setting of Mooncake's comparison
  (average TTFT over all requests);
- the ordering check (random > load > cache_local > cache_global) and cache_global's improvement over
  load, against Mooncake's reference numbers;
- ``offered_prefill_load``: prefill work per instance-second with no cache and with every block
  reused that was seen earlier (how loaded the prefill pool is: > 1 means it cannot keep up);
- ``sweep``: mean TTFT (no rejection) as the prefill pool grows, to show how the margins depend on load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smcserve.loadtest.trace import DEFAULT_TRACE, load_trace
from smcserve.scheduler.conductor import POLICY_NAMES, RequestInfo, cached_tokens_for
from smcserve.scheduler.conductor.simulator import (
    DEFAULT_PROFILE,
    SimConfig,
    rows_to_requests,
    simulate,
    trace_hit_rate,
)

MOONCAKE_MEAN_TTFT_S = {"random": 19.65, "load": 5.27, "cache_local": 3.58, "cache_global": 3.07}
ORDER = ("random", "load", "cache_local", "cache_global")


def _ordering(table: dict) -> dict:
    vals = [table[p]["mean_ttft_s"] for p in ORDER]
    ok = all(a > b for a, b in zip(vals, vals[1:]))
    imp = 1 - table["cache_global"]["mean_ttft_s"] / table["load"]["mean_ttft_s"]
    return {
        "random>load>cache_local>cache_global": ok,
        "mean_ttft_s": dict(zip(ORDER, vals)),
        "cache_global_vs_load_improvement": round(imp, 3),
        "cache_global_vs_cache_local_improvement": round(
            1 - table["cache_global"]["mean_ttft_s"] / table["cache_local"]["mean_ttft_s"], 3
        ),
    }


def _offered_load(reqs, profile, n_prefill: int) -> dict:
    cost, bs = profile.cost, profile.block_size
    span_ms = max(reqs[-1].arrival_ms - reqs[0].arrival_ms, 1.0)
    cold = warm = 0.0
    seen: set[str] = set()
    for r in reqs:
        cold += cost.prefill_ms(r.input_length, 0)
        hits = 0
        for k in r.block_keys:
            if k not in seen:
                break
            hits += 1
        c = cached_tokens_for(hits, RequestInfo(r.block_keys, r.input_length, bs))
        warm += cost.prefill_ms(r.input_length - c, c)
        seen.update(r.block_keys)
    return {
        "no_cache": round(cold / (n_prefill * span_ms), 3),
        "unbounded_cache_no_transfer_cost": round(warm / (n_prefill * span_ms), 3),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--prefill", type=int, default=8)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument(
        "--cache-blocks",
        type=int,
        default=DEFAULT_PROFILE.prefill_cache_blocks,
        help="LRU capacity of each prefill instance, in 512-token blocks (0: unbounded)",
    )
    ap.add_argument("--slo-ttft-s", type=float, default=30.0)
    ap.add_argument("--slo-tbt-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N rows")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    reqs = rows_to_requests(load_trace(args.trace, args.limit))
    profile = DEFAULT_PROFILE
    cache = None if args.cache_blocks == 0 else args.cache_blocks

    def cfg(early_reject: bool, n_prefill: int = args.prefill) -> SimConfig:
        return SimConfig(
            n_prefill=n_prefill,
            n_decode=args.decode,
            cache_blocks=cache,
            slo_ttft_ms=args.slo_ttft_s * 1e3,
            slo_tbt_ms=args.slo_tbt_ms,
            early_reject=early_reject,
            seed=args.seed,
        )

    keep = ("mean_ttft_s", "p90_ttft_s", "slo_attainment", "rejected", "hit_rate")
    table, full, noreject = {}, {}, {}
    for name in POLICY_NAMES:
        s = simulate(reqs, name, profile, cfg(True)).summary()
        full[name] = s
        table[name] = {k: s[k] for k in keep} | {"fetched_block_rate": s["fetched_block_rate"]}
        s2 = simulate(reqs, name, profile, cfg(False)).summary()
        noreject[name] = {k: s2[k] for k in ("mean_ttft_s", "p90_ttft_s", "slo_attainment", "hit_rate")}

    sweep = {}
    if not args.no_sweep:
        for n in sorted({args.prefill, 10, 12, 16}):
            sweep[str(n)] = {
                name: simulate(reqs, name, profile, cfg(False, n)).summary()["mean_ttft_s"] for name in ORDER
            }

    total_cap = None if cache is None else cache * args.prefill
    out = {
        "trace": str(args.trace),
        "requests": len(reqs),
        "setup": {
            "prefill_instances": args.prefill,
            "decode_instances": args.decode,
            "cache_blocks_per_prefill_instance": cache,
            "slo_ttft_s": args.slo_ttft_s,
            "slo_tbt_ms": args.slo_tbt_ms,
            "block_size": profile.block_size,
            "local_reuse_for_all_policies": True,
        },
        "hardware_profile": profile.as_dict(),
        "trace_hit_rate": {
            "unbounded": round(trace_hit_rate(reqs), 4),
            "one_lru_of_total_capacity": (round(trace_hit_rate(reqs, total_cap), 4) if total_cap else None),
        },
        "offered_prefill_load": _offered_load(reqs, profile, args.prefill),
        "policies": table,
        "ordering_with_rejection": _ordering(table),
        "no_rejection": noreject,
        "ordering_no_rejection": _ordering(noreject),
        "mooncake_reference": {
            "mean_ttft_s": MOONCAKE_MEAN_TTFT_S,
            "cache_global_vs_load_improvement": round(1 - 3.07 / 5.27, 3),
            "cache_global_vs_cache_local_improvement": round(1 - 3.07 / 3.58, 3),
        },
        "sweep_mean_ttft_s_by_prefill_instances": sweep,
        "wall_s": None,
    }
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
