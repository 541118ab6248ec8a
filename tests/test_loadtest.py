"""The load-testing harness: metric definitions, trace replay, arrival processes, the runner (against a
fake in-process server) and one short replay of the real trace against the real stack (e2e)."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from smcserve.loadtest import report
from smcserve.loadtest.metrics import RequestRecord, compute_metrics, parse_slo, reason_prefix
from smcserve.loadtest.runner import check_address, is_loopback, run_workload
from smcserve.loadtest.trace import (
    DEFAULT_TRACE,
    TraceRow,
    TraceScaling,
    load_trace,
    parse_slice,
    row_prompt_ids,
    scaled_token_hit_rate,
    select_rows,
    trace_requests,
    trace_workload,
    unbounded_hit_rate,
)
from smcserve.loadtest.workloads import (
    WORDS,
    RequestSpec,
    SmcMix,
    Workload,
    concurrency_workload,
    gamma_arrivals,
    ids_to_text,
    poisson_arrivals,
    rate_workload,
    sweep_workloads,
    word_block,
)
from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos import smcserve_pb2_grpc

TRACE = DEFAULT_TRACE  # loadtest/traces/synthetic_trace.jsonl, shipped in the repository


# --- metrics ------------------------------------------------------------------------------------------
def _hand_records() -> list[RequestRecord]:
    # A: chunks at 100, 150, 250 ms (1, 1, 2 tokens), stream ends at 300 ms: 4 output tokens.
    a = RequestRecord(
        0,
        chunk_s=[0.100, 0.150, 0.250],
        chunk_tokens=[1, 1, 2],
        end_s=0.300,
        status="ok",
        output_tokens=4,
        prompt_tokens=100,
        cached_prompt_tokens=32,
    )
    # B: its only token arrives with the final message at 200 ms: 1 output token (no TPOT, no ITL).
    b = RequestRecord(
        1,
        chunk_s=[0.200],
        chunk_tokens=[1],
        end_s=0.200,
        status="ok",
        output_tokens=1,
        prompt_tokens=60,
        cached_prompt_tokens=0,
    )
    c = RequestRecord(
        2,
        status="rejected",
        code="RESOURCE_EXHAUSTED",
        end_s=0.001,
        message="server busy: 8 requests in flight (limit 8)",
    )
    d = RequestRecord(
        3,
        status="rejected",
        code="RESOURCE_EXHAUSTED",
        end_s=0.002,
        message="server busy: 9 requests in flight (limit 8)",
    )
    e = RequestRecord(4, status="error", code="UNAVAILABLE", end_s=0.01, message="prefill worker p0 failed: boom")
    return [a, b, c, d, e]


def test_metrics_match_hand_computed_example():
    recs = _hand_records()
    a, b = recs[0], recs[1]
    assert a.ttft_s == pytest.approx(0.100) and a.e2e_s == pytest.approx(0.300)
    assert a.itl_s == pytest.approx([0.050, 0.100])
    assert a.tpot_s == pytest.approx(0.200 / 3)
    assert b.tpot_s is None and b.itl_s == [] and b.ttft_s == pytest.approx(0.200)

    m = compute_metrics(recs, duration_s=1.0, slo={"ttft": 150.0})
    assert m["num_requests"] == 5 and m["completed"] == 2 and m["failed"] == 3
    assert m["duration"] == 1.0
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(5.0)
    assert m["total_input_tokens"] == 160 and m["total_output_tokens"] == 5
    # TTFT [100, 200]: numpy's linear interpolation
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["median_ttft_ms"] == pytest.approx(150)
    assert m["p90_ttft_ms"] == pytest.approx(190) and m["p99_ttft_ms"] == pytest.approx(199)
    # TPOT: only A (B has one output token)
    for k in ("mean", "median", "p90", "p99"):
        assert m[f"{k}_tpot_ms"] == pytest.approx(200 / 3)
    # ITL: A's gaps [50, 100]
    assert m["mean_itl_ms"] == pytest.approx(75) and m["median_itl_ms"] == pytest.approx(75)
    assert m["p90_itl_ms"] == pytest.approx(95) and m["p99_itl_ms"] == pytest.approx(99.5)
    # E2E [300, 200]
    assert m["mean_e2el_ms"] == pytest.approx(250) and m["median_e2el_ms"] == pytest.approx(250)
    assert m["p90_e2el_ms"] == pytest.approx(290) and m["p99_e2el_ms"] == pytest.approx(299)
    # goodput: TTFT ≤ 150 ms → only A
    assert m["goodput"] == pytest.approx(1.0)
    assert m["cache_hit_rate"] == pytest.approx(32 / 160)
    assert m["rejected"] == {"server busy: N requests in flight (limit N)": 2}
    assert m["num_rejected"] == 2 and m["num_errors"] == 1
    assert list(m["errors"].values()) == [1]
    assert next(iter(m["errors"])).startswith("UNAVAILABLE: prefill worker pN failed")

    # TPOT SLO: A's 66.7 ms misses 50 ms; B (one token) counts as TPOT 0, as in vLLM
    assert compute_metrics(recs, 2.0, slo={"ttft": 250, "tpot": 50})["goodput"] == pytest.approx(0.5)
    assert compute_metrics(recs, 2.0, slo={"e2el": 300})["goodput"] == pytest.approx(1.0)
    assert compute_metrics(recs, 2.0)["goodput"] is None
    # nothing completed: zeros, as vLLM reports them
    empty = compute_metrics(recs[2:], 1.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] == 0 and empty["p99_e2el_ms"] == 0


def test_slo_parsing_and_reason_prefix():
    assert parse_slo("ttft=2000,tpot=200") == {"ttft": 2000.0, "tpot": 200.0}
    assert parse_slo("e2e=5000") == {"e2el": 5000.0}
    assert parse_slo(None) == {} and parse_slo("") == {}
    for bad in ("ttft", "foo=1", "ttft=x", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    assert (
        reason_prefix("decode worker decode-0: out of KV blocks: the request needs up to 80, 11 free")
        == "decode worker decode-N: out of KV blocks"
    )
    assert reason_prefix("") == "(no message)"


def test_report_outputs(tmp_path):
    recs = _hand_records()
    m = compute_metrics(recs, 1.0, slo={"ttft": 150.0})
    text = report.format_summary(m, "unit")
    assert "Successful requests:" in text and "P99 TTFT (ms):" in text and "server busy" in text
    doc = json.loads(report.write_json(tmp_path / "r.json", {**m, "workload": {"request_rate": math.inf}}).read_text())
    assert doc["completed"] == 2 and doc["workload"]["request_rate"] == "inf"
    lines = report.write_records(tmp_path / "r.jsonl", recs).read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["tpot_ms"] == pytest.approx(200 / 3)
    cdf = report.plot_cdfs({"run": recs}, tmp_path / "cdf.png")
    runs = [{**m, "workload": {"request_rate": r}} for r in (0.5, 1.0, 2.0)]
    sweep = report.plot_sweep(runs, tmp_path / "sweep.png")
    for p in (cdf, sweep):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rate" in report.format_sweep_table(runs)


# --- trace replay -------------------------------------------------------------------------------------
ROWS = [
    TraceRow(0.0, 1100, 10, (1, 2, 3)),  # blocks 512, 512, 76
    TraceRow(1000.0, 1324, 200, (1, 2, 4)),  # shares two blocks with the first; last block 300
    TraceRow(2500.0, 200, 0, (5,)),
    TraceRow(4000.0, 1536, 7, (1, 2, 3)),  # block 3 again, in full this time
]


def test_trace_blocks_shared_prefixes_and_cuts():
    s = TraceScaling(block_tokens=16)
    assert s.block_lengths(ROWS[0]) == [16, 16, 2]  # round(76 · 16/512) = 2
    assert s.block_lengths(ROWS[1]) == [16, 16, 9]  # round(300 · 16/512) = 9
    assert s.block_lengths(ROWS[2]) == [6]  # round(200 · 16/512) = 6
    assert s.block_lengths(ROWS[3]) == [16, 16, 16]
    ids = [row_prompt_ids(r, s) for r in ROWS]
    assert [len(x) for x in ids] == [34, 41, 6, 48]
    assert ids[0][:32] == ids[1][:32]  # shared hash ids → identical prefix
    assert ids[0][32:34] != ids[1][32:34]  # distinct ids → different blocks
    assert ids[3][:34] == ids[0]  # a cut block is a prefix of the same block in full
    assert word_block(3, 2) == word_block(3, 16)[:2]
    assert word_block(1, 16) != word_block(2, 16)
    assert word_block(1, 16) == word_block(1, 16) and word_block(1, 16, salt="x") != word_block(1, 16)
    reqs = trace_requests(ROWS, s)
    assert reqs[0][1].prompt == ids_to_text(ids[0]) and len(reqs[0][1].prompt.split()) == 34
    assert reqs[0][1].prompt.startswith(reqs[1][1].prompt.rsplit(" ", 9)[0])  # the text prefix is shared too
    assert all(w in WORDS for w in reqs[1][1].prompt.split())
    assert reqs[1][1].hash_ids == (1, 2, 4) and reqs[1][1].prompt_len == 41


def test_trace_output_and_time_scaling():
    s = TraceScaling(block_tokens=8, time_scale=0.01, output_scale=0.05)
    reqs = trace_requests(ROWS[1:], s)  # the slice starts at its own first timestamp
    assert [t for t, _ in reqs] == pytest.approx([0.0, 0.015, 0.030])
    assert [r.max_tokens for _, r in reqs] == [10, 1, 1]  # 200·0.05; 0 → min 1; round(0.35) = 0 → 1
    assert [r.max_tokens for _, r in trace_requests(ROWS, TraceScaling(output_scale=1.0, max_output=8))] == [8, 8, 1, 7]
    assert trace_requests(ROWS, TraceScaling(time_scale=2.0))[3][0] == pytest.approx(8.0)
    with pytest.raises(ValueError):
        TraceScaling(block_tokens=0)


def test_trace_parsing_slicing_and_hit_rate(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": int(r.timestamp_ms),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": list(r.hash_ids),
                }
            )
            + "\n\n"
            for r in ROWS
        )
    )
    rows = load_trace(path)
    assert rows == ROWS
    assert load_trace(path, limit=2) == ROWS[:2]
    # 10 blocks; seen earlier: 1, 2 (row 1) and 1, 2, 3 (row 3)
    assert unbounded_hit_rate(rows) == pytest.approx(5 / 10)
    assert unbounded_hit_rate(rows[:3]) == pytest.approx(2 / 7)
    assert unbounded_hit_rate([]) == 0.0
    # words: rows 34 + 41 + 6 + 48 = 129; hits 32 (row 1) + 32 + 2 (row 3: block 3 seen with 2 words)
    assert scaled_token_hit_rate(rows, TraceScaling(block_tokens=16)) == pytest.approx(66 / 129)
    assert parse_slice("5") == {"first": 5} and parse_slice("2:7") == {"start": 2, "stop": 7}
    assert parse_slice("t=1:2.5") == {"window_s": (1.0, 2.5)}
    with pytest.raises(ValueError):
        parse_slice("abc")
    assert select_rows(rows, **parse_slice("1:3")) == ROWS[1:3]
    assert select_rows(rows, **parse_slice("t=1:3")) == ROWS[1:3]
    assert select_rows(rows, **parse_slice("2")) == ROWS[:2]
    assert select_rows(rows, max_blocks=1) == [ROWS[2]] and select_rows(rows, max_blocks=3, first=1) == ROWS[:1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 3}\n')
    with pytest.raises(ValueError, match="bad row"):
        load_trace(bad)
    wl = trace_workload(rows, TraceScaling(), smc=SmcMix(ratio=1.0, particles=4, max_tokens=3))
    items = list(wl)
    assert len(items) == 4 and all(spec.kind == "smc" and spec.steering["particles"] == 4 for _, spec in items)
    assert [spec.max_tokens for _, spec in items] == [3, 3, 1, 3]
    assert wl.config["trace_unbounded_hit_rate"] == pytest.approx(0.5)


def test_trace_ships_with_the_repository():
    # loadtest/traces/ holds the trace with its provenance; nothing reads a trace from outside the repository
    import hashlib

    root = Path(__file__).resolve().parents[1]
    assert TRACE == root / "loadtest" / "traces" / "synthetic_trace.jsonl" and TRACE.is_file()
    digest = hashlib.sha256(TRACE.read_bytes()).hexdigest()
    readme = (TRACE.parent / "README.md").read_text()
    assert digest == "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131" and digest in readme
    assert "Apache" in readme and "kvcache-ai/Mooncake" in readme
    for path in [
        "README.md",
        "bench/simulate.py",
        "bench/prefix_cache.py",
        *map(str, root.glob("loadtest/*.py")),
        "scheduler/conductor/simulator.py",
        "tests/test_simulator.py",
    ]:
        assert "shared/traces" not in (root / path).read_text(), path


def test_real_trace_unbounded_hit_rate():
    rows = load_trace(TRACE)
    assert len(rows) == 3993
    assert unbounded_hit_rate(rows) == pytest.approx(0.64, abs=0.005)
    assert all(len(r.hash_ids) == math.ceil(r.input_length / 512) for r in rows)


# --- arrivals and workloads ---------------------------------------------------------------------------
def _take(it, n):
    return np.array([next(it) for _ in range(n)])


def test_poisson_and_gamma_arrivals():
    a = _take(poisson_arrivals(4.0, seed=1), 20001)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, _take(poisson_arrivals(4.0, seed=1), 20001))
    assert not np.array_equal(a[:50], _take(poisson_arrivals(4.0, seed=2), 50))
    gaps = np.diff(a)
    assert 20000 / a[-1] == pytest.approx(4.0, rel=0.03)
    assert np.var(gaps) / np.mean(gaps) ** 2 == pytest.approx(1.0, rel=0.1)  # exponential: CV² = 1
    for k in (0.25, 4.0):
        g = np.diff(_take(gamma_arrivals(2.0, k, seed=3), 20001))
        assert 1 / np.mean(g) == pytest.approx(2.0, rel=0.05)
        assert np.var(g) / np.mean(g) ** 2 == pytest.approx(1 / k, rel=0.15)  # gamma: CV² = 1/k
    assert np.all(_take(gamma_arrivals(math.inf, 1.0), 10) == 0)
    with pytest.raises(ValueError):
        next(gamma_arrivals(0.0))
    with pytest.raises(ValueError):
        next(gamma_arrivals(1.0, 0.0))


def test_synthetic_workloads():
    wl = rate_workload(5.0, num_requests=50, input_len=12, max_tokens=3, seed=7)
    items = list(wl)
    assert len(items) == 50 and wl.name == "poisson" and wl.max_concurrency is None
    assert all(len(s.prompt.split()) == 12 == s.prompt_len and s.max_tokens == 3 and s.ignore_eos for _, s in items)
    assert [t for t, _ in items] == [t for t, _ in rate_workload(5.0, num_requests=50, seed=7)]
    assert len({s.prompt for _, s in items}) == 50
    cw = concurrency_workload(3, num_requests=10)
    assert cw.max_concurrency == 3 and all(t == 0 for t, _ in cw)
    salted = [s for _, s in concurrency_workload(3, num_requests=10, salt="x")]  # fresh prompts, same seeds
    plain = [s for _, s in concurrency_workload(3, num_requests=10)]
    assert not {s.prompt for s in salted} & {s.prompt for s in plain}
    assert [s.seed for s in salted] == [s.seed for s in plain]
    sw = sweep_workloads([1, 2], num_requests=5, input_len=8)
    p1, p2 = ([s.prompt for _, s in w] for w in sw)
    assert [w.config["request_rate"] for w in sw] == [1, 2] and not set(p1) & set(p2)  # fresh prompts per run
    mixed = list(rate_workload(100.0, num_requests=2000, smc=SmcMix(ratio=0.25, particles=8, max_word_length=6)))
    smc = [s for _, s in mixed if s.kind == "smc"]
    assert 0.2 < len(smc) / 2000 < 0.3
    assert smc[0].steering == {"particles": 8, "potentials": [{"kind": "max_word_length", "max_len": 6}]}


def test_loopback_only():
    for a in ("127.0.0.1:50051", "localhost:1", "[::1]:5", "ipv4:127.0.0.2:9", "unix:/tmp/x.sock"):
        assert is_loopback(a), a
    for a in ("10.1.2.3:50051", "8.8.8.8:443", "[2001:db8::1]:1"):
        assert not is_loopback(a), a
        with pytest.raises(ValueError, match="allow-remote"):
            check_address(a)
        check_address(a, allow_remote=True)


# --- the runner against a fake server -----------------------------------------------------------------
class FakeServer(smcserve_pb2_grpc.SmcServeServicer):
    """Streams max_tokens tokens 20 ms apart; prompts starting with "reject" get RESOURCE_EXHAUSTED."""

    def __init__(self):
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def Generate(self, request, context):
        if request.prompt.startswith("reject"):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: 3 requests in flight (limit 3)")
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            n = request.sampling.max_tokens
            time.sleep(0.03)
            for i in range(n - 1):
                yield pb.GenerateResponse(text=" x", token_ids=[i])
                time.sleep(0.02)
            words = len(request.prompt.split())
            yield pb.GenerateResponse(
                text=" y",
                token_ids=[n],
                finish_reason="length",
                usage=pb.Usage(prompt_tokens=words, completion_tokens=n, cached_prompt_tokens=words // 2),
            )
        finally:
            with self.lock:
                self.active -= 1

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="fake", block_size=16)


@pytest.fixture()
def fake_server():
    servicer = FakeServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    smcserve_pb2_grpc.add_SmcServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_runner_against_fake_server(fake_server):
    specs = [(0.01 * i, RequestSpec(("reject " if i == 2 else "") + "a b c d", max_tokens=4)) for i in range(6)]
    res = run_workload(fake_server.address, Workload("unit", specs, max_concurrency=2, num_requests=6), progress=False)
    assert res.stopped_by == "done" and len(res.records) == 6
    assert fake_server.max_active <= 2
    m = res.metrics()
    assert m["completed"] == 5 and m["rejected"] == {"server busy: N requests in flight (limit N)": 1}
    ok = [r for r in res.records if r.ok]
    assert all(r.output_tokens == 4 and len(r.chunk_s) == 4 and len(r.itl_s) == 3 for r in ok)
    assert all(g > 0.015 for r in ok for g in r.itl_s)  # the server sleeps 20 ms between tokens
    assert all(r.ttft_s >= 0.025 and r.e2e_s >= r.ttft_s + 0.05 for r in ok)
    assert m["cache_hit_rate"] == pytest.approx(0.5) and m["total_input_tokens"] == 20
    assert m["server"]["model"] == "fake"

    # bounded by count, and by time: requests still running at the deadline are cut off
    res = run_workload(
        fake_server.address,
        concurrency_workload(2, num_requests=100, input_len=4, max_tokens=3),
        num_requests=5,
        progress=False,
    )
    assert res.stopped_by == "num_requests" and len(res.records) == 5 and res.metrics()["completed"] == 5
    # (each request would stream for ≥ 4 s; they are all cut off, so the run was bounded, however fast)
    res = run_workload(
        fake_server.address,
        rate_workload(50.0, input_len=4, max_tokens=200),
        max_duration=0.3,
        drain_s=0.2,
        progress=False,
    )
    assert res.stopped_by == "max_duration" and res.records
    assert all(r.status == "incomplete" and r.code == "CANCELLED" and r.output_tokens < 200 for r in res.records)
    assert all(r.scheduled_s < 0.3 for r in res.records)  # nothing is scheduled past max_duration


def test_cut_off_requests_are_counted_in_the_bar_the_table_and_the_json(fake_server, monkeypatch, tmp_path):
    # An overloaded run: requests still streaming when the run stops are cancelled. The progress bar, the
    # table and the JSON must all count them (the bar used to show err=0 while every request was CANCELLED).
    import os

    from smcserve.loadtest import runner

    postfixes = []

    class Bar:
        def update(self, n=1):
            pass

        def set_postfix(self, ordered_dict=None, refresh=True, **kw):
            postfixes.append(dict(ordered_dict or kw))

        def close(self):
            pass

    monkeypatch.setattr(runner, "_progress_bar", lambda total, desc, enabled: Bar())
    specs = [(0.0, RequestSpec("reject a b", max_tokens=2)), (0.0, RequestSpec("a b", max_tokens=2))]
    specs += [(0.05, RequestSpec(f"a b {i}", max_tokens=500)) for i in range(3)]
    # the short request needs ~50 ms, the long ones ≥ 10 s: 3 s separates them on any machine
    res = run_workload(fake_server.address, Workload("overload", specs, num_requests=5), max_duration=2.0, drain_s=1.0)
    m = res.metrics()
    assert [r.status for r in res.records] == ["rejected", "ok", "incomplete", "incomplete", "incomplete"]
    assert res.stopped_by == "max_duration"  # everything was sent, but the time limit cut requests off
    assert m["failed"] == 4 and m["num_rejected"] == 1 and m["num_errors"] == 0 and m["num_incomplete"] == 3
    assert m["num_rejected"] + m["num_errors"] + m["num_incomplete"] == m["failed"]
    assert m["incomplete"] == {"CANCELLED: cut off when the run stopped (time limit or Ctrl-C)": 3}
    assert m["errors"] == {}
    assert postfixes[-1] == {"ok": 1, "rej": 1, "err": 0, "cut": 3, "run": 0}
    assert max(p["run"] for p in postfixes) >= 3
    text = report.format_summary(m)
    assert "incomplete (cancelled at the end):" in text and "Incomplete (cut off when the run stopped)" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("  incomplete"))
    assert line.split()[-1] == "3"
    doc = json.loads(report.write_json(tmp_path / "r.json", m).read_text())
    assert doc["num_incomplete"] == 3 and doc["failed"] == 4
    hint = runner.overload_hint(m)
    assert "3 of 5 requests" in hint and "--time-scale" in hint and "rejected" in hint
    assert runner.overload_hint(compute_metrics(_hand_records()[:2], 1.0)) == ""
    # a failed (not cut off) request is an error, not incomplete
    e = RequestRecord(0, status="error", code="CANCELLED", message="server cancelled")
    me = compute_metrics([e], 1.0)
    assert me["num_errors"] == 1 and me["num_incomplete"] == 0 and me["errors"] == {"CANCELLED: server cancelled": 1}

    # the machine record: cores, CPU model, load average at the start and at the end
    mc = doc["machine"]
    assert mc["cpu_count"] == os.cpu_count() and isinstance(mc["cpu_model"], str) and mc["cpu_model"]
    for key in ("loadavg_start", "loadavg_end"):
        assert len(mc[key]) == 3 and all(isinstance(x, (int, float)) and x >= 0 for x in mc[key])
    assert "cores" in text and "load average" in text


def test_machine_info(monkeypatch):
    import os

    from smcserve.loadtest import runner

    mc = runner.machine_info()
    assert mc["cpu_count"] == os.cpu_count() and mc["loadavg_end"] is None
    if Path("/proc/cpuinfo").exists() and "model name" in Path("/proc/cpuinfo").read_text():
        assert mc["cpu_model"] in Path("/proc/cpuinfo").read_text()
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (1.234, 0.5, 0.25))
    assert runner.load_average() == [1.23, 0.5, 0.25]

    def boom():
        raise OSError("no load average here")

    monkeypatch.setattr(runner.os, "getloadavg", boom)
    assert runner.load_average() is None
    assert report.format_machine(
        {"cpu_count": 2, "cpu_model": "X", "loadavg_start": None, "loadavg_end": [1, 2, 3]}
    ) == ["2 cores, X", "load average (1/5/15 min): start n/a, end 1.00/2.00/3.00"]


def test_runner_refuses_remote():
    with pytest.raises(ValueError, match="loopback"):
        run_workload("10.0.0.1:50051", concurrency_workload(1, num_requests=1), progress=False)


# --- end to end: a slice of the real trace against the real stack -------------------------------------
@pytest.mark.e2e
def test_trace_replay_against_server(server):
    # Trace seconds 1010.9-1022, rows of at most 24 blocks (≤ 384 words), the first 12: six of them share
    # 5-12 leading blocks with an earlier one (five different prefixes), 39.5 % of the blocks repeat.
    rows = select_rows(load_trace(TRACE), window_s=(1010.9, 1022), max_blocks=24, first=12)
    expected = unbounded_hit_rate(rows)
    assert len(rows) == 12 and expected > 0.35
    scaling = TraceScaling(block_tokens=16, time_scale=0.25, output_scale=0.05, max_output=4)
    # a fresh salt: nothing of it is cached yet; at most 4 in flight (the fixture admits 8), so that the
    # rows that seed a prefix are not turned away at the door on a slow machine
    wl = trace_workload(rows, scaling, salt=uuid.uuid4().hex, seed=1, max_concurrency=4)
    res = run_workload(server.address, wl, max_duration=45, drain_s=15, request_timeout=60, progress=False)
    m = res.metrics()
    bad = [
        (r.index, r.status, r.code, r.message)
        for r in res.records
        if not (r.ok or (r.status == "rejected" and r.code == "RESOURCE_EXHAUSTED"))
    ]
    assert not bad, bad
    assert len(res.records) == 12 and m["completed"] >= 6, m
    done = [r for r in res.records if r.ok]
    # every word is one token of the default model's tokenizer
    assert all(r.prompt_tokens == r.intended_prompt_tokens for r in done)
    assert all(1 <= r.output_tokens <= 4 and r.finish_reason == "length" for r in done)
    assert m["cache_hit_rate"] > 0
    assert m["cache_hit_rate"] >= 0.5 * expected, (m["cache_hit_rate"], expected, m["rejected"])
    assert m["mean_ttft_ms"] > 0 and m["mean_e2el_ms"] >= m["mean_ttft_ms"]


def test_the_disabled_progress_bar_takes_the_runners_calls():
    """Without a progress bar (``--no-progress``, benchmarks) the runner's calls are no-ops, not a
    TypeError raised in every request's task (``bench.prefix_cache`` logged 240 of them)."""
    from smcserve.loadtest import runner

    bar = runner._progress_bar(3, "x", enabled=False)
    bar.update(1)
    bar.set_postfix(runner.progress_postfix({"ok": 1}, 2), refresh=False)
    bar.close()
