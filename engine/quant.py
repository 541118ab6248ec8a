"""int8 linears for the paged engine (``--quantization``).

Each weight matrix is stored as int8 with one scale per output channel (symmetric, absmax / 127).
``int8``: weight-only; torch's own CPU kernel (``aten._weight_int8pack_mm``) multiplies the
activations by the int8 weights. That kernel is vectorised for bfloat16 activations and not for
float32 ones on some CPUs (here: 10× slower in float32), so a float32 model hands it bfloat16
activations where a timing at start-up (:func:`int8_activation_dtype`) says that is faster; the
result is float32 again. ``w8a8`` (float32 models): fbgemm's
int8 GEMM (``quantized::linear_dynamic``), which also quantises each call's activations per tensor:
much faster, much less exact (``python -m bench.quant`` measures both). The embedding table (tied to
the LM head in SmolLM2) stays in the model's dtype for lookups; the LM head reads its int8 copy.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "w8a8")


_ACTIVATION_DTYPE: dict[torch.dtype, torch.dtype] = {}


def int8_activation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype for ``_weight_int8pack_mm`` with a ``model_dtype`` model: the model's own,
    or for float32, bfloat16 where one decode-shaped product (a 1×576 row by a 1536×576 matrix, the
    model's MLP) is faster so (best of interleaved rounds, so a busy machine slows both alike).
    Measured once per process."""
    if model_dtype != torch.float32:
        return model_dtype
    if model_dtype not in _ACTIVATION_DTYPE:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=g)
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        for _ in range(5):
            for dt in best:
                x, scale = torch.randn(1, 576, generator=g).to(dt), torch.rand(1536, generator=g).to(dt)
                t0 = time.perf_counter()
                for _ in range(4):
                    torch.ops.aten._weight_int8pack_mm(x, w, scale)
                best[dt] = min(best[dt], time.perf_counter() - t0)
        _ACTIVATION_DTYPE[model_dtype] = min(best, key=best.get)
    return _ACTIVATION_DTYPE[model_dtype]


class Int8Linear:
    """``x @ weight.T + bias`` with ``weight`` quantised to int8 per output channel; the product in
    ``activation_dtype`` (default: :func:`int8_activation_dtype`), the result in ``x``'s dtype."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, activation_dtype: torch.dtype | None = None
    ):
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.activation_dtype = activation_dtype or int8_activation_dtype(weight.dtype)
        self.scale = scale.to(self.activation_dtype).contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.activation_dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale).to(x.dtype)
        y = y.view(*shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class Linear:
    """``F.linear`` with fixed weights: what the engine calls when it does not quantise. For the row
    counts in ``columns`` (chosen by timing, ``engine/few_rows.py``) it computes ``W @ x.T`` instead."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.columns: set[int] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] in self.columns:
            return columns_product(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def columns_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x``, computed as ``weight @ x.T`` (one row as two columns:
    one column would be the BLAS's matrix-vector product)."""
    m = x.shape[0]
    cols = (x if m > 1 else x.expand(2, -1)).contiguous().t()  # a stride-0 operand would miss the BLAS
    y = torch.mm(weight, cols).t()[:m].contiguous()
    return y if bias is None else y + bias


_REDUCE_RANGE: list[bool] = []


def w8a8_reduce_range() -> bool:
    """Whether fbgemm's dynamic int8 GEMM needs 7-bit activations on this CPU. Without VNNI (an AVX2-only
    EPYC here) its u8 x s8 pair sums saturate int16 at the full 8-bit range: 18 % relative error on a
    random product, 0.9 % at 7 bits. Decided once per process by running one small product both ways
    against float32 (never assumed from the CPU's name)."""
    if not _REDUCE_RANGE:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(96, 64, generator=g), torch.randn(15, 64, generator=g)
        packed = W8A8Linear(w, reduce_range=False).packed
        ref = F.linear(x, w)
        err = {rr: float((torch.ops.quantized.linear_dynamic(x, packed, rr) - ref).abs().max()) for rr in (False, True)}
        _REDUCE_RANGE.append(err[True] < err[False])
    return _REDUCE_RANGE[0]


class W8A8Linear:
    """``x @ weight.T + bias`` on fbgemm's int8 GEMM: int8 weights per output channel, float32 activations
    quantised per tensor at each call (the full 8-bit range, or 7 bits where this CPU's kernel needs it:
    :func:`w8a8_reduce_range`), int32 accumulation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduce_range: bool | None = None):
        if weight.dtype != torch.float32:
            raise ValueError("quantization w8a8: needs a float32 model (--dtype float32)")
        self.reduce_range = w8a8_reduce_range() if reduce_range is None else reduce_range
        w = weight.detach()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        zero = torch.zeros_like(scale, dtype=torch.long)
        with warnings.catch_warnings():  # quantised tensors are deprecated; their kernels are still the fastest
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scale, zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.reduce_range)
        return y.view(*shape[:-1], y.shape[-1])


def make_linear(quantization: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if quantization == "int8":
        return Int8Linear(weight, bias)
    if quantization == "w8a8":
        return W8A8Linear(weight, bias)
    if quantization == "none":
        return Linear(weight, bias)
    raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
