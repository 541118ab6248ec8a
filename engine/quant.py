"""int8 linears for the paged engine (``--quantization``).

Each weight matrix is stored as int8 with one scale per output channel (symmetric, absmax / 127).
``int8``: weight-only; activations stay in the model's dtype and torch's own CPU kernel
(``aten._weight_int8pack_mm``) multiplies them by the int8 weights. ``w8a8`` (float32 models): fbgemm's
int8 GEMM (``quantized::linear_dynamic``), which also quantises each call's activations per tensor:
much faster, much less exact (``python -m bench.quant`` measures both). The embedding table (tied to
the LM head in SmolLM2) stays in the model's dtype for lookups; the LM head reads its int8 copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "w8a8")


class Int8Linear:
    """``x @ weight.T + bias`` with ``weight`` quantised to int8 per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(weight.dtype).contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.scale)
        y = y.view(*shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class Linear:
    """``F.linear`` with fixed weights: what the engine calls when it does not quantise."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class W8A8Linear:
    """``x @ weight.T + bias`` on fbgemm's int8 GEMM: int8 weights per output channel, float32 activations
    quantised per tensor at each call (full 8-bit range), int32 accumulation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.dtype != torch.float32:
            raise ValueError("quantization w8a8: needs a float32 model (--dtype float32)")
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
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self.packed, False)
        return y.view(*shape[:-1], y.shape[-1])


def make_linear(quantization: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if quantization == "int8":
        return Int8Linear(weight, bias)
    if quantization == "w8a8":
        return W8A8Linear(weight, bias)
    if quantization == "none":
        return Linear(weight, bias)
    raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
