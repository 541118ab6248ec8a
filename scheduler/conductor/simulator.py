"""Discrete-event simulator of the disaggregated cluster, driving the REAL placement policies.

Model (everything in ms):

- **Prefill**: ``P`` instances, each a FIFO queue (one request at a time) with a local LRU cache of
  ``cache_blocks`` KV blocks holding the blocks it computed or fetched. The **global store** is the
  union of the local caches: a block is globally available while some instance holds it.
- **Placement** goes through :func:`scheduler.conductor.place` — the same code the live scheduler
  runs — on snapshots of the instances (``queue_ms`` = the exact remaining FIFO work, the instance's
  LRU as ``local_blocks``, ``global_hit_blocks`` = longest prompt prefix present anywhere).
- **Execution** of the chosen plan: the instance reuses the prefix blocks it holds itself (engine
  prefix caching, on for every policy; ``local_reuse=False`` turns it off for policies that did not
  plan it) plus the blocks the policy chose to fetch from the global store (only ``cache_global``
  does); the rest is computed. Service time = ``prefill_ms(new, cached) + load_ms(fetched)`` on the
  profile's *true* cost model (the policy may predict with another, ``SimConfig.predict_cost``).
  Reused blocks are refreshed and fetched blocks inserted at dispatch (held until used, as if pinned);
  computed blocks enter the cache when the prefill ends. TTFT = prefill end − arrival.
- **Decode**: ``D`` instances. Placement by load among instances with room for
  ``ceil((prompt + output)/block_size)`` KV blocks, reserved from admission to the end of decode (the
  Conductor predicts decode load rather than reading it). A request joins its instance's batch when
  its prefill ends and holds a slot for ``output_length × tbt_ms(batch at join)``; that TBT is the
  request's TBT.
- **Early rejection** at arrival: no decode room (always), else (``early_reject``) predicted TTFT >
  TTFT SLO or predicted TBT > TBT SLO. Rejections are counted by reason.

Requests come from Mooncake trace rows (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``
at 512 tokens per block), read by :func:`loadtest.trace.load_trace`: ``rows_to_requests(load_trace(path))``;
the hash ids are used directly as block keys (``str(id)``).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from smcserve.scheduler.conductor.admission import place
from smcserve.scheduler.conductor.cost import CostModel
from smcserve.scheduler.conductor.policies import (
    DecodeInstance,
    Policy,
    PrefillInstance,
    RequestInfo,
    cached_tokens_for,
    kv_blocks_needed,
    make_policy,
    prefix_hits,
)

# --------------------------------------------------------------------------------------------------
# Hardware profiles
# --------------------------------------------------------------------------------------------------


@dataclass
class HardwareProfile:
    """Costs of one prefill / decode instance, plus its KV capacities (in blocks of ``block_size``)."""

    name: str
    cost: CostModel
    description: str = ""
    assumed: bool = True  # True: derived from stated assumptions, not measured
    block_size: int = 512
    prefill_cache_blocks: int | None = 4096  # per prefill instance (None: unbounded)
    decode_kv_blocks: int = 2600  # KV blocks a decode instance can hold

    @classmethod
    def from_cost_model(cls, cost: CostModel, name: str = "fitted", description: str = "", **kw) -> HardwareProfile:
        """A profile from a fitted (measured) cost model, e.g. ``CostRecorder.model``."""
        return cls(name=name, cost=cost, description=description or "fitted to measured timings", assumed=False, **kw)

    def as_dict(self) -> dict:
        c = self.cost
        return {
            "name": self.name,
            "assumed": self.assumed,
            "description": self.description,
            "block_size": self.block_size,
            "prefill_cache_blocks": self.prefill_cache_blocks,
            "decode_kv_blocks": self.decode_kv_blocks,
            "cost": {
                "a_ms": c.a,
                "b_ms_per_token": c.b,
                "c_ms_per_token2": c.c,
                "d_ms_per_block": c.d,
                "e_ms": c.e,
                "f_ms_per_seq": c.f,
            },
            "examples_ms": {
                "prefill_8k": round(c.prefill_ms(8192), 1),
                "prefill_32k": round(c.prefill_ms(32768), 1),
                "prefill_512_after_32k_cached": round(c.prefill_ms(512, 32768), 1),
                "load_1_block": round(c.load_ms(1), 2),
                "tbt_batch_32": round(c.tbt_ms(32), 1),
            },
        }


# ASSUMED, not measured. One instance = one 8×A800-80GB node running a LLaMA-2-70B-class model
# (80 layers, d_model 8192, GQA with 8 KV heads, bf16) with tensor parallelism 8:
# - GEMMs: 2 × 70e9 FLOP/token at ~50% of 8 × 312 TFLOPS → b ≈ 0.112 ms/token.
# - Attention: ≈ 4·d_model·layers = 2.6e6 FLOP per (token × context position); causal over the new
#   tokens ≈ 1.3e6·new·(new + 2·cached) FLOP at the same rate → c ≈ 1.05e-6 ms/token².
#   An 8k-token prompt: ≈ 1.0 s; 32k: ≈ 4.8 s.
# - KV per token: 80 × 2 × 8 × 128 × 2 B = 320 KiB → 160 MiB per 512-token block; fetched over
#   RDMA at ~80 GB/s effective per node → d ≈ 2 ms per block (recomputing it costs ~60 ms).
# - Decode: weights 140 GB read per step at ~70% of 8 × 2 TB/s plus TP all-reduces → e ≈ 25 ms;
#   KV read of one ~15k-token sequence ≈ 5 GB → f ≈ 0.45 ms per sequence in the batch.
# - Capacities: 640 GiB of host DRAM per prefill node as KV cache → 4096 blocks; decode HBM
#   8 × 80 GB − 140 GB weights − activations ≈ 420 GB → 2600 blocks.
A800_70B = HardwareProfile(
    name="assumed-8xA800-70B-TP8",
    cost=CostModel(a=15.0, b=0.112, c=1.05e-6, d=2.0, e=25.0, f=0.45),
    description=(
        "ASSUMED profile (not measured): one instance = 8×A800-80GB, LLaMA-2-70B-class model "
        "(GQA 8 KV heads, bf16), TP8, ~50% MFU prefill; 160 MiB per 512-token KV block, "
        "~80 GB/s RDMA fetch; 640 GiB DRAM KV cache per prefill node (4096 blocks), "
        "2600 KV blocks of HBM per decode node"
    ),
)
DEFAULT_PROFILE = A800_70B


# --------------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------------


@dataclass
class TraceRequest:
    arrival_ms: float
    input_length: int
    output_length: int
    block_keys: tuple[str, ...]


def rows_to_requests(rows: Iterable) -> list[TraceRequest]:
    """Simulator requests from trace rows: :class:`loadtest.trace.TraceRow` objects (what
    :func:`loadtest.trace.load_trace` returns) or the JSON objects themselves (dicts)."""

    def one(r) -> TraceRequest:
        if isinstance(r, dict):
            return TraceRequest(
                float(r["timestamp"]),
                int(r["input_length"]),
                int(r["output_length"]),
                tuple(str(h) for h in r["hash_ids"]),
            )
        return TraceRequest(
            float(r.timestamp_ms), int(r.input_length), int(r.output_length), tuple(str(h) for h in r.hash_ids)
        )

    return [one(r) for r in rows]


def trace_hit_rate(requests: Sequence[TraceRequest], capacity: int | None = None) -> float:
    """Fraction of prompt blocks found in one shared prefix cache, requests in order, no timing:
    unbounded (``capacity=None``: the fraction of blocks seen earlier) or an LRU of ``capacity``."""
    cache: OrderedDict[str, None] = OrderedDict()
    hits = total = 0
    for r in requests:
        keys = r.block_keys
        h = prefix_hits(keys, cache)
        hits += h
        total += len(keys)
        for k in keys:
            if k in cache:
                cache.move_to_end(k)
            else:
                cache[k] = None
                if capacity is not None and len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------------


@dataclass
class SimConfig:
    n_prefill: int = 8
    n_decode: int = 8
    cache_blocks: int | None = -1  # per prefill instance; -1: the profile's; None: unbounded
    decode_kv_blocks: int | None = None  # None: the profile's
    slo_ttft_ms: float | None = 30_000.0
    slo_tbt_ms: float | None = 100.0
    early_reject: bool = True  # reject at arrival on predicted SLO misses
    local_reuse: bool = True  # instances reuse their own cached prefix whatever the policy
    predict_cost: CostModel | None = None  # the policy's cost model (None: the profile's, i.e. exact)
    seed: int = 0


@dataclass
class RequestResult:
    index: int
    admitted: bool
    reason: str | None = None
    prefill_id: str | None = None
    decode_id: str | None = None
    pred_ttft_ms: float = math.nan
    ttft_ms: float = math.nan
    pred_tbt_ms: float = math.nan
    tbt_ms: float = math.nan
    blocks: int = 0
    reused_blocks: int = 0
    fetched_blocks: int = 0


class _Prefill:
    __slots__ = ("snap", "free_at", "cache", "capacity")

    def __init__(self, i: int, capacity: int | None):
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.snap = PrefillInstance(f"prefill-{i}", 0.0, self.cache)  # type: ignore[arg-type]
        self.free_at = 0.0
        self.capacity = capacity


class _Decode:
    __slots__ = ("snap", "capacity", "reserved", "assigned", "running")

    def __init__(self, i: int, capacity: int):
        self.snap = DecodeInstance(f"decode-{i}", 0, capacity)
        self.capacity = capacity
        self.reserved = 0
        self.assigned = 0  # admitted, not finished (predicted batch)
        self.running = 0  # in decode now


@dataclass
class SimResult:
    policy: str
    requests: list[RequestResult]
    slo_ttft_ms: float | None
    slo_tbt_ms: float | None

    def hit_rate(self) -> float:
        """Unrounded fraction of the served prompts' blocks that were reused."""
        served = [r for r in self.requests if r.admitted]
        blocks = sum(r.blocks for r in served)
        return sum(r.reused_blocks for r in served) / blocks if blocks else 0.0

    def summary(self) -> dict:
        served = [r for r in self.requests if r.admitted]
        ttft = np.array([r.ttft_ms for r in served], dtype=float)
        slo_t = self.slo_ttft_ms if self.slo_ttft_ms is not None else math.inf
        slo_b = self.slo_tbt_ms if self.slo_tbt_ms is not None else math.inf
        ok = sum(1 for r in served if r.ttft_ms <= slo_t and r.tbt_ms <= slo_b)
        reasons: dict[str, int] = {}
        for r in self.requests:
            if not r.admitted:
                key = (r.reason or "?").split(":", 1)[0]
                reasons[key] = reasons.get(key, 0) + 1
        blocks = sum(r.blocks for r in served)
        pred_err = [r.ttft_ms - r.pred_ttft_ms for r in served]
        n = len(self.requests)

        def q(p):
            return round(float(np.percentile(ttft, p)) / 1e3, 4) if len(ttft) else None

        return {
            "requests": n,
            "served": len(served),
            "mean_ttft_s": round(float(ttft.mean()) / 1e3, 4) if len(ttft) else None,
            "p50_ttft_s": q(50),
            "p90_ttft_s": q(90),
            "p99_ttft_s": q(99),
            "slo_attainment": round(ok / n, 4) if n else None,
            "rejected": {"total": n - len(served), **dict(sorted(reasons.items()))},
            "hit_rate": round(sum(r.reused_blocks for r in served) / blocks, 4) if blocks else 0.0,
            "fetched_block_rate": round(sum(r.fetched_blocks for r in served) / blocks, 4) if blocks else 0.0,
            "mean_tbt_ms": round(float(np.mean([r.tbt_ms for r in served])), 2) if served else None,
            "mean_ttft_pred_error_s": round(float(np.mean(pred_err)) / 1e3, 4) if served else None,
        }


