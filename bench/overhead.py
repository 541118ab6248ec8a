"""Overhead of the full stack vs in-process HF ``generate``: TTFT and TPOT of one request.

    python -m bench.overhead [--tokens 64] [--runs 3] [--dtype auto]

Both sides use the same model, dtype, prompt, greedy decoding and torch thread count. The stack is
measured from the client (gRPC stream through scheduler → prefill → KV store → decode worker);
HF from a streamer's timestamps inside ``generate``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.timing import PROMPT, StreamClock


def measure_hf(model_name: str | None, dtype: str, threads: int, tokens: int, runs: int) -> tuple[float, float]:
    from smcserve.engine.model import load_model

    lm = load_model(model_name, dtype, threads=threads)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    x = torch.tensor([ids])
    ttfts, tpots = [], []
    for i in range(runs + 1):
        clock = StreamClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=clock,
            )
        end = time.perf_counter()
        if i == 0:
            continue  # warm-up
        first = clock.times[1]
        ttfts.append((first - t0) * 1e3)
        tpots.append((end - first) * 1e3 / (tokens - 1))
    return statistics.median(ttfts), statistics.median(tpots)


def measure_stack(model_name: str | None, dtype: str, threads: int, tokens: int, runs: int) -> tuple[float, float]:
    from smcserve.client import Client
    from smcserve.loadtest.server_process import ServeProcess

    args = ["--dtype", dtype, "--threads", str(threads)] + (["--model", model_name] if model_name else [])
    ttfts, tpots = [], []
    with ServeProcess(*args) as server, Client(server.address) as client:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            first = None
            n = 0
            # a fresh seed-free greedy request; the suffix keeps the prompt out of the prefix cache
            for r in client.stream(
                messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
                temperature=0.0,
                max_tokens=tokens,
                ignore_eos=True,
            ):
                if r.token_ids and first is None:
                    first = time.perf_counter()
                n += len(r.token_ids)
            end = time.perf_counter()
            assert n == tokens, f"expected {tokens} tokens, got {n}"
            if i == 0:
                continue
            ttfts.append((first - t0) * 1e3)
            tpots.append((end - first) * 1e3 / (tokens - 1))
    return statistics.median(ttfts), statistics.median(tpots)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    hf_ttft, hf_tpot = measure_hf(args.model, args.dtype, args.threads, args.tokens, args.runs)
    stack_ttft, stack_tpot = measure_stack(args.model, args.dtype, args.threads, args.tokens, args.runs)
    from smcserve.engine.model import resolve_dtype

    print(
        json.dumps(
            {
                "model": args.model or "smollm2-135m-instruct",
                "dtype": str(resolve_dtype(args.dtype)).removeprefix("torch."),
                "threads": args.threads,
                "tokens": args.tokens,
                "runs": args.runs,
                "stack_ttft_ms": round(stack_ttft, 2),
                "stack_tpot_ms": round(stack_tpot, 2),
                "hf_ttft_ms": round(hf_ttft, 2),
                "hf_tpot_ms": round(hf_tpot, 2),
                "ttft_ratio": round(stack_ttft / hf_ttft, 3),
                "tpot_ratio": round(stack_tpot / hf_tpot, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
