"""The public gRPC service: validates, admits, places prefill and decode, and streams the answer.

``Generate`` runs, in order: :meth:`~SchedulerService._validate` → :meth:`~SchedulerService._claim` →
:meth:`~SchedulerService._admit` (placement by the Conductor, :mod:`scheduler.conductor`) → either
:meth:`~SchedulerService._steer` or :meth:`~SchedulerService._prefill_and_decode` (prefill, then
:meth:`~SchedulerService._stream` the decode worker's tokens) → the final message (:meth:`~SchedulerService._final`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import ray

from smcserve.engine.kv import chain_keys
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.prefill.result import PrefillResult
from smcserve.protos import smcserve_pb2, worker_pb2, worker_pb2_grpc
from smcserve.protos.messages import logprob_message
from smcserve.scheduler.auth import OPEN, ApiKeys, with_secret
from smcserve.scheduler.conductor import (
    CostRecorder,
    DecodeInstance,
    Placement,
    Policy,
    PrefillInstance,
    RequestInfo,
    kv_blocks_needed,
    make_policy,
    place,
)
from smcserve.scheduler.handles import DecodeHandle, PrefillHandle
from smcserve.scheduler.liveness import Liveness, NoWorker
from smcserve.scheduler.metrics import Metrics, RequestMeter, StoreCollector, WorkerCollector
from smcserve.scheduler.steering import SteeringConfig, SteeringRun, validate_steering
from smcserve.scheduler.validate import (
    BadUtf8,
    InvalidRequest,
    Limits,
    ValidationBacklog,
    Validators,
    check_steering_size,
    lenient_deserializer,
    tokenize_request,
    validate_sampling,
)
from smcserve.smc.vocab import get_vocab

log = logging.getLogger(__name__)

PREFILL_ATTEMPTS = 3  # a prefill whose worker dies runs again, on a live worker, this many times in all
DECODE_ATTEMPTS = 4  # a generation whose worker dies mid-stream resumes elsewhere, this many workers in all


def cancel_prefill(pw: PrefillHandle, ref: ray.ObjectRef, ticket: str) -> None:
    """Stop a prefill: Ray drops it while it is queued on the worker; the worker stops it between
    chunks while it runs."""
    ray.cancel(ref)
    pw.actor.cancel.remote(ticket)


def connect_decode(address: str, secret: str = "") -> worker_pb2_grpc.DecodeWorkerStub:
    """A stub of the decode worker at ``address``; every call sends the cluster ``secret``."""
    return worker_pb2_grpc.DecodeWorkerStub(grpc.aio.insecure_channel(address, interceptors=with_secret(secret)))


@dataclass
class Running:
    call: grpc.aio.UnaryStreamCall | None = None
    aborted: bool = False
    cancel_prefill: Callable[[], None] | None = None  # while its prefill runs: stop it (Abort)
    owner: str = OPEN  # the caller's key id: only the same caller may Abort it


def spec_totals(workers) -> tuple[int, list[int], list[int]]:
    """The decode workers' speculative counters together: (steps, accepted per depth, drafted per depth)."""
    steps, accepted, drafted = 0, [], []
    for st in workers:
        steps += st.spec_steps
        for totals, mine in ((accepted, st.spec_accepted), (drafted, st.spec_drafted)):
            totals += [0] * (len(mine) - len(totals))
            for j, v in enumerate(mine):
                totals[j] += v
    return steps, accepted, drafted


@dataclass
class ModelSummary:
    name: str
    fingerprint: str
    dtype: str
    vocab_size: int
    block_size: int
    kv_bytes_per_token: int = 0  # K and V of every layer for one token (0: unknown)
    dtype_reason: str = ""  # why this dtype (--dtype auto: the timings that decided)
    device: str = "cpu"  # where the workers compute
    speculative: str = ""  # --speculative: "mtp" or "" (off)
    num_speculative_tokens: int = 0
    speculative_max_batch: int = 0
    mtp_style: str = ""


