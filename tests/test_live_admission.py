"""The live scheduler's Generate steps (validate → claim → admit/place → prefill → decode stream → final)
with fake workers, and decode admission on the free KV blocks the decode workers report. No Ray, no
model, no server: fast."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import grpc
import pytest
import ray

from smcserve.engine.kv import chain_keys
from smcserve.prefill.result import PrefillResult
from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos import worker_pb2
from smcserve.scheduler.conductor import CostRecorder, make_policy
from smcserve.scheduler.server import DecodeHandle, ModelSummary, PrefillHandle, SchedulerService
from smcserve.scheduler.validate import Limits

BS = 4


class WordTokenizer:
    """One token per word."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + i for i, _ in enumerate(text.split())]


class FakePrefill:
    def __init__(self):
        self.calls = 0
        self.prefill = SimpleNamespace(remote=self._prefill)
        self.cancelled: list[str] = []  # tickets the scheduler asked to stop
        self.cancel = SimpleNamespace(remote=self.cancelled.append)

    async def _prefill(self, token_ids, params, ticket=""):
        self.calls += 1
        return PrefillResult(7, [], prompt_tokens=len(token_ids), cached_tokens=0, compute_ms=1.0)


class FakeCall:
    def __init__(self, events, error=None):
        self.events, self.error, self.cancelled = list(events), error, False

    async def read(self):
        if self.events:
            return self.events.pop(0)
        if self.error is not None:
            raise self.error
        return grpc.aio.EOF

    def cancel(self):
        self.cancelled = True


class FakeDecodeStub:
    def __init__(self, total=0, in_use=0, events=(), error=None):
        self.total, self.in_use, self.events, self.error = total, in_use, list(events), error
        self.loaded, self.load_ms = 0, 0.0  # cumulative KV-store loads
        self.decodes: list = []
        self.stats_calls = 0

    def Decode(self, request):
        call = FakeCall(self.events, self.error)
        self.decodes.append((request, call))
        return call

    async def Stats(self, request, timeout=None):
        self.stats_calls += 1
        loads = {"kv_blocks_loaded": self.loaded, "kv_load_ms": self.load_ms} if self.loaded else {}
        return pb.WorkerStats(role="decode", kv_blocks_total=self.total, kv_blocks_in_use=self.in_use, **loads)


class FakeContext:
    code = details = None

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


class FakeDecodeActor:
    """A decode worker's actor as the scheduler's liveness sees it: after a loss it answers its address."""

    def __init__(self, address):
        self.address_of = SimpleNamespace(remote=lambda: asyncio.sleep(0, address))


def service(*stubs: FakeDecodeStub, policy="cache_global") -> SchedulerService:
    return SchedulerService(
        tokenizer=WordTokenizer(),
        limits=Limits(max_context=4096, max_tokens_limit=1000, model_name="m"),
        model=ModelSummary("m", "fp", "float32", 100, BS),
        prefill=[PrefillHandle("prefill-0", FakePrefill())],
        decode=[DecodeHandle(f"decode-{i}", FakeDecodeActor(f"addr-{i}"), f"addr-{i}", s) for i, s in enumerate(stubs)],
        policy=make_policy(policy),
        connect=lambda address: stubs[int(address.split("-")[1])],
    )


def request(words=8, max_tokens=8, request_id="r") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        prompt=" ".join(["w"] * words),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def generate(svc, req):
    ctx, out = FakeContext(), []
    try:
        async for r in svc.Generate(req, ctx):
            out.append(r)
    except grpc.aio.AbortError:
        pass
    return out, ctx


def events(n):
    evs = [worker_pb2.DecodeEvent(token_ids=[10 + i], text=f"t{i}", completion_tokens=i + 1) for i in range(n)]
    evs[-1].finish_reason = "length"
    return evs


# --- free blocks of a decode worker ------------------------------------------------------------------
def test_free_blocks_from_reports_and_reservations():
    h = DecodeHandle("d", None, "a", None)
    assert h.free_blocks() == 1 << 30  # no report yet: no limit (as before reports)
    h.report(pb.WorkerStats(kv_blocks_total=100, kv_blocks_in_use=30))
    assert h.free_blocks() == 70  # 30 held by others (e.g. SMC particles)
    h.reserved_blocks = 20  # a request placed since: its blocks count now
    assert h.free_blocks() == 50
    h.report(pb.WorkerStats(kv_blocks_total=100, kv_blocks_in_use=40))  # it holds 10 of its 20 so far
    assert h.free_blocks() == 100 - 20 - 20
    h.reserved_blocks = 0  # it finished: its blocks are free at once
    assert h.free_blocks() == 80


