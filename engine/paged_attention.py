"""Paged attention with PyTorch's FlexAttention: queries read K and V in the pool's own blocks, no gather.

The SDPA path (``ModelRunner``'s default on the CPU) copies each sequence's K and V slots into a padded
batch per layer before ``scaled_dot_product_attention``. Here every query attends to the whole pool of one
layer (``[1, H, slots, D]``, a view), and a ``BlockMask`` made once per forward lists, per sequence, the
pool blocks of its table, so the kernel visits only those (block-sparse); inside them ``mask_mod`` keeps a
slot when its block is in the query's table and its position in the sequence (the block's index in the
table × block size + offset) is at most the query's. GQA is the kernel's (``enable_gqa``).

On CUDA the kernel is compiled (``torch.compile``, dynamic shapes); elsewhere it runs eagerly, PyTorch's
reference implementation: what the CPU tests use to check the path against SDPA.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # a torch without FlexAttention
    BlockMask = flex_attention = None


def available() -> bool:
    return flex_attention is not None


@functools.cache
def _kernel(device_type: str):
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    # uncompiled by choice (tests; the CPU serves with SDPA): no warning per call about it
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


@dataclass
class PagedMask:
    """Which pool slots each query of a forward sees: made once per forward, used by every layer."""

    block_mask: object  # BlockMask
    num_slots: int

    @classmethod
    def build(
        cls, tables: list[list[int]], qpos: torch.Tensor, block_size: int, num_blocks: int, device: torch.device
    ) -> PagedMask:
        """``tables``: each sequence's pool blocks in order (those its queries may see); ``qpos`` [B, N]:
        each query's position in its sequence (padding rows: any position with KV, e.g. 0)."""
        B, N = qpos.shape
        seq, blk, idx = [], [], []
        for b, row in enumerate(tables):
            seq += [b] * len(row)
            blk += row
            idx += range(len(row))
        # index of each pool block in each sequence's table (-1: not in it)
        logical = torch.full((B, num_blocks), -1, dtype=torch.int32, device=device)
        logical[torch.tensor(seq, device=device), torch.tensor(blk, device=device)] = torch.tensor(
            idx, dtype=torch.int32, device=device
        )
        counts = torch.tensor([len(r) for r in tables], dtype=torch.int32, device=device)
        indices = torch.zeros(B, num_blocks, dtype=torch.int32, device=device)  # a sequence's blocks first
        indices[torch.tensor(seq, device=device), torch.tensor(idx, device=device)] = torch.tensor(
            blk, dtype=torch.int32, device=device
        )
        q_blocks = -(-N // 128)

        def mask_mod(b, h, q_idx, kv_idx):
            lb = logical[b, kv_idx // block_size]
            return (lb >= 0) & (lb * block_size + kv_idx % block_size <= qpos[b, q_idx])

        mask = BlockMask.from_kv_blocks(
            counts[:, None, None].expand(B, 1, q_blocks).contiguous(),
            indices[:, None, None].expand(B, 1, q_blocks, num_blocks).contiguous(),
            BLOCK_SIZE=(128, block_size),
            mask_mod=mask_mod,
            seq_lengths=(N, num_blocks * block_size),
        )
        return cls(mask, num_blocks * block_size)

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """``q`` [B, Hq, N, D]; ``k_pool``/``v_pool`` one layer's pool [slots, H, D]: the output [B, Hq, N, D]."""
        B = q.shape[0]
        k = k_pool.permute(1, 0, 2)[None].expand(B, -1, -1, -1)  # [B, H, slots, D], a view
        v = v_pool.permute(1, 0, 2)[None].expand(B, -1, -1, -1)
        return _kernel(q.device.type)(q, k, v, block_mask=self.block_mask, enable_gqa=True)
