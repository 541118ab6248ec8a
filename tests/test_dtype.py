"""``--dtype auto`` is decided by timing (injected here), cached per CPU / torch / threads / model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fake_load import FakeLoad

import smcserve.engine.dtype as dt
from smcserve.engine.dtype import SHAPES, ModelDims, choose_auto, decide, resolve


def fake_timer(ms: dict[str, dict[str, float]], calls: list | None = None):
    """A time function with fixed per-step times (ms) per dtype and shape; records its calls."""

    def time_fn(dtype: str, shape, dims) -> float:
        if calls is not None:
            calls.append((dtype, shape.name, dims))
        return ms[dtype][shape.name] / 1e3

    return time_fn


FAST_BF16 = {
    "float32": {"decode_b1": 10.0, "decode_b64": 100.0, "prefill_128": 80.0},
    "bfloat16": {"decode_b1": 5.0, "decode_b64": 40.0, "prefill_128": 30.0},
}
# this machine's case: bf16 GEMMs faster (prefill), but one-token attention much slower (decode)
SLOW_BF16_DECODE = {
    "float32": {"decode_b1": 10.0, "decode_b64": 100.0, "prefill_128": 80.0},
    "bfloat16": {"decode_b1": 9.0, "decode_b64": 160.0, "prefill_128": 40.0},
}
MARGINAL_BF16 = {
    "float32": {"decode_b1": 10.0, "decode_b64": 100.0, "prefill_128": 80.0},
    "bfloat16": {"decode_b1": 9.0, "decode_b64": 90.0, "prefill_128": 60.0},
}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(dt, "cpu_name", lambda: "Test CPU 9000 [avx512_bf16]")
    monkeypatch.setattr(dt, "CpuLoad", FakeLoad(0.0))  # an idle machine, whatever else runs here now
    return tmp_path / dt.CACHE_FILE


@pytest.mark.parametrize(
    "timings, want", [(FAST_BF16, "bfloat16"), (SLOW_BF16_DECODE, "float32"), (MARGINAL_BF16, "float32")]
)
def test_chooser_picks_the_faster_dtype(cache, timings, want):
    choice = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(timings))
    assert choice.dtype == want and choice.measured
    assert choice.torch_dtype == {"bfloat16": torch.bfloat16, "float32": torch.float32}[want]
    assert choice.timings_ms == timings  # min over rounds of constant times: exactly the injected ones
    assert f"auto chose {want}" in choice.reason and "decode_b64" in choice.reason and "2 threads" in choice.reason


def test_decide_needs_the_margin_on_every_decode_shape():
    assert decide(FAST_BF16)[0] == "bfloat16"
    assert decide(FAST_BF16, threshold=3.0)[0] == "float32"  # 2x and 2.5x are not 3x
    only_b64 = {"float32": dict(FAST_BF16["float32"]), "bfloat16": dict(FAST_BF16["bfloat16"], decode_b1=9.5)}
    assert decide(only_b64)[0] == "float32"  # batch 1 is not clearly faster
    assert decide(SLOW_BF16_DECODE)[0] == "float32"  # prefill alone does not decide


def test_measurement_warms_up_interleaves_and_takes_the_min(cache):
    noisy = iter([50.0] * 6 + [30.0] * 6 + [10.0] * 6 + [20.0] * 6 + [5.0] * 600)  # per round; warm-up slowest
    seen = []

    def time_fn(dtype, shape, dims):
        seen.append(dtype)
        return next(noisy) / 1e3

    mins, medians = dt.measure(ModelDims(), time_fn, budget_s=0.0, min_rounds=3)
    assert len(seen) == 4 * 2 * len(SHAPES)  # warm-up + 3 rounds, then over budget
    assert seen[:6] == ["float32"] * 3 + ["bfloat16"] * 3 and seen[6:12] == ["bfloat16"] * 3 + ["float32"] * 3
    assert all(v == 10.0 for per in mins.values() for v in per.values())  # never the warm-up's 50
    assert all(v == 20.0 for per in medians.values() for v in per.values())


def test_the_cache_is_reused_and_keyed_by_cpu_and_threads(cache, monkeypatch):
    calls: list = []
    first = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(FAST_BF16, calls))
    n = len(calls)
    assert first.measured and n > 0 and cache.exists()
    # a later start (another process: a fresh call) reads the decision, even if timing would now differ
    again = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(SLOW_BF16_DECODE, calls))
    assert (again.dtype, again.measured, len(calls)) == ("bfloat16", False, n)
    assert "cached" in again.reason and again.timings_ms == FAST_BF16
    # another thread count is another decision
    other_threads = choose_auto(ModelDims(), threads=4, time_fn=fake_timer(SLOW_BF16_DECODE, calls))
    assert other_threads.measured and other_threads.dtype == "float32" and len(calls) > n
    n = len(calls)
    # another CPU too
    monkeypatch.setattr(dt, "cpu_name", lambda: "Other CPU 1 [no bf16 isa]")
    other_cpu = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(SLOW_BF16_DECODE, calls))
    assert other_cpu.measured and other_cpu.dtype == "float32" and len(calls) > n
    n = len(calls)
    # and another model's sizes
    other_model = choose_auto(
        ModelDims(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16),
        threads=2,
        time_fn=fake_timer(SLOW_BF16_DECODE, calls),
    )
    assert other_model.measured and len(calls) > n
    n = len(calls)
    # all decisions live side by side; the first machine's is still there
    monkeypatch.setattr(dt, "cpu_name", lambda: "Test CPU 9000 [avx512_bf16]")
    assert choose_auto(ModelDims(), threads=2, time_fn=fake_timer(SLOW_BF16_DECODE, calls)).dtype == "bfloat16"
    assert len(calls) == n
    entries = json.loads(cache.read_text())
    assert len(entries) == 4
    assert all("torch " + torch.__version__ in k for k in entries)


def test_the_key_names_cpu_torch_threads_and_model(cache):
    key = dt.cache_key(ModelDims(), 3)
    assert "Test CPU 9000" in key and f"torch {torch.__version__}" in key and "threads 3" in key
    assert "h576" in key and "L30" in key and "V49152" in key


def test_an_explicit_dtype_is_not_measured(cache):
    def boom(*_):
        raise AssertionError("an explicit dtype must not be timed")

    for name, want in [("float32", "float32"), ("fp32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16")]:
        choice = resolve(name, ModelDims(), 2, time_fn=boom)
        assert choice.dtype == want and not choice.measured and "as given" in choice.reason
    assert not cache.exists()
    with pytest.raises(ValueError, match="dtype"):
        resolve("float16", time_fn=boom)


def test_model_dims_from_a_config():
    d = ModelDims.from_config(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
        }
    )
    assert d == ModelDims(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=1000)
    assert ModelDims.from_config({}) == ModelDims() == ModelDims.from_model_dir("/nonexistent")


def test_load_model_resolves_auto_through_the_chooser(cache, monkeypatch, tiny_model_dir):
    """``load_model(..., "auto")`` asks the chooser with the model's own sizes (timing injected)."""
    from smcserve.engine.model import load_model

    seen = []
    monkeypatch.setattr(dt, "Timer", lambda: fake_timer(FAST_BF16, seen))
    lm = load_model(str(tiny_model_dir), "auto")
    assert lm.dtype == torch.bfloat16 and "auto chose bfloat16" in lm.dtype_reason
    assert seen and seen[0][2] == ModelDims(
        hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=lm.config.vocab_size
    )


