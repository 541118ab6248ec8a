"""No KV leaks, ever: whatever happens to requests (refused, cancelled, timed out, duplicated, failed,
their worker killed), every worker ends with no block in use and no sequence running."""

from __future__ import annotations

import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from faults import all_back, decode_pid, kill, wait_until

from smcserve.client import Client
from smcserve.client.client import build_request

pytestmark = pytest.mark.e2e

PROMPT = "Tell me a story about a fox who learns to sail."


def idle(client: Client) -> bool:
    """Every decode worker is back and holds nothing: no block in use, no sequence."""
    info = client.info()
    return all_back(client) and all(not w.kv_blocks_in_use and not w.active_sequences for w in info.decode_workers)


def steering(particles: int, max_tokens: int, prompts: int = 0) -> dict:
    potentials = [{"kind": "max_word_length", "max_len": 7}]
    if prompts:
        potentials.append({"kind": "prompt_intersection", "prompts": [f"Prompt {i}: {PROMPT}" for i in range(prompts)]})
    return {"particles": particles, "potentials": potentials}


def test_a_steering_request_too_big_for_the_pool_is_refused_before_it_holds_anything(fclient):
    wait_until("idle", lambda: idle(fclient))
    with pytest.raises(grpc.RpcError) as err:
        list(fclient.stub.Generate(build_request(PROMPT, max_tokens=200, steering=steering(64, 200, prompts=31))))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of KV blocks" in err.value.details()
    wait_until("the refused request freed everything", lambda: idle(fclient))
    assert fclient.generate(PROMPT, max_tokens=4).finish_reason in ("length", "stop")  # the pool is usable


def test_cancelled_steering_requests_free_everything(fclient):
    for i in range(12):
        call = fclient.stub.Generate(build_request(PROMPT, max_tokens=24, seed=i, steering=steering(8, 24)))
        next(call)  # the first step's progress: particles exist on both workers
        call.cancel()
    wait_until("the cancelled requests freed everything", lambda: idle(fclient))


def test_chaos_mix_leaves_no_kv_behind(fault_server, fclient):
    """A concurrent mix: plain and steering requests run to the end, are cancelled part-way, hit a
    deadline, reuse a running request's id, are refused (too big), and a decode worker is killed."""
    wait_until("idle", lambda: idle(fclient))
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            outcomes[what] = outcomes.get(what, 0) + 1

    def one(i: int) -> None:
        kind = ["plain", "steer", "cancel", "cancel_steer", "deadline", "duplicate", "too_big"][i % 7]
        steer = steering(4, 16) if kind in ("steer", "cancel_steer", "deadline") and i % 2 else None
        if kind == "too_big":
            steer = steering(64, 200, prompts=31)
        req = build_request(PROMPT, max_tokens=16, seed=i, steering=steer, request_id=uuid.uuid4().hex)
        timeout = rng.uniform(0.05, 2.0) if kind == "deadline" else None
        try:
            call = fclient.stub.Generate(req, timeout=timeout)
            if kind == "duplicate":  # a second request with the id of one still running
                twin = fclient.stub.Generate(req)
                try:
                    list(twin)
                except grpc.RpcError as err:
                    note(f"twin {err.code().name}")
            for n, _ in enumerate(call):
                if kind.startswith("cancel") and n == 1:
                    call.cancel()
            note(f"{kind} ok")
        except grpc.RpcError as err:
            note(f"{kind} {err.code().name}")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(42)]
        wait_until("some requests done", lambda: sum(f.done() for f in futures) >= 10, every=0.05)
        kill(decode_pid(fault_server, fclient.info().decode_workers[0].address))
        for f in futures:
            f.result()
    print("\n[chaos] outcomes:", dict(sorted(outcomes.items())))
    assert outcomes.get("too_big RESOURCE_EXHAUSTED") == 6
    assert not any(k.endswith(("INTERNAL", "UNKNOWN")) for k in outcomes), outcomes  # no request hit our bug
    wait_until("every worker back with no KV in use and no sequence", lambda: idle(fclient))
    assert fclient.generate(PROMPT, max_tokens=4).finish_reason in ("length", "stop")


def test_abandoned_requests_stop_their_prefills(fclient):
    """Eight long prompts, each abandoned by its client while its prefill is queued or running: the
    prefill worker computes at most the one it had started (up to a chunk past the cancel), and the
    scheduler's queue is empty afterwards."""

    def computed() -> int:
        return sum(w.prompt_tokens_computed for w in fclient.info().prefill_workers)

    wait_until("idle", lambda: idle(fclient))
    prompts = [" ".join(f"{PROMPT} ({k}, {i})" for i in range(40)) for k in range(9)]
    length = fclient.generate(prompts.pop(), max_tokens=1).usage.prompt_tokens  # each about as long
    before = computed()
    calls = [fclient.stub.Generate(build_request(p, max_tokens=4)) for p in prompts]
    wait_until("all eight prefills sent", lambda: sum(w.queue_length for w in fclient.info().prefill_workers) == 8)
    for call in calls:
        call.cancel()
    wait_until("the prefill queue is empty", lambda: not any(w.queue_length for w in fclient.info().prefill_workers))
    short = fclient.generate("Say hi.", max_tokens=2)  # the worker is free again
    assert short.finish_reason in ("length", "stop")
    spent = computed() - before
    print(f"\n[chaos] prompt tokens computed for 8 abandoned prompts of {length} tokens: {spent}")
    assert spent < 2 * length, "abandoned prefills kept running"
