"""What a prefill worker returns over Ray: typed values, light to import (the scheduler reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefillResult:
    first_token: int
    block_keys: list[str]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused (the worker's own cache or the store), not computed
    compute_ms: float  # the prefill's time, less reading blocks from the store (``load_ms``)
    local_hit_blocks: int = 0  # prompt blocks served from the worker's own cache
    loaded_blocks: int = 0  # prompt blocks read from the KV store
    load_ms: float = 0.0  # the time reading them
    local_keys: tuple[str, ...] = ()  # every key the worker's own cache holds after this prefill
    local_version: int = 0  # counts the worker's prefills: the newest ``local_keys`` is the worker's cache
    first_logprob: object = None  # with sampling logprobs: first_token's ``engine.sampling.TokenLogprob``


@dataclass
class PrefillStats:
    worker_id: str
    requests_served: int
    tokens_computed: int  # prompt tokens computed (not reused)
    local_hit_blocks: int  # prompt blocks served from the worker's own cache, over all prefills
    loaded_blocks: int  # prompt blocks read from the KV store, over all prefills
    kv_blocks_total: int  # the worker's pool: the longest prompt plus its own cache
    kv_blocks_cached: int  # blocks in its own cache now
