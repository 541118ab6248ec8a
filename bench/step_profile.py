"""Where one batched decode step's time goes, phase by phase (issue 12 §2).

    python -m bench.step_profile [--batch 64] [--dtype float32] [--steps 12] [--temperature 1.0] [--top-p 1.0]

N sequences forked from the chat prompt (as ``bench.engine`` and ``bench.llamacpp``), decoded as the
decode loop serves them: per step ``append_tokens`` (block slots), ``ModelRunner.forward``,
``sample_tokens`` and each sequence's ``IncrementalDetokenizer.push``. Each phase is timed on its own
every step (medians over ``--steps``); one extra step runs under torch.profiler (shapes recorded) to
split the forward and sampling into ops: the GEMMs by weight (QKV, O, gate/up, down, lm_head),
attention (KV gather + SDPA), rotary and norms, KV writes, other ops, and the Python between ops
(the profiled wall time − every op's self time; it holds the profiler's own per-op cost too).

Prints one JSON object: ``ms`` (per-phase milliseconds, unprofiled), ``forward_ops_ms`` and
``sampling_ops_ms`` (profiled split), ``gemm_bound_ms`` (the step's GEMMs each timed alone, as
``bench.engine``) and ``step_vs_gemm_bound`` (unprofiled step / gemm bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from bench.engine import gemm_bound
from bench.timing import PROMPT
from smcserve.decode.loop import append_tokens
from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import SamplingParams, sample_token, sample_tokens

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::_weight_int8pack_mm")
ATTENTION_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::index_select",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_softmax",
    "aten::masked_fill_",
)
ROTARY_NORM_OPS = ("aten::mul", "aten::add", "aten::neg", "aten::cat", "aten::pow", "aten::mean", "aten::rsqrt")
KV_WRITE_OPS = ("aten::index_put_", "aten::_index_put_impl_")


def gemm_names(lm) -> dict[int, str]:
    """GEMM output width → which weight (the decode step's GEMMs have distinct output widths here)."""
    c = lm.config
    d = c.hidden_size // c.num_attention_heads if not getattr(c, "head_dim", None) else c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    return {qkv: "gemm_qkv", 2 * c.intermediate_size: "gemm_gate_up", c.vocab_size: "gemm_lm_head"}


def split_ops(prof, wall_s: float, lm=None) -> dict[str, float]:
    """Self time (ms) of the profiled region's ops by kind, plus ``python_overhead`` = wall − ops."""
    kinds: dict[str, float] = {}
    total = 0.0
    names = gemm_names(lm) if lm is not None else {}
    hidden = lm.config.hidden_size if lm is not None else 0
    inter = lm.config.intermediate_size if lm is not None else 0
    for e in prof.key_averages(group_by_input_shape=True):
        t = e.self_cpu_time_total / 1e3
        total += t
        if e.key in GEMM_OPS and lm is not None:
            shapes = e.input_shapes or []
            w = shapes[-1] if shapes else []
            out = w[-1] if len(w) == 2 else 0
            inn = w[0] if len(w) == 2 else 0
            kind = names.get(out) or ("gemm_down" if inn == inter else "gemm_o" if out == hidden else "gemm_other")
        elif lm is None:  # sampling: by op
            kind = e.key.removeprefix("aten::")
        elif e.key in ATTENTION_OPS:
            kind = "attention"
        elif e.key in KV_WRITE_OPS:
            kind = "kv_write"
        elif e.key in ROTARY_NORM_OPS:
            kind = "rotary_norm_residual"
        else:
            kind = e.key.removeprefix("aten::")
        kinds[kind] = kinds.get(kind, 0.0) + t
    out = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    big = {k: v for k, v in out.items() if v >= 0.05 * total or k.startswith("gemm") or k in ("attention", "kv_write")}
    big["other_ops"] = total - sum(big.values())
    big["python_overhead"] = max(0.0, wall_s * 1e3 - total)
    return {k: round(v, 2) for k, v in big.items()}


def run(lm, ids: list[int], n: int, steps: int, params: list[SamplingParams]) -> dict:
    nb = n * (-(-(len(ids) + steps + 4) // 16) + 1) + 16
    bm, runner = BlockManager(nb, 16), ModelRunner(lm, nb, 16)
    root = BlockTable()
    for _ in ids:
        bm.append_slot(root)
    logits = runner.forward([SeqBatchItem(ids, 0, root.blocks)])
    first = sample_token(logits[0], params[0], len(ids))
    tables = [bm.fork(root) for _ in range(n)]
    bm.free_table(root)
    detoks = [IncrementalDetokenizer(lm.tokenizer) for _ in range(n)]
    last = [first] * n
    phases: dict[str, list[float]] = {"slots": [], "forward": [], "sampling": [], "detok": [], "step": []}
    prof_out: dict = {}
    for step in range(steps + 2):
        profiled = step == steps + 1
        positions = [len(ids) + 1 + step] * n
        t0 = time.perf_counter()
        items = append_tokens(bm, runner, tables, last)
        t1 = time.perf_counter()
        if profiled:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                t1 = time.perf_counter()
                logits = runner.forward(items)
                t2 = time.perf_counter()
            prof_out["forward_ops_ms"] = split_ops(p, t2 - t1, lm)
            prof_out["forward_profiled_ms"] = round((t2 - t1) * 1e3, 2)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                t2 = time.perf_counter()
                last = sample_tokens(logits, params, positions)
                t3 = time.perf_counter()
            prof_out["sampling_ops_ms"] = split_ops(p, t3 - t2)
            prof_out["sampling_profiled_ms"] = round((t3 - t2) * 1e3, 2)
            break
        logits = runner.forward(items)
        t2 = time.perf_counter()
        last = sample_tokens(logits, params, positions)
        t3 = time.perf_counter()
        for d, tok in zip(detoks, last):
            d.push(tok)
        t4 = time.perf_counter()
        if step >= 1:  # step 0 is a warm-up
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[k].append(v)
    for t in tables:
        bm.free_table(t)
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in phases.items()}
    return {"ms": ms, **prof_out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    args = p.parse_args(argv)
    lm = load_model(args.model, args.dtype, threads=args.threads)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n = args.batch
    kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    params = [SamplingParams(**kw, seed=i) for i in range(n)]
    r = run(lm, ids, n, args.steps, params)
    gemm_s = gemm_bound(lm, n)
    model_s = r["ms"]["forward"] + r["ms"]["sampling"]
    out = {
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": args.threads,
        "batch": n,
        "prompt_tokens": len(ids),
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
        **r,
        "gemm_bound_ms": round(gemm_s * 1e3, 2),
        "step_vs_gemm_bound": round(r["ms"]["step"] / (gemm_s * 1e3), 3),
        "forward_sampling_vs_gemm_bound": round(model_s / (gemm_s * 1e3), 3),
        "tok_s": round(n / (r["ms"]["step"] / 1e3), 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
