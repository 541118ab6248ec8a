"""``--device``: where the engine's tensors live (weights, the KV pool, sampling, the potentials' masks).

``auto`` is CUDA where torch sees a GPU, else the CPU. On CUDA, ``--dtype auto`` is bfloat16 where the
GPU supports it (float32 otherwise): the CPU timing of ``engine/dtype.py`` is about CPUs. KV blocks
cross between the GPU pool and the KV store (bytes on the host) through pinned host buffers
(:func:`to_device`, :func:`to_host`), so the copies are asynchronous DMA, not pageable copies.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` as a concrete device; ValueError naming ``device`` when
    CUDA is asked for where there is none."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES or (kind != "cuda" and ":" in name):
        raise ValueError(f"device: must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} asked for, but torch sees no CUDA device (torch {torch.__version__})")
    return torch.device(name)


def cuda_dtype(device: torch.device) -> tuple[str, str]:
    """``--dtype auto`` on a CUDA device: (dtype, reason)."""
    gpu = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return "bfloat16", f"{gpu}: bfloat16 (supported; auto on CUDA does not time)"
    return "float32", f"{gpu}: float32 (no bfloat16 support)"


def to_device(block: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``block`` on ``device``, through a pinned buffer, asynchronously (the caching host allocator
    keeps the buffer until the copy has run). On the CPU: ``block`` itself."""
    if device.type == "cpu":
        return block
    staged = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
    staged.copy_(block)
    return staged.to(device, non_blocking=True)


def to_host(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device ``blocks`` as host tensors: every copy is enqueued into a pinned buffer, then one wait for
    them all. On the CPU: ``blocks`` themselves."""
    if not blocks or blocks[0].device.type == "cpu":
        return blocks
    out = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in blocks]
    for dst, src in zip(out, blocks):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(blocks[0].device).synchronize()
    return out