class _MeteredContext:
    """A servicer context whose aborts are counted by the request's meter (reason: the status code)."""

    def __init__(self, context, meter: RequestMeter):
        self._context, self._meter = context, meter

    def invocation_metadata(self):
        return self._context.invocation_metadata()

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        self._meter.failed(code.name.lower())
        await self._context.abort(code, details)


def worker_status(err: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a client gets for a decode worker's error: out of KV stays RESOURCE_EXHAUSTED, an
    unreachable worker is UNAVAILABLE, and anything else (the worker rejecting what the scheduler sent,
    or failing) is our bug: INTERNAL, logged here (the worker logged its traceback)."""
    code = err.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return code
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return grpc.StatusCode.UNAVAILABLE
    log.error("decode worker call failed: %s: %s", code.name, err.details())
    return grpc.StatusCode.INTERNAL


def client_error(err: grpc.aio.AioRpcError, what: str) -> tuple[grpc.StatusCode, str]:
    """What the client is told of a decode worker's error (:func:`worker_status`): why it is out of KV,
    else nothing of the worker (which worker, where, what failed inside: that is in the logs)."""
    code = worker_status(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return code, f"{what}: {err.details()}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return code, f"{what}: no decode worker could be reached; try again"
    return code, f"{what} failed: internal error (see the server log)"


def _sampling_proto(p: SamplingParams) -> smcserve_pb2.SamplingParams:
    return smcserve_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_tokens=p.max_tokens,
        stop=p.stop,
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.logprobs >= 0 else None,
        disable_speculation=p.disable_speculation,
    )


@dataclass
class SchedulerService:
    tokenizer: object
    limits: Limits
    model: ModelSummary
    prefill: list[PrefillHandle]
    decode: list[DecodeHandle]
    max_inflight: int = 256
    max_particles: int = 256
    store: KVStore | None = None  # the global prefix cache (None: prefix cache off)
    policy: Policy = field(default_factory=lambda: make_policy("cache_global"))
    cost: CostRecorder = field(default_factory=lambda: CostRecorder(refit_every=4))
    slo_ttft_ms: float = 0.0  # 0: no SLO
    slo_tbt_ms: float = 0.0
    stats_interval_s: float = 2.0  # decode workers' Stats older than this are refreshed (in the background)
    connect: Callable[[str], worker_pb2_grpc.DecodeWorkerStub] = connect_decode  # a decode worker's stub
    liveness: Liveness | None = None  # who is alive (made from the pools and the store when not given)
    api_keys: ApiKeys = field(default_factory=ApiKeys)  # none: the API is open
    _vocab: object = None
    _validators: Validators = field(default_factory=Validators)  # off the event loop
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)  # one encode at a time (Rust borrow)
    _token_texts: dict[int, str] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    _stats_task: asyncio.Task | None = None
    _stats_again: bool = False

    def __post_init__(self) -> None:
        if self.liveness is None:
            self.liveness = Liveness(self.prefill, self.decode, self.connect, self.store)
        self.metrics.add_collector(WorkerCollector(self._worker_reports))
        self.metrics.add_collector(StoreCollector(lambda: (self.liveness.store_state, self.liveness.store_restarts)))

    def _worker_reports(self):
        for w in self.prefill:
            yield w.worker_id, "prefill", None, w.alive, w.restarts
        for w in self.decode:
            yield w.worker_id, "decode", w.last_stats, w.alive, w.restarts

    async def render_metrics(self) -> bytes:
        """The ``/metrics`` body, with every decode worker's report fresh."""
        await self.refresh_decode_stats()
        return self.metrics.render()

    # --- placement (the Conductor) -----------------------------------------------------------------
    async def place(self, prompt_ids: list[int], max_tokens: int) -> Placement:
        """Choose the prefill and decode workers and decide admission from predicted TTFT and TBT."""
        bs = self.model.block_size
        keys = chain_keys(self.model.fingerprint, prompt_ids, bs)
        reusable = keys[: (len(prompt_ids) - 1) // bs] if self.store is not None else []
        store_up = self.liveness.store_state == "ok"  # while it is down every lookup would be a miss anyway
        global_hits = await asyncio.to_thread(self.store.cached_prefix_len, reusable) if reusable and store_up else 0
        req = RequestInfo(reusable, len(prompt_ids), bs, max_tokens)
        prefill = [PrefillInstance(w.worker_id, w.queue_ms, w.local_blocks) for w in self.liveness.alive_prefill()]
        decode = [
            DecodeInstance(w.worker_id, batch=w.active + w.incoming, free_blocks=w.free_blocks())
            for w in self.liveness.alive_decode()
        ]
        if any(time.monotonic() - w.reported_at > self.stats_interval_s for w in self.decode):
            self.refresh_decode_stats_soon()
        return place(
            self.policy,
            req,
            prefill,
            global_hits,
            decode,
            self.cost.model,
            self.slo_ttft_ms or None,
            self.slo_tbt_ms or None,
        )

    def refresh_decode_stats_soon(self) -> None:
        """Refresh the decode workers' KV reports in the background: one refresh at a time, and one more
        after it when asked again meanwhile. Called when a request ends and when the reports are older
        than ``stats_interval_s``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a request closed at shutdown): nothing to refresh for
            return
        self._stats_again = True
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = loop.create_task(self._refresh_stats_loop())

    async def _refresh_stats_loop(self) -> None:
        while self._stats_again:
            self._stats_again = False
            try:
                await self.refresh_decode_stats()
            except Exception:  # a closed channel at shutdown: the reports stay as they were
                log.debug("decode stats refresh failed", exc_info=True)

    async def refresh_decode_stats(self, timeout: float = 5.0) -> list:
        """Ask every decode worker for its ``Stats`` and keep its KV report (a worker that does not answer
        keeps its last one); its KV-store loads since the last report go to the cost model. Returns the
        answers, an exception where a worker failed (or is not alive); an unreachable one is lost."""
        workers = self.liveness.alive_decode()
        answers = await asyncio.gather(
            *(w.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout) for w in workers), return_exceptions=True
        )
        stats = dict(zip(workers, answers))
        for w, st in stats.items():
            if isinstance(st, grpc.aio.AioRpcError) and st.code() == grpc.StatusCode.UNAVAILABLE:
                self.liveness.lost(w, "Stats unanswered")
            elif not isinstance(st, BaseException) and (load := w.report(st)) is not None:
                self.cost.add_load(*load)
        return [stats.get(w, LookupError("not alive")) for w in self.decode]

    async def _prefill(
        self, placement: Placement, token_ids: list[int], params: SamplingParams, context, run: Running
    ) -> PrefillResult | None:
        """Run the prefill on the chosen worker; feed its measured times to the cost model and take its
        report of its own prefix cache. A worker that dies meanwhile is lost and the prefill runs again
        on a live one (the least queued; the restarted one when it is the only one), up to
        ``PREFILL_ATTEMPTS`` times. The client leaving (this task cancelled) or an Abort (then None is
        returned) stops the prefill: dropped while queued, stopped between chunks while running."""
        pw = next(w for w in self.prefill if w.worker_id == placement.prefill.instance.id)
        cached = placement.prefill.cached_tokens
        predicted = self.cost.model.prefill_ms(len(token_ids) - cached, cached)
        pre = None
        for attempt in range(PREFILL_ATTEMPTS):
            if attempt:
                try:
                    pw = min(await self.liveness.wait_for(self.liveness.alive_prefill), key=lambda w: w.queue_ms)
                except NoWorker:
                    break
                log.info("prefill of a request retried on %s", pw.worker_id)
            pw.queued += 1
            pw.queue_ms += predicted
            ticket = uuid.uuid4().hex
            ref = pw.actor.prefill.remote(token_ids, params, ticket)
            run.cancel_prefill = functools.partial(cancel_prefill, pw, ref, ticket)
            try:
                pre = await ref
                if pre is None:  # stopped by an Abort
                    return None
                break
            except asyncio.CancelledError:  # the client left: stop the work
                cancel_prefill(pw, ref, ticket)
                raise
            except ray.exceptions.TaskCancelledError:  # dropped from the worker's queue by an Abort
                return None
            except ray.exceptions.RayTaskError:  # prefill raised: our bug (the request was validated)
                log.exception("prefill worker %s failed", pw.worker_id)
                await context.abort(grpc.StatusCode.INTERNAL, "prefill failed (see the server log)")
            except ray.exceptions.RayActorError as err:  # the worker died (Ray restarts it)
                self.liveness.lost(pw, type(err).__name__)
            finally:
                run.cancel_prefill = None
                pw.queued -= 1
                pw.served += 1
                pw.queue_ms = max(0.0, pw.queue_ms - predicted)
        if pre is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no prefill worker is available; try again")
        self.cost.add_prefill(pre.prompt_tokens - pre.cached_tokens, pre.cached_tokens, pre.compute_ms)
        if pre.loaded_blocks:
            self.cost.add_load(pre.loaded_blocks, pre.load_ms)
        pw.report(pre)
        return pre

    # --- RPCs --------------------------------------------------------------------------------------
    async def Generate(self, request, context: grpc.aio.ServicerContext):
        """Client mistakes are INVALID_ARGUMENT (raised where they are found); anything unexpected here
        is our bug: INTERNAL, with the traceback in the server log. Every response passes the request's
        meter (``/metrics``)."""
        meter = RequestMeter(self.metrics)
        context = _MeteredContext(context, meter)
        try:
            async with contextlib.aclosing(self._generate(request, context, meter)) as responses:
                async for response in responses:
                    if response.token_ids or response.HasField("progress"):
                        meter.tokens(len(response.token_ids) or 1)
                    if response.finish_reason:
                        meter.finished(response.finish_reason, response.usage)
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("request %s failed", getattr(request, "request_id", "") or "(unnamed)")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        finally:
            meter.close()

    async def _generate(self, request, context: grpc.aio.ServicerContext, meter: RequestMeter):
        """validate → claim an id and a slot → admit and place → (steer | prefill → decode stream), each
        ending with its final message."""
        t0 = time.perf_counter()
        caller = await self._authenticate(context)
        prompt_ids, params, steering = await self._validate(request, context)
        request_id, run = await self._claim(request, context)
        run.owner = caller
        try:
            placement = await self._admit(prompt_ids, params, context)
            meter.admitted()
            if steering is not None:
                responses = self._steer(request_id, prompt_ids, params, steering, context, t0, run, placement)
            else:
                responses = self._prefill_and_decode(request_id, prompt_ids, params, placement, context, t0, run)
            async with contextlib.aclosing(responses) as stream:
                async for response in stream:
                    yield response
        finally:
            if run.call is not None:
                run.call.cancel()  # no-op when finished; otherwise the worker frees the KV
            self.running.pop(request_id, None)
            self.refresh_decode_stats_soon()  # the KV it held is free again: place the next ones on fresh numbers

    async def _authenticate(self, context) -> str:
        """The caller's key id (:class:`scheduler.auth.ApiKeys`); UNAUTHENTICATED without a valid key."""
        if not self.api_keys.keys:
            return OPEN
        caller = self.api_keys.caller(context.invocation_metadata())
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer)")
        return caller

    async def _validate(self, request, context) -> tuple[list[int], SamplingParams, SteeringConfig | None]:
        """Prompt token ids, sampling parameters and the steering configuration (None: plain generation);
        INVALID_ARGUMENT for bad UTF-8 or an invalid request."""
        if isinstance(request, BadUtf8):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: invalid UTF-8")
        try:  # sizes first, here; the work off the event loop: a big request must not stall the others
            check_steering_size(request)
            return await asyncio.wrap_future(self._validators.submit(request, self._validate_now))
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except ValidationBacklog as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))

    def _validate_now(self, request) -> tuple[list[int], SamplingParams, SteeringConfig | None]:
        """Tokenise and check; build the potentials once (grammars compiled, tables made) to validate
        them. Every size is bounded before the work (``Limits``, ``smc.potentials.spec``). In a
        ``_validators`` thread."""
        with self._tokenizer_lock:
            prompt_ids = tokenize_request(request, self.tokenizer, self.limits)
        params = validate_sampling(request.sampling, self.limits, len(prompt_ids))
        steering = None
        if request.HasField("steering"):
            if params.logprobs >= 0:
                raise InvalidRequest("sampling.logprobs: not available with steering (see the particles' weights)")
            steering = validate_steering(
                request.steering,
                params,
                self.steering_vocab(),
                self.max_particles,
                lambda text: self._tokenize_like(request, text),
            )
        return prompt_ids, params, steering

    async def _claim(self, request, context) -> tuple[str, Running]:
        """The request's id (a fresh one when unset), registered as running: ALREADY_EXISTS when a request
        with that id is running, RESOURCE_EXHAUSTED when ``max_inflight`` requests are. Check and
        registration happen with no await between them, so two requests with one id, or one request past
        the limit, cannot both get through while an earlier one is still being admitted."""
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already running")
        if len(self.running) >= self.max_inflight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {len(self.running)} requests in flight (limit {self.max_inflight})",
            )
        run = self.running[request_id] = Running()
        return request_id, run

    async def _admit(self, prompt_ids: list[int], params: SamplingParams, context) -> Placement:
        """The Conductor's placement; RESOURCE_EXHAUSTED when it rejects the request (no decode room, or a
        predicted SLO miss)."""
        try:  # a pool with no live worker (all restarting): wait for one, a while
            await self.liveness.wait_for(self.liveness.alive_prefill)
            await self.liveness.wait_for(self.liveness.alive_decode)
        except NoWorker:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is available; try again")
        placement = await self.place(prompt_ids, params.max_tokens)
        if not placement.admitted:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rejected at admission: {placement.reject_reason}")
        return placement

    async def _prefill_and_decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        placement: Placement,
        context,
        t0: float,
        run: Running,
    ):
        """Prefill on the chosen worker, then stream the decode. From placement to the end the chosen
        decode worker counts the request: as incoming load during prefill, and its KV blocks as reserved.
        An Abort during prefill ends with an "abort" final message."""
        dw = next(w for w in self.decode if w.worker_id == placement.decode.id)
        need = kv_blocks_needed(RequestInfo((), len(prompt_ids), self.model.block_size, params.max_tokens))
        dw.reserved_blocks += need
        try:
            dw.incoming += 1
            try:
                pre = await self._prefill(placement, prompt_ids, params, context, run)
            finally:
                dw.incoming -= 1
            usage = smcserve_pb2.Usage(prompt_tokens=len(prompt_ids))
            if pre is not None:
                usage.cached_prompt_tokens = pre.cached_tokens
            if run.aborted or pre is None:
                yield self._final(request_id, "abort", usage, t0)
                return
            decode_request = worker_pb2.DecodeRequest(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                block_keys=pre.block_keys,
                first_token=pre.first_token,
                sampling=_sampling_proto(params),
            )
            if pre.first_logprob is not None:
                decode_request.first_logprob.CopyFrom(logprob_message(pre.first_logprob))
            async with contextlib.aclosing(self._stream(decode_request, dw, run, usage, context, t0)) as responses:
                async for response in responses:
                    yield response
        finally:
            dw.reserved_blocks -= need

    async def _stream(
        self,
        decode_request: worker_pb2.DecodeRequest,
        dw: DecodeHandle,
        run: Running,
        usage: smcserve_pb2.Usage,
        context,
        t0: float,
    ):
        """The decode worker's events as responses, measuring TTFT and feeding the time between tokens to
        the cost model; the finishing event becomes the final message. An Abort ends with an "abort"
        final message; a decode worker's error becomes :func:`worker_status`'s code."""
        request_id = decode_request.request_id
        try:
            last = None
            async with contextlib.aclosing(self._decode(decode_request, run, dw)) as events:
                async for ev in events:
                    now = time.perf_counter()
                    if not usage.ttft_ms and ev.token_ids:
                        usage.ttft_ms = (now - t0) * 1e3
                    elif last is not None:
                        self.cost.add_tbt(dw.active, (now - last) * 1e3)
                    last = now
                    usage.completion_tokens = ev.completion_tokens
                    if not ev.finish_reason:
                        yield smcserve_pb2.GenerateResponse(
                            request_id=request_id, text=ev.text, token_ids=ev.token_ids, logprobs=ev.logprobs
                        )
                        continue
                    final = self._final(request_id, ev.finish_reason, usage, t0)
                    final.text, final.token_ids[:] = ev.text, ev.token_ids
                    final.logprobs.extend(ev.logprobs)
                    yield final
                    return
        except asyncio.CancelledError:
            if not run.aborted:
                raise  # the client went away: _generate's finally cancels the worker's stream
            yield self._final(request_id, "abort", usage, t0)
        except grpc.aio.AioRpcError as err:
            await context.abort(*client_error(err, "decode"))

    async def _decode(self, request: worker_pb2.DecodeRequest, run: Running, preferred: DecodeHandle):
        """Stream the request from the chosen decode worker, or the least loaded other one that can take
        it: a worker that is full, or unreachable, before it streamed anything passes it on. A worker that
        dies mid-stream is lost and the generation resumes on a live one from the tokens and text already
        streamed (``resume_token_ids``; its KV from the store where present, else recomputed; seeded
        sampling draws by position, so the continuation is the one the dead worker would have made):
        the client sees one stream."""
        generated: list[int] = []
        chars = 0
        tried: set[DecodeHandle] = set()
        dw: DecodeHandle | None = preferred
        err: grpc.aio.AioRpcError | None = None
        for _ in range(DECODE_ATTEMPTS + len(self.decode)):
            if dw is None:  # every live worker was tried: one that came back (or a restart) may take it
                try:
                    live = await self.liveness.wait_for(self.liveness.alive_decode)
                except NoWorker:
                    break
                dw = min(live, key=lambda w: w.active)
            tried.add(dw)
            if generated:
                request = self._resume_request(request, generated, chars)
            run.call = dw.stub.Decode(request)
            dw.active += 1
            streamed = False
            try:
                ev = await run.call.read()
                while ev is not grpc.aio.EOF:
                    streamed = True
                    generated += ev.token_ids
                    chars += len(ev.text)
                    yield ev
                    ev = await run.call.read()
                return
            except grpc.aio.AioRpcError as e:
                err, code = e, e.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.liveness.lost(dw, "Decode stream broke")
                elif streamed or code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS):
                    raise  # out of KV mid-stream, or the worker failed: not a worker to replace
            finally:
                dw.active -= 1
            if run.aborted:
                break
            untried = [w for w in self.liveness.alive_decode() if w not in tried]
            dw = min(untried, key=lambda w: w.active) if untried else None
            if dw is None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not generated:
                break  # every worker is full
        if err is not None and not run.aborted:
            raise err

    def _resume_request(self, request: worker_pb2.DecodeRequest, generated: list[int], chars: int):
        """``request`` continued after ``generated`` (its first ``chars`` characters of text sent)."""
        resumed = worker_pb2.DecodeRequest()
        resumed.CopyFrom(request)
        prompt = list(request.prompt_token_ids)
        resumed.block_keys[:] = chain_keys(self.model.fingerprint, prompt + generated[:-1], self.model.block_size)
        resumed.resume_token_ids[:] = generated
        resumed.resume_text_chars = chars
        return resumed

    def _tokenize_like(self, request, text: str) -> list[int]:
        """Token ids of ``text`` in the same form as the request's input (a chat user message, or raw)."""
        like = smcserve_pb2.GenerateRequest(model=request.model)
        if request.WhichOneof("input") == "chat":
            like.chat.messages.add(role="user", content=text)
        else:
            like.prompt = text
        with self._tokenizer_lock:
            return tokenize_request(like, self.tokenizer, self.limits)

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs show it (cached; the tokenizer is shared with the validators)."""
        text = self._token_texts.get(token_id)
        if text is None:
            with self._tokenizer_lock:
                text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def steering_vocab(self):
        if self._vocab is None:
            with self._tokenizer_lock:  # built once, by one validating thread
                if self._vocab is None:
                    eos = [self.tokenizer.eos_token_id]
                    self._vocab = get_vocab(self.tokenizer, size=self.model.vocab_size, eos_ids=eos)
        return self._vocab

    async def _steer(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        cfg: SteeringConfig,
        context,
        t0: float,
        running: Running,
        placement: Placement,
    ):
        """SMC steering: prefill the prompt into the store, then drive the particles step by step."""
        usage = smcserve_pb2.Usage(prompt_tokens=len(prompt_ids))
        keys = chain_keys(self.model.fingerprint, prompt_ids[:-1], self.model.block_size)
        if len(prompt_ids) > 1:  # the workers compute the last prompt token: its logits start every particle
            pre = await self._prefill(placement, prompt_ids[:-1], params, context, running)
            if pre is None:  # aborted during the prefill
                yield self._final(request_id, "abort", usage, t0)
                return
            keys, usage.cached_prompt_tokens = pre.block_keys, pre.cached_tokens
        # the potentials' companion prompts' KV goes to the store too (workers recompute whatever is missing)
        await asyncio.gather(
            *(
                min(self.liveness.alive_prefill() or self.prefill, key=lambda w: w.queue_ms).actor.prefill.remote(
                    ids[:-1], params
                )
                for ids in cfg.prompts
                if len(ids) > 1
            ),
            return_exceptions=True,
        )
        steer = SteeringRun(
            request_id, prompt_ids, params, cfg, self.liveness.alive_decode(), self.tokenizer, self.liveness
        )
        try:
            pop = await steer.open(keys)
            while not pop.finished.all() and steer.status == "ok" and not running.aborted:
                migrated = steer.migrated_tokens, steer.migrated_particles
                before = steer.compute_s, steer.sync_s, steer.patches, steer.patch_tokens
                resampled = await steer.step(pop)
                if not usage.ttft_ms:
                    usage.ttft_ms = (time.perf_counter() - t0) * 1e3
                progress = steer.progress(pop, resampled)
                m = self.metrics
                m.smc_steps.inc()
                if resampled:
                    m.smc_resamples.inc()
                    if steer.ess_ratio == steer.ess_ratio:  # not NaN
                        m.smc_ess.observe(steer.ess_ratio)
                m.smc_migrated.inc(steer.migrated_particles - migrated[1])
                m.smc_migrated_bytes.inc((steer.migrated_tokens - migrated[0]) * self.model.kv_bytes_per_token)
                m.smc_step_seconds.labels("compute").inc(steer.compute_s - before[0])
                m.smc_step_seconds.labels("sync").inc(steer.sync_s - before[1])
                m.smc_patches.inc(steer.patches - before[2])
                m.smc_patch_tokens.inc(steer.patch_tokens - before[3])
                yield smcserve_pb2.GenerateResponse(request_id=request_id, progress=progress)
            usage.completion_tokens = sum(len(t) for t in pop.tokens)
            self.metrics.smc_token_positions.inc(max((len(t) for t in pop.tokens), default=0))
            final = self._final(request_id, "abort" if running.aborted else "stop", usage, t0)
            final.result.CopyFrom(steer.result(pop))
            yield final
        except grpc.aio.AioRpcError as err:
            await context.abort(*client_error(err, "steering"))
        finally:  # shielded: a cancelled request (the client gone) still frees its particles everywhere
            await asyncio.shield(steer.close())

    def _final(self, request_id: str, reason: str, usage: smcserve_pb2.Usage, t0: float):
        usage.e2e_ms = (time.perf_counter() - t0) * 1e3
        return smcserve_pb2.GenerateResponse(request_id=request_id, finish_reason=reason, usage=usage)

    async def Abort(self, request, context):
        caller = await self._authenticate(context)
        if isinstance(request, BadUtf8):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: invalid UTF-8")
        run = self.running.get(request.request_id)
        if run is None or run.owner != caller:  # another caller's request is not found either
            return smcserve_pb2.AbortResponse(found=False)
        run.aborted = True
        if run.call is not None:
            run.call.cancel()
        if run.cancel_prefill is not None:
            run.cancel_prefill()
        return smcserve_pb2.AbortResponse(found=True)

    async def GetModelInfo(self, request, context):
        await self._authenticate(context)
        decode = await self.refresh_decode_stats(timeout=10)
        info = smcserve_pb2.ModelInfo(
            model=self.model.name,
            fingerprint=self.model.fingerprint,
            dtype=self.model.dtype,
            vocab_size=self.model.vocab_size,
            max_context=self.limits.max_context,
            block_size=self.model.block_size,
            max_tokens_limit=self.limits.max_tokens_limit,
            kv_store=self.liveness.store_state,
            kv_store_restarts=self.liveness.store_restarts,
            dtype_reason=self.model.dtype_reason,
            device=self.model.device,
            speculative=self.model.speculative,
            num_speculative_tokens=self.model.num_speculative_tokens,
            speculative_max_batch=self.model.speculative_max_batch,
            mtp_style=self.model.mtp_style,
        )
        own = await asyncio.gather(  # the workers' own counts (answered from a thread of their own)
            *(asyncio.wait_for(w.actor.stats.remote(), 10) for w in self.prefill), return_exceptions=True
        )
        for w, st in zip(self.prefill, own):
            info.prefill_workers.add(
                worker_id=w.worker_id,
                role="prefill",
                node_id=w.node_id,
                queue_length=w.queued,
                requests_served=w.served,
                alive=w.alive,
                restarts=w.restarts,
                prompt_tokens_computed=0 if isinstance(st, BaseException) else st.tokens_computed,
            )
        for w, st in zip(self.decode, decode):
            if isinstance(st, BaseException):
                info.decode_workers.add(worker_id=w.worker_id, role="decode", address=w.address)
            else:
                info.decode_workers.append(st)
            info.decode_workers[-1].alive, info.decode_workers[-1].restarts = w.alive, w.restarts
        if self.model.speculative:
            steps, accepted, drafted = spec_totals(info.decode_workers)
            info.mean_accepted_length = 1.0 + sum(accepted) / steps if steps else 1.0
            info.acceptance_per_depth.extend(a / d if d else 0.0 for a, d in zip(accepted, drafted))
        return info

    def handlers(self) -> grpc.GenericRpcHandler:
        """RPC handlers whose deserializers report bad UTF-8 as INVALID_ARGUMENT rather than a transport error."""
        pb = smcserve_pb2
        return grpc.method_handlers_generic_handler(
            "smcserve.v1.SmcServe",
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.Generate,
                    request_deserializer=lenient_deserializer(pb.GenerateRequest),
                    response_serializer=pb.GenerateResponse.SerializeToString,
                ),
                "Abort": grpc.unary_unary_rpc_method_handler(
                    self.Abort,
                    request_deserializer=lenient_deserializer(pb.AbortRequest),
                    response_serializer=pb.AbortResponse.SerializeToString,
                ),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo,
                    request_deserializer=pb.ModelInfoRequest.FromString,
                    response_serializer=pb.ModelInfo.SerializeToString,
                ),
            },
        )
