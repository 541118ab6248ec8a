"""A prefill worker: prompt → KV blocks in the store + the first sampled token."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import ray
from transformers import DynamicCache

from engine.config import WorkerConfig
from engine.forward import forward
from engine.kv import KVLayout, blocks_to_cache, cache_to_blocks, chain_keys
from engine.model import LoadedModel, load_model
from engine.sampling import SamplingParams, sample_token
from kvstore import KVStore


@dataclass
class PrefillResult:
    first_token: int
    block_keys: list[str]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was read from the store instead of computed
    compute_ms: float


class Prefiller:
    """Computes prompts' KV; reuses the longest prefix of blocks already in the store."""

    def __init__(self, lm: LoadedModel, store: KVStore, block_size: int, prefix_cache: bool = True):
        self.lm = lm
        self.store = store
        self.layout = KVLayout.from_config(lm.config, lm.dtype, block_size)
        self.prefix_cache = prefix_cache

    def prefill(self, token_ids: list[int], params: SamplingParams) -> PrefillResult:
        t0 = time.perf_counter()
        bs = self.layout.block_size
        keys = chain_keys(self.lm.fingerprint, token_ids, bs)
        # Reuse cached full blocks, but always compute at least the last token (we need its logits).
        reusable = (len(token_ids) - 1) // bs if self.prefix_cache else 0
        cached = self.store.get_blocks(keys[:reusable]) if reusable else []  # one MGET; misses are None
        if None in cached:  # the cached prefix ends at the first miss
            cached = cached[: cached.index(None)]
        cache = blocks_to_cache(cached, self.lm.config) if cached else DynamicCache(config=self.lm.config)
        start = len(cached) * bs
        logits = forward(self.lm.model, token_ids[start:], cache)
        first = sample_token(logits, params, position=len(token_ids))
        new_blocks = cache_to_blocks(cache, self.layout, start, len(token_ids))
        new_keys = keys[len(cached) :]
        present = self.store.contains(new_keys)
        self.store.put_blocks([(k, b) for k, b, p in zip(new_keys, new_blocks, present) if not p])
        return PrefillResult(first, keys, len(token_ids), start, (time.perf_counter() - t0) * 1e3)


@ray.remote
class PrefillWorker:
    """Ray actor around a :class:`Prefiller`."""

    def __init__(self, config: WorkerConfig, worker_id: str):
        self.worker_id = worker_id
        self.lm = load_model(config.model, config.dtype, threads=config.threads or os.cpu_count())
        self.prefiller = Prefiller(self.lm, KVStore(config.redis_url), config.block_size, config.prefix_cache)
        self.served = 0
        self.tokens = 0

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def prefill(self, token_ids: list[int], params: dict) -> dict:
        result = self.prefiller.prefill(token_ids, SamplingParams(**params))
        self.served += 1
        self.tokens += len(token_ids) - result.cached_tokens
        return dataclasses.asdict(result)

    def stats(self) -> dict:
        return {"worker_id": self.worker_id, "requests_served": self.served, "tokens_computed": self.tokens}
