"""The OpenAI-compatible HTTP front: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health`` and ``/metrics``, served by aiohttp on the scheduler's own event loop.

A request body becomes one ``GenerateRequest`` per choice (``n`` of them, seeds ``seed + i``), each run
by :meth:`SchedulerService.Generate` directly, in this process: no hop beyond what gRPC streaming costs.
The service's aborts become OpenAI error objects (``HttpAbort``: the gRPC code → HTTP status); a client
that disconnects cancels its handler, which closes the streams, which frees their KV.

Extensions (as vLLM takes its own): ``steering`` (the gRPC ``SteeringSpec`` as JSON: ``particles``,
``extensions``, ``scheme``, ``ess_threshold``, ``patch_max_tokens``, ``entropy_threshold``, ``weight_drop``,
``potentials`` as ``smcserve steer`` takes them) returns
every particle as a choice plus a ``steering`` object (weights, log Ẑ); ``top_k``, ``ignore_eos`` and
``disable_speculation``.
``response_format`` (``json_object``, ``json_schema``) is served by the grammar-constrained proposal:
one particle steered by a ``json_schema`` potential.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

import grpc
from aiohttp import web

from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos.messages import build_request
from smcserve.scheduler.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)
DEFAULT_HTTP_PORT = 8000
MAX_BODY = 8 << 20  # bytes of JSON a request may send
MAX_N = 16
GREEDY_STEERING_TEMPERATURE = 1e-3  # temperature 0 with response_format: steering needs > 0; this is argmax in effect

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
# the service names proto fields; an HTTP client knows them by the body's names
_FIELD_NAMES = (
    ("sampling.max_tokens", "max_tokens"),
    ("sampling.", ""),
    ("chat.messages", "messages"),
)


class HttpAbort(grpc.aio.AbortError):
    """What ``context.abort`` raises for an HTTP request: the status code and its message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class BadBody(ValueError):
    """A body field an HTTP client got wrong (400, naming the field)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class _Context:
    """The part of a gRPC servicer context the service uses: the caller's metadata and abort."""

    def __init__(self, request: web.Request):
        auth = request.headers.get("Authorization")
        self._metadata = (("authorization", auth),) if auth is not None else ()

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise HttpAbort(code, details)


