"""The one KV block layout, used by prefill, decode and the KV store alike.

A block holds ``block_size`` consecutive tokens (the last block of a sequence may hold fewer) of
K and V for every layer, as one tensor of shape ``[num_layers, 2, num_kv_heads, tokens, head_dim]``.
Blocks are content-addressed by a chained prefix hash: key = H(model fingerprint, parent key,
token ids), so equal prefixes give equal keys on every worker.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE) -> KVLayout:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, block_size, dtype)

    def block_shape(self, tokens: int | None = None) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_kv_heads, tokens or self.block_size, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def blocks_in(self, nbytes: int) -> int:
        """Whole blocks that ``nbytes`` of KV holds (a worker's ``--kv-cache``)."""
        return nbytes // (self.bytes_per_token * self.block_size)


def block_key(fingerprint: str, parent: str | None, token_ids: Sequence[int]) -> str:
    """Chained prefix hash of one block."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode())
    h.update((parent or "").encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.hexdigest()


def chain_keys(fingerprint: str, token_ids: Sequence[int], block_size: int) -> list[str]:
    """Keys of every block of ``token_ids``, the last (possibly partial) block included."""
    keys: list[str] = []
    parent = None
    for start in range(0, len(token_ids), block_size):
        parent = block_key(fingerprint, parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
