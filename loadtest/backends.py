"""How ``smcserve bench`` sends one request and times its stream: over the gRPC API (``grpc``) or the
OpenAI-compatible HTTP API (``openai``: ``POST /v1/completions`` with SSE). Each fills the same
:class:`RequestRecord`, so both give the same metrics."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc

from smcserve.loadtest.metrics import RequestRecord
from smcserve.protos.messages import build_request

BACKENDS = ("grpc", "openai")


def _finish_ok(rec: RequestRecord, spec, steps: int | None) -> None:
    rec.status = "ok"
    if spec.steering:
        rec.output_tokens = steps if steps is not None else len(rec.chunk_s)
    else:
        rec.output_tokens = rec.completion_tokens or sum(rec.chunk_tokens)


async def grpc_one(stub, spec, rec: RequestRecord, request_id: str, timeout: float | None) -> None:
    req = build_request(
        spec.prompt,
        request_id=request_id,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        seed=spec.seed,
        ignore_eos=spec.ignore_eos,
        steering=spec.steering,
    )
    t0 = time.perf_counter()
    call = stub.Generate(req, timeout=timeout)
    final, steps = False, None
    try:
        async for r in call:
            now = time.perf_counter() - t0
            n = len(r.token_ids) or (1 if r.HasField("progress") else 0)
            if n:
                rec.chunk_s.append(now)
                rec.chunk_tokens.append(n)
            if r.HasField("result"):
                steps = r.result.steps
            if r.finish_reason:
                final = True
                rec.end_s = now
                rec.finish_reason = r.finish_reason
                u = r.usage
                rec.prompt_tokens, rec.cached_prompt_tokens = u.prompt_tokens, u.cached_prompt_tokens
                rec.completion_tokens = u.completion_tokens
                rec.server_ttft_ms, rec.server_e2e_ms = u.ttft_ms, u.e2e_ms
        if final:
            _finish_ok(rec, spec, steps)
        else:
            rec.end_s = time.perf_counter() - t0
            rec.status, rec.code, rec.message = "error", "INCOMPLETE", "stream ended without a final message"
    except grpc.aio.AioRpcError as err:
        rec.end_s = time.perf_counter() - t0
        rec.code, rec.message = err.code().name, err.details() or ""
        rec.status = "rejected" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
    except asyncio.CancelledError:
        call.cancel()
        rec.end_s = time.perf_counter() - t0
        rec.status, rec.code = "incomplete", "CANCELLED"
        rec.message = "cut off when the run stopped (time limit or Ctrl-C)"
        raise


async def openai_one(session: aiohttp.ClientSession, spec, rec: RequestRecord, timeout: float | None) -> None:
    """One streamed ``/v1/completions``. Each SSE chunk with text is a token arrival; the usage chunk's
    completion count puts any tokens beyond one per chunk on the last chunk (the server may send a few
    tokens in one chunk, as its gRPC stream does)."""
    body = {"prompt": spec.prompt, "stream": True, "stream_options": {"include_usage": True}}
    for name, value in (("max_tokens", spec.max_tokens), ("temperature", spec.temperature), ("seed", spec.seed)):
        if value is not None:
            body[name] = value
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.steering:
        body["steering"] = spec.steering
    t0 = time.perf_counter()
    steps = None
    try:
        async with session.post("/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                err = (await resp.json(content_type=None)).get("error", {})
                rec.end_s = time.perf_counter() - t0
                rec.code, rec.message = f"HTTP {resp.status}", err.get("message", "")
                rec.status = "rejected" if resp.status == 429 else "error"
                return
            final = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter() - t0
                if line == b"data: [DONE]":
                    rec.end_s = now
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.end_s = now
                    rec.status, rec.code, rec.message = "error", "STREAM", chunk["error"].get("message", "")
                    return
                if "steering_progress" in chunk or any(c.get("text") for c in chunk.get("choices", ())):
                    if "steering" not in chunk:  # the particles' final texts are not token arrivals
                        rec.chunk_s.append(now)
                        rec.chunk_tokens.append(1)
                if "steering" in chunk:
                    steps = chunk["steering"]["steps"]
                for c in chunk.get("choices", ()):
                    if c.get("finish_reason"):
                        final, rec.finish_reason = True, c["finish_reason"]
                if chunk.get("usage"):
                    u = chunk["usage"]
                    rec.prompt_tokens, rec.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
                    rec.cached_prompt_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if final and rec.end_s is not None:
                extra = rec.completion_tokens - sum(rec.chunk_tokens)
                if extra > 0 and rec.chunk_tokens and not spec.steering:
                    rec.chunk_tokens[-1] += extra
                _finish_ok(rec, spec, steps)
            else:
                rec.end_s = time.perf_counter() - t0
                rec.status, rec.code, rec.message = "error", "INCOMPLETE", "stream ended without a final chunk"
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        rec.end_s = time.perf_counter() - t0
        rec.status, rec.code, rec.message = "error", type(err).__name__, str(err)
    except asyncio.CancelledError:
        rec.end_s = time.perf_counter() - t0
        rec.status, rec.code = "incomplete", "CANCELLED"
        rec.message = "cut off when the run stopped (time limit or Ctrl-C)"
        raise
