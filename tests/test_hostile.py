"""Hostile input against the live server: one expensive request does not stall the others, sizes
are refused before any work, and what the server keeps per request is bounded."""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smcserve.client.client import build_request

pytestmark = pytest.mark.e2e


def health_latency(channel) -> float:
    stub = health_pb2_grpc.HealthStub(channel)
    t0 = time.perf_counter()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=120)
    return time.perf_counter() - t0


def ttft(client) -> float:
    t0 = time.perf_counter()
    next(iter(client.stream("Say hi.", max_tokens=2)))
    return time.perf_counter() - t0


def test_an_expensive_request_does_not_stall_health_checks_or_a_bystander(server, client):
    """The largest banned-phrase table a request may ask for is built off the event loop: while it is,
    health checks and a bystander's first token come about as fast as at rest (bounds derived from
    the same test's measurements: the expensive request's own duration, and the times at rest)."""
    rng = random.Random(0)
    phrases = ["".join(rng.choice("abcdefghij klmnop") for _ in range(250)) for _ in range(1000)]
    expensive = build_request(
        "Hello", max_tokens=1, steering={"particles": 1, "potentials": [{"kind": "banned_phrases", "phrases": phrases}]}
    )
    with grpc.insecure_channel(server.address) as ch:
        rest_health = statistics.median(health_latency(ch) for _ in range(5))
        rest_ttft = statistics.median(ttft(client) for _ in range(3))
        done = threading.Event()
        took = []

        def run():
            t0 = time.perf_counter()
            list(client.stub.Generate(expensive))
            took.append(time.perf_counter() - t0)
            done.set()

        threading.Thread(target=run).start()
        during_health, during_ttft = [], []
        while not done.is_set():
            during_health.append(health_latency(ch))
            if not during_ttft:
                during_ttft.append(ttft(client))
    print(
        f"\n[hostile] expensive request {took[0]:.2f} s; health at rest {rest_health * 1e3:.1f} ms, worst during "
        f"{max(during_health) * 1e3:.1f} ms ({len(during_health)} checks); TTFT at rest {rest_ttft * 1e3:.0f} ms, "
        f"during {during_ttft[0] * 1e3:.0f} ms"
    )
    # Were it on the event loop, a check would wait for all of the request's validation (most of its time)
    assert max(during_health) < 10 * rest_health + 0.25 * took[0]
    assert during_ttft[0] < 3 * rest_ttft + 0.25 * took[0]


MANY = ["a"] * 5000


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(prompt="x" * 200_000), "prompt: longer than this server's limit"),
        (
            dict(prompt="hi", steering={"particles": 1, "potentials": [{"kind": "banned_phrases", "phrases": MANY}]}),
            "steering.potentials[0].phrases: 5000 of them",
        ),
    ],
)
def test_sizes_are_refused_before_any_work(client, kw, field):
    prompt = kw.pop("prompt")
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(build_request(prompt, max_tokens=1, **kw)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


def test_scheduler_memory_is_flat_over_distinct_rejected_requests(server, client):
    """2,000 requests with distinct client-made tables (forbidden_chars, banned phrases) that are then
    refused (max_word_length 0 is invalid, after the tables are built): the scheduler's RSS stays flat."""

    def rejected(i: int) -> None:
        potentials = [
            {"kind": "forbidden_chars", "chars": f"{i}qz"},
            {"kind": "banned_phrases", "phrases": [f"phrase {i}", f"other {i * 7}"]},
            {"kind": "max_word_length", "max_len": 0},
        ]
        req = build_request("Hello", max_tokens=4, steering={"particles": 2, "potentials": potentials})
        with pytest.raises(grpc.RpcError) as err:
            list(client.stub.Generate(req))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    scheduler = psutil.Process(server.proc.pid)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(rejected, range(200)))  # warm-up: allocator pools, caches at their bound
        start = scheduler.memory_info().rss
        list(pool.map(rejected, range(200, 2200)))
    growth_mb = (scheduler.memory_info().rss - start) / 2**20
    print(f"\n[hostile] scheduler RSS growth over 2,000 rejected requests: {growth_mb:.1f} MB")
    assert growth_mb < 50