# --- admission on reported free blocks, through the live scheduler's placement ----------------------
@pytest.mark.parametrize("policy", ["cache_global", "load", "round_robin"])
def test_reported_free_blocks_steer_decode_placement_and_reject_when_none_has_room(policy):
    async def main():
        full, roomy = FakeDecodeStub(total=20, in_use=18), FakeDecodeStub(total=20, in_use=0)
        svc = service(full, roomy, policy=policy)
        await svc.refresh_decode_stats()
        # 8 prompt + 8 max tokens = 4 blocks of 4: only decode-1 has room
        placement = await svc.place(list(range(8)), 8)
        assert placement.admitted and placement.decode.id == "decode-1"
        roomy.in_use = 19
        await svc.refresh_decode_stats()
        placement = await svc.place(list(range(8)), 8)
        assert not placement.admitted and placement.decode is None
        assert placement.reject_reason == "decode: no instance has 4 free KV blocks"

    asyncio.run(main())


def test_generate_is_rejected_at_admission_when_no_decode_worker_has_room():
    async def main():
        stub = FakeDecodeStub(total=10, in_use=0, events=events(2))
        svc = service(stub)
        await svc.refresh_decode_stats()
        out, ctx = await generate(svc, request(words=8, max_tokens=40))  # 12 blocks > 10
        assert out == [] and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ctx.details == "rejected at admission: decode: no instance has 12 free KV blocks"
        assert stub.decodes == [] and svc.prefill[0].actor.calls == 0 and not svc.running
        out, ctx = await generate(svc, request(words=8, max_tokens=8))  # 4 blocks fit
        assert ctx.code is None and out[-1].finish_reason == "length"

    asyncio.run(main())


def test_a_request_in_flight_holds_its_blocks_until_it_ends():
    async def main():
        stub = FakeDecodeStub(total=10, in_use=0, events=events(2))
        svc = service(stub)
        await svc.refresh_decode_stats()
        gen = svc.Generate(request(words=8, max_tokens=16, request_id="first"), FakeContext())  # 6 blocks
        first = await gen.__anext__()  # streaming: its blocks are reserved
        assert first.token_ids == [10] and svc.decode[0].reserved_blocks == 6
        out, ctx = await generate(svc, request(words=8, max_tokens=16, request_id="second"))
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no instance has 6 free KV blocks" in ctx.details
        rest = [r async for r in gen]
        assert rest[-1].finish_reason == "length" and svc.decode[0].reserved_blocks == 0
        before = stub.stats_calls
        await asyncio.sleep(0)  # the refresh a finished request asks for
        await svc._stats_task
        assert stub.stats_calls > before

    asyncio.run(main())


# --- the cost model's KV-load term, from the decode workers' reports -----------------------------------
def test_the_load_term_is_fitted_from_the_kv_loads_the_decode_workers_report():
    async def main():
        stubs = FakeDecodeStub(total=100), FakeDecodeStub(total=100)
        svc = service(*stubs)
        svc.cost = CostRecorder(refit_every=1)
        default = svc.cost.model.d
        await svc.refresh_decode_stats()  # nothing loaded yet: no sample
        assert not svc.cost.load
        stubs[0].loaded, stubs[0].load_ms = 10, 30.0
        stubs[1].loaded, stubs[1].load_ms = 4, 12.0
        await svc.refresh_decode_stats()
        stubs[0].loaded, stubs[0].load_ms = 30, 90.0  # 20 more blocks in 60 ms
        await svc.refresh_decode_stats()
        assert list(svc.cost.load) == [(10.0, 30.0), (4.0, 12.0), (20.0, 60.0)]  # the deltas of the counters
        assert svc.cost.model.d == pytest.approx(3.0) != default
        stubs[1].loaded, stubs[1].load_ms = 2, 8.0  # counters that went back: a restarted worker
        await svc.refresh_decode_stats()
        assert svc.cost.load[-1] == (2.0, 8.0)

    asyncio.run(main())