def simulate(
    requests: Sequence[TraceRequest],
    policy: str | Policy,
    profile: HardwareProfile = DEFAULT_PROFILE,
    config: SimConfig | None = None,
) -> SimResult:
    """Replay ``requests`` (sorted by arrival; ties keep their order) under ``policy``."""
    cfg = config or SimConfig()
    pol = make_policy(policy, seed=cfg.seed) if isinstance(policy, str) else policy
    true_cost = profile.cost
    pred_cost = cfg.predict_cost or profile.cost
    bs = profile.block_size
    cap = profile.prefill_cache_blocks if cfg.cache_blocks == -1 else cfg.cache_blocks
    dcap = cfg.decode_kv_blocks if cfg.decode_kv_blocks is not None else profile.decode_kv_blocks
    slo_ttft = cfg.slo_ttft_ms if cfg.early_reject else None
    slo_tbt = cfg.slo_tbt_ms if cfg.early_reject else None

    prefills = [_Prefill(i, cap) for i in range(cfg.n_prefill)]
    decodes = [_Decode(i, dcap) for i in range(cfg.n_decode)]
    p_snaps = [p.snap for p in prefills]
    d_snaps = [d.snap for d in decodes]
    p_by_snap = {id(p.snap): p for p in prefills}  # by identity: snapshots hold whole caches
    d_by_snap = {id(d.snap): d for d in decodes}
    holders: dict[str, int] = {}  # block -> number of instances holding it (global store)

    def insert(p: _Prefill, k: str) -> None:
        c = p.cache
        if k in c:
            c.move_to_end(k)
            return
        c[k] = None
        holders[k] = holders.get(k, 0) + 1
        if p.capacity is not None and len(c) > p.capacity:
            old, _ = c.popitem(last=False)
            left = holders[old] - 1
            if left:
                holders[old] = left
            else:
                del holders[old]

    events: list[tuple] = []  # (time, seq, kind, payload)
    seq = 0

    def run_events(until: float) -> None:
        while events and events[0][0] <= until:
            t, _, kind, payload = heapq.heappop(events)
            if kind == "prefill_done":
                p, keys, start_block, d, res, out_len, need = payload
                for k in keys[start_block:]:
                    insert(p, k)
                d.running += 1
                res.tbt_ms = true_cost.tbt_ms(d.running)
                push(t + out_len * res.tbt_ms, "decode_done", (d, need))
            else:  # decode_done
                d, need = payload
                d.running -= 1
                d.assigned -= 1
                d.reserved -= need

    def push(t: float, kind: str, payload) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    results: list[RequestResult] = []
    for idx, r in enumerate(requests):
        now = r.arrival_ms
        run_events(now)
        keys = r.block_keys
        for p in prefills:
            p.snap.queue_ms = max(0.0, p.free_at - now)
        for d in decodes:
            d.snap.batch = d.assigned
            d.snap.free_blocks = d.capacity - d.reserved
        g = 0
        for k in keys:
            if k not in holders:
                break
            g += 1
        req = RequestInfo(keys, r.input_length, bs, r.output_length)
        pl = place(pol, req, p_snaps, g, d_snaps, pred_cost, slo_ttft, slo_tbt)
        res = RequestResult(
            idx,
            pl.admitted,
            pl.reject_reason,
            blocks=len(keys),
            pred_ttft_ms=pl.prefill.ttft_ms,
            pred_tbt_ms=pl.pred_tbt_ms,
        )
        results.append(res)
        if not pl.admitted:
            continue
        p = p_by_snap[id(pl.prefill.instance)]
        d = d_by_snap[id(pl.decode)]
        res.prefill_id, res.decode_id = p.snap.id, d.snap.id
        # execute the plan
        local = prefix_hits(keys, p.cache)
        planned = min(math.ceil(pl.prefill.cached_tokens / bs), max(g, local))
        reuse = max(planned, local) if cfg.local_reuse else planned
        fetched = max(0, reuse - local)
        cached = cached_tokens_for(reuse, req)
        service = true_cost.prefill_ms(r.input_length - cached, cached) + true_cost.load_ms(fetched)
        for k in keys[:reuse]:
            insert(p, k)  # refresh the reused blocks, bring in the fetched ones
        start = max(now, p.free_at)
        end = start + service
        p.free_at = end
        res.ttft_ms = end - now
        res.reused_blocks, res.fetched_blocks = reuse, fetched
        need = kv_blocks_needed(req)
        d.reserved += need
        d.assigned += 1
        push(end, "prefill_done", (p, keys, reuse, d, res, r.output_length, need))
    run_events(math.inf)
    return SimResult(pol.name, results, cfg.slo_ttft_ms, cfg.slo_tbt_ms)
