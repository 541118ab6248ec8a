"""The discrete-event simulator (scheduler/conductor/simulator.py) on hand-checkable traces and a real-trace slice."""

from __future__ import annotations

import json

import pytest

from smcserve.loadtest.trace import DEFAULT_TRACE, load_trace
from smcserve.scheduler.conductor import POLICY_NAMES, CostModel
from smcserve.scheduler.conductor.simulator import (
    DEFAULT_PROFILE,
    HardwareProfile,
    SimConfig,
    TraceRequest,
    rows_to_requests,
    simulate,
    trace_hit_rate,
)

TRACE = DEFAULT_TRACE  # loadtest/traces/synthetic_trace.jsonl, shipped in the repository

# 1 ms per new token, 2 ms per fetched block, TBT = 20 + batch ms; 4-token blocks.
COST = CostModel(a=0.0, b=1.0, c=0.0, d=2.0, e=20.0, f=1.0)


def profile(cache_blocks=None, decode_kv_blocks=1000) -> HardwareProfile:
    return HardwareProfile(
        "test", COST, block_size=4, prefill_cache_blocks=cache_blocks, decode_kv_blocks=decode_kv_blocks
    )


def R(t: float, keys: str, out: int = 5, tokens: int | None = None) -> TraceRequest:
    ks = tuple(keys.split())
    return TraceRequest(t, tokens if tokens is not None else 4 * len(ks), out, ks)


def cfg(**kw) -> SimConfig:
    base = dict(n_prefill=1, n_decode=1, cache_blocks=-1, slo_ttft_ms=None, slo_tbt_ms=None)
    return SimConfig(**(base | kw))


def test_second_identical_request_hits_the_cache():
    reqs = [R(0, "a0 a1 a2"), R(100, "a0 a1 a2")]
    for name in POLICY_NAMES:  # every engine reuses its own cached prefix
        res = simulate(reqs, name, profile(), cfg())
        a, b = res.requests
        assert a.ttft_ms == pytest.approx(12.0)  # 12 tokens at 1 ms
        assert b.ttft_ms == pytest.approx(1.0)  # all 3 blocks reused, the last token computed
        assert (a.reused_blocks, b.reused_blocks) == (0, 3)
        assert a.tbt_ms == pytest.approx(21.0)  # alone in the batch
        assert b.tbt_ms == pytest.approx(22.0)  # a (done at 12 + 5 * 21 = 117) still decoding
        s = res.summary()
        assert s["hit_rate"] == pytest.approx(0.5)
        assert s["mean_ttft_s"] == pytest.approx(0.0065, abs=1e-4)
        assert s["slo_attainment"] == 1.0 and s["rejected"] == {"total": 0}


def test_request_arriving_during_prefill_waits_and_misses():
    res = simulate([R(0, "a0 a1 a2"), R(5, "a0 a1 a2")], "cache_global", profile(), cfg())
    a, b = res.requests
    assert b.reused_blocks == 0  # a's blocks enter the cache only when its prefill ends
    assert b.ttft_ms == pytest.approx((12 - 5) + 12)
    assert b.pred_ttft_ms == pytest.approx(b.ttft_ms)


def test_cache_global_fetches_to_an_idle_instance():
    reqs = [
        R(0, "a0 a1 a2 a3"),  # p0: 16 ms
        R(20, " ".join(f"x{i}" for i in range(10))),  # p0 (tie, first): busy 20..60
        R(21, "a0 a1 a2 a3 b4 b5"),
    ]  # shares a 4-block prefix with the first
    g = simulate(reqs, "cache_global", profile(), cfg(n_prefill=2)).requests[2]
    # p0: queue 39 + 8 new tokens = 47; p1: 8 new + fetch 4 blocks at 2 ms = 16
    assert g.prefill_id == "prefill-1"
    assert (g.reused_blocks, g.fetched_blocks) == (4, 4)
    assert g.ttft_ms == pytest.approx(16.0)
    loc = simulate(reqs, "cache_local", profile(), cfg(n_prefill=2)).requests[2]
    # p0: 39 + 8 = 47; p1: cold, 24 tokens = 24
    assert loc.prefill_id == "prefill-1" and loc.fetched_blocks == 0
    assert loc.ttft_ms == pytest.approx(24.0)
    ld = simulate(reqs, "load", profile(), cfg(n_prefill=2)).requests[2]
    assert ld.prefill_id == "prefill-1" and ld.ttft_ms == pytest.approx(24.0)


def test_lru_capacity_evicts():
    reqs = [R(0, "a0 a1 a2"), R(100, "c0 c1 c2"), R(200, "a0 a1 a2")]
    small = simulate(reqs, "cache_local", profile(cache_blocks=3), cfg()).requests[2]
    assert small.reused_blocks == 0 and small.ttft_ms == pytest.approx(12.0)
    big = simulate(reqs, "cache_local", profile(cache_blocks=6), cfg()).requests[2]
    assert big.reused_blocks == 3 and big.ttft_ms == pytest.approx(1.0)
    # an explicit config capacity overrides the profile's
    assert simulate(reqs, "cache_local", profile(cache_blocks=3), cfg(cache_blocks=None)).requests[2].reused_blocks == 3


