"""Placement policies (after Mooncake's Conductor), shared by the live scheduler and the simulator.

A policy sees plain snapshots of the instances (no Ray, no gRPC), so the very same code places
requests in ``scheduler/server.py`` and in ``loadtest/simulator.py``.

Named policies: ``random``, ``round_robin``, ``load`` (shortest predicted queue), ``cache_local``
(prefix hits in the instance's own cache), ``cache_global`` (the Conductor: hits anywhere in the
global KV store, paying the transfer time of blocks the instance lacks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class CostModel:
    """Predicted times in ms, fitted to measured engine timings (see :meth:`fit`).

    prefill_ms(new, cached) = a + b·new + c·new·(new + cached)   (GEMMs grow with new tokens, attention
    with new × context); load_ms(blocks) = d·blocks; tbt_ms(batch) = e + f·batch.
    """

    a: float = 5.0
    b: float = 1.0
    c: float = 0.0
    d: float = 0.5
    e: float = 20.0
    f: float = 2.0

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.a + self.b * new_tokens + self.c * new_tokens * (new_tokens + cached_tokens)

    def load_ms(self, blocks: int) -> float:
        return self.d * blocks

    def tbt_ms(self, batch: int) -> float:
        return self.e + self.f * batch


@dataclass
class PrefillInstance:
    """What a policy knows of one prefill instance at decision time."""

    id: str
    queue_ms: float = 0.0                  # predicted time until the work already sent to it is done
    local_blocks: set[str] = field(default_factory=set)  # blocks in its own cache (for cache_local)


@dataclass
class DecodeInstance:
    id: str
    batch: int = 0                          # sequences it is running (predicted, see the Conductor)
    free_blocks: int = 1 << 30


@dataclass
class RequestInfo:
    block_keys: Sequence[str]              # chained prefix keys of the prompt's blocks
    prompt_tokens: int
    block_size: int
    max_tokens: int = 0


@dataclass
class PrefillChoice:
    instance: PrefillInstance
    ttft_ms: float                          # predicted: queue + prefill of the uncached part + KV load
    cached_tokens: int


class Policy(Protocol):
    name: str

    def choose_prefill(self, req: RequestInfo, instances: Sequence[PrefillInstance], global_hit_blocks: int,
                       cost: CostModel) -> PrefillChoice: ...

    def choose_decode(self, req: RequestInfo, instances: Sequence[DecodeInstance], cost: CostModel) -> DecodeInstance: ...
