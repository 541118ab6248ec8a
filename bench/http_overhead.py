"""What the OpenAI-compatible HTTP front costs over the gRPC API: TTFT and TPOT of the same requests,
sent in alternating rounds to one server through each, side by side in one run.

    python -m bench.http_overhead [--rounds 6] [--per-round 4] [--tokens 48] [--concurrency 1]

Starts a server (``smcserve serve``, fp32, one prefill and one decode worker) unless ``--address`` and
``--http`` name a running one. Each round sends the same ``--per-round`` requests (a 46-word prompt,
``--tokens`` tokens with ignore_eos, seeded) through ``smcserve bench``'s two backends, gRPC first in even
rounds and HTTP first in odd ones, so drift in the machine's speed falls on both. Prints one JSON
object: medians over every request of each backend and their ratios (HTTP / gRPC; target ≤ 1.1).
"""

from __future__ import annotations

import argparse
import json
import statistics

from smcserve.loadtest.runner import cpu_model, run_workload
from smcserve.loadtest.workloads import RequestSpec, Workload

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night, "
    "and tell how the message changes the rest of her quiet life by the sea"
)


def workload(n: int, tokens: int, concurrency: int, round_: int) -> Workload:
    specs = [
        (0.0, RequestSpec(PROMPT, max_tokens=tokens, temperature=1.0, seed=1000 * round_ + i, ignore_eos=True))
        for i in range(n)
    ]
    return Workload("http-overhead", specs, max_concurrency=concurrency, num_requests=n)


def run(grpc_address: str, http_address: str, args) -> dict:
    per = {"grpc": {"ttft": [], "tpot": []}, "openai": {"ttft": [], "tpot": []}}
    for backend, address in (("grpc", grpc_address), ("openai", http_address)):  # warm-up, not counted
        run_workload(address, workload(2, 8, 1, 0), backend=backend, progress=False)
    for r in range(args.rounds):
        order = ("grpc", "openai") if r % 2 == 0 else ("openai", "grpc")
        for backend in order:
            address = grpc_address if backend == "grpc" else http_address
            res = run_workload(
                address, workload(args.per_round, args.tokens, args.concurrency, r + 1), backend=backend, progress=False
            )
            for rec in res.records:
                if not rec.ok:
                    raise RuntimeError(f"{backend} request failed: {rec.code} {rec.message}")
                per[backend]["ttft"].append(rec.ttft_s * 1e3)
                per[backend]["tpot"].append((rec.end_s - rec.ttft_s) * 1e3 / max(1, rec.output_tokens - 1))
    med = {b: {k: statistics.median(v) for k, v in d.items()} for b, d in per.items()}
    return {
        "ttft_p50_ms_grpc": med["grpc"]["ttft"],
        "ttft_p50_ms_http": med["openai"]["ttft"],
        "tpot_p50_ms_grpc": med["grpc"]["tpot"],
        "tpot_p50_ms_http": med["openai"]["tpot"],
        "ttft_ratio_http_vs_grpc": med["openai"]["ttft"] / med["grpc"]["ttft"],
        "tpot_ratio_http_vs_grpc": med["openai"]["tpot"] / med["grpc"]["tpot"],
        "requests_per_backend": len(per["grpc"]["ttft"]),
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "cpu": cpu_model(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--address", default=None, help="a running server's gRPC address (with --http)")
    p.add_argument("--http", default=None, help="its HTTP API, e.g. http://127.0.0.1:8000")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    if args.address and args.http:
        out = run(args.address, args.http, args)
    else:
        from smcserve.loadtest.server_process import ServeProcess

        with ServeProcess("--dtype", args.dtype, "--kv-cache", "256mb", "--redis-maxmemory", "512mb") as srv:
            out = run(srv.address, srv.http_address, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
