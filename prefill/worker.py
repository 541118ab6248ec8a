"""A prefill worker: the Ray actor around a :class:`~prefill.prefiller.Prefiller` and its
:class:`~prefill.queue.PrefillQueue` (prompts interleaved chunk by chunk)."""

from __future__ import annotations

import threading

import ray

from smcserve.engine.config import WorkerConfig
from smcserve.engine.kv import KVLayout
from smcserve.engine.model import load_for_worker
from smcserve.engine.sampling import SamplingParams
from smcserve.engine.threads import on_passing_thread
from smcserve.kvstore import KVStore
from smcserve.prefill.prefiller import Prefiller
from smcserve.prefill.queue import PrefillQueue
from smcserve.prefill.result import PrefillResult, PrefillStats

MAX_CANCELLED = 4096
MAX_QUEUED = 256  # prefill calls the worker takes in at once (into its queue); Ray holds the rest


@ray.remote(concurrency_groups={"health": 1, "prefill": MAX_QUEUED})
class PrefillWorker:
    """Ray actor around a :class:`Prefiller`; its own prefix cache is ``config.kv_cache_bytes`` of KV.
    Each ``prefill`` call waits in its own thread while the queue's one thread computes the prompts, chunk
    by chunk; ``ping`` answers from its own thread meanwhile (the scheduler's liveness check)."""

    def __init__(self, config: WorkerConfig, worker_id: str):
        self.worker_id = worker_id
        self.config = config

        def build() -> tuple:  # the engine's torch work stays off this (Ray's main) thread: engine/threads.py
            lm = load_for_worker(config)
            bs = config.block_size
            cache_blocks = KVLayout.from_config(lm.config, lm.dtype, bs).blocks_in(config.kv_cache_bytes)
            store = KVStore(config.redis_url)
            return lm, Prefiller(lm, store, bs, config.prefix_cache, cache_blocks, chunk=config.prefill_chunk)

        self.lm, self.prefiller = on_passing_thread(build)
        self.queue = PrefillQueue(self.prefiller).start()
        self.counters = threading.Lock()  # the counters below: prefill calls end in their own threads
        self.served = 0
        self.cancelled: set[str] = set()  # tickets of running prefills to stop (set from the health thread)
        self.tokens = 0
        self.local_hit_blocks = 0
        self.loaded_blocks = 0

    @ray.method(concurrency_group="health")
    def config_of(self) -> WorkerConfig:
        """What it was started with (a restarted scheduler takes it over only if its own is the same)."""
        return self.config

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="health")
    def ping(self) -> None:
        pass

    @ray.method(concurrency_group="health")
    def cancel(self, ticket: str) -> None:
        """Stop the prefill of ``ticket`` between two chunks, if it is running (the scheduler also
        ``ray.cancel``s it, which drops it while queued)."""
        if len(self.cancelled) > MAX_CANCELLED:  # tickets of prefills that ended before their cancel came
            self.cancelled.clear()
        self.cancelled.add(ticket)

    @ray.method(concurrency_group="prefill")
    def prefill(self, token_ids: list[int], params: SamplingParams, ticket: str = "") -> PrefillResult | None:
        """None: cancelled (``cancel(ticket)``) before or while it ran."""
        try:
            result = self.queue.submit(token_ids, params, lambda: ticket in self.cancelled).result()
        finally:
            self.cancelled.discard(ticket)
        if result is None:
            return None
        with self.counters:
            self.served += 1
            self.tokens += len(token_ids) - result.cached_tokens
            self.local_hit_blocks += result.local_hit_blocks
            self.loaded_blocks += result.loaded_blocks
        return result

    @ray.method(concurrency_group="health")  # answers while a prefill runs
    def stats(self) -> PrefillStats:
        return PrefillStats(
            worker_id=self.worker_id,
            requests_served=self.served,
            tokens_computed=self.tokens,
            local_hit_blocks=self.local_hit_blocks,
            loaded_blocks=self.loaded_blocks,
            kv_blocks_total=self.prefiller.bm.num_blocks,
            kv_blocks_cached=len(self.prefiller.bm.cache),
        )
