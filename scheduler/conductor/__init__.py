"""The Conductor (after Mooncake's): placement and admission, shared by the live scheduler and the simulator.

- :mod:`~scheduler.conductor.cost`: the cost model (predicted prefill, KV load and decode-step times)
  and its least-squares fit to measured timings (:class:`CostModel`, :class:`CostRecorder`);
- :mod:`~scheduler.conductor.policies`: the named placement policies, one module each, over plain
  snapshots of the instances (no Ray, no gRPC; :mod:`~scheduler.conductor.policies.base`);
- :mod:`~scheduler.conductor.admission`: :func:`place`, both choices and the early-rejection decision;
- :mod:`~scheduler.conductor.simulator`: a discrete-event simulator of the cluster running the same
  policies (not imported here).

The very same code places requests in ``scheduler/server.py`` and in the simulator. Every policy places
decode by load (Mooncake does the same): the decode instance with the smallest predicted time between
tokens, ``cost.tbt_ms(batch + 1)``, among those with room for the request's KV blocks (``None`` when none
has room: the caller rejects).

Typical use (what the live scheduler and the simulator both do)::

    policy = make_policy("cache_global")
    placement = place(policy, req, prefill_snapshots, global_hits, decode_snapshots, cost,
                      slo_ttft_ms=..., slo_tbt_ms=...)
    if placement.reject_reason: reject (RESOURCE_EXHAUSTED, placement.reject_reason)
    else: send to placement.prefill.instance, then placement.decode

and measured timings go to a :class:`CostRecorder`, whose ``model`` is the cost model to pass.
"""

from __future__ import annotations

from smcserve.scheduler.conductor.admission import Placement, admit, place
from smcserve.scheduler.conductor.cost import CostModel, CostRecorder
from smcserve.scheduler.conductor.policies import (
    POLICY_NAMES,
    CacheGlobalPolicy,
    CacheLocalPolicy,
    DecodeInstance,
    LoadPolicy,
    Policy,
    PrefillChoice,
    PrefillInstance,
    RandomPolicy,
    RequestInfo,
    RoundRobinPolicy,
    cached_tokens_for,
    choose_decode_by_load,
    global_prefix_hits,
    kv_blocks_needed,
    make_policy,
    predict_ttft_ms,
    prefix_hits,
)

__all__ = [
    "CostModel",
    "CostRecorder",
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
    "prefix_hits",
    "global_prefix_hits",
    "cached_tokens_for",
    "kv_blocks_needed",
    "predict_ttft_ms",
    "choose_decode_by_load",
    "Placement",
    "admit",
    "place",
]
