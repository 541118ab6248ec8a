"""Patches vs per-token synchronisation (issue 14): the same steering task on two decode workers on two
Ray nodes, with ``patch_max_tokens = 1`` (every token a round trip) and with patches.

    python -m bench.patches [--quick] [--seeds 20] [--particles 16 64] [--patch 8] [--entropy none|auto|NATS]

Task: a chat prompt asking for a person as JSON; potentials: words of at most 5 letters
(``max_word_length``) and a JSON schema (``json_schema``); temperature 1, ``--max-tokens`` new tokens.
The full stack (``smcserve serve`` in a subprocess against a local two-node Ray cluster,
``ray.cluster_utils.Cluster``, one decode worker per node), one ``steer`` call at a time, the
seeds 0..S−1 for each mode and N, the two modes alternating seed by seed (their order swapped each
seed, so that the load of a shared machine drifts over both alike), after one warm-up call per mode.
Both modes use the same resampling scheme (``--scheme``, ESS < ``--ess``·N).

Per mode: round trips per generated token (``SteeringResult.roundtrips_per_token``: steps per token
of the longest particle, averaged over requests), wall time (sum over its requests), the variance and
mean of log Ẑ across seeds (finite ones; ``*_dead`` counts the −inf), tokens per patch, and compute
vs synchronisation seconds (``compute_s``, ``sync_s``). Top-level keys pool every N; ``by_n`` breaks
them down (with each N's wall speedup, round-trip reduction and variance ratio); with several N,
``var_log_z_*`` is the mean over N of the per-N variances. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

PROMPT = "Describe a person as a JSON object with a name and an age."
WARMUP_PROMPT = "Give me a JSON object for a cat."
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
POTENTIALS = [{"kind": "max_word_length", "max_len": 5}, {"kind": "json_schema", "schema": SCHEMA}]


def start(args):
    from ray.cluster_utils import Cluster

    from smcserve.loadtest.server_process import ServeProcess
    from smcserve.scheduler.stack import RAY_SYSTEM_CONFIG

    head = {"num_cpus": 2, "include_dashboard": False, "_system_config": RAY_SYSTEM_CONFIG}

    cluster = None
    for attempt in range(2):  # Ray waits a fixed 30 s for a raylet; a loaded machine can miss it once
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            break
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt:
                raise
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    srv = ServeProcess(
        "--ray-address",
        cluster.address,
        "--worker-host",
        "127.0.0.1",
        "--decode-workers",
        "2",
        "--dtype",
        args.dtype,
        "--redis-maxmemory",
        "512mb",
        "--kv-cache",
        "512mb",
        timeout=600,
    )
    return cluster, srv


def summary(results: list, walls: list[float]) -> dict:
    log_z = [r.log_z for r in results]
    finite = [z for z in log_z if math.isfinite(z)]
    return {
        "roundtrips_per_token": statistics.fmean(r.roundtrips_per_token for r in results),
        "wall_s": sum(walls),
        "var_log_z": statistics.variance(finite) if len(finite) > 1 else None,
        "mean_log_z": statistics.fmean(finite) if finite else None,
        "dead": len(log_z) - len(finite),
        "tokens_per_patch": statistics.fmean(r.tokens_per_patch for r in results),
        "steps": statistics.fmean(r.steps for r in results),
        "compute_s": sum(r.compute_s for r in results),
        "sync_s": sum(r.sync_s for r in results),
        "entropy_threshold": results[-1].entropy_threshold if math.isfinite(results[-1].entropy_threshold) else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=16 only, 4 seeds, 24 tokens: for iteration")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--particles", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--patch", type=int, default=8, help="patch_max_tokens of the patch mode")
    ap.add_argument(
        "--entropy", default="none", help="entropy_threshold of the patch mode: nats, auto, or none (no boundary)"
    )
    ap.add_argument("--weight-drop", type=float, default=None, help="weight_drop of the patch mode")
    ap.add_argument("--scheme", default="systematic")
    ap.add_argument("--ess", type=float, default=0.5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.particles, args.max_tokens = 4, [16], 24

    from smcserve.client import Client

    patch = {"patch_max_tokens": args.patch}
    if args.entropy != "none":
        patch["entropy_threshold"] = args.entropy if args.entropy == "auto" else float(args.entropy)
    if args.weight_drop is not None:
        patch["weight_drop"] = args.weight_drop
    modes = {"sync": {}, "patch": patch}
    cluster, srv = start(args)
    out: dict = {"by_n": {}}
    pooled = {m: ([], []) for m in modes}
    try:
        with Client(srv.address) as client:
            nodes = {w.node_id for w in client.info().decode_workers}
            out["decode_worker_nodes"] = len(nodes)

            def steer(prompt: str, n: int, seed: int, mode: str):
                return client.steer(
                    messages=[{"role": "user", "content": prompt}],
                    particles=n,
                    potentials=POTENTIALS,
                    max_tokens=args.max_tokens,
                    temperature=1.0,
                    seed=seed,
                    scheme=args.scheme,
                    ess_threshold=args.ess,
                    **modes[mode],
                )

            for mode in modes:  # warm-up: the workers' first batches, the grammar's compile cache
                steer(WARMUP_PROMPT, args.particles[0], 10_000, mode)
            for n in args.particles:
                runs = {m: ([], []) for m in modes}
                for seed in range(args.seeds):  # the modes alternate (and swap order): drifting load hits both
                    for mode in list(modes)[:: 1 if seed % 2 == 0 else -1]:
                        t0 = time.perf_counter()
                        runs[mode][0].append(steer(PROMPT, n, seed, mode))
                        runs[mode][1].append(time.perf_counter() - t0)
                per_n = {m: summary(*runs[m]) for m in modes}
                for m in modes:
                    pooled[m][0].extend(runs[m][0])
                    pooled[m][1].extend(runs[m][1])
                per_n["wall_speedup"] = per_n["sync"]["wall_s"] / per_n["patch"]["wall_s"]
                rt = per_n["sync"]["roundtrips_per_token"], per_n["patch"]["roundtrips_per_token"]
                per_n["roundtrip_reduction"] = rt[0] / rt[1]
                vs, vp = per_n["sync"]["var_log_z"], per_n["patch"]["var_log_z"]
                per_n["var_ratio"] = vp / vs if vs and vp is not None else None
                out["by_n"][str(n)] = per_n
    finally:
        srv.stop()
        cluster.shutdown()
    for mode in modes:
        for key, value in summary(*pooled[mode]).items():
            out[f"{key}_{mode}"] = value
    if len(args.particles) > 1:  # a variance pooled over N would mix two estimators: the mean of the per-N ones
        for mode in modes:
            per = [out["by_n"][str(n)][mode]["var_log_z"] for n in args.particles]
            out[f"var_log_z_{mode}"] = statistics.fmean(per) if None not in per else None
        out["var_log_z_note"] = "the mean over N of the per-N variances across seeds (by_n has each, and var_ratio)"
    s, p = out, out
    out["roundtrip_reduction"] = s["roundtrips_per_token_sync"] / p["roundtrips_per_token_patch"]
    out["wall_speedup"] = s["wall_s_sync"] / p["wall_s_patch"]
    out["var_ratio"] = (
        p["var_log_z_patch"] / s["var_log_z_sync"] if s["var_log_z_sync"] and p["var_log_z_patch"] is not None else None
    )
    out["config"] = {
        "seeds": args.seeds,
        "particles": args.particles,
        "max_tokens": args.max_tokens,
        "scheme": args.scheme,
        "ess_threshold": args.ess,
        "patch": patch,
        "dtype": args.dtype,
        "prompt": PROMPT,
        "potentials": POTENTIALS,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
