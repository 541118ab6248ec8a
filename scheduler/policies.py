"""Placement policies (after Mooncake's Conductor), shared by the live scheduler and the simulator.

A policy sees plain snapshots of the instances (no Ray, no gRPC), so the very same code places
requests in ``scheduler/server.py`` and in ``loadtest/simulator.py``.

Named policies: ``random``, ``round_robin``, ``load`` (shortest predicted queue), ``cache_local``
(prefix hits in the instance's own cache), ``cache_global`` (the Conductor: hits anywhere in the
global KV store, paying the transfer time of blocks the instance lacks).

Every policy places decode by load (Mooncake does the same): the decode instance with the smallest
predicted time between tokens, ``cost.tbt_ms(batch + 1)``, among those with room for the request's
KV blocks (``None`` when none has room: the caller rejects).

Typical use (what the live scheduler and the simulator both do)::

    policy = make_policy("cache_global")
    placement = place(policy, req, prefill_snapshots, global_hits, decode_snapshots, cost,
                      slo_ttft_ms=..., slo_tbt_ms=...)
    if placement.reject_reason: reject (RESOURCE_EXHAUSTED, placement.reject_reason)
    else: send to placement.prefill.instance, then placement.decode

and measured timings go to a :class:`CostRecorder`, whose ``model`` is the cost model to pass.
"""
from __future__ import annotations

import itertools
import math
import random as _random
import threading
from collections import deque
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import numpy as np

