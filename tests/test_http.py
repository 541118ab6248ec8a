"""The OpenAI-compatible HTTP front, driven by the real ``openai`` package against the session server
(its HTTP API on a free port), plus the body parsing and error mapping on their own."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from smcserve.scheduler.http import BadBody, HttpAbort, abort_response, parse_body

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
BOUND_S = 300  # only a server that never frees its KV gets here


# --- no server ---------------------------------------------------------------------------------------
def test_body_fields_are_checked_by_name():
    for body, field in [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0]"),
        ({"messages": CAPITAL, "temperature": "hot"}, "temperature"),
        ({"messages": CAPITAL, "n": 0}, "n"),
        ({"messages": CAPITAL, "stop": [1]}, "stop"),
        ({"messages": CAPITAL, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CAPITAL, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CAPITAL, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": CAPITAL, "response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"messages": CAPITAL, "steering": {"particles": 2}, "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ]:
        with pytest.raises(BadBody) as err:
            parse_body(body, chat=True, model_name="m")
        assert err.value.param == field, (body, str(err.value))
    with pytest.raises(BadBody) as err:
        parse_body({"prompt": [1, 2]}, chat=False, model_name="m")
    assert err.value.param == "prompt"


def test_a_body_becomes_one_request_per_choice():
    p = parse_body(
        {"messages": CAPITAL, "n": 3, "seed": 7, "max_completion_tokens": 5, "stop": "x", "stream": True},
        chat=True,
        model_name="m",
    )
    assert [r.sampling.seed for r in p.requests] == [7, 8, 9] and p.stream and p.model == "m"
    assert all(r.sampling.max_tokens == 5 and list(r.sampling.stop) == ["x"] for r in p.requests)
    assert p.requests[0].chat.messages[0].content == CAPITAL[0]["content"]
    p = parse_body({"prompt": ["a", "b"], "n": 2}, chat=False, model_name="m")
    assert [r.prompt for r in p.requests] == ["a", "a", "b", "b"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    p = parse_body({"messages": CAPITAL, "response_format": fmt, "temperature": 0}, chat=True, model_name="m")
    (req,) = p.requests  # served by one particle under a json_schema potential
    assert req.steering.particles == 1 and req.steering.potentials[0].WhichOneof("kind") == "json_schema"
    assert 0 < req.sampling.temperature < 0.01


def test_service_codes_become_http_statuses_and_body_field_names():
    for code, status in [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.INTERNAL, 500),
    ]:
        assert abort_response(HttpAbort(code, "x")).status == status
    body = json.loads(abort_response(HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad")).body)
    assert body["error"]["param"] == "top_p" and body["error"]["message"] == "top_p: bad"


# --- against the session server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_address + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(oai):
    (m,) = oai.models.list().data
    return m.id


pytestmark = pytest.mark.e2e


def test_chat_streamed_and_not_match_grpc(oai, model, client):
    whole = oai.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=12)
    (choice,) = whole.choices
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.message.content == client.generate(messages=CAPITAL, temperature=0.0, max_tokens=12).text
    assert whole.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=CAPITAL,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_completions_with_n_choices_and_seeds(oai, model):
    kw = dict(model=model, prompt="The capital of France is", n=2, seed=11, max_tokens=6, temperature=1.0)
    first = oai.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in oai.completions.create(**kw).choices] == [c.text for c in first.choices]  # seeded
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in oai.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]


def test_response_format_json_schema_is_obeyed(oai, model):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    out = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    assert set(json.loads(out.choices[0].message.content)) == {"city"}
    chunks = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=48,
        n=2,
        seed=5,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(set(json.loads(t)) == {"city"} for t in texts.values())  # two choices, each obeying


def test_steering_extension_returns_weighted_particles(oai, model):
    out = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a storm at sea."}],
        max_tokens=6,
        seed=3,
        extra_body={"steering": {"particles": 4, "potentials": [{"kind": "max_word_length", "max_len": 5}]}},
    )
    steering = out.model_extra["steering"]
    assert len(out.choices) == len(steering["particles"]) == 4
    assert sum(p["weight"] for p in steering["particles"]) == pytest.approx(1.0)
    assert all(max(map(len, "".join(ch if ch.isalpha() else " " for ch in c.message.content).split() or [""])) <= 5
               for c in out.choices)  # fmt: skip
    assert steering["log_z"] < 0


def test_bad_requests_get_openai_errors(oai, model, server):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=CAPITAL, temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="another-model", messages=CAPITAL)
    assert "model" in err.value.body["message"]
    req = urllib.request.Request(server.http_address + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400 and json.load(err.value)["error"]["param"] == "body"


def test_a_disconnected_stream_frees_its_kv(oai, model, client):
    def generated() -> int:
        return sum(w.tokens_generated for w in client.info().decode_workers)

    before = generated()
    stream = oai.completions.create(
        model=model, prompt="Once upon a time", max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
    )
    it = iter(stream)
    next(it), next(it)
    assert any(w.active_sequences for w in client.info().decode_workers)
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + BOUND_S
    while any(w.active_sequences or w.kv_blocks_in_use for w in client.info().decode_workers):
        assert time.monotonic() < deadline, "the abandoned stream still holds its sequence or KV"
        time.sleep(0.2)
    assert generated() - before < 1000  # stopped, not run to its 1,000 tokens (ignore_eos)


def test_health_and_metrics(server, oai, model):
    assert json.load(urllib.request.urlopen(server.http_address + "/health")) == {"status": "ok"}
    oai.completions.create(model=model, prompt="Hello", max_tokens=3)
    text = urllib.request.urlopen(server.http_address + "/metrics").read().decode()
    samples = {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in (
        "smcserve:time_to_first_token_seconds_count",
        "smcserve:e2e_request_latency_seconds_count",
        'smcserve:kv_cache_usage_perc{worker="decode-0"}',
        'smcserve:worker_alive{role="prefill",worker="prefill-0"}',
        "smcserve:kv_store_up",
    ):
        assert name in samples, name
    count = next(line for line in text.splitlines() if line.startswith("smcserve:e2e_request_latency_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_bench_drives_the_http_api_with_the_grpc_metrics(server):
    from smcserve.loadtest.runner import run_workload
    from smcserve.loadtest.workloads import RequestSpec, Workload

    specs = [(0.0, RequestSpec("Tell me about the sea", max_tokens=5, seed=i)) for i in range(3)]
    runs = {
        backend: run_workload(address, Workload("b", specs, max_concurrency=2, num_requests=3), backend=backend,
                              progress=False).metrics()
        for backend, address in (("grpc", server.address), ("openai", server.http_address))
    }  # fmt: skip
    assert runs["openai"].keys() == runs["grpc"].keys()
    for m in runs.values():
        assert m["completed"] == 3 and m["total_output_tokens"] == 15 and m["median_ttft_ms"] > 0
    refused = Workload("bad", [(0.0, RequestSpec("Hi", max_tokens=10**6))], num_requests=1)
    m = run_workload(server.http_address, refused, backend="openai", progress=False).metrics()
    assert m["failed"] == 1 and any(k.startswith("HTTP 400: max_tokens") for k in m["errors"])


def test_http_overhead_bench_prints_its_keys(server):
    from argparse import Namespace

    from bench.http_overhead import run

    out = run(server.address, server.http_address, Namespace(rounds=1, per_round=1, tokens=4, concurrency=1))
    assert out["requests_per_backend"] == 1
    assert out["ttft_ratio_http_vs_grpc"] > 0 and out["tpot_ratio_http_vs_grpc"] > 0


def test_every_series_the_grafana_dashboard_queries_is_exported(server):
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "smcserve.json").read_text())
    queried = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"smcserve:[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 20
    text = urllib.request.urlopen(server.http_address + "/metrics").read().decode()
    exported = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line.startswith("smcserve:")}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported}
    assert not queried - exported, sorted(queried - exported)


def test_logprobs_chat_and_completions(oai, model, client):
    out = client.generate(messages=CAPITAL, temperature=0.0, max_tokens=4, logprobs=1)  # the gRPC API
    assert [lp.token_id for lp in out.logprobs] == out.token_ids and all(len(lp.top) == 1 for lp in out.logprobs)
    with pytest.raises(grpc.RpcError) as err:
        client.steer(messages=CAPITAL, particles=2, max_tokens=2, logprobs=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.logprobs" in err.value.details()
    kw = dict(model=model, messages=CAPITAL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    whole = oai.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert "".join(t.token for t in content).startswith(whole.choices[0].message.content)
    streamed = [t for c in oai.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]  # fmt: skip
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    legacy = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=4, logprobs=2, seed=1)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == legacy.choices[0].text
    plain = oai.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None
