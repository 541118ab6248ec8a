"""The SMC coordinator: validates a steering request (``validate_steering``) and drives its particle
set over the decode workers (``SteeringRun``).

Each step: the workers extend their particles (batched with everything else they run), the
coordinator updates log weights, resamples (Algorithm 4, or a standard scheme when the ESS falls
below the threshold), then reshapes the population: offspring stay on their parent's worker and
only the surplus migrates, its KV going through the KV store. All calls are batched per worker.
Potentials are built on the workers from their specs; the scheduler only validates them and
resolves what needs the request's form (prompt_intersection's prompts, tokenised here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from smcserve.engine.sampling import SamplingParams
from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos import worker_pb2
from smcserve.scheduler.validate import InvalidRequest
from smcserve.smc import SCHEMES, ess, logsumexp, normalize
from smcserve.smc.patch import MAX_PATCH_TOKENS
from smcserve.smc.potentials import PotentialError, PotentialSpec, build_potential, companion_prompts
from smcserve.smc.step import LENGTH, OK, WITHOUT_REPLACEMENT, smc_step

MAX_RECOVERIES = 3  # worker losses one steering request survives


async def settled(*calls):
    """Like ``asyncio.gather``, but every call has finished before the first failure is raised, so a
    close sent afterwards never overtakes an open or a step still running on another worker."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@dataclass
class SteeringConfig:
    particles: int
    extensions: int
    scheme: str
    ess_threshold: float
    potentials: list[worker_pb2.SmcPotential]  # what the workers build, prompts resolved to token ids
    prompts: list[list[int]] = field(default_factory=list)  # the potentials' companion prompts (prefilled)
    patch: worker_pb2.SmcPatch = field(default_factory=worker_pb2.SmcPatch)  # up to 1 token: the per-token step


def validate_steering(
    spec: pb.SteeringSpec, params: SamplingParams, vocab, max_particles: int, tokenize
) -> SteeringConfig:
    """``tokenize(text)`` turns a prompt of the request's form (raw or chat) into token ids."""
    if not 1 <= spec.particles <= max_particles:
        raise InvalidRequest(f"steering.particles: must be in [1, {max_particles}], got {spec.particles}")
    k = spec.extensions if spec.HasField("extensions") else 2
    if not 1 <= k <= 64:
        raise InvalidRequest(f"steering.extensions: must be in [1, 64], got {k}")
    scheme = spec.scheme or WITHOUT_REPLACEMENT
    if scheme not in (WITHOUT_REPLACEMENT, *SCHEMES):
        raise InvalidRequest(
            f"steering.scheme: unknown scheme {scheme!r}; use {WITHOUT_REPLACEMENT} or {', '.join(SCHEMES)}"
        )
    thr = spec.ess_threshold if spec.HasField("ess_threshold") else 0.5
    if not 0.0 <= thr <= 1.0:
        raise InvalidRequest(f"steering.ess_threshold: must be in [0, 1], got {thr}")
    patch = validate_patch(spec)
    if params.temperature <= 0:
        raise InvalidRequest("sampling.temperature: must be > 0 for steering (the LM is the proposal)")
    # the proposal is the whole (masked) LM: truncation or stop strings would change the target silently
    if params.top_p < 1.0:
        raise InvalidRequest(f"sampling.top_p: not supported with steering (got {params.top_p:g}); use a potential")
    if params.top_k:
        raise InvalidRequest(f"sampling.top_k: not supported with steering (got {params.top_k}); use a potential")
    if params.stop:
        raise InvalidRequest("sampling.stop: not supported with steering; use a regex or banned_phrases potential")
    potentials, prompts = [], []
    try:
        for i, m in enumerate(spec.potentials):
            where = f"steering.potentials[{i}]"
            p = PotentialSpec.from_proto(m, where)
            if p.prompts:  # prompt_intersection: tokenised like the request's input (the builder checks the texts)
                p = dataclasses.replace(p, prompt_ids=[tokenize(text) if text else [] for text in p.prompts])
            prompts += companion_prompts([build_potential(p, vocab, where=where)])
            potentials.append(
                worker_pb2.SmcPotential(spec=m, prompt_ids=[worker_pb2.TokenIds(ids=q) for q in p.prompt_ids or ()])
            )
    except PotentialError as err:
        raise InvalidRequest(str(err)) from err
    return SteeringConfig(
        spec.particles, k if scheme == WITHOUT_REPLACEMENT else 1, scheme, thr, potentials, prompts, patch
    )