# --- the Generate steps, each error where it was --------------------------------------------------------
def test_generate_streams_tokens_then_the_final_message():
    async def main():
        stub = FakeDecodeStub(events=events(3))
        svc = service(stub)
        out, ctx = await generate(svc, request(words=5, max_tokens=3))
        assert ctx.code is None
        assert [r.token_ids[:] for r in out] == [[10], [11], [12]] and [r.text for r in out] == ["t0", "t1", "t2"]
        final = out[-1]
        assert final.finish_reason == "length" and final.usage.prompt_tokens == 5
        assert final.usage.completion_tokens == 3 and final.usage.ttft_ms > 0 and final.usage.e2e_ms > 0
        ((decode_request, call),) = stub.decodes
        assert decode_request.first_token == 7 and list(decode_request.prompt_token_ids) == [1, 2, 3, 4, 5]
        assert call.cancelled and not svc.running and svc.decode[0].active == svc.decode[0].incoming == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    "req, code, details",
    [
        (
            pb.GenerateRequest(prompt="", sampling=pb.SamplingParams(max_tokens=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt: must not be empty",
        ),
        (
            pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens: must be > 0, got 0",
        ),
    ],
)
def test_invalid_requests_are_invalid_argument(req, code, details):
    out, ctx = asyncio.run(generate(service(FakeDecodeStub(events=events(1))), req))
    assert out == [] and ctx.code == code and ctx.details == details


def test_duplicate_id_and_server_busy():
    async def main():
        svc = service(FakeDecodeStub(events=events(1)))
        svc.running["dup"] = object()
        _, ctx = await generate(svc, request(request_id="dup"))
        assert ctx.code == grpc.StatusCode.ALREADY_EXISTS and ctx.details == "request_id: 'dup' is already running"
        svc.max_inflight = 1
        _, ctx = await generate(svc, request(request_id="other"))
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ctx.details == "server busy: 1 requests in flight (limit 1)"

    asyncio.run(main())


def test_a_duplicate_id_is_refused_while_the_first_is_still_being_admitted():
    """The first request with an id is held inside placement; a second with the same id arrives then and
    gets ALREADY_EXISTS (it used to pass the check too, as the id was registered only after placement:
    both ran, one hung), and the in-flight limit counts the held one."""

    async def main():
        svc = service(FakeDecodeStub(events=events(1)))
        held, release = asyncio.Event(), asyncio.Event()
        place = svc.place

        async def held_place(prompt_ids, max_tokens):
            if not held.is_set():  # only the first request waits: a second one placed would run through
                held.set()
                await release.wait()
            return await place(prompt_ids, max_tokens)

        svc.place = held_place
        first = asyncio.create_task(generate(svc, request(request_id="dup")))
        await held.wait()
        out, ctx = await generate(svc, request(request_id="dup"))
        assert out == [] and ctx.code == grpc.StatusCode.ALREADY_EXISTS
        svc.max_inflight = 1
        _, ctx = await generate(svc, request(request_id="other"))
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        out, ctx = await first
        assert ctx.code is None and out[-1].finish_reason == "length"
        assert svc.running == {}

    asyncio.run(main())


def _rpc_error(code):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom")


@pytest.mark.parametrize(
    "code, expected, details",
    [  # out of KV says why; our own bug says nothing of the worker
        (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED, "decode: boom"),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.INTERNAL,
            "decode failed: internal error (see the server log)",
        ),
    ],
)
def test_a_decode_worker_error_after_the_first_token_maps_through_worker_status(code, expected, details):
    async def main():
        first = worker_pb2.DecodeEvent(token_ids=[10], text="t0", completion_tokens=1)
        svc = service(FakeDecodeStub(events=[first], error=_rpc_error(code)), FakeDecodeStub(events=events(1)))
        out, ctx = await generate(svc, request())
        assert [r.token_ids[:] for r in out] == [[10]]  # streamed once: never passed on
        assert ctx.code == expected and ctx.details == details
        assert svc.decode[1].stub.decodes == [] and not svc.running and svc.decode[0].reserved_blocks == 0

    asyncio.run(main())


def test_a_worker_lost_mid_stream_is_resumed_on_another_from_what_was_streamed():
    async def main():
        first = worker_pb2.DecodeEvent(token_ids=[10], text="t0", completion_tokens=1)
        rest = events(3)[1:]
        svc = service(
            FakeDecodeStub(events=[first], error=_rpc_error(grpc.StatusCode.UNAVAILABLE)), FakeDecodeStub(events=rest)
        )
        out, ctx = await generate(svc, request())
        assert ctx.code is None and [r.token_ids[:] for r in out] == [[10], [11], [12]]
        assert "".join(r.text for r in out) == "t0t1t2" and out[-1].finish_reason == "length"
        ((resumed, _),) = svc.decode[1].stub.decodes
        assert resumed.resume_token_ids == [10] and resumed.resume_text_chars == 2
        assert resumed.first_token == 7 and list(resumed.prompt_token_ids) == list(range(1, 9))
        # KV to load: the prompt and the resumed tokens but the last (fed next)
        assert resumed.block_keys == chain_keys("fp", list(range(1, 9)), BS)
        assert not svc.decode[0].alive  # lost: out of placement until it rejoins
        await asyncio.sleep(0.05)
        assert svc.decode[0].alive and svc.decode[0].restarts == 1  # its actor answered again

    asyncio.run(main())


