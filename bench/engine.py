"""Decode-engine benchmark: paged KV + continuous batching vs HF ``generate``, side by side.

    python -m bench.engine [--particles 64] [--tokens 32] [--dtype auto]

Prints one JSON object:
- ``speedup_vs_hf_single``: decode tokens/s of N sequences forked from one prompt, one batched step
  per token, vs HF ``generate`` of one sequence (same model, dtype, threads).
- ``speedup_vs_hf_batched``: the same vs HF ``generate(num_return_sequences=N)``.
- ``fork_fraction_of_step``: forking a 2,048-token sequence / one batch-N decode step.
- ``step_vs_gemm_bound``: batch-N step time / the time of the step's GEMMs alone, measured.
- ``kv_bytes_shared`` / ``kv_bytes_private``: KV held by N sequences that share a 1,024-token
  prompt (after ``--tokens`` generated tokens each) vs N private copies.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from bench.timing import PROMPT, StreamClock
from smcserve.decode.loop import append_tokens
from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.kv import KVLayout
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import SamplingParams, sample_token, sample_tokens


def hf_single_tps(lm, ids: list[int], tokens: int) -> float:
    """Decode tokens/s of HF generate of one sequence (from the first generated token to the end)."""
    x = torch.tensor([ids], device=lm.device)
    clock = StreamClock()
    with torch.inference_mode():
        lm.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=clock,
        )
    return (tokens - 1) / (time.perf_counter() - clock.times[1])


def hf_batched_tps(lm, ids: list[int], tokens: int, n: int) -> float:
    """HF generate with n return sequences; decode time = total − the time of a 1-token run."""
    x = torch.tensor([ids], device=lm.device)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=True, num_return_sequences=n)
    with torch.inference_mode():
        t0 = time.perf_counter()
        lm.model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        lm.model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        t2 = time.perf_counter()
    return n * (tokens - 1) / ((t2 - t1) - (t1 - t0))


def ours(lm, ids: list[int], tokens: int, n: int, num_blocks: int, temperature: float = 1.0) -> dict:
    bm = BlockManager(num_blocks, 16)
    runner = ModelRunner(lm, num_blocks, 16)
    root = BlockTable()
    for _ in ids:
        bm.append_slot(root)
    logits = runner.forward([SeqBatchItem(ids, 0, root.blocks)])
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(n)]
    first = sample_token(logits[0], params[0], len(ids))
    tables = [bm.fork(root) for _ in range(n)]
    bm.free_table(root)
    last = [first] * n
    step_times = []
    t0 = time.perf_counter()
    for step in range(tokens - 1):
        s0 = time.perf_counter()
        logits = runner.forward(append_tokens(bm, runner, tables, last))
        last = sample_tokens(logits, params, [len(ids) + 1 + step] * n)
        step_times.append(time.perf_counter() - s0)
    elapsed = time.perf_counter() - t0
    for t in tables:
        bm.free_table(t)
    assert bm.num_free == num_blocks
    step_times.sort()
    return {"tps": n * (tokens - 1) / elapsed, "step_s": step_times[len(step_times) // 2]}


def fork_time(num_blocks: int, context: int = 2048, reps: int = 200) -> float:
    bm = BlockManager(num_blocks, 16)
    table = BlockTable()
    for _ in range(context):
        bm.append_slot(table)
    t0 = time.perf_counter()
    for _ in range(reps):
        child = bm.fork(table)
        bm.free_table(child)
    return (time.perf_counter() - t0) / (2 * reps)  # a fork and a free each rep; charge half to the fork


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_bound(lm, n: int, reps: int = 5) -> float:
    """Seconds of the GEMMs of one batch-n decode step, each timed alone at its real shape."""
    weights = []
    for layer in lm.model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [
            a.q_proj.weight,
            a.k_proj.weight,
            a.v_proj.weight,
            a.o_proj.weight,
            m.gate_proj.weight,
            m.up_proj.weight,
            m.down_proj.weight,
        ]
    weights.append(lm.model.lm_head.weight)
    total = 0.0
    with torch.inference_mode():
        for w in weights:
            x = torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device)
            F.linear(x, w)
            sync(w.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                F.linear(x, w)
            sync(w.device)
            total += (time.perf_counter() - t0) / reps
    return total


def kv_memory(lm, n: int, tokens: int, prompt_len: int = 1024) -> tuple[int, int]:
    bm = BlockManager(4096, 16)
    block_bytes = KVLayout.from_config(lm.config, lm.dtype, 16).bytes_per_token * 16
    root = BlockTable()
    for _ in range(prompt_len):
        bm.append_slot(root)
    tables = [bm.fork(root) for _ in range(n)]
    bm.free_table(root)
    for _ in range(tokens):
        for t in tables:
            bm.append_slot(t)
    shared = (bm.num_blocks - bm.num_free) * block_bytes
    private = n * bm.blocks_for(prompt_len + tokens) * block_bytes
    return shared, private


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (engine/device.py)")
    args = p.parse_args()
    lm = load_model(args.model, args.dtype, threads=args.threads, device=args.device)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n, tokens = args.particles, args.tokens
    num_blocks = n * (-(-(len(ids) + tokens) // 16) + 1) + 256
    hf_single_tps(lm, ids, 4)  # warm-up
    ours(lm, ids, 4, n, num_blocks)
    hf1 = hf_single_tps(lm, ids, tokens)
    hfn = hf_batched_tps(lm, ids, tokens, n)
    mine = ours(lm, ids, tokens, n, num_blocks)
    fork_s = fork_time(4096)
    gemm_s = gemm_bound(lm, n)
    shared, private = kv_memory(lm, n, tokens)
    print(
        json.dumps(
            {
                "model": args.model or "smollm2-135m-instruct",
                "dtype": str(lm.dtype).removeprefix("torch."),
                "dtype_reason": lm.dtype_reason,
                "device": str(lm.device),
                "threads": args.threads,
                "particles": n,
                "tokens": tokens,
                "prompt_tokens": len(ids),
                "hf_single_tokens_per_s": round(hf1, 2),
                "hf_batched_tokens_per_s": round(hfn, 2),
                "smcserve_tokens_per_s": round(mine["tps"], 2),
                "speedup_vs_hf_single": round(mine["tps"] / hf1, 2),
                "speedup_vs_hf_batched": round(mine["tps"] / hfn, 2),
                "step_ms": round(mine["step_s"] * 1e3, 2),
                "fork_us": round(fork_s * 1e6, 2),
                "fork_fraction_of_step": round(fork_s / mine["step_s"], 6),
                "gemm_bound_ms": round(gemm_s * 1e3, 2),
                "step_vs_gemm_bound": round(mine["step_s"] / gemm_s, 3),
                "kv_bytes_shared": shared,
                "kv_bytes_private": private,
                "kv_shared_fraction": round(shared / private, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
