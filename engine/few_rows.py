"""How a forward over a few rows runs its products, by measurement: on how many threads, and which
way round the matrix product is handed to the BLAS.

A single stream's decode step (one row), a speculative verify step (k+1 rows) and a small batch all
multiply a few rows by every weight matrix: memory-bound products of a few megabytes each. Two
things decide their speed, and both depend on the CPU and its BLAS, so both are timed here, once per
process, shape and row count, on the runner's own weights (every layer's, streamed as a forward
streams them), in interleaved rounds (a busy moment slows every variant alike), best of each:

- **Which way round.** ``F.linear`` computes ``x @ W.T``: the BLAS's matrix-vector product for one
  row, a GEMM with the weight as the transposed operand for a few. On our Xeon (fp32) both read the
  weights at ~11 GB/s, where ``W @ x.T`` (the weight as the plain operand, the rows as columns) reads
  them at 25-33 GB/s: the LM head over 3 rows 32.9 ms against 6.5, over one row 10.1 against 4.4 (one
  row is duplicated into two columns: a one-column product would be the matrix-vector product again).
  The elements are dot products summed in another order, so the logits differ in the last bits.
- **How many threads** (one row only). Handing a small product to all OpenMP threads wakes the
  sleeping ones: a few microseconds where threads spin (libgomp's default), ~100 us where they sleep
  at once (``OMP_WAIT_POLICY=passive``, a machine shared with other processes, or a busy machine).
  The small products (Q/K/V, O, attention over a short context) then cost more on two threads than on
  one. A one-row product's elements do not depend on the thread count, so that choice leaves the
  logits bit for bit the same (``tests/test_decode_threads.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smcserve.engine.quant import Linear, columns_product

log = logging.getLogger(__name__)

OPS = ("qkv", "attend", "o", "gate_up", "down")  # the ops of a layer a one-row forward may run on one thread
PRODUCTS = ("qkv", "o", "gate_up", "down", "head")  # the products whose formulation is chosen
FEW_ROWS = 8  # forwards of at most this many rows are planned
CONTEXT = 256  # the attention op is timed over this many cached positions
ROUNDS = 3
FORMS = ("rows", "columns")  # F.linear's x @ W.T, and W @ x.T
INF = float("inf")
MARGIN = 1.2  # W @ x.T replaces F.linear only where it is this much faster


@dataclass(frozen=True)
class RowPlan:
    """How a forward of some number of rows runs: ``one_thread`` (one row only), the ops on one thread;
    ``columns``, the products computed as ``W @ x.T``."""

    one_thread: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()


_PLANS: dict[tuple, RowPlan] = {}
_NARROWABLE: dict[tuple, frozenset[str]] = {}


def _best(f: Callable[[], object], threads: int, best: float) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    f()
    return min(best, time.perf_counter() - t0)


def _sweep(product: Callable, lins: list, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``product`` of ``x`` and each of ``lins``' weights in turn (as a forward streams them); the last result."""

    def run() -> torch.Tensor:
        for lin in lins:
            y = product(x, lin.weight, lin.bias)
        return y

    return run


def _same_on_one_thread(f: Callable[[], torch.Tensor], threads: int) -> bool:
    """Whether ``f``'s result is bit for bit the same on one thread and on ``threads``."""
    try:
        torch.set_num_threads(1)
        one = f()
        torch.set_num_threads(threads)
        return torch.equal(one, f())
    finally:
        torch.set_num_threads(threads)


