"""The prefill engine: a prompt → its KV blocks in the KV store, and the first sampled token.

Prompts run through the same paged :class:`~engine.model_runner.ModelRunner` as decode. The pool has room
for the longest prompt the worker accepts plus the worker's own prefix cache (the
:class:`~engine.block_manager.BlockManager`'s key → block registry, evicted least-recently-used when the
pool runs short): a prompt's leading full blocks come from that cache, else from the KV store, and the rest
is computed. Every full block of the prompt stays in the cache, and every block the store lacks is written
to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.kv import chain_keys
from smcserve.engine.model import LoadedModel
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import SamplingParams, sample_token, token_logprobs
from smcserve.kvstore import KVStore
from smcserve.kvstore.transfer import KVTransfer
from smcserve.prefill.result import PrefillResult

DEFAULT_CACHE_BLOCKS = 256
CHUNK_TOKENS = 512  # a long prompt runs in chunks of this many tokens: a cancelled one stops between them


class PrefillCancelled(Exception):
    """The request was cancelled (its client left) while its prompt was computed."""


class Prefiller:
    """Computes prompts' KV; reuses the longest prefix of blocks in its own cache, then in the store."""

    def __init__(
        self,
        lm: LoadedModel,
        store: KVStore,
        block_size: int,
        prefix_cache: bool = True,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        max_prompt_tokens: int = 0,
    ):
        """``cache_blocks``: the worker's own prefix cache (none without ``prefix_cache``), on top of room
        for a prompt of ``max_prompt_tokens`` (0: the model's context)."""
        self.lm = lm
        self.store = store
        self.prefix_cache = prefix_cache
        self.max_prompt_tokens = max_prompt_tokens or lm.config.max_position_embeddings
        num_blocks = -(-self.max_prompt_tokens // block_size) + (cache_blocks if prefix_cache else 0)
        self.bm = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(lm, num_blocks, block_size)
        self.kv = KVTransfer(store, self.bm, self.runner, threading.Lock())  # one thread: the lock is never contended
        self.version = 0  # prefills run: tells the scheduler which report of the cache is newest

    def prefill(
        self, token_ids: list[int], params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> PrefillResult:
        """The prompt's KV into the store and its first token. ``cancelled()`` is asked between chunks:
        True stops the work (:class:`PrefillCancelled`; what was computed is freed, nothing stored)."""
        n, bs = len(token_ids), self.bm.block_size
        if not 0 < n <= self.max_prompt_tokens:
            raise ValueError(f"prompt: {n} tokens; the prefill pool holds 1 to {self.max_prompt_tokens}")
        t0 = time.perf_counter()
        keys = chain_keys(self.lm.fingerprint, token_ids, bs)
        # reuse whole cached blocks, but always compute at least the last token (its logits give the first one)
        reusable = (n - 1) // bs if self.prefix_cache else 0
        table = BlockTable()
        try:
            while len(table.blocks) < reusable and (b := self.bm.lookup(keys[len(table.blocks)])) is not None:
                table.blocks.append(b)
            local = len(table.blocks)
            t_load = time.perf_counter()
            self.kv.read_store(table, token_ids, keys[:reusable], local)
            load_ms = (time.perf_counter() - t_load) * 1e3
            start = table.num_tokens = len(table.blocks) * bs
            for _ in range(start, n):
                self.bm.append_slot(table)
            for s in range(start, n, CHUNK_TOKENS):
                if cancelled():
                    raise PrefillCancelled()
                e = min(n, s + CHUNK_TOKENS)
                logits = self.runner.forward([SeqBatchItem(token_ids[s:e], s, table.blocks)])[0]
            first = sample_token(logits, params, position=n)
            first_logprob = None
            if params.logprobs >= 0:
                (first_logprob,) = token_logprobs(logits.view(1, -1), [first], [params.logprobs])
            self.kv.save(table, token_ids, keys, cache=False)
            if self.prefix_cache:  # whole blocks only: a prompt's last token is always computed
                for i in range(n // bs):
                    self.bm.register(keys[i], table.blocks[i])
        finally:
            self.bm.free_table(table)
        self.version += 1
        return PrefillResult(
            first_logprob=first_logprob,
            first_token=first,
            block_keys=keys,
            prompt_tokens=n,
            cached_tokens=start,
            compute_ms=(time.perf_counter() - t0) * 1e3 - load_ms,
            local_hit_blocks=local,
            loaded_blocks=start // bs - local,
            load_ms=load_ms,
            local_keys=tuple(self.bm.cache),
            local_version=self.version,
        )
