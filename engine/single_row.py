"""Which ops of a one-row forward (a single stream's decode step) run on one thread, by measurement.

At batch 1 every matrix product is a memory-bound matrix-vector product of a few megabytes. Handing
one to all OpenMP threads pays a wake-up of the threads that went to sleep since the last parallel
op: a few microseconds where threads spin (libgomp's default), ~100 us where they sleep at once
(``OMP_WAIT_POLICY=passive``, the setting of a machine shared with other processes, or a busy
machine). The small products (Q/K/V, O, attention over a short context) then cost more on two
threads than on one; the large ones (gate/up, the LM head) still gain. So the choice is timed here,
per op, once per process and shape: each op on one thread and on all, in interleaved rounds (a busy
moment slows both), best of each. A one-row product's elements do not depend on the thread count
(each output is one thread's dot product), so the logits are the same either way
(``tests/test_decode_threads.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

OPS = ("qkv", "attend", "o", "gate_up", "down")  # the ops of a layer that may run on all threads
CONTEXT = 256  # the attention op is timed over this many cached positions
ROUNDS, CALLS = 5, 8

_CHOSEN: dict[tuple, frozenset[str]] = {}


def _time(f: Callable[[], object], threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for _ in range(CALLS):
        f()
    return time.perf_counter() - t0


def narrow_ops(runner, threads: int) -> frozenset[str]:
    """The ops of layer 0 of ``runner`` (an ``engine.model_runner.ModelRunner``) that a one-row forward
    runs faster on one thread than on ``threads``, timed once per process and shape."""
    if threads <= 1 or runner.device.type != "cpu":
        return frozenset()
    lay = runner.layout
    key = (lay.num_layers, lay.num_kv_heads, lay.head_dim, runner.num_heads, runner.lm.dtype, threads)
    key += (runner.lm.quantization, tuple(runner.fused[0].gate_up_weight.shape))
    if key in _CHOSEN:
        return _CHOSEN[key]
    dt, d = runner.lm.dtype, runner.lm.config.hidden_size
    H, D, Hq = lay.num_kv_heads, lay.head_dim, runner.num_heads
    x = torch.randn(1, d, dtype=dt)
    h = torch.randn(1, runner.fused[0].gate_up_weight.shape[0] // 2, dtype=dt)
    cache = torch.randn(CONTEXT, H * D, dtype=dt)
    rows = torch.arange(CONTEXT)
    q = torch.randn(1, Hq, 1, D, dtype=dt)

    def attend():  # as ModelRunner._decode's: gather K and V, one SDPA
        k = cache.index_select(0, rows).view(1, CONTEXT, H, D).transpose(1, 2)
        v = cache.index_select(0, rows).view(1, CONTEXT, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    ops = {
        "qkv": lambda: runner.qkv[0](x),
        "attend": attend,
        "o": lambda: runner.o_proj[0](x),
        "gate_up": lambda: runner.gate_up[0](x),
        "down": lambda: runner.down_proj[0](h),
    }
    best = {(op, n): float("inf") for op in OPS for n in (1, threads)}
    with torch.inference_mode():
        try:
            for _ in range(ROUNDS):
                for op, f in ops.items():
                    for n in (1, threads):
                        best[op, n] = min(best[op, n], _time(f, n))
        finally:
            torch.set_num_threads(threads)
    chosen = frozenset(op for op in OPS if best[op, 1] < best[op, threads])
    us = {op: f"{best[op, 1] / CALLS * 1e6:.0f}/{best[op, threads] / CALLS * 1e6:.0f}" for op in OPS}
    log.info("one-row forward: on one thread %s (us per op, 1/%d threads: %s)", sorted(chosen), threads, us)
    _CHOSEN[key] = chosen
    return chosen