POLICY_NAMES = ("random", "round_robin", "load", "cache_local", "cache_global")


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

    # --- fitting --------------------------------------------------------------------------------
    MIN_PREFILL_SAMPLES = 6
    MIN_LOAD_SAMPLES = 2
    MIN_TBT_SAMPLES = 3

    @classmethod
    def fit(cls, prefill: Iterable[tuple[float, float, float]] | Mapping | None = (),
            load: Iterable[tuple[float, float]] = (), tbt: Iterable[tuple[float, float]] = (), *,
            base: CostModel | None = None) -> CostModel:
        """Non-negative least squares fit of the three parts to measured samples.

        ``prefill``: (new_tokens, cached_tokens, ms) → a, b, c; ``load``: (blocks, ms) → d;
        ``tbt``: (batch, ms) → e, f. ``prefill`` may instead be a mapping with the keys
        ``"prefill"``, ``"load"``, ``"tbt"`` (``fit(samples)``). A part with too few samples (or
        samples that cannot separate its coefficients) keeps the values of ``base`` (default: the
        class defaults). Coefficients are never negative (exact NNLS over the few columns).
        """
        if isinstance(prefill, Mapping):
            samples = prefill
            prefill, load, tbt = samples.get("prefill", ()), samples.get("load", ()), samples.get("tbt", ())
        out = replace(base) if base is not None else cls()
        pre = np.asarray(list(prefill or ()), dtype=float).reshape(-1, 3)
        pre = pre[pre[:, 0] > 0] if len(pre) else pre
        if len(pre) >= cls.MIN_PREFILL_SAMPLES:
            new, cached, ms = pre[:, 0], pre[:, 1], pre[:, 2]
            X = np.column_stack([np.ones_like(new), new, new * (new + cached)])
            coef = _nnls(X, ms)
            if coef is not None:
                out.a, out.b, out.c = (float(v) for v in coef)
        ld = np.asarray(list(load or ()), dtype=float).reshape(-1, 2)
        ld = ld[ld[:, 0] > 0] if len(ld) else ld
        if len(ld) >= cls.MIN_LOAD_SAMPLES:
            x, y = ld[:, 0], ld[:, 1]
            out.d = float(max(0.0, (x @ y) / (x @ x)))
        tb = np.asarray(list(tbt or ()), dtype=float).reshape(-1, 2)
        if len(tb) >= cls.MIN_TBT_SAMPLES:
            coef = _nnls(np.column_stack([np.ones(len(tb)), tb[:, 0]]), tb[:, 1])
            if coef is not None:
                out.e, out.f = (float(v) for v in coef)
        return out

    def refit(self, prefill=(), load=(), tbt=()) -> CostModel:
        """:meth:`fit` with this model as the fallback for parts with too few samples."""
        return type(self).fit(prefill, load, tbt, base=self)


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """min ‖Xβ − y‖ subject to β ≥ 0, exactly, for a handful of columns: least squares on every
    subset of columns (the others held at 0), keep the best feasible one. ``None`` when the columns
    cannot be told apart (rank-deficient samples)."""
    n, k = X.shape
    scale = np.linalg.norm(X, axis=0)
    if np.any(scale == 0):
        scale = np.where(scale == 0, 1.0, scale)
    Xs = X / scale
    if np.linalg.matrix_rank(Xs, tol=1e-9) < k:
        return None
    best, best_res = np.zeros(k), float(y @ y)
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sol, *_ = np.linalg.lstsq(Xs[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            beta = np.zeros(k)
            beta[list(cols)] = sol
            res = float(np.sum((Xs @ beta - y) ** 2))
            if res < best_res - 1e-12 * max(1.0, best_res):
                best, best_res = beta, res
    return best / scale


class CostRecorder:
    """Keeps the last ``window`` measured samples of each kind and refits the cost model every
    ``refit_every`` samples (of any kind). The live scheduler feeds it; ``model`` is always usable."""

    def __init__(self, model: CostModel | None = None, window: int = 512, refit_every: int = 32):
        self.model = model if model is not None else CostModel()
        self.refit_every = max(1, int(refit_every))
        self.prefill: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.load: deque[tuple[float, float]] = deque(maxlen=window)
        self.tbt: deque[tuple[float, float]] = deque(maxlen=window)
        self._since = 0
        self.refits = 0
        self._lock = threading.Lock()

    def add_prefill(self, new_tokens: int, cached_tokens: int, ms: float) -> None:
        self._add(self.prefill, (float(new_tokens), float(cached_tokens), float(ms)))

    def add_load(self, blocks: int, ms: float) -> None:
        self._add(self.load, (float(blocks), float(ms)))

    def add_tbt(self, batch: int, ms: float) -> None:
        self._add(self.tbt, (float(batch), float(ms)))

    def _add(self, buf: deque, sample: tuple) -> None:
        with self._lock:
            buf.append(sample)
            self._since += 1
            if self._since >= self.refit_every:
                self._refit_locked()

    def refit(self) -> CostModel:
        with self._lock:
            return self._refit_locked()

    def _refit_locked(self) -> CostModel:
        self._since = 0
        self.refits += 1
        self.model = self.model.refit(list(self.prefill), list(self.load), list(self.tbt))
        return self.model


@dataclass
class PrefillInstance:
    """What a policy knows of one prefill instance at decision time."""

    id: str
    queue_ms: float = 0.0                  # predicted time until the work already sent to it is done
    local_blocks: set[str] = field(default_factory=set)  # blocks in its own cache (for cache_local);
    # any container supporting ``in`` will do (the simulator passes its LRU dict)


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
    local_hit_blocks: int = 0               # prefix blocks already in the instance's own cache
    load_blocks: int = 0                    # prefix blocks to fetch from the global store first


class Policy(Protocol):
    name: str

    def choose_prefill(self, req: RequestInfo, instances: Sequence[PrefillInstance], global_hit_blocks: int,
                       cost: CostModel) -> PrefillChoice: ...

    def choose_decode(self, req: RequestInfo, instances: Sequence[DecodeInstance],
                      cost: CostModel) -> DecodeInstance | None: ...


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


def predict_ttft_ms(req: RequestInfo, inst: PrefillInstance, reuse_blocks: int, load_blocks: int,
                    cost: CostModel) -> tuple[float, int]:
    """(queue + prefill of the part beyond ``reuse_blocks`` + load of ``load_blocks``, cached tokens)."""
    cached = cached_tokens_for(reuse_blocks, req)
    return inst.queue_ms + cost.prefill_ms(req.prompt_tokens - cached, cached) + cost.load_ms(load_blocks), cached


def choose_decode_by_load(req: RequestInfo, instances: Sequence[DecodeInstance],
                          cost: CostModel) -> DecodeInstance | None:
    need = kv_blocks_needed(req)
    best, best_key = None, None
    for i, inst in enumerate(instances):
        if inst.free_blocks < need:
            continue
        key = (cost.tbt_ms(inst.batch + 1), -inst.free_blocks, i)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


def _no_cache_choice(req: RequestInfo, inst: PrefillInstance, cost: CostModel) -> PrefillChoice:
    ttft, cached = predict_ttft_ms(req, inst, 0, 0, cost)
    return PrefillChoice(inst, ttft, cached)


def _require(instances: Sequence) -> None:
    if not instances:
        raise ValueError("no prefill instances")


# --- the policies --------------------------------------------------------------------------------
class _DecodeByLoad:
    def choose_decode(self, req: RequestInfo, instances: Sequence[DecodeInstance],
                      cost: CostModel) -> DecodeInstance | None:
        return choose_decode_by_load(req, instances, cost)


class RandomPolicy(_DecodeByLoad):
    """Uniformly random prefill instance (seeded); predicted TTFT ignores the cache."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = _random.Random(seed)

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        _require(instances)
        return _no_cache_choice(req, instances[self._rng.randrange(len(instances))], cost)


class RoundRobinPolicy(_DecodeByLoad):
    """Prefill instances in turn; predicted TTFT ignores the cache."""

    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        _require(instances)
        inst = instances[self._next % len(instances)]
        self._next += 1
        return _no_cache_choice(req, inst, cost)


class LoadPolicy(_DecodeByLoad):
    """Shortest predicted queue; TTFT predicted without cache hits: queue + prefill(all tokens)."""

    name = "load"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        _require(instances)
        inst = min(instances, key=lambda p: p.queue_ms)  # first of equals
        return _no_cache_choice(req, inst, cost)


class CacheGlobalPolicy(_DecodeByLoad):
    """The Conductor: local hits L_i, global hits G; blocks [L_i, G) are fetched at load_ms(G − L_i);
    TTFT_i = queue_i + prefill(beyond G, cached) + load. Pick the minimum."""

    name = "cache_global"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        _require(instances)
        best = None
        for inst in instances:
            local = prefix_hits(req.block_keys, inst.local_blocks)
            g = max(int(global_hit_blocks), local)
            ttft, cached = predict_ttft_ms(req, inst, g, g - local, cost)
            if best is None or ttft < best.ttft_ms:
                best = PrefillChoice(inst, ttft, cached, local_hit_blocks=local, load_blocks=g - local)
        return best


class CacheLocalPolicy(CacheGlobalPolicy):
    """Prefix hits in each instance's own cache only: the Conductor's rule with no global hits."""

    name = "cache_local"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        return super().choose_prefill(req, instances, 0, cost)


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


# --- admission -----------------------------------------------------------------------------------
def admit(pred_ttft_ms: float, pred_tbt_ms: float, slo_ttft_ms: float | None,
          slo_tbt_ms: float | None) -> str | None:
    """None to admit; else why not (early rejection, as in Mooncake). An SLO of None is no limit."""
    if slo_ttft_ms is not None and pred_ttft_ms > slo_ttft_ms:
        return f"ttft: predicted {pred_ttft_ms:.0f} ms > SLO {slo_ttft_ms:.0f} ms"
    if slo_tbt_ms is not None and pred_tbt_ms > slo_tbt_ms:
        return f"tbt: predicted {pred_tbt_ms:.1f} ms > SLO {slo_tbt_ms:.1f} ms"
    return None


@dataclass
class Placement:
    prefill: PrefillChoice
    decode: DecodeInstance | None
    pred_tbt_ms: float                      # cost.tbt_ms(decode.batch + 1); inf when no decode fits
    reject_reason: str | None               # None: admitted; "decode: …", "ttft: …" or "tbt: …"

    @property
    def admitted(self) -> bool:
        return self.reject_reason is None


def place(policy: Policy, req: RequestInfo, prefill: Sequence[PrefillInstance], global_hit_blocks: int,
          decode: Sequence[DecodeInstance], cost: CostModel, slo_ttft_ms: float | None = None,
          slo_tbt_ms: float | None = None) -> Placement:
    """Both choices and the admission decision in one call."""
    pc = policy.choose_prefill(req, prefill, global_hit_blocks, cost)
    dc = policy.choose_decode(req, decode, cost)
    if dc is None:
        return Placement(pc, None, math.inf,
                         f"decode: no instance has {kv_blocks_needed(req)} free KV blocks")
    tbt = cost.tbt_ms(dc.batch + 1)
    return Placement(pc, dc, tbt, admit(pc.ttft_ms, tbt, slo_ttft_ms, slo_tbt_ms))
