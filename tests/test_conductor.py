"""The live Conductor: the TTFT predictor against measured prefill timings, and early rejection."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from smcserve.client import Client
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.prefill.worker import Prefiller
from smcserve.scheduler.conductor import CostRecorder


def test_ttft_predictor_fits_measured_prefill(real_model, redis_url):
    """Fit the cost model to real prefill timings; it predicts unseen prompt lengths within 2.5×.

    Each timing is the best of three rounds that each measure every length once, so that another
    process taking the cores for a while does not count as the engine's cost at any one length; one
    torch thread, because with several a busy machine slows each op by whole scheduler slices at
    random, far beyond its share (a fit needs costs in proportion, not a machine's best speed)."""
    prefiller = Prefiller(real_model, KVStore(redis_url, key_prefix="t-cost:"), 16, prefix_cache=False)
    recorder = CostRecorder(refit_every=1)
    params = SamplingParams(temperature=0.0)
    fit_lengths, unseen = (16, 64, 128, 256, 384, 512), (96, 320)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prefiller.prefill(list(range(100, 132)), params)  # warm-up
        best: dict[int, float] = {}
        for salt in range(3):
            for n in fit_lengths + unseen:
                ms = prefiller.prefill([(7 * i + salt) % 30000 + 100 for i in range(n)], params).compute_ms
                best[n] = min(best.get(n, ms), ms)
    finally:
        torch.set_num_threads(threads)
    for n in fit_lengths:
        recorder.add_prefill(n, 0, best[n])
    for n in unseen:
        actual, predicted = best[n], recorder.model.prefill_ms(n)
        assert actual / 2.5 < predicted < actual * 2.5, (n, predicted, actual, best)


SLO_FACTOR = 4  # burst requests admitted at once: the TTFT SLO is (SLO_FACTOR + ½) predicted prefills
BURST = 16  # burst requests sent at once


def burst_prompt(i: int) -> str:
    return f"Burst {i}: " + "tokens and more tokens " * 60  # ~250 tokens


@pytest.fixture()
def live_stack(monkeypatch, in_process_stack):
    """The real stack (real model, Ray workers, embedded Redis) with its scheduler in this process, so
    that the test can read the scheduler's cost model and set its SLO (as ``test_served_unbiased``).
    One torch thread per worker: two workers of all the cores each on a busy machine slow every op
    by whole scheduler slices, far beyond their share of the CPU. Ray's workers at nice 0, not Ray's
    default 15, at which any other busy process on the machine starves them (~30x slower)."""
    import smcserve.scheduler.stack as stack_mod

    services = []
    real_service = stack_mod.SchedulerService

    def capture(*args, **kwargs):
        services.append(real_service(*args, **kwargs))
        return services[-1]

    monkeypatch.setattr(stack_mod, "SchedulerService", capture)
    config = stack_mod.ServeConfig(dtype="float32", port=0, threads=1, kv_cache="256mb", redis_maxmemory="128mb")
    with in_process_stack(config, start_timeout=600) as st:
        yield st, services[0]


@pytest.mark.e2e
def test_early_rejection_under_load_only(live_stack):
    """Early rejection turns away a burst's latecomers and nothing under light load.

    No fixed time: light load first teaches the scheduler's cost model this machine's timings (at
    lengths up to the burst's), then the TTFT SLO is set to (SLO_FACTOR + ½)·P, P the model's own
    prediction for one burst prompt. By construction of the cost model, a burst prompt with k
    requests admitted ahead of it on the one prefill worker is predicted at (k + 1)·P: the first
    SLO_FACTOR are admitted, and a request that finds SLO_FACTOR still ahead is rejected. A burst of
    BURST sent at once arrives within a fraction of one prefill (arrival is tokenising and placing,
    ~1 % of a prefill's compute), so the latecomers find them. This holds on a machine 10x faster or
    slower alike."""
    stack, service = live_stack
    with Client(stack.address) as client:
        tok = service.tokenizer
        # light load, one request at a time (the SLO is off): six short ones of distinct lengths first
        # (the cost model is fitted from six), then up to the burst's length
        n = len(tok.encode(burst_prompt(0), add_special_tokens=False))
        for i, words in enumerate([8, 16, 24, 32, 40, 48, n // 2, 3 * n // 4, n]):
            assert client.generate(prompt=f"Light request {i}: " + "words " * words, max_tokens=2).finish_reason

        def set_slo() -> str:  # from the model as it is now (it refits only when a request reports timings)
            service.slo_ttft_ms = (SLO_FACTOR + 0.5) * service.cost.model.prefill_ms(n)
            return f"(SLO {service.slo_ttft_ms:.0f} ms = {SLO_FACTOR + 0.5} x the predicted prefill of {n} tokens)"

        why = set_slo()
        try:  # light load is admitted under the SLO
            assert client.generate(prompt="Light request under the SLO: " + "words " * n, max_tokens=2).finish_reason
        except grpc.RpcError as err:
            pytest.fail(f"a light request was refused: {err.details()} {why}")
        why = set_slo()  # that request's timings may have refitted the model
        # a burst, all at once: the predicted queue wait pushes TTFT past the SLO for the latecomers
        results: list = [None] * BURST
        start = threading.Barrier(BURST)

        def run(i):
            start.wait()
            try:
                results[i] = client.generate(prompt=burst_prompt(i), max_tokens=2)
            except grpc.RpcError as err:
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rejected = [r for r in results if isinstance(r, grpc.RpcError)]
        print(f"burst of {BURST}: {BURST - len(rejected)} admitted, {len(rejected)} rejected {why}")
        assert rejected, f"a burst that misses the TTFT SLO must be rejected at admission {why}"
        for err in rejected:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ttft" in err.details(), err
        assert BURST - len(rejected) >= SLO_FACTOR, f"the burst's first requests must be admitted {why}"
        # and light load is admitted again once the burst has drained
        assert client.generate(prompt="After the burst.", max_tokens=2).finish_reason