def _attend(runner, context: int, layers: int) -> Callable[[], torch.Tensor]:
    """As ``ModelRunner._decode``'s attention for one row: gather K and V, one SDPA, for ``layers`` layers."""
    lay, dt = runner.layout, runner.lm.dtype
    H, D = lay.num_kv_heads, lay.head_dim
    g = torch.Generator().manual_seed(context)
    q = torch.randn(1, runner.num_heads, 1, D, dtype=dt, generator=g)
    cache = torch.randn(context, H * D, dtype=dt, generator=g)
    slots = torch.arange(context)

    def run() -> torch.Tensor:
        for _ in range(layers):
            k = cache.index_select(0, slots).view(1, context, H, D).transpose(1, 2)
            v = cache.index_select(0, slots).view(1, context, H, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return o

    return run


def narrowable(runner, threads: int) -> frozenset[str]:
    """The ops of a one-row forward of ``runner`` whose result is bit for bit the same on one thread as on
    ``threads`` (products both ways round; attention over short and long contexts)."""
    key = _key(runner, threads, 1)
    if key not in _NARROWABLE:
        ok = set()
        with torch.inference_mode():
            for name, lins in _products(runner).items():
                if name == "head":  # it runs after the layers, on every thread
                    continue
                x = torch.randn(1, lins[0].weight.shape[1], dtype=runner.lm.dtype)
                if all(_same_on_one_thread(_sweep(f, lins[:1], x), threads) for f in (F.linear, columns_product)):
                    ok.add(name)
            if all(_same_on_one_thread(_attend(runner, c, 1), threads) for c in (16, CONTEXT, 4096)):
                ok.add("attend")
        _NARROWABLE[key] = frozenset(ok)
    return _NARROWABLE[key]


def _key(runner, threads: int, rows: int) -> tuple:
    lay = runner.layout
    key = (lay.num_layers, lay.num_kv_heads, lay.head_dim, runner.num_heads, runner.lm.dtype, threads, rows)
    return key + (runner.lm.quantization, tuple(runner.fused[0].gate_up_weight.shape), tuple(runner.head.weight.shape))


def _products(runner) -> dict[str, list]:
    """The runner's products that have both formulations (int8 ones have one; a test may wrap one)."""
    return {name: lins for name, lins in runner.products().items() if all(type(lin) is Linear for lin in lins)}


def plan(runner, rows: int, threads: int) -> RowPlan:
    """The plan of a ``rows``-row forward of ``runner`` (an ``engine.model_runner.ModelRunner``) with
    ``threads`` threads, timed once per process, shape and row count (a CPU only; beyond
    :data:`FEW_ROWS` rows, or on other devices, the default: ``F.linear`` on every thread).

    An op runs on one thread only where its result is bit for bit the one on every thread (checked here:
    true of every product on our Xeon and EPYC, not of the EPYC's attention), so that choice never changes
    a logit. A product is computed as ``W @ x.T`` only where that is :data:`MARGIN` times faster, so a
    restart's timing rarely flips it (it changes the last bits of the logits)."""
    if runner.device.type != "cpu" or not 1 <= rows <= FEW_ROWS:
        return RowPlan()
    key = _key(runner, threads, rows)
    if key in _PLANS:
        return _PLANS[key]
    narrow = narrowable(runner, threads) if rows == 1 and threads > 1 else frozenset()
    variants: dict[tuple[str, int, str], Callable[[], object]] = {}
    with torch.inference_mode():
        for name, lins in _products(runner).items():
            x = torch.randn(rows, lins[0].weight.shape[1], dtype=runner.lm.dtype)
            for form, product in zip(FORMS, (F.linear, columns_product)):
                # the head runs after the layers, on every thread
                for n in (1, threads) if name in narrow and name != "head" else (threads,):
                    variants[name, n, form] = _sweep(product, lins, x)
        for n in (1, threads) if "attend" in narrow else ():
            variants["attend", n, "rows"] = _attend(runner, CONTEXT, runner.layout.num_layers)
        best = dict.fromkeys(variants, INF)
        try:
            for _ in range(ROUNDS):
                for (name, n, form), f in variants.items():
                    best[name, n, form] = _best(f, n, best[name, n, form])
        finally:
            torch.set_num_threads(threads)
    one_thread, columns = set(), set()
    for name in {v[0] for v in variants}:
        fastest = {f: min((t for (op, _, f2), t in best.items() if op == name and f2 == f), default=INF) for f in FORMS}
        form = "columns" if fastest["columns"] * MARGIN < fastest["rows"] else "rows"
        n = min((k for k in variants if k[0] == name and k[2] == form), key=best.get)[1]
        if form == "columns":
            columns.add(name)
        if n == 1 and threads > 1:
            one_thread.add(name)
    result = RowPlan(frozenset(one_thread), frozenset(columns))
    ms = {"/".join(map(str, k)): round(v * 1e3, 2) for k, v in sorted(best.items())}
    log.info("%d-row forward on %d threads: %s (ms per layer sweep: %s)", rows, threads, result, ms)
    _PLANS[key] = result
    return result


_ONE: dict[tuple, bool] = {}


def columns_faster(weight: torch.Tensor, rows: int) -> bool:
    """Whether ``rows`` rows times ``weight`` (one matrix, e.g. the MTP heads' unembedding) is faster as
    ``W @ x.T`` than as ``F.linear``: timed once per process, shape, dtype, row count and thread count."""
    if weight.device.type != "cpu" or not 1 <= rows <= FEW_ROWS:
        return False
    threads = torch.get_num_threads()
    key = (tuple(weight.shape), weight.dtype, rows, threads)
    if key not in _ONE:
        x, lins = torch.randn(rows, weight.shape[1], dtype=weight.dtype), [Linear(weight)]
        best = dict.fromkeys(FORMS, INF)
        with torch.inference_mode():
            for _ in range(ROUNDS):
                for form, product in zip(FORMS, (F.linear, columns_product)):
                    best[form] = _best(_sweep(product, lins, x), threads, best[form])
        _ONE[key] = best["columns"] * MARGIN < best["rows"]
    return _ONE[key]
