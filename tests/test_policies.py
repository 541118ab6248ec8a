"""Placement policies, cost model fitting and admission (scheduler/conductor/). Pure Python, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smcserve.scheduler.conductor import (
    POLICY_NAMES,
    CostModel,
    CostRecorder,
    DecodeInstance,
    PrefillInstance,
    RequestInfo,
    admit,
    cached_tokens_for,
    global_prefix_hits,
    kv_blocks_needed,
    make_policy,
    place,
    prefix_hits,
)

# 1 ms per new token, nothing else, 10 ms per fetched block: easy to check by hand.
COST = CostModel(a=0.0, b=1.0, c=0.0, d=10.0, e=20.0, f=1.0)
BS = 4


def req(n_blocks: int, prompt: int | None = None, max_tokens: int = 0, prefix: str = "k") -> RequestInfo:
    keys = [f"{prefix}{i}" for i in range(n_blocks)]
    return RequestInfo(keys, prompt if prompt is not None else n_blocks * BS, BS, max_tokens)


def blocks(n: int, prefix: str = "k") -> set[str]:
    return {f"{prefix}{i}" for i in range(n)}


def test_make_policy_names_and_error():
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError) as e:
        make_policy("nope")
    for name in POLICY_NAMES:
        assert name in str(e.value)


def test_prefix_hits_and_global_hits():
    keys = ["a", "b", "c", "d"]
    assert prefix_hits(keys, {"a", "b", "d"}) == 2
    assert prefix_hits(keys, {"b", "c"}) == 0
    insts = [PrefillInstance("p0", local_blocks={"a"}), PrefillInstance("p1", local_blocks={"b", "c"})]
    assert global_prefix_hits(keys, insts) == 3


def test_cached_tokens_leave_one_token_to_compute():
    r = req(3)  # 12 tokens, 3 full blocks
    assert cached_tokens_for(3, r) == 11
    assert cached_tokens_for(2, r) == 8
    assert cached_tokens_for(0, r) == 0
    assert cached_tokens_for(3, req(3, prompt=10)) == 9


def test_load_picks_shortest_queue_and_ignores_cache():
    insts = [PrefillInstance("p0", 50.0, blocks(4)), PrefillInstance("p1", 10.0), PrefillInstance("p2", 30.0)]
    c = make_policy("load").choose_prefill(req(4), insts, 4, COST)
    assert c.instance.id == "p1"
    assert c.cached_tokens == 0
    assert c.ttft_ms == pytest.approx(10.0 + 16.0)


def test_cache_local_uses_own_hits_and_ignores_remote_hits():
    r = req(10)  # 40 tokens
    # p0: 6 local hits, queue 20 -> 20 + 16 = 36; p1: nothing, queue 0 -> 40; p2: 2 hits, queue 5 -> 37.
    # global_hit_blocks = 10 (the whole prompt is somewhere) must not matter to cache_local.
    insts = [PrefillInstance("p0", 20.0, blocks(6)), PrefillInstance("p1", 0.0), PrefillInstance("p2", 5.0, blocks(2))]
    c = make_policy("cache_local").choose_prefill(r, insts, 10, COST)
    assert c.instance.id == "p0"
    assert c.cached_tokens == 24
    assert c.ttft_ms == pytest.approx(36.0)
    assert c.load_blocks == 0
    # a longer queue on p0 (30 + 16 = 46) makes p2 (37) the best, then the cold p1 (40)
    insts[0].queue_ms = 30.0
    c = make_policy("cache_local").choose_prefill(r, insts, 10, COST)
    assert c.instance.id == "p2" and c.cached_tokens == 8 and c.ttft_ms == pytest.approx(37.0)
    insts[2].queue_ms = 10.0
    c = make_policy("cache_local").choose_prefill(r, insts, 10, COST)
    assert c.instance.id == "p1" and c.cached_tokens == 0 and c.ttft_ms == pytest.approx(40.0)
    # cache_global, seeing G = 10, would fetch onto the idle p1: 0 + prefill(1, 39) + 10 * 10
    g = make_policy("cache_global").choose_prefill(r, insts, 10, COST)
    assert g.ttft_ms == pytest.approx(min(30 + 1 + 40, 0 + 1 + 100, 10 + 1 + 80))


def test_cache_global_min_predicted_ttft_with_loads():
    r = req(10)  # 40 tokens; G = 8 global hits -> 8 new tokens beyond G
    insts = [
        PrefillInstance("p0", 40.0, blocks(8)),  # 40 + 8 + 0 load        = 48
        PrefillInstance("p1", 0.0, blocks(2)),  # 0 + 8 + 10*(8-2)=60    = 68
        PrefillInstance("p2", 10.0, blocks(6)),
    ]  # 10 + 8 + 10*2 = 20     = 38
    c = make_policy("cache_global").choose_prefill(r, insts, 8, COST)
    assert c.instance.id == "p2"
    assert c.ttft_ms == pytest.approx(38.0)
    assert c.cached_tokens == 32 and c.local_hit_blocks == 6 and c.load_blocks == 2
    # cheaper transfers favour the idle instance: p1 = 0 + 8 + 6 = 14
    cheap = CostModel(a=0.0, b=1.0, c=0.0, d=1.0)
    c = make_policy("cache_global").choose_prefill(r, insts, 8, cheap)
    assert c.instance.id == "p1" and c.ttft_ms == pytest.approx(14.0) and c.load_blocks == 6
    # with the same state, cache_local cannot see G and picks p2 by local hits: 10 + 16 = 26 < 32 < 40
    c = make_policy("cache_local").choose_prefill(r, insts, 8, cheap)
    assert c.instance.id == "p2" and c.ttft_ms == pytest.approx(26.0)


def test_cache_global_full_hit_computes_last_token():
    r = req(3)  # 12 tokens, all present remotely
    insts = [PrefillInstance("p0", 0.0)]
    c = make_policy("cache_global").choose_prefill(r, insts, 3, COST)
    assert c.cached_tokens == 11
    assert c.ttft_ms == pytest.approx(COST.prefill_ms(1, 11) + COST.load_ms(3))


def test_cache_global_uses_local_hits_beyond_global():
    # a stale/low global count never hides the instance's own hits
    insts = [PrefillInstance("p0", 0.0, blocks(3))]
    c = make_policy("cache_global").choose_prefill(req(5), insts, 0, COST)
    assert c.local_hit_blocks == 3 and c.load_blocks == 0 and c.cached_tokens == 12


def test_round_robin_cycles():
    p = make_policy("round_robin")
    insts = [PrefillInstance(f"p{i}", queue_ms=float(10 - i)) for i in range(3)]
    ids = [p.choose_prefill(req(1), insts, 0, COST).instance.id for _ in range(7)]
    assert ids == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]


def test_random_is_seeded():
    insts = [PrefillInstance(f"p{i}") for i in range(8)]

    def run(seed):
        p = make_policy("random", seed=seed)
        return [p.choose_prefill(req(1), insts, 0, COST).instance.id for _ in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len(set(run(3))) > 4


def test_decode_respects_free_blocks_and_prefers_small_batch():
    r = req(3, max_tokens=5)  # ceil((12 + 5) / 4) = 5 blocks
    assert kv_blocks_needed(r) == 5
    insts = [
        DecodeInstance("d0", batch=0, free_blocks=4),
        DecodeInstance("d1", batch=7, free_blocks=100),
        DecodeInstance("d2", batch=3, free_blocks=5),
    ]
    for name in POLICY_NAMES:
        assert make_policy(name).choose_decode(r, insts, COST).id == "d2"
    insts[2].free_blocks = 4
    assert make_policy("cache_global").choose_decode(r, insts, COST).id == "d1"
    insts[1].free_blocks = 0
    for name in POLICY_NAMES:
        assert make_policy(name).choose_decode(r, insts, COST) is None


def test_admit_reasons():
    assert admit(900, 50, 1000, 100) is None
    assert admit(1234, 50, 1000, 100) == "ttft: predicted 1234 ms > SLO 1000 ms"
    why = admit(500, 150, 1000, 100)
    assert why.startswith("tbt: predicted 150") and "SLO 100" in why
    assert admit(1e9, 1e9, None, None) is None


def test_place_combines_choice_and_admission():
    r = req(4, max_tokens=4)
    pre = [PrefillInstance("p0", 100.0)]
    dec = [DecodeInstance("d0", batch=9, free_blocks=100)]
    pl = place(make_policy("load"), r, pre, 0, dec, COST, slo_ttft_ms=200, slo_tbt_ms=50)
    assert pl.admitted and pl.prefill.ttft_ms == pytest.approx(116.0) and pl.pred_tbt_ms == pytest.approx(30.0)
    pl = place(make_policy("load"), r, pre, 0, dec, COST, slo_ttft_ms=110, slo_tbt_ms=50)
    assert pl.reject_reason.startswith("ttft:")
    pl = place(make_policy("load"), r, pre, 0, dec, COST, slo_ttft_ms=200, slo_tbt_ms=25)
    assert pl.reject_reason.startswith("tbt:")
    dec[0].free_blocks = 4
    pl = place(make_policy("load"), r, pre, 0, dec, COST)
    assert pl.decode is None and pl.reject_reason.startswith("decode:") and math.isinf(pl.pred_tbt_ms)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_decode_room_anywhere_is_rejected_whatever_the_policy_and_slos(name):
    r = req(3, max_tokens=5)  # 5 blocks
    pre = [PrefillInstance("p0"), PrefillInstance("p1", 5.0)]
    dec = [
        DecodeInstance("d0", batch=0, free_blocks=4),
        DecodeInstance("d1", batch=1, free_blocks=0),
        DecodeInstance("d2", batch=2, free_blocks=3),
    ]
    pl = place(make_policy(name), r, pre, 0, dec, COST)  # no SLOs: room is still required
    assert not pl.admitted and pl.decode is None and math.isinf(pl.pred_tbt_ms)
    assert pl.reject_reason == "decode: no instance has 5 free KV blocks"
    dec[2].free_blocks = 5
    pl = place(make_policy(name), r, pre, 0, dec, COST)
    assert pl.admitted and pl.decode.id == "d2"


def _synthetic(true: CostModel, n: int = 200, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    new = rng.integers(1, 4000, n)
    cached = rng.integers(0, 8000, n)
    pre = [
        (int(x), int(y), true.prefill_ms(int(x), int(y)) * (1 + noise * rng.standard_normal()))
        for x, y in zip(new, cached)
    ]
    bl = rng.integers(1, 64, n)
    load = [(int(b), true.load_ms(int(b)) * (1 + noise * rng.standard_normal())) for b in bl]
    bt = rng.integers(1, 128, n)
    tbt = [(int(b), true.tbt_ms(int(b)) * (1 + noise * rng.standard_normal())) for b in bt]
    return pre, load, tbt


def test_fit_recovers_known_coefficients():
    true = CostModel(a=12.0, b=0.11, c=1.1e-6, d=2.5, e=25.0, f=0.45)
    pre, load, tbt = _synthetic(true)
    m = CostModel.fit(pre, load, tbt)
    for k in "abcdef":
        assert getattr(m, k) == pytest.approx(getattr(true, k), rel=1e-6), k
    m = CostModel.fit({"prefill": pre, "load": load, "tbt": tbt})  # fit(samples) form
    assert m.b == pytest.approx(0.11, rel=1e-6)
    # with 2% noise: close
    pre, load, tbt = _synthetic(true, n=500, noise=0.02, seed=1)
    m = CostModel.fit(pre, load, tbt)
    assert m.b == pytest.approx(true.b, rel=0.05)
    assert m.c == pytest.approx(true.c, rel=0.1)
    assert m.d == pytest.approx(true.d, rel=0.02)
    assert m.f == pytest.approx(true.f, rel=0.05)


def test_fit_is_non_negative_and_keeps_defaults():
    # true c = 0 and a = 0, with noise: unconstrained lstsq could go negative
    true = CostModel(a=0.0, b=0.5, c=0.0, d=1.0, e=30.0, f=0.0)
    pre, load, tbt = _synthetic(true, noise=0.05, seed=2)
    m = CostModel.fit(pre, load, tbt)
    assert min(m.a, m.b, m.c, m.d, m.e, m.f) >= 0.0
    assert m.b == pytest.approx(0.5, rel=0.05)
    # too few samples: defaults (or the given base) are kept
    base = CostModel(a=1, b=2, c=3, d=4, e=5, f=6)
    m = CostModel.fit(pre[:2], load[:1], tbt[:2], base=base)
    assert m == base
    m = base.refit(pre, (), ())
    assert (m.d, m.e, m.f) == (4, 5, 6) and m.b == pytest.approx(0.5, rel=0.05)
    assert CostModel.fit() == CostModel()
    # samples that cannot separate the coefficients (all the same size) keep the fallback
    same = [(100, 0, 110.0)] * 10
    assert CostModel.fit(same, base=base) == base


def test_cost_recorder_window_and_refit_period():
    true = CostModel(a=10.0, b=0.2, c=0.0, d=3.0, e=22.0, f=0.5)
    pre, load, tbt = _synthetic(true, n=40)
    rec = CostRecorder(window=16, refit_every=10)
    for i in range(9):
        rec.add_prefill(*pre[i])
    assert rec.refits == 0 and rec.model == CostModel()
    rec.add_prefill(*pre[9])
    assert rec.refits == 1
    assert rec.model.b == pytest.approx(0.2, rel=1e-6)
    assert rec.model.d == CostModel().d  # no load samples yet
    for i in range(40):
        rec.add_load(*load[i])
        rec.add_tbt(*tbt[i])
    assert len(rec.load) == 16 and len(rec.tbt) == 16
    assert rec.refits == 9
    assert rec.model.d == pytest.approx(3.0, rel=1e-6)
    assert rec.model.f == pytest.approx(0.5, rel=1e-6)