def validate_patch(spec: pb.SteeringSpec) -> worker_pb2.SmcPatch:
    """The request's patch rule (``smc.patch``) as the workers get it."""
    p = spec.patch_max_tokens if spec.HasField("patch_max_tokens") else 1
    if not 1 <= p <= MAX_PATCH_TOKENS:
        raise InvalidRequest(f"steering.patch_max_tokens: must be in [1, {MAX_PATCH_TOKENS}], got {p}")
    patch = worker_pb2.SmcPatch(max_tokens=p, entropy_auto=spec.entropy_auto)
    if spec.HasField("entropy_threshold"):
        if not (spec.entropy_threshold >= 0 and math.isfinite(spec.entropy_threshold)):
            raise InvalidRequest(
                f"steering.entropy_threshold: must be a finite number >= 0, got {spec.entropy_threshold}"
            )
        patch.entropy_threshold = spec.entropy_threshold
    if spec.HasField("weight_drop"):
        if not spec.weight_drop >= 0:
            raise InvalidRequest(f"steering.weight_drop: must be >= 0, got {spec.weight_drop}")
        patch.weight_drop = spec.weight_drop
    return patch


@dataclass
class _Population:
    ids: list[str]  # particle id of each population index
    where: dict[str, object]  # particle id → decode worker handle
    tokens: list[list[int]]
    finished: np.ndarray
    logw: np.ndarray
    reasons: list[str]  # how each particle ended ("" while running): stop, length, violated
    targets: dict = field(default_factory=dict)  # worker handle → how many particles it holds

    def copy(self) -> _Population:
        """A copy that steps on this one never change (they replace its lists and arrays, and add to ``where``)."""
        return dataclasses.replace(self, ids=list(self.ids), where=dict(self.where), targets=dict(self.targets))