def test_a_full_worker_passes_the_request_on_before_its_first_token():
    async def main():
        svc = service(
            FakeDecodeStub(error=_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)), FakeDecodeStub(events=events(2))
        )
        out, ctx = await generate(svc, request())
        assert ctx.code is None and out[-1].finish_reason == "length"
        assert len(svc.decode[0].stub.decodes) == len(svc.decode[1].stub.decodes) == 1

    asyncio.run(main())


def test_an_abort_during_prefill_stops_it_and_ends_with_an_abort_message(monkeypatch):
    dropped = []
    monkeypatch.setattr(ray, "cancel", dropped.append)  # Ray's drop from the worker's queue

    async def main():
        svc = service(FakeDecodeStub(events=events(2)))
        actor = svc.prefill[0].actor
        tickets = []

        async def prefill_then_abort(token_ids, params, ticket):
            tickets.append(ticket)
            await svc.Abort(pb.AbortRequest(request_id="r"), None)
            return await FakePrefill._prefill(actor, token_ids, params)

        actor.prefill = SimpleNamespace(remote=prefill_then_abort)
        out, ctx = await generate(svc, request(request_id="r"))
        assert ctx.code is None and [r.finish_reason for r in out] == ["abort"]
        assert svc.decode[0].stub.decodes == [] and not svc.running
        assert actor.cancelled == tickets and len(dropped) == 1  # the worker was told to stop it
        assert svc.prefill[0].queued == 0

    asyncio.run(main())


# --- validation off the event loop: the steering backlog ----------------------------------------------
HANG_GUARD_S = 60  # only ends a test that would otherwise hang; the right behaviour answers at once


def steering_request(i: int) -> pb.GenerateRequest:
    phrases = [f"phrase {i} {j}" for j in range(200)]
    req = request(request_id=f"steer-{i}")
    req.steering.particles = 1
    req.steering.potentials.add().banned_phrases.phrases.extend(phrases)
    return req


def test_a_flood_of_steering_validation_is_refused_and_a_plain_request_does_not_wait_behind_it():
    """Steering validations are held (explicitly) in their threads: the backlog admits requests while
    their bytes fit (the first always), refuses the rest at once with RESOURCE_EXHAUSTED naming
    ``steering``, and a plain request runs to its end meanwhile, validated in a thread of its own. Once
    released, the held requests finish and their bytes leave the backlog."""
    from smcserve.scheduler.validate import InvalidRequest, Validators

    async def main():
        svc = service(FakeDecodeStub(events=events(2)))
        size = steering_request(0).steering.ByteSize()
        svc._validators = Validators(backlog_bytes=3 * size + size // 2)  # three fit, a fourth does not
        release, entered = threading.Event(), threading.Semaphore(0)
        validate_now = svc._validate_now

        def held(req):
            if not req.HasField("steering"):
                return validate_now(req)
            entered.release()
            release.wait()
            raise InvalidRequest("steering.potentials: held by the test, then refused")

        svc._validate_now = held
        try:
            admitted = []
            for i in range(3):
                admitted.append(asyncio.create_task(generate(svc, steering_request(i))))
                await asyncio.to_thread(entered.acquire)  # it is in its validation thread, held there
            for i in range(3, 5):
                # refused at once (were it queued, it would wait for the release: the guard ends the test)
                out, ctx = await asyncio.wait_for(generate(svc, steering_request(i)), HANG_GUARD_S)
                assert out == [] and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED, ctx.details
                assert ctx.details.startswith("steering: ")
            out, ctx = await asyncio.wait_for(generate(svc, request(request_id="plain")), HANG_GUARD_S)  # all held
            assert ctx.code is None and out[-1].finish_reason == "length"
            assert not any(t.done() for t in admitted)
            release.set()
            for task in admitted:
                out, ctx = await task
                assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "held by the test" in ctx.details
            assert svc._validators._backlog == 0 and svc.running == {}
            out, ctx = await generate(svc, steering_request(5))  # the backlog is empty again: it is taken
            assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "held by the test" in ctx.details
        finally:
            release.set()  # a failed test leaves no thread held

    asyncio.run(main())
