"""A decode worker: a Ray actor that serves the internal DecodeWorker gRPC service."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from concurrent import futures

import grpc
import ray

from smcserve.decode.batcher import InvalidCall, RequestClosed
from smcserve.decode.loop import DecodeLoop
from smcserve.decode.particles import ParticleGroup
from smcserve.decode.secret import SecretCheck
from smcserve.decode.sequence import DecodeSeq
from smcserve.decode.speculation import Speculation
from smcserve.engine.block_manager import OutOfBlocks
from smcserve.engine.config import WorkerConfig
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.finish import FinishReason
from smcserve.engine.kv import KVLayout
from smcserve.engine.model import load_for_worker
from smcserve.engine.mtp import load_heads
from smcserve.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams, TokenLogprob
from smcserve.engine.speculative import SpecStats, Speculator
from smcserve.engine.threads import on_passing_thread
from smcserve.kvstore import KVStore
from smcserve.protos import smcserve_pb2, worker_pb2, worker_pb2_grpc
from smcserve.protos.messages import logprob_message
from smcserve.smc.patch import MAX_PATCH_TOKENS, PatchRule
from smcserve.smc.potentials import PotentialSpec
from smcserve.smc.potentials.spec import MAX_POTENTIALS
from smcserve.smc.vocab import get_vocab

log = logging.getLogger(__name__)

SESSION_LEASE_S = 10.0  # a scheduler silent this long is gone: its steering requests are dropped
MAX_CLOSED_REMEMBERED = 4096  # ids of steering requests closed before they opened, remembered (oldest forgotten)


def sampling_from_proto(p: smcserve_pb2.SamplingParams) -> SamplingParams:
    """The scheduler sends fully resolved parameters; this only converts them."""
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_tokens=p.max_tokens,
        stop=list(p.stop),
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else -1,
        disable_speculation=p.disable_speculation,
    )


def patch_from_proto(p: worker_pb2.SmcPatch) -> PatchRule:
    return PatchRule(
        max_tokens=max(1, p.max_tokens),
        entropy_threshold=p.entropy_threshold if p.HasField("entropy_threshold") else math.inf,
        entropy_auto=p.entropy_auto,
        weight_drop=p.weight_drop if p.HasField("weight_drop") else math.inf,
    )


def logprob_from_proto(m: smcserve_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, loop: DecodeLoop, worker_id: str, address: str, node_id: str):
        self.loop = loop
        self.worker_id = worker_id
        self.address = address
        self.node_id = node_id
        self.groups: dict[str, ParticleGroup] = {}
        # steering requests closed before their SmcOpen arrived (a cancel racing the open): never opened
        self.closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.groups_lock = threading.Lock()  # opens and closes run in gRPC threads
        # scheduler sessions (StatsRequest.session) → when they last called; each steering request's session
        self.sessions: dict[str, float] = {}
        self.group_session: dict[str, str] = {}
        self.vocab = None
        threading.Thread(target=self._drop_orphans, name="orphan-reaper", daemon=True).start()

    def _drop_orphans(self) -> None:
        """Every second: close the steering requests of schedulers that stopped calling (gone; their
        plain streams were cancelled with their connections already), freeing the particles' KV."""
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.groups_lock:
                gone = {s for s, seen in self.sessions.items() if now - seen > SESSION_LEASE_S}
                orphans = [rid for rid, s in self.group_session.items() if s in gone]
                for s in gone:
                    del self.sessions[s]
                groups = [self.groups.pop(rid) for rid in orphans if rid in self.groups]
                for rid in orphans:
                    del self.group_session[rid]
            for group in groups:
                log.warning("steering request %s dropped: its scheduler is gone", group.request_id)
                self.loop.call(group.close)

    # --- checks: only the scheduler calls this service, but nothing it receives is trusted ---------
    def _invalid(self, context, message: str) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def _check_tokens(self, context, field: str, ids) -> None:
        vocab = self.loop.lm.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                self._invalid(context, f"{field}[{i}]: token id {t} is outside the vocabulary [0, {vocab})")

    def _check_request(self, context, request_id: str, prompt, sampling) -> None:
        if not request_id:
            self._invalid(context, "request_id: required")
        if not prompt:
            self._invalid(context, "prompt_token_ids: must not be empty")
        self._check_tokens(context, "prompt_token_ids", prompt)
        p = sampling
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            self._invalid(context, f"sampling.temperature: must be a finite number >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            self._invalid(context, f"sampling.top_p: must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            self._invalid(context, f"sampling.top_k: must be >= 0, got {p.top_k}")
        context_len = self.loop.lm.config.max_position_embeddings
        if not 0 < p.max_tokens or len(prompt) + p.max_tokens > context_len:
            self._invalid(context, f"sampling.max_tokens: {p.max_tokens} does not fit the context of {context_len}")
        if len(p.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in p.stop):
            self._invalid(context, f"sampling.stop: at most {MAX_STOP_STRINGS}, each 1 to {MAX_STOP_CHARS} characters")

    def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext):
        self._check_request(context, request.request_id, request.prompt_token_ids, request.sampling)
        self._check_tokens(context, "resume_token_ids", request.resume_token_ids)
        self._check_tokens(context, "first_token", [request.first_token])
        if self.loop.has_sequence(request.request_id):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request.request_id!r} is already decoding")
        params = sampling_from_proto(request.sampling)
        resumed = list(request.resume_token_ids)  # a generation another worker began: its detokenizer picks up
        seq = DecodeSeq(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            block_keys=list(request.block_keys),
            params=params,
            detok=IncrementalDetokenizer(self.loop.lm.tokenizer, params.stop, resumed, request.resume_text_chars),
            output_ids=list(resumed),
        )
        # Client gone (cancel, disconnect, deadline) → stop generating and free the KV.
        context.add_callback(lambda: self.loop.abort(seq.request_id))
        try:
            if resumed:
                self.loop.resume(seq)
            else:
                first_logprob = None
                if params.logprobs >= 0 and request.HasField("first_logprob"):
                    first_logprob = logprob_from_proto(request.first_logprob)
                self.loop.submit(seq, request.first_token, first_logprob)
        except OutOfBlocks as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Exception:
            self._internal(context, f"submitting {request.request_id}")
        while True:
            try:
                ev = seq.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if ev.finish_reason == FinishReason.ERROR:  # logged with its traceback where it happened
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if ev.out_of_kv else grpc.StatusCode.INTERNAL
                context.abort(code, ev.error)
            yield worker_pb2.DecodeEvent(
                token_ids=ev.token_ids,
                text=ev.text,
                finish_reason=ev.finish_reason or "",
                completion_tokens=ev.completion_tokens,
                logprobs=[logprob_message(lp) for lp in ev.logprobs],
            )
            if ev.finish_reason:
                return

    # --- SMC steering --------------------------------------------------------------------------------
    def _group(self, request_id: str, context) -> ParticleGroup:
        group = self.groups.get(request_id)
        if group is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no steering request {request_id!r} here")
        return group

    def _internal(self, context, what: str) -> None:
        """Our own bug (the scheduler validated the request): INTERNAL, traceback in this worker's log."""
        log.exception("decode worker %s: %s failed", self.worker_id, what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what} failed (see the server log)")

    def _wait(self, future, context, what: str):
        """The result of work done in the decode loop's thread; its failures mapped to gRPC codes."""
        try:
            return future.result()
        except OutOfBlocks as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except InvalidCall as err:  # names a particle the request does not have, or the like
            self._invalid(context, str(err))
        except RequestClosed:  # the request was cancelled meanwhile: nothing to report
            context.abort(grpc.StatusCode.CANCELLED, "the steering request was closed")
        except Exception:
            self._internal(context, what)

    def _run(self, fn, context, what: str):
        """Run ``fn`` in the decode loop's thread (between steps)."""
        return self._wait(self.loop.call(fn), context, what)

    def SmcOpen(self, request, context):
        self._check_request(context, request.request_id, request.prompt_token_ids, request.sampling)
        if len(set(request.particle_ids)) != len(request.particle_ids):
            self._invalid(context, "particle_ids: must be distinct")
        if len(request.potentials) > MAX_POTENTIALS:
            self._invalid(context, f"potentials: {len(request.potentials)} of them; the limit is {MAX_POTENTIALS}")
        for i, p in enumerate(request.potentials):
            for j, ids in enumerate(p.prompt_ids):
                self._check_tokens(context, f"potentials[{i}].prompt_ids[{j}].ids", ids.ids)
        patch = request.patch
        if not 0 <= patch.max_tokens <= MAX_PATCH_TOKENS:
            self._invalid(context, f"patch.max_tokens: must be in [0, {MAX_PATCH_TOKENS}], got {patch.max_tokens}")
        for name in ("entropy_threshold", "weight_drop"):
            value = getattr(patch, name)
            if patch.HasField(name) and not value >= 0:  # also NaN
                self._invalid(context, f"patch.{name}: must be >= 0, got {value}")
        if request.request_id in self.groups:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request.request_id!r} is already open")
        if self.vocab is None:
            self.vocab = get_vocab(
                self.loop.lm.tokenizer,
                size=self.loop.lm.config.vocab_size,
                eos_ids=sorted(self.loop.lm.eos_token_ids),
            )
        specs = [  # prompt_intersection's prompts arrive as token ids: the scheduler tokenised them
            dataclasses.replace(PotentialSpec.from_proto(p.spec), prompt_ids=[list(t.ids) for t in p.prompt_ids])
            if p.prompt_ids
            else PotentialSpec.from_proto(p.spec)
            for p in request.potentials
        ]
        group = ParticleGroup(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_proto(request.sampling),
            specs,
            self.vocab,
            self.loop,
            patch=patch_from_proto(patch),
        )
        with self.groups_lock:
            refused = request.request_id in self.closed  # closed (cancelled) before this open arrived
            if not refused:
                self.groups[request.request_id] = group
                if request.session:
                    self.group_session[request.request_id] = request.session
                    self.sessions[request.session] = time.monotonic()
        if refused:
            context.abort(grpc.StatusCode.CANCELLED, "request_id: the steering request was closed")
        self._run(
            lambda: group.open(list(request.block_keys), list(request.particle_ids), request.reserve_particles),
            context,
            "SmcOpen",
        )
        return worker_pb2.SmcAck()

    def SmcExtend(self, request, context):
        t0 = time.perf_counter()
        group = self._group(request.request_id, context)
        items = [(it.particle_id, it.index, it.k) for it in request.items]
        patch = self._run(lambda: group.extend_patch(request.step, items), context, "SmcExtend")
        children = self._wait(patch, context, "SmcExtend")
        return worker_pb2.SmcExtendReply(
            worker_s=time.perf_counter() - t0,
            positions=max((len(c.tokens) for c in children), default=0),
            entropy_threshold=group.patch.entropy_threshold,
            children=[
                worker_pb2.SmcChild(
                    parent_id=c.parent_id,
                    child_id=c.child_id,
                    token=c.token,
                    log_increment=c.log_increment,
                    finished=c.finished,
                    finish_reason=c.finish_reason,
                    tokens=c.tokens,
                )
                for c in children
            ],
        )

    def SmcExport(self, request, context):
        group = self._group(request.request_id, context)
        states = self._run(lambda: group.export(list(request.particle_ids)), context, "SmcExport")
        return worker_pb2.SmcExportReply(
            particles=[
                worker_pb2.SmcParticleState(particle_id=pid, generated=gen, finished=fin) for pid, gen, fin in states
            ]
        )

    def SmcReshape(self, request, context):
        group = self._group(request.request_id, context)
        for i, st in enumerate(request.imports):
            self._check_tokens(context, f"imports[{i}].generated", st.generated)
        keep = [(k.source_id, list(k.new_ids)) for k in request.keep]
        imports = [(st.particle_id, list(st.generated), st.finished) for st in request.imports]
        self._run(lambda: group.reshape(keep, imports), context, "SmcReshape")
        return worker_pb2.SmcAck()

    def SmcClose(self, request, context):
        with self.groups_lock:
            group = self.groups.pop(request.request_id, None)
            self.group_session.pop(request.request_id, None)
            if group is None:  # an open may still be on its way: it must not open after this
                self.closed[request.request_id] = None
                while len(self.closed) > MAX_CLOSED_REMEMBERED:
                    self.closed.popitem(last=False)
        if group is not None:
            self._run(group.close, context, "SmcClose")
        return worker_pb2.SmcAck()

    def Stats(self, request, context) -> smcserve_pb2.WorkerStats:
        if request.session:
            with self.groups_lock:
                self.sessions[request.session] = time.monotonic()
        st = self.loop.stats()
        return smcserve_pb2.WorkerStats(
            worker_id=self.worker_id,
            role="decode",
            address=self.address,
            node_id=self.node_id,
            active_sequences=st.active_sequences,
            kv_blocks_in_use=st.kv_blocks_in_use,
            kv_bytes_in_use=st.kv_bytes_in_use,
            requests_served=st.requests_served,
            tokens_generated=st.tokens_generated,
            prompt_recomputes=st.prompt_recomputes,
            kv_blocks_total=st.kv_blocks_total,
            kv_blocks_used=st.kv_blocks_used,
            kv_blocks_shared=st.kv_blocks_shared,
            kv_blocks_cached=st.kv_blocks_cached,
            prompt_blocks_reused=st.prompt_blocks_reused,
            batch_steps=st.batch_steps,
            batched_tokens=st.batched_tokens,
            max_batch_size=st.max_batch_size,
            particles_imported=st.particles_imported,
            kv_blocks_loaded=st.kv_blocks_loaded,
            kv_load_ms=st.kv_load_ms,
            **_spec_fields(st.spec),
        )