class SteeringRun:
    """One steering request's particle set, driven over the decode workers.

    ``open`` splits the N particles over the workers (fewest active requests first, as evenly as
    possible: each worker's share, ``targets``, stays fixed) and each worker builds its share from
    the prompt's KV (``SmcOpen``). Each ``step``:

    1. extend: each worker gets one ``SmcExtend`` listing its live particles (all workers at once);
       it proposes K children per particle (K = 1 for standard schemes), batched with everything
       else it runs, runs each child's patch (up to ``patch_max_tokens`` tokens, ``smc.patch``) and
       returns their tokens, summed log-weight increments and how they ended. A child's draw is a
       hash of (seed, step, population index, child[, position]), so placement changes nothing;
    2. reweight and resample: ``smc.step.smc_step`` runs here, with this run's seeded generator,
       and gives each of the N new slots its source: a child, or a particle carried unchanged;
    3. reshape (``_reshape``): a source stays on its worker while that worker holds fewer than its
       share, and the surplus migrates to workers below theirs: ``SmcExport`` has each source's
       worker write its KV to the KV store under content keys and return its tokens, then one
       ``SmcReshape`` per worker lists what it keeps (a source and its new ids; extra offspring
       fork its KV) and what it imports (KV read from the store, recomputed where missing), and
       the worker frees everything else of the request.

    Weights, tokens and endings live here; KV lives on the workers. A failed worker call raises out
    of ``step`` as a gRPC error once every concurrent call of that phase has finished
    (``settled``); the caller then ``close``s, which frees the request's particles on every worker
    (a worker keeps all of them reachable when a step or reshape fails half-way, so nothing leaks).

    A worker that dies (a call UNAVAILABLE) is survived: the run finds which workers stopped answering
    (``liveness`` loses them), frees the request everywhere, rebuilds the population as it was before
    the step on the live workers (``_rebuild``: each particle imported from its tokens, its KV read
    from the store or recomputed) and runs the step again with the generator state it had. Draws are
    hashed by (seed, step, index, child), so the rerun makes exactly the draws the lost one made.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        cfg: SteeringConfig,
        workers: list,
        tokenizer,
        liveness=None,
    ):
        """``workers``: the live decode workers; ``liveness`` (a :class:`scheduler.liveness.Liveness`)
        tells who is still alive when a call fails (None: a failed worker ends the run)."""
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.cfg = cfg
        self.workers = workers
        self.tokenizer = tokenizer
        self.liveness = liveness
        self.block_keys: list[str] = []
        self.recoveries = 0
        self.group_id = request_id  # the request's particles on the workers; a new one after each recovery
        self.rng = np.random.default_rng(params.seed)
        self.steps = 0
        self.resamples = 0
        self.migrated_particles = 0  # moved between workers at resampling, and the tokens their KV covers
        self.migrated_tokens = 0
        self.ess_ratio = float("nan")  # ESS / N the last resampling decision saw
        self.compute_s = 0.0  # Σ over steps of the slowest worker's SmcExtend time
        self.sync_s = 0.0  # Σ over steps of the rest of the step
        self.patches = 0  # children proposed, and the tokens of their patches
        self.patch_tokens = 0
        self.entropy_threshold = math.inf  # as the workers apply it (auto: calibrated)
        self.status = "ok"

    def _sampling(self) -> pb.SamplingParams:
        p = self.params
        return pb.SamplingParams(
            temperature=p.temperature,
            top_p=1.0,
            max_tokens=p.max_tokens,
            seed=p.seed,
            ignore_eos=p.ignore_eos,
            disable_speculation=p.disable_speculation,  # patches draft with the MTP heads unless opted out
        )

    async def open(self, block_keys: list[str]) -> _Population:
        self.block_keys = block_keys
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return await self._open(block_keys)
            except grpc.aio.AioRpcError as err:
                if not await self._survivable(err, attempt):
                    raise
        raise AssertionError("unreachable")

    async def _survivable(self, err: grpc.aio.AioRpcError, attempt: int) -> bool:
        """After a failed call: whether to go on, on the workers still alive (the request freed everywhere)."""
        if err.code() != grpc.StatusCode.UNAVAILABLE or self.liveness is None or attempt == MAX_RECOVERIES:
            return False
        await self.close()
        answers = await asyncio.gather(
            *(h.stub.Stats(worker_pb2.StatsRequest(), timeout=30) for h in self.workers), return_exceptions=True
        )
        for h, a in zip(self.workers, answers):
            if isinstance(a, grpc.aio.AioRpcError) and a.code() == grpc.StatusCode.UNAVAILABLE:
                self.liveness.lost(h, "a steering call failed")
        try:
            self.workers = await self.liveness.wait_for(self.liveness.alive_decode)
        except Exception:  # NoWorker: nobody to go on with
            return False
        self.recoveries += 1
        # a fresh id: a worker that never saw the old one remembers its close, and must not refuse the reopen
        self.group_id = f"{self.request_id}@{self.recoveries}"
        return True

    async def _open(self, block_keys: list[str]) -> _Population:
        n, w = self.cfg.particles, len(self.workers)
        order = sorted(self.workers, key=lambda h: h.active)
        counts = {h: n // w + (1 if i < n % w else 0) for i, h in enumerate(order)}
        ids = [f"0.{i}" for i in range(n)]
        where, start = {}, 0
        for h in order:
            for pid in ids[start : start + counts[h]]:
                where[pid] = h
            start += counts[h]
        await settled(
            *(
                h.stub.SmcOpen(self._open_request(block_keys, [pid for pid in ids if where[pid] is h]))
                for h in order
                if counts[h]
            )
        )
        return _Population(ids, where, [[] for _ in range(n)], np.zeros(n, bool), np.zeros(n), [""] * n, counts)

    def _open_request(self, block_keys: list[str], particle_ids: list[str], reserve: int = 0):
        return worker_pb2.SmcOpenRequest(
            reserve_particles=reserve,
            session=self.liveness.session if self.liveness is not None else "",
            request_id=self.group_id,
            prompt_token_ids=self.prompt_ids,
            block_keys=block_keys,
            sampling=self._sampling(),
            potentials=self.cfg.potentials,
            particle_ids=particle_ids,
            patch=self.cfg.patch,
        )

    async def close(self) -> None:
        await asyncio.gather(
            *(h.stub.SmcClose(worker_pb2.SmcCloseRequest(request_id=self.group_id)) for h in self.workers),
            return_exceptions=True,
        )

    async def step(self, pop: _Population) -> bool:
        """One step for every live particle (``smc.step.smc_step``); returns whether it resampled. A
        worker lost during it: the population is rebuilt as it was on the live workers and the step rerun."""
        saved = (pop.copy(), self.rng.bit_generator.state, self.steps, self.resamples)
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                if attempt:
                    await self._rebuild(pop)
                return await self._step(pop)
            except grpc.aio.AioRpcError as err:
                if not await self._survivable(err, attempt):
                    raise
                before, self.rng.bit_generator.state, self.steps, self.resamples = saved
                pop.__dict__.update(before.copy().__dict__)
        raise AssertionError("unreachable")

    async def _rebuild(self, pop: _Population) -> None:
        """The population onto ``self.workers`` afresh (the request is closed everywhere): each worker
        opens the request with no particles and imports its share from the particles' tokens."""
        n, w = len(pop.ids), len(self.workers)
        order = sorted(self.workers, key=lambda h: h.active)
        counts = {h: n // w + (1 if i < n % w else 0) for i, h in enumerate(order)}
        plans = {h: worker_pb2.SmcReshapeRequest(request_id=self.group_id) for h in order}
        where, start = {}, 0
        for h in order:
            for i in range(start, start + counts[h]):
                where[pop.ids[i]] = h
                plans[h].imports.add(particle_id=pop.ids[i], generated=pop.tokens[i], finished=bool(pop.finished[i]))
            start += counts[h]
        await settled(*(h.stub.SmcOpen(self._open_request(self.block_keys, [], counts[h])) for h in order if counts[h]))
        await settled(*(h.stub.SmcReshape(plans[h]) for h in order if counts[h]))
        pop.where, pop.targets = where, counts

    async def _step(self, pop: _Population) -> bool:
        t0 = time.perf_counter()
        n, k = self.cfg.particles, self.cfg.extensions
        by_worker: dict = {}
        for i in np.flatnonzero(~pop.finished):
            by_worker.setdefault(pop.where[pop.ids[i]], []).append(
                worker_pb2.SmcExtendRequest.Item(particle_id=pop.ids[i], index=int(i), k=k)
            )
        replies = await settled(
            *(
                h.stub.SmcExtend(worker_pb2.SmcExtendRequest(request_id=self.group_id, step=self.steps, items=items))
                for h, items in by_worker.items()
            )
        )
        index_of = {pop.ids[i]: i for i in range(n)}
        incr = np.full((n, k), -math.inf)
        child_done = np.ones((n, k), dtype=bool)
        child: dict[tuple[int, int], worker_pb2.SmcChild] = {}
        for h, reply in zip(by_worker, replies):
            for c in reply.children:
                i, j = index_of[c.parent_id], int(c.child_id.rsplit("/", 1)[1])
                incr[i, j], child_done[i, j], child[i, j] = c.log_increment, c.finished, c
                pop.where[c.child_id] = h
                self.patches += 1
                self.patch_tokens += len(c.tokens)
        worker_s = max((r.worker_s for r in replies), default=0.0)
        if replies:
            self.entropy_threshold = replies[0].entropy_threshold
        self.steps += 1
        out = smc_step(pop.logw, pop.finished, incr, child_done, self.cfg.scheme, self.cfg.ess_threshold, self.rng)
        sources, tokens, reasons = [], [], []
        for i, j in zip(out.parent, out.child):
            if j < 0:  # carried unchanged (finished or dead)
                sources.append(pop.ids[i])
                tokens.append(list(pop.tokens[i]))
                reasons.append(pop.reasons[i])
            else:
                c = child[i, j]
                sources.append(c.child_id)
                tokens.append(pop.tokens[i] + list(c.tokens))
                reasons.append(c.finish_reason)
        self.resamples += out.resampled
        self.ess_ratio = out.ess_ratio
        await self._reshape(pop, sources)
        pop.tokens, pop.finished, pop.logw, pop.reasons = tokens, out.finished, out.log_weights, reasons
        if out.status != OK:
            self.status = self.why_all_dead(pop)
        self.compute_s += worker_s
        self.sync_s += max(0.0, time.perf_counter() - t0 - worker_s)
        return out.resampled

    def why_all_dead(self, pop: _Population) -> str:
        """Why every particle has zero weight, in the words a user can act on."""
        cut = sum(r == LENGTH for r in pop.reasons)
        ruled_out = len(pop.reasons) - cut
        parts = []
        if cut:
            parts.append(
                f"{cut} reached max_tokens ({self.params.max_tokens}) before the constraints could be "
                f"satisfied (raise sampling.max_tokens)"
            )
        if ruled_out:
            parts.append(f"{ruled_out} violated the constraints")
        return "every particle has zero weight: " + "; ".join(parts)

    async def _reshape(self, pop: _Population, sources: list[str]) -> None:
        """Offspring stay on their source's worker up to its share; only the surplus migrates."""
        n = len(sources)
        new_ids = [f"{self.steps}.{i}" for i in range(n)]
        assign: dict[int, object] = {}
        surplus = []
        kept = {h: 0 for h in self.workers}
        for i, src in enumerate(sources):
            h = pop.where[src]
            if kept[h] < pop.targets.get(h, 0):
                assign[i] = h
                kept[h] += 1
            else:
                surplus.append(i)
        for h in self.workers:
            while kept[h] < pop.targets.get(h, 0) and surplus:
                assign[surplus.pop()] = h
                kept[h] += 1
        migrating = {}
        for i, src in enumerate(sources):
            if assign[i] is not pop.where[src]:
                migrating.setdefault(pop.where[src], set()).add(src)
        exported = {}
        if migrating:
            replies = await settled(
                *(
                    h.stub.SmcExport(worker_pb2.SmcExportRequest(request_id=self.group_id, particle_ids=sorted(ids)))
                    for h, ids in migrating.items()
                )
            )
            for reply in replies:
                for st in reply.particles:
                    exported[st.particle_id] = st
        plans = {h: worker_pb2.SmcReshapeRequest(request_id=self.group_id) for h in self.workers}
        keep: dict = {}
        for i, src in enumerate(sources):
            h = assign[i]
            if h is pop.where[src]:
                keep.setdefault((h, src), []).append(new_ids[i])
            else:
                st = exported[src]
                plans[h].imports.add(particle_id=new_ids[i], generated=st.generated, finished=st.finished)
                self.migrated_particles += 1
                if not st.finished:
                    self.migrated_tokens += len(self.prompt_ids) + len(st.generated) - 1
        for (h, src), ids in keep.items():
            plans[h].keep.add(source_id=src, new_ids=ids)
        await settled(*(h.stub.SmcReshape(plan) for h, plan in plans.items()))
        pop.ids = new_ids
        pop.where = {new_ids[i]: assign[i] for i in range(n)}

    def progress(self, pop: _Population, resampled: bool) -> pb.SteeringProgress:
        best = int(np.argmax(pop.logw)) if np.isfinite(pop.logw).any() else 0
        return pb.SteeringProgress(
            step=self.steps,
            ess=float(ess(pop.logw)),
            resampled=resampled,
            best_text=self.tokenizer.decode(pop.tokens[best], skip_special_tokens=True),
            finished=int(pop.finished.sum()),
        )

    def result(self, pop: _Population) -> pb.SteeringResult:
        n = self.cfg.particles
        log_z = logsumexp(pop.logw) - math.log(n) if np.isfinite(pop.logw).any() else -math.inf
        weights = normalize(pop.logw)
        res = pb.SteeringResult(
            log_z=log_z,
            steps=self.steps,
            resamples=self.resamples,
            status=self.status if math.isfinite(log_z) else self.why_all_dead(pop),
            roundtrips_per_token=self.steps / max(1, max(len(t) for t in pop.tokens)),
            tokens_per_patch=self.patch_tokens / max(1, self.patches),
            compute_s=self.compute_s,
            sync_s=self.sync_s,
            entropy_threshold=self.entropy_threshold,
        )
        for i in range(n):
            res.particles.add(
                text=self.tokenizer.decode(pop.tokens[i], skip_special_tokens=True),
                token_ids=pop.tokens[i],
                log_weight=float(pop.logw[i]),
                weight=float(weights[i]),
                finished=bool(pop.finished[i]),
                finish_reason=pop.reasons[i],
            )
        return res