def test_the_real_timer_runs_every_shape(cache):
    """The real measurement at tiny sizes: positive times for every dtype and shape (no speed assertion)."""
    tiny = ModelDims(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=1000)
    mins, _ = dt.measure(tiny, dt.Timer(), budget_s=0.0, min_rounds=1)
    assert set(mins) == {"float32", "bfloat16"}
    assert all(0 < v < float("inf") for per in mins.values() for v in per.values())


def test_a_busy_machine_is_not_trusted_nor_cached(cache):
    busy = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(FAST_BF16), load_probe=FakeLoad(0.6))
    assert busy.dtype == "float32" and busy.measured and "60%" in busy.reason and "not cached" in busy.reason
    assert not cache.exists()
    calm = choose_auto(ModelDims(), threads=2, time_fn=fake_timer(FAST_BF16), load_probe=FakeLoad(0.1))
    assert calm.dtype == "bfloat16" and calm.measured and cache.exists()


def test_the_cpu_load_probe_sees_another_process():
    import subprocess
    import sys
    import time

    with dt.CpuLoad() as quiet:
        time.sleep(0.3)
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 5\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        with dt.CpuLoad() as loaded:
            time.sleep(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert 0.0 <= quiet.others <= 1.0
    assert loaded.others > 0.25 / (os.cpu_count() or 1)  # one spinning process: a core's worth, less noise
