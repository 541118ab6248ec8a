"""Self-speculative decoding with MTP heads against plain decoding, side by side in one run.

    python -m bench.mtp [--model M] [--styles deepseek gloeckle] [--k auto|N] [--max-tokens 64]

Greedy decoding of the held-out instruction prompts (``engine/mtp_prompts.json``, never trained on)
on one paged engine. ``mean_accepted_length`` and ``acceptance_per_depth``: every depth of the heads
drafting (3 by default), the 16 held-out prompts one at a time. The timed runs draft ``--k`` tokens a
step (``k`` in the JSON; default ``auto``, as ``smcserve serve --num-speculative-tokens auto`` chooses:
the k with the largest held-out accepted length over its step cost at batch 1,
``step_cost_ratio_batch1_by_k``; on our Xeon a forward over 3 positions cost about one over 1, so k = 2;
on the AVX2 EPYC k = 1), their accepted length is ``mean_accepted_length_at_k``: single stream (one
prompt at a time), 16 and 64 sequences at once; each configuration with and without MTP in ABBA order,
the ratio of the faster wall times is the speedup (with the default ``--max-batch``, 1, 16 and 64
sequences decode plainly: the fall-back). Prints ONE JSON object: the first style's figures at the
top level and every style's under ``styles`` (heads from ``smcserve mtp train``; a style without heads
is reported as missing).

``fallback`` is what ``smcserve serve --speculative-max-batch auto`` measures at start
(``engine/spec_pays.py``, the same steps): at each batch size B, the wall time of
a speculative step (drafting k tokens per sequence and the forward over k+1 positions each) over that of
a plain decode step (one position each), ``step_cost_ratio``, both on the same sequences (the fastest
of ``--reps`` each, alternated). A speculative step yields ``mean_accepted_length`` tokens per sequence
where a plain one yields 1, so speculation pays at B while ratio(B) < mean_accepted_length_at_k:
``pays_up_to_batch`` is the largest such B (0: none); the server weighs the same ratios against the
held-out acceptance that ``smcserve mtp train`` stored in the heads (``heldout_acceptance_in_heads``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from smcserve.engine.block_manager import BlockManager
from smcserve.engine.config import DEFAULT_NUM_SPECULATIVE_TOKENS, DEFAULT_SPECULATIVE_MAX_BATCH
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner
from smcserve.engine.mtp import load_heads, read_metadata
from smcserve.engine.mtp_train import encode_prompt, instruction_prompts
from smcserve.engine.sampling import SamplingParams
from smcserve.engine.spec_pays import choose_k, pays_up_to, step_cost_ratios
from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder


def _prompts(lm, n: int) -> list[list[int]]:
    """``n`` chat prompts from the held-out instructions, cycling through them."""
    texts = instruction_prompts("heldout")
    return [encode_prompt(lm.tokenizer, texts[i % len(texts)]) for i in range(n)]


def _run(lm, heads, k, prompts, max_tokens, max_batch, at_once) -> tuple[float, SpeculativeDecoder, list]:
    """Wall seconds to decode ``prompts`` (``at_once`` at a time) and the decoder (its stats)."""
    longest = max(len(p) for p in prompts) + max_tokens + 8
    blocks = at_once * (-(-longest // 16) + 1)
    dec = SpeculativeDecoder(
        ModelRunner(lm, blocks, 16), BlockManager(blocks, 16), heads, k, lm.eos_token_ids, max_batch
    )
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), at_once):
        seqs = [SpecSeq(p, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for p in prompts[i : i + at_once]]
        outs += dec.generate(seqs)
        for s in seqs:
            dec.bm.free_table(s.table)
    return time.perf_counter() - t0, dec, outs


def _side_by_side(lm, heads, k, prompts, max_tokens, max_batch, at_once) -> tuple[float, SpeculativeDecoder]:
    """Plain and MTP runs in ABBA order, the faster of each pair (a shared CPU's load drifts); the ratio
    plain / MTP and the MTP decoder of the last run."""
    times: dict[bool, list[float]] = {False: [], True: []}
    ref, last = None, None
    for spec in (False, True, True, False):
        t, dec, out = _run(lm, heads if spec else None, k if spec else 0, prompts, max_tokens, max_batch, at_once)
        ref = out if ref is None else ref
        assert out == ref, "speculative greedy output differs from plain decoding"
        times[spec].append(t)
        if spec:
            last = dec
    return min(times[False]) / min(times[True]), last


TARGET_LENGTH = 1.8  # issue 13's target mean accepted length with 3 depths


def measure(lm, heads, k: int, max_tokens: int, single: int, max_batch: int) -> dict:
    prompts = _prompts(lm, 64)
    out: dict = {}
    # the heads' quality: every depth drafting, one held-out prompt at a time (not timed)
    held_out = prompts[: len(instruction_prompts("heldout"))]
    dec = _run(lm, heads, heads.spec.depths, held_out, max_tokens, max_batch, 1)[1]
    out["mean_accepted_length"] = round(dec.stats.mean_accepted_length, 3)
    out["acceptance_per_depth"] = [round(a, 3) for a in dec.stats.acceptance_per_depth]
    speedup, dec = _side_by_side(lm, heads, k, prompts[:single], max_tokens, max_batch, 1)
    out["mean_accepted_length_at_k"] = round(dec.stats.mean_accepted_length, 3)
    out["single_stream_speedup"] = round(speedup, 3)
    for n in (16, 64):
        out[f"batch{n}_speedup"] = round(_side_by_side(lm, heads, k, prompts[:n], max_tokens, max_batch, n)[0], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--styles", nargs="+", default=["deepseek", "gloeckle"])
    ap.add_argument(
        "--k",
        type=lambda v: None if v == "auto" else int(v),
        default=None,
        help="drafted tokens per step (timed runs); auto (default): as `smcserve serve` chooses it, the k whose "
        "held-out accepted length per batch-1 step cost is largest",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single", type=int, default=8, help="prompts decoded one at a time")
    ap.add_argument(
        "--max-batch", type=int, default=DEFAULT_SPECULATIVE_MAX_BATCH, help="speculate up to this many sequences"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cost-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=5, help="steps timed per batch size and kind (the fastest counts)")
    ap.add_argument("--no-speedups", action="store_true", help="only the step costs (fallback), no decoding runs")
    args = ap.parse_args()
    lm = load_model(args.model, "float32", args.threads)
    result: dict = {"model": lm.name, "threads": torch.get_num_threads(), "styles": {}}
    for style in args.styles:
        try:
            heads = load_heads(lm, style=style)
        except FileNotFoundError as err:
            result["styles"][style] = {"missing": str(err)}
            continue
        info = read_metadata(heads_file := lm.path / "mtp" / f"{style}.safetensors")["info"]
        prompts = _prompts(lm, max(args.cost_batches))
        by_k = {j: step_cost_ratios(lm, heads, j, prompts, [1], args.reps)[1] for j in range(1, heads.spec.depths + 1)}
        acceptance = info.get("acceptance_per_depth")
        if args.k is not None:
            k, why = min(args.k, heads.spec.depths), "as given"
        elif acceptance:
            k, why = choose_k(by_k, acceptance), "auto: the largest held-out accepted length / step cost at batch 1"
        else:
            k, why = min(DEFAULT_NUM_SPECULATIVE_TOKENS, heads.spec.depths), "auto: the default (no acceptance)"
        r = {"k": k, "k_choice": why}
        if not args.no_speedups:
            r.update(measure(lm, heads, k, args.max_tokens, args.single, args.max_batch))
        ratios = step_cost_ratios(lm, heads, k, prompts, args.cost_batches, args.reps)
        length = r.get("mean_accepted_length_at_k")
        r["fallback"] = {
            "step_cost_ratio": ratios,
            "step_cost_ratio_batch1_by_k": by_k,
            "pays_up_to_batch": pays_up_to(ratios, length) if length else 0,
            "pays_up_to_batch_at_target_1.8": pays_up_to(ratios, TARGET_LENGTH),
            "heldout_acceptance_in_heads": info.get("acceptance_per_depth"),
        }
        r["train_minutes"] = round(float(info.get("train_minutes", 0.0)), 2)
        r["train_steps"] = info.get("steps")
        r["heads"] = str(heads_file)
        result["styles"][style] = r
    first = next((r for r in result["styles"].values() if "missing" not in r), {})
    result = {**{k: v for k, v in first.items() if k not in ("heads", "train_steps")}, **result}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
