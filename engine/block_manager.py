"""Paged KV bookkeeping: a fixed pool of blocks, per-sequence block tables, reference counts.

Pure bookkeeping, no tensors: the engine copies block contents when this class says so. Forking
copies a block table and bumps counts; the first write into a shared block copies that one block
(copy-on-write). Prompt blocks loaded from the KV store are kept in a prefix cache (key → block)
that holds one reference, so every sequence with that prefix shares them; cached blocks that no
sequence uses are evicted least-recently-used when the pool runs short.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """The pool cannot hold what was asked for."""


@dataclass
class BlockTable:
    """The blocks of one sequence, in order, and how many token slots of them are filled."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.cache: OrderedDict[str, int] = OrderedDict()  # prefix-cache key → block (LRU order)
        self.cached_key: dict[int, str] = {}

    # --- allocation ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_evictable(self) -> int:
        """Cached blocks that no sequence uses (reclaimable on demand)."""
        return sum(1 for b in self.cache.values() if self.ref[b] == 1)

    def available(self) -> int:
        return self.num_free + self.num_evictable

    def allocate(self) -> int:
        if not self.free:
            self._evict_one()
        b = self.free.pop()
        self.ref[b] = 1
        return b

    def _evict_one(self) -> None:
        for key, b in self.cache.items():  # oldest first
            if self.ref[b] == 1:
                del self.cache[key]
                del self.cached_key[b]
                self._release(b)
                return
        raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")

    def _release(self, b: int) -> None:
        assert self.ref[b] > 0, f"block {b} released more often than referenced"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free.append(b)

    # --- the prefix cache ----------------------------------------------------------------------
    def lookup(self, key: str) -> int | None:
        """A cached block for ``key``, with a new reference for the caller; None on a miss."""
        b = self.cache.get(key)
        if b is None:
            return None
        self.cache.move_to_end(key)
        self.ref[b] += 1
        return b

    def register(self, key: str, b: int) -> None:
        """Put block ``b`` (already referenced by the caller) in the prefix cache under ``key``."""
        if key in self.cache or b in self.cached_key:
            return
        self.cache[key] = b
        self.cached_key[b] = key
        self.ref[b] += 1

    def clear_cache(self) -> None:
        for b in self.cache.values():
            self._release(b)
        self.cache.clear()
        self.cached_key.clear()

    # --- sequences -----------------------------------------------------------------------------
    def fork(self, table: BlockTable) -> BlockTable:
        """A child sharing every block of ``table``: O(blocks), no tensor copy."""
        for b in table.blocks:
            self.ref[b] += 1
        return BlockTable(list(table.blocks), table.num_tokens)

    def free_table(self, table: BlockTable) -> None:
        for b in table.blocks:
            self._release(b)
        table.blocks.clear()
        table.num_tokens = 0

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` slots of ``table`` (dropping rejected speculative tokens), releasing
        the blocks past them."""
        keep = self.blocks_for(num_tokens)
        for b in table.blocks[keep:]:
            self._release(b)
        del table.blocks[keep:]
        table.num_tokens = min(table.num_tokens, num_tokens)

    def append_slot(self, table: BlockTable) -> tuple[int, tuple[int, int] | None]:
        """Make room for one more token; returns (flat slot, (src, dst) block copy to do first or None)."""
        pos = table.num_tokens
        index, offset = divmod(pos, self.block_size)
        copy = None
        if index == len(table.blocks):
            table.blocks.append(self.allocate())
        else:
            b = table.blocks[index]
            if self.ref[b] > 1:  # shared: copy-on-write this one block
                new = self.allocate()
                self._release(b)
                table.blocks[index] = new
                copy = (b, new)
        table.num_tokens = pos + 1
        return table.blocks[index] * self.block_size + offset, copy

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- observability ---------------------------------------------------------------------------
    def holders(self, b: int) -> int:
        """References to block ``b`` other than the prefix cache's: sequences and particles."""
        return self.ref[b] - (b in self.cached_key)

    def stats(self) -> dict:
        """Counts from the reference counts themselves, so every holder (sequence or SMC particle) counts."""
        in_use = [b for b in range(self.num_blocks) if self.holders(b) > 0]
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_used": self.num_blocks - self.num_free,
            "kv_blocks_in_use": len(in_use),
            "kv_blocks_shared": sum(1 for b in in_use if self.holders(b) > 1),
            "kv_blocks_cached": len(self.cache),
        }