def error_response(status: int, kind: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


def abort_response(err: HttpAbort) -> web.Response:
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    message = err.message
    for proto, http in _FIELD_NAMES:
        if message.startswith(proto):
            message = http + message[len(proto) :]
            break
    param = message.split(":", 1)[0] if status == 400 and ":" in message else None
    return error_response(status, kind, message, param)


def _error_chunk(err: HttpAbort) -> bytes:
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    return _sse({"error": {"message": err.message, "type": kind, "param": None, "code": status}})


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# --- the body → GenerateRequests -------------------------------------------------------------------------
def _opt(body: dict, name: str, kinds: tuple[type, ...], what: str):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise BadBody(name, f"must be {what}, got {json.dumps(v)[:80]}")
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        out = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadBody(f"messages[{i}].content[{j}]", "only text parts are supported")
            out.append(part["text"])
        return "".join(out)
    raise BadBody(f"messages[{i}].content", "must be a string or a list of text parts")


@dataclass
class Parsed:
    requests: list[pb.GenerateRequest]  # one per choice
    stream: bool
    include_usage: bool
    model: str
    chat: bool

    def first_of_prompt(self, i: int) -> bool:
        """Request ``i`` is its prompt's first choice (usage counts a prompt's tokens once)."""
        return i == 0 or self.requests[i].prompt != self.requests[i - 1].prompt


def parse_body(body: object, chat: bool, model_name: str) -> Parsed:
    """The body's requests, one per choice; ``BadBody`` naming the field it cannot take."""
    if not isinstance(body, dict):
        raise BadBody("body", "must be a JSON object")
    messages = prompts = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadBody("messages", "required: a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadBody(f"messages[{i}]", "must be an object with a string role")
        messages = [{"role": m["role"], "content": _content(m, i)} for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise BadBody("prompt", "required: a string or a list of strings (token-id prompts are not supported)")
    model = _opt(body, "model", (str,), "a string") or ""
    n = _opt(body, "n", (int,), "an integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise BadBody("n", f"must be in [1, {MAX_N}], got {n}")
    max_tokens = _opt(body, "max_completion_tokens", (int,), "an integer") if chat else None
    if max_tokens is None:
        max_tokens = _opt(body, "max_tokens", (int,), "an integer")
    temperature = _opt(body, "temperature", (int, float), "a number")
    top_p = _opt(body, "top_p", (int, float), "a number")
    top_k = _opt(body, "top_k", (int,), "an integer") or 0
    seed = _opt(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < 1 << 64:
        raise BadBody("seed", "must be in [0, 2**64)")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadBody("stop", "must be a string or a list of strings")
    stream = _opt(body, "stream", (bool,), "a boolean") or False
    options = _opt(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(options.get("include_usage"))
    for name in ("frequency_penalty", "presence_penalty"):
        if _opt(body, name, (int, float), "a number"):
            raise BadBody(name, "is not supported (only 0)")
    if chat:  # logprobs: true, top_logprobs: k alternatives
        want = _opt(body, "logprobs", (bool,), "a boolean") or False
        top = _opt(body, "top_logprobs", (int,), "an integer")
        if top is not None and not want:
            raise BadBody("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if want else None
    else:  # logprobs: k alternatives (the legacy completions form)
        logprobs = _opt(body, "logprobs", (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise BadBody("top_logprobs" if chat else "logprobs", f"must be in [0, 20], got {logprobs}")
    if body.get("tools") or body.get("functions"):
        raise BadBody("tools", "tool calling is not supported")
    ignore_eos = _opt(body, "ignore_eos", (bool,), "a boolean") or False
    disable_speculation = _opt(body, "disable_speculation", (bool,), "a boolean") or False
    steering = _opt(body, "steering", (dict,), "an object")
    fmt = _opt(body, "response_format", (dict,), "an object")
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise BadBody("response_format.json_schema.schema", "required: the JSON schema, an object")
            schema = spec["schema"]
        elif kind == "text":
            schema = None
        else:
            raise BadBody("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
        if schema is not None:
            if steering is not None:
                raise BadBody("response_format", "cannot be combined with steering (add a json_schema potential)")
            steering = {"particles": 1, "potentials": [{"kind": "json_schema", "schema": schema}]}
            if temperature == 0:
                temperature = GREEDY_STEERING_TEMPERATURE
    if "steering" in body and body["steering"] is not None and n != 1:
        raise BadBody("n", "must be 1 with steering (every particle is a choice)")
    requests = []
    for text in prompts or [None]:
        for i in range(n):
            try:
                requests.append(
                    build_request(
                        text,
                        messages,
                        model=model,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        max_tokens=max_tokens,
                        stop=stop,
                        seed=None if seed is None else (seed + i) % (1 << 64),
                        ignore_eos=ignore_eos,
                        steering=steering,
                        disable_speculation=disable_speculation,
                    )
                )
                if logprobs is not None:
                    requests[-1].sampling.logprobs = logprobs
            except (ValueError, TypeError) as err:
                raise BadBody("steering", str(err)) from None
    return Parsed(requests, stream, include_usage, model or model_name, chat)


# --- the front ---------------------------------------------------------------------------------------
class HttpFront:
    """The aiohttp application over a :class:`SchedulerService`; ``await start(host, port)``, ``await stop()``."""

    def __init__(self, service):
        self.service = service
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
            ]
        )
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        # handler_cancellation: a client that disconnects cancels its handler (and so its request)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # --- plain endpoints ---
    def _authorized(self, request: web.Request) -> web.Response | None:
        keys = self.service.api_keys
        if keys.keys and keys.caller(_Context(request).invocation_metadata()) is None:
            return error_response(401, "authentication_error", "missing or invalid API key (Authorization: Bearer)")
        return None

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        name = self.service.model.name
        return web.json_response(
            {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "smcserve"}]}
        )

    async def health(self, request: web.Request) -> web.Response:
        ok = self.service.liveness.serving()
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.service.render_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # --- generation ---
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError) as err:
            return error_response(400, "invalid_request_error", f"body: not valid JSON ({err})", "body")
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "invalid_request_error", f"body: larger than {MAX_BODY} bytes", "body")
        try:
            parsed = parse_body(body, chat, self.service.model.name)
        except BadBody as err:
            return error_response(400, "invalid_request_error", str(err), err.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        context = _Context(request)
        streams = [self.service.Generate(req, context) for req in parsed.requests]
        try:
            if parsed.stream:
                return await self._stream(request, parsed, streams, rid)
            return await self._collect(parsed, streams, rid)
        except HttpAbort as err:
            return abort_response(err)

    async def _collect(self, parsed: Parsed, streams: list, rid: str) -> web.Response:
        tasks = [asyncio.ensure_future(_drain(s)) for s in streams]
        try:
            finals = await asyncio.gather(*tasks)
        except BaseException:  # one choice failed (or the client left): the others stop too
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        choices, usage = [], _Usage()
        for i, (text, final) in enumerate(finals):
            usage.add(final.usage, first=parsed.first_of_prompt(i))
            if final.HasField("result"):
                for p in final.result.particles:
                    choices.append(_particle_choice(len(choices), p, parsed.chat))
            else:
                choices.append(_choice(i, text, _finish(final.finish_reason), parsed.chat))
                if parsed.requests[i].sampling.HasField("logprobs"):
                    choices[-1]["logprobs"] = self._logprobs(final.logprobs, parsed.chat)
        out = {
            "id": rid,
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": int(time.time()),
            "model": parsed.model,
            "choices": choices,
            "usage": usage.json(),
        }
        steered = [f.result for _, f in finals if f.HasField("result")]
        if steered:
            out["steering"] = _steering_json(steered[0]) if len(steered) == 1 else [_steering_json(r) for r in steered]
        return web.json_response(out, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    def _logprobs(self, logprobs, chat: bool, offset: int = 0) -> dict:
        """TokenLogprob messages in OpenAI's shape: chat ``{"content": [...]}``, completions the legacy lists."""
        decode = self.service.token_text
        if chat:
            return {
                "content": [
                    {
                        **_token_json(decode(lp.token_id), lp.logprob),
                        "top_logprobs": [_token_json(decode(t.token_id), t.logprob) for t in lp.top],
                    }
                    for lp in logprobs
                ]
            }
        tokens = [decode(lp.token_id) for lp in logprobs]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{decode(t.token_id): t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    async def _stream(self, request: web.Request, parsed: Parsed, streams: list, rid: str) -> web.StreamResponse:
        """SSE: the first response of every choice is awaited before the headers go out, so a request the
        service refuses gets its HTTP status; a failure after that is an ``error`` event, then the end."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(_pump(i, s, queue)) for i, s in enumerate(streams)]
        try:
            pending = [await queue.get() for _ in streams]  # each choice's first event (or its end/failure)
            for _, item in pending:
                if isinstance(item, HttpAbort):
                    return abort_response(item)
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
            await resp.prepare(request)
            head = _Head(rid, parsed, self._logprobs)
            usage, open_choices = _Usage(), len(streams)
            for i, item in pending:
                open_choices -= await head.write(resp, i, item, usage)
            while open_choices:
                i, item = await queue.get()
                open_choices -= await head.write(resp, i, item, usage)
            if parsed.include_usage:
                await resp.write(_sse({**head.base(), "choices": [], "usage": usage.json()}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(stream) -> tuple[str, pb.GenerateResponse]:
    """The whole text and the final message (its ``logprobs`` then hold every token's)."""
    text, logprobs = [], []
    async with contextlib.aclosing(stream) as responses:
        async for r in responses:
            text.append(r.text)
            logprobs.extend(r.logprobs)
            if r.finish_reason:
                del r.logprobs[:]
                r.logprobs.extend(logprobs)
                return "".join(text), r
    raise HttpAbort(grpc.StatusCode.INTERNAL, "the stream ended without a final message")


async def _pump(i: int, stream, queue: asyncio.Queue) -> None:
    """Choice ``i``'s responses into ``queue`` as (i, response); its end as (i, None); a failure as (i, HttpAbort)."""
    try:
        async with contextlib.aclosing(stream) as responses:
            async for r in responses:
                await queue.put((i, r))
        await queue.put((i, None))
    except HttpAbort as err:
        await queue.put((i, err))


class _Usage:
    def __init__(self):
        self.prompt = self.completion = self.cached = 0

    def add(self, u: pb.Usage, first: bool = True) -> None:
        if first:  # n choices of one prompt count its tokens once, as OpenAI's usage does
            self.prompt += u.prompt_tokens
            self.cached += u.cached_prompt_tokens
        self.completion += u.completion_tokens

    def json(self) -> dict:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


def _token_json(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _finish(reason: str) -> str:
    return {"": "stop", "violated": "stop"}.get(reason, reason)


def _choice(i: int, text: str, finish: str, chat: bool) -> dict:
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
    return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


def _particle_finish(p: pb.Particle) -> str:
    return _finish(p.finish_reason) if p.finished else "length"


def _particle_choice(i: int, p: pb.Particle, chat: bool) -> dict:
    return _choice(i, p.text, _particle_finish(p), chat)


def _steering_json(result: pb.SteeringResult) -> dict:
    return {
        "log_z": result.log_z,
        "steps": result.steps,
        "resamples": result.resamples,
        "status": result.status,
        "roundtrips_per_token": result.roundtrips_per_token,
        "tokens_per_patch": result.tokens_per_patch,
        "compute_s": result.compute_s,
        "sync_s": result.sync_s,
        "entropy_threshold": result.entropy_threshold if math.isfinite(result.entropy_threshold) else None,
        "particles": [
            {
                "index": i,
                "log_weight": p.log_weight,
                "weight": p.weight,
                "finished": p.finished,
                "finish_reason": p.finish_reason,
                "token_ids": list(p.token_ids),
            }
            for i, p in enumerate(result.particles)
        ],
    }


class _Head:
    """Writes one choice's events as chunks: text deltas, steering progress, the end."""

    def __init__(self, rid: str, parsed: Parsed, logprobs):
        self.rid, self.parsed, self.created = rid, parsed, int(time.time())
        self.logprobs = logprobs  # HttpFront._logprobs
        self.offsets: dict[int, int] = {}  # completions: characters streamed per choice (text_offset)
        self.started: set[int] = set()
        self.next_particle = len(parsed.requests)  # steering particles get indexes after the choices

    def base(self) -> dict:
        kind = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.parsed.model}

    def _choice(self, i: int, text: str, finish: str | None) -> dict:
        if not self.parsed.chat:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"content": text}
        if i not in self.started:
            self.started.add(i)
            delta = {"role": "assistant", "content": text}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def write(self, resp: web.StreamResponse, i: int, item, usage: _Usage) -> int:
        """Write choice ``i``'s event; 1 when the choice has ended (its stream closed or failed), else 0."""
        if item is None:
            return 1
        if isinstance(item, HttpAbort):
            await resp.write(_error_chunk(item))
            return 1
        r: pb.GenerateResponse = item
        if r.HasField("progress"):
            p = r.progress
            await resp.write(
                _sse(
                    {
                        **self.base(),
                        "choices": [],
                        "steering_progress": {
                            "index": i,
                            "step": p.step,
                            "ess": p.ess,
                            "resampled": p.resampled,
                            "finished": p.finished,
                            "best_text": p.best_text,
                        },
                    }
                )
            )
        if r.HasField("result"):
            usage.add(r.usage, self.parsed.first_of_prompt(i))
            choices = []
            for p in r.result.particles:
                if len(self.parsed.requests) == 1:  # one request: its particles are the choices
                    k = len(choices)
                elif len(r.result.particles) == 1:  # response_format: choice i is request i's particle
                    k = i
                else:  # several prompts, each steered: numbered after the requests
                    k, self.next_particle = self.next_particle, self.next_particle + 1
                choices.append(self._choice(k, p.text, _particle_finish(p)))
            await resp.write(_sse({**self.base(), "choices": choices, "steering": _steering_json(r.result)}))
            return 0
        if r.text or r.finish_reason or r.logprobs:
            finish = _finish(r.finish_reason) if r.finish_reason else None
            choice = self._choice(i, r.text, finish)
            if self.parsed.requests[i].sampling.HasField("logprobs"):
                choice["logprobs"] = self.logprobs(r.logprobs, self.parsed.chat, self.offsets.get(i, 0))
            self.offsets[i] = self.offsets.get(i, 0) + len(r.text)
            await resp.write(_sse({**self.base(), "choices": [choice]}))
        if r.finish_reason:
            usage.add(r.usage, self.parsed.first_of_prompt(i))
        return 0