def test_early_rejection_by_reason():
    reqs = [R(0, "a0 a1 a2 a3 a4"), R(1, "b0 b1 b2"), R(2, "c0")]
    res = simulate(reqs, "load", profile(), cfg(slo_ttft_ms=10.0, slo_tbt_ms=100.0))
    a, b, c = res.requests
    assert not a.admitted and a.reason.startswith("ttft: predicted 20 ms > SLO 10 ms")
    assert not b.admitted  # 12 ms > 10 ms
    assert c.admitted and c.ttft_ms == pytest.approx(4.0)
    s = res.summary()
    assert s["rejected"] == {"total": 2, "ttft": 2} and s["served"] == 1
    assert s["slo_attainment"] == pytest.approx(1 / 3, abs=1e-4)
    # TBT: 20 + 1 * batch > 21.5 once one request is assigned
    res = simulate([R(0, "a0"), R(1, "b0")], "load", profile(), cfg(slo_tbt_ms=21.5))
    assert res.requests[0].admitted and res.requests[1].reason.startswith("tbt:")
    # early_reject=False serves all (one FIFO: 20, 20 - 1 + 12, 32 - 2 + 4 ms), still counted against the SLO
    res = simulate(reqs, "load", profile(), cfg(slo_ttft_ms=10.0, early_reject=False))
    assert [r.ttft_ms for r in res.requests] == pytest.approx([20.0, 31.0, 34.0])
    assert res.summary()["served"] == 3 and res.summary()["slo_attainment"] == 0.0
    res = simulate(reqs, "load", profile(), cfg(slo_ttft_ms=25.0, early_reject=False))
    assert res.summary()["slo_attainment"] == pytest.approx(1 / 3, abs=1e-4)


def test_decode_capacity_rejects_and_frees():
    # each request needs ceil((8 + 4) / 4) = 3 KV blocks; the decode instance holds 4
    reqs = [R(0, "a0 a1", out=4), R(1, "b0 b1", out=4), R(1000, "c0 c1", out=4)]
    res = simulate(reqs, "cache_global", profile(decode_kv_blocks=4), cfg())
    a, b, c = res.requests
    assert a.admitted and not b.admitted and b.reason.startswith("decode:")
    assert c.admitted  # a finished at 8 + 4 * 21 = 92, blocks freed
    assert res.summary()["rejected"] == {"total": 1, "decode": 1}


def test_prediction_with_a_wrong_cost_model():
    reqs = [R(0, "a0 a1 a2")]
    res = simulate(reqs, "load", profile(), cfg(predict_cost=CostModel(a=0, b=2.0, c=0, d=2, e=20, f=1)))
    r = res.requests[0]
    assert r.pred_ttft_ms == pytest.approx(24.0) and r.ttft_ms == pytest.approx(12.0)


def test_default_profile_is_stated_and_plausible():
    p = DEFAULT_PROFILE
    assert p.assumed and "ASSUMED" in p.description and p.block_size == 512
    assert 1000 <= p.cost.prefill_ms(8192) <= 2000
    assert 1.0 <= p.cost.load_ms(1) <= 10.0
    assert p.cost.load_ms(1) < p.cost.prefill_ms(512) / 10  # fetching beats recomputing
    fitted = HardwareProfile.from_cost_model(CostModel(), name="measured")
    assert not fitted.assumed and fitted.name == "measured"


@pytest.fixture(scope="module")
def trace_slice():
    return rows_to_requests(load_trace(TRACE))[3500:3900]  # late in the trace, where prefixes repeat (~60% of blocks)


def test_unbounded_hit_rate_matches_the_trace(trace_slice):
    reqs = trace_slice
    seen, hits, total = set(), 0, 0
    for r in reqs:  # directly from hash_ids: blocks seen earlier
        hits += sum(1 for k in r.block_keys if k in seen)
        total += len(r.block_keys)
        seen.update(r.block_keys)
    direct = hits / total
    assert 0.4 < direct < 0.95
    assert trace_hit_rate(reqs) == pytest.approx(direct)
    # spread the arrivals so that every prefill ends before the next request arrives
    spread = [TraceRequest(i * 1e9, r.input_length, r.output_length, r.block_keys) for i, r in enumerate(reqs)]
    for name, n_prefill in (("cache_global", 4), ("cache_local", 1), ("load", 1)):
        res = simulate(
            spread, name, DEFAULT_PROFILE, SimConfig(n_prefill=n_prefill, cache_blocks=None, early_reject=False)
        )
        assert res.summary()["served"] == len(reqs)
        assert res.hit_rate() == pytest.approx(direct, rel=1e-12), name
    # with the real timing, requests that arrive before the prefill they share ends miss
    res = simulate(reqs, "cache_global", DEFAULT_PROFILE, SimConfig(cache_blocks=None, early_reject=False))
    assert res.hit_rate() <= direct + 1e-12


def test_policies_on_real_slice(trace_slice):
    out = {}
    for name in POLICY_NAMES:
        s = simulate(trace_slice, name).summary()
        assert s["served"] + s["rejected"]["total"] == len(trace_slice)
        out[name] = s
    # the simulator knows the exact queues, so the cache-aware predictions are exact
    assert out["cache_global"]["mean_ttft_pred_error_s"] == pytest.approx(0.0, abs=1e-9)
    assert out["cache_global"]["hit_rate"] >= out["cache_local"]["hit_rate"] > out["load"]["hit_rate"]
    assert out["cache_global"]["fetched_block_rate"] > 0 and out["cache_local"]["fetched_block_rate"] == 0
    # deterministic, the seeded random policy included
    assert simulate(trace_slice, "random").summary() == out["random"]


def test_rows_to_requests_parses_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [0, 1]},
        {"timestamp": 15, "input_length": 600, "output_length": 9, "hash_ids": [0, 2]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = rows_to_requests(load_trace(p))
    assert reqs == rows_to_requests(rows)
    assert reqs[1] == TraceRequest(15.0, 600, 9, ("0", "2"))
