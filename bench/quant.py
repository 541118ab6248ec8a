"""int8 (``--quantization int8``, weight-only; ``w8a8``, int8 activations too) vs the model's own weights:
agreement and decode speed.

    python -m bench.quant [--tokens 32] [--steps 30] [--batch 1,64] [--dtype float32]

Side by side in one run, same threads: greedy decoding of the project's standard prompts with both
(``teacher_forced_agreement``: the int8 argmax equals the reference token given the reference's prefix;
``free_running_agreement``: the two greedy outputs position by position, so every token after the first
divergence counts as different), and the paged engine's decode step at each batch size, interleaved
(reference, int8, reference, ...) so drift in the machine's speed falls on both. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.quant import int8_activation_dtype

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Describe a storm at sea.",
)


def prompt_ids(lm, text: str) -> list[int]:
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def greedy(lm, tokens: int, forced: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy tokens per prompt; with ``forced``, each step is fed the forced token instead (teacher forcing)."""
    runner, bm = ModelRunner(lm, 512, 16), BlockManager(512, 16)
    outs = []
    with torch.inference_mode():
        for j, text in enumerate(PROMPTS):
            ids = prompt_ids(lm, text)
            table = BlockTable()
            for _ in ids:
                bm.append_slot(table)
            logits = runner.forward([SeqBatchItem(ids, 0, table.blocks)])
            out = []
            for k in range(tokens):
                out.append(int(logits[-1].argmax()))
                feed = forced[j][k] if forced is not None else out[-1]
                bm.append_slot(table)
                logits = runner.forward([SeqBatchItem([feed], len(ids) + k, table.blocks)])
            bm.free_table(table)
            outs.append(out)
    return outs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for u, v in zip(a, b) for x, y in zip(u, v)) / sum(len(u) for u in a)


def step_ms(runners: dict, ids: list[int], batch: int, steps: int) -> dict[str, float]:
    """Median decode-step time of ``batch`` sequences after ``ids``, each engine in turn per step."""
    state = {}
    for name, runner in runners.items():
        bm = BlockManager(runner.num_blocks, 16)
        root = BlockTable()
        for _ in ids:
            bm.append_slot(root)
        with torch.inference_mode():
            runner.forward([SeqBatchItem(ids, 0, root.blocks)])
        state[name] = (bm, [bm.fork(root) for _ in range(batch)])
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for step in range(steps + 3):
            for name, runner in runners.items():
                bm, tables = state[name]
                items = []
                for t in tables:
                    start = t.num_tokens
                    bm.append_slot(t)
                    items.append(SeqBatchItem([1000 + step], start, t.blocks))
                t0 = time.perf_counter()
                runner.forward(items)
                if step >= 3:  # warm-up steps not counted
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", default="1,64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    ref = load_model(None, args.dtype, threads=args.threads)
    kinds = ("int8", "w8a8") if ref.dtype == torch.float32 else ("int8",)
    quant = {k: load_model(None, args.dtype, threads=args.threads, quantization=k) for k in kinds}
    a = greedy(ref, args.tokens)
    out = {"dtype": str(ref.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    for k, lm in quant.items():
        out[f"teacher_forced_agreement_{k}"] = agreement(a, greedy(lm, args.tokens, forced=a))
        out[f"free_running_agreement_{k}"] = agreement(a, greedy(lm, args.tokens))
    out["tokens_compared"] = sum(len(u) for u in a)
    out["int8_activation_dtype"] = str(int8_activation_dtype(ref.dtype)).removeprefix("torch.")
    ids = prompt_ids(ref, PROMPTS[0])
    for batch in (int(b) for b in args.batch.split(",")):
        blocks = batch * 8 + 16
        runners = {"ref": ModelRunner(ref, blocks, 16)} | {k: ModelRunner(lm, blocks, 16) for k, lm in quant.items()}
        ms = step_ms(runners, ids, batch, args.steps)
        out[f"step_ms_ref_b{batch}"] = ms["ref"]
        for k in quant:
            out[f"step_ms_{k}_b{batch}"] = ms[k]
            out[f"speedup_{k}_b{batch}"] = ms["ref"] / ms[k]
    try:
        from smcserve.loadtest.runner import cpu_model

        out["cpu"] = cpu_model()
    except Exception:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    main()
