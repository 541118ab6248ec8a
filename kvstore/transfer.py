"""Moving KV blocks between the KV store and a worker's paged pool.

A prompt's blocks come from the pool's prefix cache, else the store, else are recomputed (and
written back to the store); every block ends up in the prefix cache under its chained key. The
pool is a :class:`BlockManager` (bookkeeping, guarded by ``lock``) and a :class:`ModelRunner`
(the tensors, touched only by the thread that runs the model).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.chunked_prefill import ChunkedPrefill
from smcserve.engine.model_runner import ModelRunner
from smcserve.kvstore.store import KVStore


@dataclass
class TransferStats:
    prompt_blocks_reused: int = 0  # blocks found in the pool's prefix cache
    prompt_recomputes: int = 0  # loads that recomputed part of their tokens (a store miss)
    kv_blocks_loaded: int = 0  # blocks read from the store into the pool
    kv_load_ms: float = 0.0  # time spent reading blocks from the store and writing them into the pool


class KVTransfer:
    def __init__(self, store: KVStore, bm: BlockManager, runner: ModelRunner, lock: threading.Lock):
        self.store = store
        self.bm = bm
        self.runner = runner
        self.lock = lock
        self.stats = TransferStats()  # read under ``lock``

    def load(self, token_ids: list[int], keys: list[str]) -> BlockTable:
        """A block table holding the KV of ``token_ids`` (whose chained keys are ``keys``), any recompute
        in one forward.

        Raises ``OutOfBlocks`` when the pool cannot hold it; on any failure nothing stays allocated.
        """
        fill = self.start_load(token_ids, keys)
        try:
            fill.run_chunk(self.runner)
            self.finish_load(fill, keys)
        except BaseException:
            with self.lock:
                self.bm.free_table(fill.table)
            raise
        return fill.table

    def start_load(self, token_ids: list[int], keys: list[str], chunk: int = 0) -> ChunkedPrefill:
        """The prompt's leading blocks from the pool's prefix cache, else the store, and a slot for each of
        the rest: what is left to recompute (``chunk`` tokens per forward; then :meth:`finish_load`).

        Raises ``OutOfBlocks`` when the pool cannot hold it; on any failure nothing stays allocated.
        """
        bs, n = self.bm.block_size, len(token_ids)
        table = BlockTable()
        try:
            with self.lock:
                while len(table.blocks) < len(keys) and (b := self.bm.lookup(keys[len(table.blocks)])) is not None:
                    table.blocks.append(b)
                self.stats.prompt_blocks_reused += len(table.blocks)
            first_miss = len(table.blocks)
            if first_miss < len(keys):
                self.read_store(table, token_ids, keys, first_miss)
            table.num_tokens = start = min(len(table.blocks) * bs, n)
            if start < n:
                with self.lock:
                    self.stats.prompt_recomputes += 1
                    for _ in range(start, n):
                        self.bm.append_slot(table)
        except BaseException:
            with self.lock:
                self.bm.free_table(table)
            raise
        return ChunkedPrefill(token_ids, table, start, chunk)

    def finish_load(self, fill: ChunkedPrefill, keys: list[str]) -> None:
        """The recomputed blocks of a finished :meth:`start_load` into the store and the prefix cache."""
        if fill.cached < len(fill.tokens):
            self.save(fill.table, fill.tokens, keys, first=fill.cached // self.bm.block_size)

    def read_store(self, table: BlockTable, token_ids: list[int], keys: list[str], first: int) -> None:
        """Append blocks ``first..`` read from the store to ``table``, up to the first miss (or foreign KV)."""
        bs, n = self.bm.block_size, len(token_ids)
        t0 = time.perf_counter()
        loaded = 0
        try:
            for i, block in enumerate(self.store.get_blocks(keys[first:]), start=first):
                want = self.runner.layout.block_shape(min(bs, n - i * bs))
                if block is None or tuple(block.shape) != want or block.dtype != self.runner.lm.dtype:
                    break  # recompute from here
                with self.lock:
                    b = self.bm.allocate()
                    table.blocks.append(b)
                self.runner.write_block(b, block)
                with self.lock:
                    self.bm.register(keys[i], b)
                loaded += 1
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            with self.lock:
                self.stats.kv_blocks_loaded += loaded
                self.stats.kv_load_ms += ms

    def save(
        self, table: BlockTable, token_ids: list[int], keys: list[str], first: int = 0, cache: bool = True
    ) -> None:
        """Write blocks ``first..`` of a table to the store (those it lacks) and, with ``cache``, to the
        pool's prefix cache."""
        bs, n = self.bm.block_size, len(token_ids)
        todo = [i for i, present in zip(range(first, len(keys)), self.store.contains(keys[first:])) if not present]
        blocks = self.runner.read_blocks([(table.blocks[i], min(bs, n - i * bs)) for i in todo])
        self.store.put_blocks([(keys[i], block) for i, block in zip(todo, blocks)])
        if not cache:
            return
        with self.lock:
            for i in range(first, len(keys)):
                self.bm.register(keys[i], table.blocks[i])
