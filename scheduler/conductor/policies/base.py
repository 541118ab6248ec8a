"""What every placement policy shares: the snapshots it decides on, its interface, and the helpers.

A policy sees plain snapshots of the instances (no Ray, no gRPC), so the very same code places requests
in the live scheduler and in the simulator. Every policy places decode by load (Mooncake does the same):
:class:`DecodeByLoad`.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from smcserve.scheduler.conductor.cost import CostModel


@dataclass
class PrefillInstance:
    """What a policy knows of one prefill instance at decision time."""

    id: str
    queue_ms: float = 0.0  # predicted time until the work already sent to it is done
    local_blocks: set[str] = field(default_factory=set)  # blocks in its own cache (for cache_local);
    # any container supporting ``in`` will do (the simulator passes its LRU dict)


@dataclass
class DecodeInstance:
    id: str
    batch: int = 0  # sequences it is running (predicted, see the Conductor)
    free_blocks: int = 1 << 30


@dataclass
class RequestInfo:
    block_keys: Sequence[str]  # chained prefix keys of the prompt's blocks
    prompt_tokens: int
    block_size: int
    max_tokens: int = 0


@dataclass
class PrefillChoice:
    instance: PrefillInstance
    ttft_ms: float  # predicted: queue + prefill of the uncached part + KV load
    cached_tokens: int
    local_hit_blocks: int = 0  # prefix blocks already in the instance's own cache
    load_blocks: int = 0  # prefix blocks to fetch from the global store first


class Policy(Protocol):
    name: str

    def choose_prefill(
        self, req: RequestInfo, instances: Sequence[PrefillInstance], global_hit_blocks: int, cost: CostModel
    ) -> PrefillChoice: ...

    def choose_decode(
        self, req: RequestInfo, instances: Sequence[DecodeInstance], cost: CostModel
    ) -> DecodeInstance | None: ...


# --- helpers -------------------------------------------------------------------------------------
def prefix_hits(block_keys: Sequence[str], blocks: Container[str]) -> int:
    """Length of the longest prefix of ``block_keys`` whose every block is in ``blocks``."""
    n = 0
    for k in block_keys:
        if k not in blocks:
            break
        n += 1
    return n


def global_prefix_hits(block_keys: Sequence[str], instances: Sequence[PrefillInstance]) -> int:
    """Longest prefix present anywhere (each block in some instance's cache): the global store seen
    as the union of the local caches. The live scheduler may instead probe the KV store."""
    n = 0
    for k in block_keys:
        if not any(k in inst.local_blocks for inst in instances):
            break
        n += 1
    return n


def cached_tokens_for(hit_blocks: int, req: RequestInfo) -> int:
    """Prompt tokens whose KV is reused: whole hit blocks, but at least one token is computed
    (the last position's logits give the first output token)."""
    return max(0, min(hit_blocks * req.block_size, req.prompt_tokens - 1))


def kv_blocks_needed(req: RequestInfo) -> int:
    return math.ceil((req.prompt_tokens + req.max_tokens) / req.block_size)


def predict_ttft_ms(
    req: RequestInfo, inst: PrefillInstance, reuse_blocks: int, load_blocks: int, cost: CostModel
) -> tuple[float, int]:
    """(queue + prefill of the part beyond ``reuse_blocks`` + load of ``load_blocks``, cached tokens)."""
    cached = cached_tokens_for(reuse_blocks, req)
    return inst.queue_ms + cost.prefill_ms(req.prompt_tokens - cached, cached) + cost.load_ms(load_blocks), cached


def choose_decode_by_load(
    req: RequestInfo, instances: Sequence[DecodeInstance], cost: CostModel
) -> DecodeInstance | None:
    """The decode instance with the smallest predicted time between tokens, ``cost.tbt_ms(batch + 1)``,
    among those with room for the request's KV blocks (``None`` when none has room: the caller rejects)."""
    need = kv_blocks_needed(req)
    best, best_key = None, None
    for i, inst in enumerate(instances):
        if inst.free_blocks < need:
            continue
        key = (cost.tbt_ms(inst.batch + 1), -inst.free_blocks, i)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


def no_cache_choice(req: RequestInfo, inst: PrefillInstance, cost: CostModel) -> PrefillChoice:
    """``inst`` with its TTFT predicted as if nothing were cached."""
    ttft, cached = predict_ttft_ms(req, inst, 0, 0, cost)
    return PrefillChoice(inst, ttft, cached)


def require_instances(instances: Sequence) -> None:
    if not instances:
        raise ValueError("no prefill instances")


class DecodeByLoad:
    """Mixin: decode placed by :func:`choose_decode_by_load` (every named policy)."""

    def choose_decode(
        self, req: RequestInfo, instances: Sequence[DecodeInstance], cost: CostModel
    ) -> DecodeInstance | None:
        return choose_decode_by_load(req, instances, cost)