def _spec_fields(spec: SpecStats | None) -> dict:
    """The speculative counters of ``WorkerStats`` (none without speculation)."""
    if spec is None:
        return {}
    return dict(
        spec_steps=spec.steps,
        spec_drafted=spec.drafted,
        spec_accepted=spec.accepted,
        mean_accepted_length=spec.mean_accepted_length,
        acceptance_per_depth=spec.acceptance_per_depth,
    )


def _speculation(lm, config: WorkerConfig) -> Speculation | None:
    """``--speculative mtp``: the model's heads (refused when trained for other weights) and the settings.
    None with a limit of 0 sequences (what ``--speculative-max-batch auto`` picks where speculation pays at
    no batch size): nothing drafts, not even steering patches, and the heads are not loaded."""
    if config.speculative != "mtp" or config.speculative_max_batch == 0:
        return None
    heads = load_heads(lm, style=config.mtp_style)
    k = config.num_speculative_tokens
    return Speculation(Speculator(heads, k, lm.config.vocab_size), config.speculative_max_batch)


def _node_ip(node_id: str) -> str:
    """The address Ray knows this node by (127.0.0.1 on a local cluster)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


@ray.remote
class DecodeWorker:
    """Ray actor: loads the model, runs the decode loop and its gRPC service."""

    def __init__(self, config: WorkerConfig, worker_id: str):
        self.worker_id = worker_id
        self.config = config

        def build() -> tuple:  # the engine's torch work stays off this (Ray's main) thread: engine/threads.py
            lm = load_for_worker(config)
            layout = KVLayout.from_config(lm.config, lm.dtype, config.block_size)
            num_blocks = max(1, layout.blocks_in(config.kv_cache_bytes))
            loop = DecodeLoop(
                lm,
                KVStore(config.redis_url),
                config.block_size,
                num_blocks,
                config.prefill_chunk,
                speculation=_speculation(lm, config),
            )
            return lm, loop

        self.lm, loop = on_passing_thread(build)
        self.loop = loop.start()
        node_id = ray.get_runtime_context().get_node_id()
        host = config.host or _node_ip(node_id)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=256),
            interceptors=[SecretCheck(config.secret)],
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        )
        port = self.server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{port}"
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(
            DecodeService(self.loop, worker_id, self.address, node_id), self.server
        )
        self.server.start()

    def config_of(self) -> WorkerConfig:
        """What it was started with (a restarted scheduler takes it over only if its own is the same)."""
        return self.config

    def address_of(self) -> str:
        return self.address

    def stop(self) -> None:
        self.server.stop(grace=1)
        self.loop.close()
