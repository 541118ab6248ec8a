"""The prefill engine: a prompt → its KV blocks in the KV store, and the first sampled token.

Prompts run through the same paged :class:`~engine.model_runner.ModelRunner` as decode. The pool has room
for the longest prompt the worker accepts plus the worker's own prefix cache (the
:class:`~engine.block_manager.BlockManager`'s key → block registry, evicted least-recently-used when the
pool runs short): a prompt's leading full blocks come from that cache, else from the KV store, and the rest
is computed, ``--prefill-chunk`` tokens per forward. Every full block of the prompt stays in the cache, and
every block the store lacks is written to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.chunked_prefill import ChunkedPrefill
from smcserve.engine.config import DEFAULT_PREFILL_CHUNK
from smcserve.engine.kv import chain_keys
from smcserve.engine.model import LoadedModel
from smcserve.engine.model_runner import ModelRunner
from smcserve.engine.sampling import SamplingParams, sample_token, token_logprobs
from smcserve.kvstore import KVStore
from smcserve.kvstore.transfer import KVTransfer
from smcserve.prefill.result import PrefillResult

DEFAULT_CACHE_BLOCKS = 256


class PrefillCancelled(Exception):
    """The request was cancelled (its client left) while its prompt was computed."""


@dataclass
class PrefillJob:
    """One prompt on its way through :meth:`Prefiller.start`, :meth:`Prefiller.run_chunk` (until
    ``fill.finished``) and :meth:`Prefiller.finish`: its blocks are held in the pool throughout."""

    params: SamplingParams
    keys: list[str]
    fill: ChunkedPrefill
    local_hit_blocks: int
    load_ms: float
    compute_s: float = 0.0  # its own time, less the store reads (not the other prompts' chunks in between)

    @property
    def remaining(self) -> int:
        """Prompt tokens still to compute."""
        return self.fill.remaining


class Prefiller:
    """Computes prompts' KV; reuses the longest prefix of blocks in its own cache, then in the store.

    A prompt is :meth:`start`-ed (its blocks reserved), computed ``chunk`` tokens per :meth:`run_chunk`
    and :meth:`finish`-ed (first token sampled, KV stored): between two chunks other prompts may run
    (``prefill.queue.PrefillQueue``); :meth:`prefill` does all three for one prompt.
    """

    def __init__(
        self,
        lm: LoadedModel,
        store: KVStore,
        block_size: int,
        prefix_cache: bool = True,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        max_prompt_tokens: int = 0,
        chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        """``cache_blocks``: the worker's own prefix cache (none without ``prefix_cache``), on top of room
        for a prompt of ``max_prompt_tokens`` (0: the model's context)."""
        self.lm = lm
        self.store = store
        self.prefix_cache = prefix_cache
        self.chunk = chunk
        self.max_prompt_tokens = max_prompt_tokens or lm.config.max_position_embeddings
        num_blocks = -(-self.max_prompt_tokens // block_size) + (cache_blocks if prefix_cache else 0)
        self.bm = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(lm, num_blocks, block_size)
        self.kv = KVTransfer(store, self.bm, self.runner, threading.Lock())  # one thread: the lock is never contended
        self.version = 0  # prefills finished: tells the scheduler which report of the cache is newest

    def check(self, token_ids: list[int]) -> None:
        n = len(token_ids)
        if not 0 < n <= self.max_prompt_tokens:
            raise ValueError(f"prompt: {n} tokens; the prefill pool holds 1 to {self.max_prompt_tokens}")

    def reusable_keys(self, token_ids: list[int]) -> list[str]:
        """Keys of the prompt's leading whole blocks that :meth:`start` may take from a cache."""
        if not self.prefix_cache:
            return []
        bs = self.bm.block_size
        return chain_keys(self.lm.fingerprint, token_ids[: (len(token_ids) - 1) // bs * bs], bs)

    def computing_keys(self, job: PrefillJob) -> list[str]:
        """Keys of the whole blocks a started job computes (in the worker's cache once it finished)."""
        if not self.prefix_cache:
            return []
        bs = self.bm.block_size
        return job.keys[job.fill.cached // bs : len(job.fill.tokens) // bs]

    def start(self, token_ids: list[int], params: SamplingParams) -> PrefillJob | None:
        """Reserve the prompt's blocks: its leading whole blocks from the worker's cache, else the store; a
        slot for each of the rest. None (nothing held) when the pool cannot hold it next to the prompts
        already started: start it again once one of them finished."""
        self.check(token_ids)
        t0 = time.perf_counter()
        n, bs = len(token_ids), self.bm.block_size
        keys = chain_keys(self.lm.fingerprint, token_ids, bs)
        # reuse whole cached blocks, but always compute at least the last token (its logits give the first one)
        reusable = (n - 1) // bs if self.prefix_cache else 0
        table = BlockTable()
        try:
            while len(table.blocks) < reusable and (b := self.bm.lookup(keys[len(table.blocks)])) is not None:
                table.blocks.append(b)
            local = len(table.blocks)
            if self.bm.available() < self.bm.blocks_for(n) - local:
                self.bm.free_table(table)
                return None
            t_load = time.perf_counter()
            self.kv.read_store(table, token_ids, keys[:reusable], local)
            load_ms = (time.perf_counter() - t_load) * 1e3
            start = table.num_tokens = len(table.blocks) * bs
            for _ in range(start, n):
                self.bm.append_slot(table)
        except BaseException:
            self.bm.free_table(table)
            raise
        job = PrefillJob(params, keys, ChunkedPrefill(token_ids, table, start, self.chunk), local, load_ms)
        job.compute_s = time.perf_counter() - t0 - load_ms / 1e3
        return job

    def run_chunk(self, job: PrefillJob) -> int:
        """Compute the job's next chunk; returns its tokens."""
        t0 = time.perf_counter()
        n = job.fill.run_chunk(self.runner)
        job.compute_s += time.perf_counter() - t0
        return n

    def finish(self, job: PrefillJob) -> PrefillResult:
        """The first token and the prompt's KV into the store; the job's blocks go back to the pool (its
        whole blocks stay in the worker's cache)."""
        t0 = time.perf_counter()
        fill, params, keys = job.fill, job.params, job.keys
        n, bs = len(fill.tokens), self.bm.block_size
        try:
            first = sample_token(fill.logits, params, position=n)
            first_logprob = None
            if params.logprobs >= 0:
                (first_logprob,) = token_logprobs(fill.logits.view(1, -1), [first], [params.logprobs])
            self.kv.save(fill.table, fill.tokens, keys, cache=False)
            if self.prefix_cache:  # whole blocks only: a prompt's last token is always computed
                for i in range(n // bs):
                    self.bm.register(keys[i], fill.table.blocks[i])
        finally:
            self.bm.free_table(fill.table)
        self.version += 1
        return PrefillResult(
            first_logprob=first_logprob,
            first_token=first,
            block_keys=keys,
            prompt_tokens=n,
            cached_tokens=fill.cached,
            compute_ms=(job.compute_s + time.perf_counter() - t0) * 1e3,
            local_hit_blocks=job.local_hit_blocks,
            loaded_blocks=fill.cached // bs - job.local_hit_blocks,
            load_ms=job.load_ms,
            local_keys=tuple(self.bm.cache),
            local_version=self.version,
        )

    def abandon(self, job: PrefillJob) -> None:
        """Give a started job's blocks back (cancelled: nothing is stored)."""
        self.bm.free_table(job.fill.table)

    def prefill(
        self, token_ids: list[int], params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> PrefillResult:
        """The prompt's KV into the store and its first token, alone (nothing else runs between its chunks).
        ``cancelled()`` is asked between chunks: True stops the work (:class:`PrefillCancelled`; what was
        computed is freed, nothing stored)."""
        job = self.start(token_ids, params)
        assert job is not None, "an empty pool holds any prompt up to max_prompt_tokens"
        try:
            while not job.fill.finished:
                if cancelled():
                    raise PrefillCancelled()
                self.run_chunk(job)
        except BaseException:
            self.abandon(job)
            raise
        return self.finish(job)
