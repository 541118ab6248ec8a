"""The live Conductor: the TTFT predictor against measured prefill timings, and early rejection."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from client import Client
from client.server_process import ServeProcess
from engine.sampling import SamplingParams
from kvstore import KVStore
from prefill.worker import Prefiller
from scheduler.policies import CostRecorder


def test_ttft_predictor_fits_measured_prefill(real_model, redis_url):
    """Fit the cost model to real prefill timings; it predicts unseen prompt lengths within 2.5×.

    Each timing is the best of three, so that another process briefly taking the cores does not
    count as the engine's cost."""
    prefiller = Prefiller(real_model, KVStore(redis_url, key_prefix="t-cost:"), 16, prefix_cache=False)
    recorder = CostRecorder(refit_every=1)
    params = SamplingParams(temperature=0.0)

    def measure(n: int) -> float:
        return min(prefiller.prefill([(7 * i + salt) % 30000 + 100 for i in range(n)], params).compute_ms
                   for salt in range(3))

    measure(32)  # warm-up
    for n in (16, 64, 128, 256, 384, 512):
        recorder.add_prefill(n, 0, measure(n))
    for n in (96, 320):
        actual, predicted = measure(n), recorder.model.prefill_ms(n)
        assert actual / 2.5 < predicted < actual * 2.5, (n, predicted, actual)


@pytest.mark.e2e
def test_early_rejection_under_load_only():
    with ServeProcess("--dtype", "float32", "--slo-ttft-ms", "8000", "--redis-maxmemory", "128mb") as srv, \
            Client(srv.address) as client:
        # light load: one request at a time is admitted (and teaches the cost model real timings)
        for i in range(8):
            out = client.generate(prompt=f"Light request {i}: " + "words " * (40 * (i % 4 + 1)), max_tokens=2)
            assert out.finish_reason
        # a burst of long prompts: the predicted queue wait pushes TTFT past the SLO for the latecomers
        results: list = [None] * 12

        def run(i):
            try:
                results[i] = client.generate(prompt=f"Burst {i}: " + "tokens and more tokens " * 150, max_tokens=2)
            except grpc.RpcError as err:
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(timeout=300)
        rejected = [r for r in results if isinstance(r, grpc.RpcError)]
        assert rejected, "a burst that misses the TTFT SLO must be rejected at admission"
        for err in rejected:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ttft" in err.details()
        assert any(not isinstance(r, grpc.RpcError) for r in results)
        # and light load is admitted again once the burst has drained
        assert client.generate(prompt="After the burst.", max_tokens=2).finish_reason
