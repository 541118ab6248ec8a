"""bench.llamacpp imports, parses its flags and assembles its report (no llama.cpp build here)."""

from bench import llamacpp


def test_parser_defaults_and_quick():
    a = llamacpp.parser().parse_args([])
    assert a.dtype == "float32" and a.threads >= 1 and not a.quick and a.tokens is None
    assert a.omp_wait_policy == "passive"
    a = llamacpp.parser().parse_args(["--quick", "--threads", "2", "--skip", "q4_1,grpc", "--omp-wait-policy", "unset"])
    assert a.quick and a.threads == 2 and a.skip == "q4_1,grpc" and a.omp_wait_policy == "unset"


def test_assemble_ratios_and_targets():
    side = {"ttft_ms_46": 20.0, "ttft_ms_1024": 300.0, "decode_tok_s_b1_46": 50.0, "decode_tok_s_b1_1024": 40.0}
    m = {
        "llamacpp_f32": {
            **side,
            "cpu_ms_per_token_b1": 50.0,
            "decode_tok_s_b16": 200.0,
            "decode_tok_s_b64": 300.0,
            "window_b64": {"tok_s": 300.0},
        },
        "llamacpp_q4_1": {**side, "decode_tok_s_b1_46": 100.0, "decode_tok_s_b64": 500.0},
        "engine": {
            **side,
            "decode_tok_s_b1_46": 60.0,
            "cpu_ms_per_token_b1": 40.0,
            "decode_tok_s_b16": 400.0,
            "decode_tok_s_b64": 450.0,
        },
        "grpc": {**side, "decode_tok_s_b1_46": 45.0, "smc64_tok_s": 330.0, "smc64_how": "x"},
    }
    meta = {"threads": 2, "cpu": "fake", "short": 46, "long": 1024, "llamacpp_f32_bench": {"tg64_tok_s": 25.0}}
    out = llamacpp.assemble(m, {**meta, "dtype_chosen": "float32"})
    summary = ["llamacpp_decode_tok_s", "smcserve_decode_tok_s", "single_stream_ratio", "llamacpp_np64_tok_s"]
    summary += ["smcserve_b64_tok_s", "batch64_ratio", "dtype_chosen"]
    assert list(out)[:7] == summary
    assert out["llamacpp_decode_tok_s"] == 50.0 and out["smcserve_decode_tok_s"] == 60.0
    assert out["llamacpp_np64_tok_s"] == 300.0 and out["smcserve_b64_tok_s"] == 450.0
    assert out["single_stream_cpu_ratio"] == 1.25 and out["smcserve_engine_cpu_ms_per_token_b1"] == 40.0
    assert out["dtype_chosen"] == "float32" and out["llamacpp_server_vs_llama_bench_tg"] == 2.0
    assert out["ratio_single_stream_vs_llama_bench_tg"] == 2.4
    assert out["threads"] == 2 and out["cpu"] == "fake" and out["prompt_tokens"] == [46, 1024]
    assert out["llamacpp_f32_decode_tok_s_b1"] == 50.0 and out["smcserve_engine_decode_tok_s_b1"] == 60.0
    assert out["smcserve_grpc_ttft_ms_1024"] == 300.0 and out["llamacpp_q4_1_ttft_ms_46"] == 20.0
    assert out["smcserve_engine_decode_tok_s_b1_after_1024"] == 40.0
    assert out["single_stream_ratio"] == 1.2 and out["ratio_single_stream_grpc"] == 0.9
    assert out["batch64_ratio"] == 1.5 and out["ratio_b16"] == 2.0 and out["ratio_smc64_vs_b64"] == 1.1
    assert out["smc64_tok_s"] == 330.0 and out["smcserve_grpc_smc64_how"] == "x"
    assert out["targets"]["single_stream"]["holds"] is True
    assert out["targets"]["b64"] == {"target": 2.0, "ratio": 1.5, "holds": False}
    assert any("Q4_1" in n for n in out["notes"])


def test_assemble_missing_side():
    meta = {"threads": 1, "cpu": "c", "short": 46, "long": 1024}
    out = llamacpp.assemble({"engine": {"decode_tok_s_b64": 10.0}}, meta)
    assert out["batch64_ratio"] is None and out["targets"]["b64"]["holds"] is None


def test_aggregate_window():
    # two streams: tokens at 1,2,3,4 s and 2,3,4,5 s → all decode between 2 and 4 s
    r = [{"events": [(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1)]}, {"events": [(2.0, 1), (3.0, 1), (4.0, 1), (5.0, 1)]}]
    agg = llamacpp.aggregate_decode(r)
    assert agg["window_s"] == 2.0 and agg["window_tokens"] == 4 and agg["tok_s"] == 2.0 and not agg["whole_span"]
