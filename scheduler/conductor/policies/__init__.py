"""The named placement policies, one per module (as sgl-router has one file per policy), and
:func:`make_policy`.

``random``, ``round_robin``, ``load`` (shortest predicted queue), ``cache_local`` (prefix hits in the
instance's own cache), ``cache_global`` (the Conductor: hits anywhere in the global KV store, paying the
transfer time of blocks the instance lacks). The snapshots they decide on, their interface and the
shared helpers are in :mod:`scheduler.conductor.policies.base`.
"""

from __future__ import annotations

from smcserve.scheduler.conductor.policies.base import (
    DecodeByLoad,
    DecodeInstance,
    Policy,
    PrefillChoice,
    PrefillInstance,
    RequestInfo,
    cached_tokens_for,
    choose_decode_by_load,
    global_prefix_hits,
    kv_blocks_needed,
    predict_ttft_ms,
    prefix_hits,
)
from smcserve.scheduler.conductor.policies.cache_global import CacheGlobalPolicy
from smcserve.scheduler.conductor.policies.cache_local import CacheLocalPolicy
from smcserve.scheduler.conductor.policies.load import LoadPolicy
from smcserve.scheduler.conductor.policies.random import RandomPolicy
from smcserve.scheduler.conductor.policies.round_robin import RoundRobinPolicy

POLICY_NAMES = ("random", "round_robin", "load", "cache_local", "cache_global")

_POLICIES = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "load": LoadPolicy,
    "cache_local": CacheLocalPolicy,
    "cache_global": CacheGlobalPolicy,
}


def make_policy(name: str, seed: int = 0) -> Policy:
    """A fresh policy object (policies keep state: the RNG, the round-robin position)."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    return RandomPolicy(seed) if name == "random" else _POLICIES[name]()


__all__ = [
    "POLICY_NAMES",
    "make_policy",
    "Policy",
    "PrefillInstance",
    "DecodeInstance",
    "RequestInfo",
    "PrefillChoice",
    "RandomPolicy",
    "RoundRobinPolicy",
    "LoadPolicy",
    "CacheLocalPolicy",
    "CacheGlobalPolicy",
    "DecodeByLoad",
    "prefix_hits",
    "global_prefix_hits",
    "cached_tokens_for",
    "kv_blocks_needed",
    "predict_ttft_ms",
    "choose_decode_by_load",
]
