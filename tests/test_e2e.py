"""End to end through `smcserve serve`: real model, real Ray, real Redis, real gRPC on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smcserve.client.client import build_request
from smcserve.protos import smcserve_pb2 as pb

pytestmark = pytest.mark.e2e
INVALID = grpc.StatusCode.INVALID_ARGUMENT

REPO = Path(__file__).resolve().parent.parent  # (not from conftest: tests/fault has a conftest too)


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def wait_for_idle_workers(client, timeout: float = 300.0):  # returns as soon as they are idle
    deadline = time.time() + timeout
    while True:
        workers = client.info().decode_workers
        if all(w.kv_blocks_in_use == 0 and w.active_sequences == 0 for w in workers) or time.time() > deadline:
            return workers
        time.sleep(0.2)


def test_capital_of_france(client):
    out = client.generate(messages=chat("What is the capital of France?"), temperature=0.0, max_tokens=32)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    u = out.usage
    assert u.prompt_tokens > 10 and u.completion_tokens == len(out.token_ids) and u.ttft_ms > 0
    assert u.e2e_ms >= u.ttft_ms


def test_stack_equals_hf_generate_fp32(client, real_model):
    tok = real_model.tokenizer
    for q in ("Name a primary colour.", "What is 2 + 2?", "Say hello in French."):
        out = client.generate(messages=chat(q), temperature=0.0, max_tokens=20)
        ids = tok.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=True, return_dict=False)
        ref = real_model.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
        )[0, len(ids) :].tolist()
        assert out.token_ids == ref, q
        assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_repeated_prompt_hits_prefix_cache(client):
    msgs = chat("Tell me one fact about the Moon, in one sentence, please. " * 3)
    first = client.generate(messages=msgs, temperature=0.0, max_tokens=4)
    second = client.generate(messages=msgs, temperature=0.0, max_tokens=4)
    assert second.usage.cached_prompt_tokens >= (second.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert second.token_ids == first.token_ids


def test_seed_reproducible_and_stop_strings(client):
    kw = dict(messages=chat("Count from one to twenty in words."), temperature=0.8, max_tokens=24)
    a = client.generate(seed=7, **kw)
    b = client.generate(seed=7, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    full = client.generate(messages=chat("Count from 1 to 10, separated by commas."), temperature=0.0, max_tokens=40)
    assert "," in full.text
    cut = client.generate(
        messages=chat("Count from 1 to 10, separated by commas."), temperature=0.0, max_tokens=40, stop=[","]
    )
    assert cut.finish_reason == "stop" and "," not in cut.text and full.text.startswith(cut.text)


def test_max_tokens_gives_length(client):
    out = client.generate(prompt="Once upon a time", temperature=0.0, max_tokens=5, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.usage.completion_tokens == 5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(messages=[]), "chat.messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "chat.messages[0].role"),
        (dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
        (dict(prompt="hi", max_tokens=-3), "sampling.max_tokens"),
        (dict(prompt="hi", max_tokens=10**6), "sampling.max_tokens"),
        (dict(prompt="hi", temperature=-0.5), "sampling.temperature"),
        (dict(prompt="hi", top_p=0.0), "sampling.top_p"),
        (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
        (dict(prompt="hi", top_k=-1), "sampling.top_k"),
        (dict(prompt="hi", model="gpt-17"), "model"),
        (dict(prompt="hello " * 9000), "prompt"),
    ],
)
def test_bad_input_is_invalid_argument(client, kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(**kwargs)
    assert err.value.code() == INVALID
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_invalid_utf8_is_invalid_argument(server, client):
    def bad(msg) -> bytes:  # the message with "héllo" made invalid UTF-8 on the wire
        return msg.SerializeToString().replace("héllo".encode(), b"h\xff\xfello")

    with grpc.insecure_channel(server.address) as ch:
        # no request serializer: the bytes go out as they are
        generate = ch.unary_stream(
            "/smcserve.v1.SmcServe/Generate", response_deserializer=pb.GenerateResponse.FromString
        )
        abort = ch.unary_unary("/smcserve.v1.SmcServe/Abort", response_deserializer=pb.AbortResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(generate(bad(build_request("héllo"))))
        assert err.value.code() == INVALID and err.value.details().startswith("prompt:")
        with pytest.raises(grpc.RpcError) as err:
            abort(bad(pb.AbortRequest(request_id="héllo")))
        assert err.value.code() == INVALID and err.value.details() == "request_id: invalid UTF-8"
    assert client.generate(prompt="Hi", max_tokens=2).finish_reason  # still serving


def test_cancel_mid_stream_frees_kv(client):
    stream = client.stream(messages=chat("Write a long story about a dragon."), max_tokens=400, ignore_eos=True)
    got = 0
    for r in stream:
        got += len(r.token_ids)
        if got >= 5:
            break
    busy = client.info().decode_workers
    assert sum(w.kv_blocks_in_use for w in busy) > 0  # the request held KV while it ran
    stream.cancel()
    workers = wait_for_idle_workers(client)
    assert all(w.kv_blocks_in_use == 0 and w.active_sequences == 0 for w in workers)
    assert sum(w.tokens_generated for w in workers) < 400 * 4


def test_abort_rpc_ends_stream(client):
    responses = []
    stream = client.stream(
        messages=chat("Describe the ocean at length."), max_tokens=400, ignore_eos=True, request_id="abort-me"
    )
    for r in stream:
        responses.append(r)
        if len(responses) == 3:
            assert client.abort("abort-me")
    assert responses[-1].finish_reason == "abort"
    assert not client.abort("abort-me")  # gone
    assert all(w.kv_blocks_in_use == 0 for w in wait_for_idle_workers(client))


def test_overload_is_resource_exhausted(client):
    """The test server admits 8 requests in flight; the rest get RESOURCE_EXHAUSTED, nothing is lost."""
    results: list = [None] * 11

    def run(i):
        try:
            results[i] = client.generate(prompt=f"Story {i}:", max_tokens=40, ignore_eos=True, temperature=0.0)
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    done = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert len(done) >= 8 and all(r.finish_reason == "length" and len(r.token_ids) == 40 for r in done)


def test_model_info_health_and_reflection(server, client):
    info = client.info()
    assert info.model == "smollm2-135m-instruct" and info.dtype == "float32" and info.block_size == 16
    assert len(info.prefill_workers) == 1 and len(info.decode_workers) == 1
    assert info.decode_workers[0].address.startswith("127.0.0.1:")
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="smcserve.v1.SmcServe"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "smcserve.v1.SmcServe" in names and "grpc.health.v1.Health" in names


def test_cli_generate_streams(server):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smcserve.entrypoints.cli",
            "generate",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--address",
            server.address,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "[stop]" in out.stderr


def test_unreachable_redis_is_a_clear_error():
    url = "redis://127.0.0.1:1"
    out = subprocess.run(
        [sys.executable, "-m", "smcserve.entrypoints.cli", "serve", "--redis-url", url, "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and url in out.stderr and "Redis" in out.stderr


def test_unknown_model_dir_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "smcserve.entrypoints.cli", "serve", "--model", str(tmp_path / "nope"), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "model:" in out.stderr


def test_concurrent_requests_share_batch_steps(client, real_model):
    """7 concurrent Generate calls join a running batch and complete correctly.

    A long request (the anchor) is in every decode step of the measured window, so the steps' rows
    beyond one per step are exactly the 7 requests' rows: they were advanced in the anchor's batched
    steps (and in each other's where they overlapped), however fast the machine."""
    anchor = client.stream(
        messages=chat("Describe the ocean at length."), max_tokens=400, ignore_eos=True, request_id="anchor"
    )
    streamed = []
    for r in anchor:  # a second token means the anchor has run a decode step: it is in the batch
        streamed.extend(r.token_ids)
        if len(streamed) >= 2:
            break
    before = client.info().decode_workers[0]
    questions = [
        f"Give me one word that rhymes with {w}." for w in ("cat", "dog", "sun", "tree", "blue", "rain", "star")
    ]  # 7 + the anchor: the server's --max-inflight 8
    results: list = [None] * len(questions)

    def run(i):
        results[i] = client.generate(messages=chat(questions[i]), temperature=0.0, max_tokens=32)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = client.info().decode_workers[0]
    assert client.abort("anchor")
    assert [r.finish_reason for r in anchor if r.finish_reason] == ["abort"]  # it ran through the whole window
    steps = after.batch_steps - before.batch_steps
    rows = after.batched_tokens - before.batched_tokens
    # each request's first token comes from prefill; decode computes the others, one row per step each
    assert rows - steps == sum(len(out.token_ids) - 1 for out in results) > 0
    assert after.max_batch_size >= 2
    tok = real_model.tokenizer
    for q, out in zip(questions, results):  # batching did not change anyone's greedy output
        ids = tok.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=True, return_dict=False)
        ref = real_model.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
        )[0, len(ids) :].tolist()
        assert out.token_ids == ref, q
    assert all(w.kv_blocks_in_use == 0 for w in wait_for_idle_workers(client))


def test_out_of_kv_blocks_is_resource_exhausted(client):
    """A request that cannot fit the worker's KV pool is refused up front; the server keeps serving."""
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt="Tell me everything.", max_tokens=4000, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV blocks" in err.value.details()
    assert client.generate(prompt="Still there?", max_tokens=3).finish_reason
    info = client.info().decode_workers[0]
    assert info.kv_blocks_total == 91 and info.kv_blocks_in_use == 0
