"""SMC particles on one decode worker: their KV, their potentials, and how they extend.

The scheduler owns the particle set (weights, resampling); a worker owns its particles' KV. Each
step the scheduler asks the worker to extend particles, each by a patch of tokens (``smc.patch``: one
token unless the request asks for more); every particle's next-token distribution
comes out of the worker's shared batched forward step and goes through ``smc.proposal`` (the LM
times its potentials' factors, masked by the hard constraints and renormalised; the weight gets the
allowed mass) and ``smc.extension``, the same code the reference driver runs. Each child's uniform
is a hash of (request seed, step, population index, child), so it does not depend on placement or
batching; a patch's later tokens hash (seed, step, index, child, position).
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from smcserve.decode.batcher import ExtendJob, InvalidCall, RequestClosed, Reservation
from smcserve.decode.host import ParticleHost
from smcserve.engine.block_manager import BlockTable
from smcserve.engine.kv import chain_keys
from smcserve.engine.sampling import SamplingParams, seeded_uniform
from smcserve.smc.extension import extend
from smcserve.smc.patch import PatchRule, calibrate, entropy, stops_after, stops_before
from smcserve.smc.potentials import (
    Potential,
    build_potentials,
    clone_all,
    combined_log_factor,
    combined_mask,
    companion_prompts,
)
from smcserve.smc.proposal import propose, stacked_masks, with_factors
from smcserve.smc.vocab import Vocab


@dataclass
class Particle:
    generated: list[int]  # the last one is pending: its KV is not computed yet
    potentials: list[Potential]
    tables: list[BlockTable] | None = None  # KV of each prompt + generated[:-1]; None once finished
    finished: bool = False
    # a patch that ended before a token (an entropy boundary) keeps that token's logits (one row per
    # prompt): the tables then cover every generated token, and the next step needs no forward for it
    ahead: torch.Tensor | None = None


@dataclass
class Child:
    parent_id: str
    child_id: str
    token: int
    log_increment: float
    finished: bool  # finished or dead: never extended again
    finish_reason: str = ""  # STOP, LENGTH or VIOLATED once finished
    tokens: list[int] = field(default_factory=list)  # the patch's tokens (``token`` is the first; −1: none)


@dataclass
class ParticleGroup:
    """The particles of one SMC request on this worker.

    ``prompts[0]`` is the request's prompt; the others are its potentials' companion prompts
    (``Potential.prompts()``, e.g. prompt_intersection's): every particle also runs under each of
    them, as a companion sequence that shares its generated tokens, and each step the potentials turn
    those sequences' next-token log-probabilities into factors of the proposal (``log_factor``).
    A particle holds one KV table per prompt.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    specs: list
    vocab: Vocab
    host: ParticleHost  # the decode loop: KV pool and store operations
    particles: dict[str, Particle] = field(default_factory=dict)
    closed: bool = False
    held_blocks: int = 0  # distinct KV blocks the particles held at the end of the last operation
    patch: PatchRule = field(default_factory=PatchRule)  # how far a particle runs between two steps
    prompts: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = [list(self.prompt), *companion_prompts(build_potentials(self.specs, self.vocab))]

    def fresh_potentials(self, generated: list[int] = ()) -> list[Potential]:
        pots = build_potentials(self.specs, self.vocab)
        for tok in generated:
            for p in pots:
                p.advance(tok)
        return pots

    def feed_tokens(self, p: Particle) -> list[int]:
        return [p.generated[-1] if p.generated else prompt[-1] for prompt in self.prompts]

    def kv_tokens(self, p: Particle, prompt: list[int]) -> list[int]:
        if p.ahead is not None:
            return prompt + p.generated
        return prompt + p.generated[:-1] if p.generated else prompt[:-1]

    def keys(self, tokens: list[int]) -> list[str]:
        return chain_keys(self.host.fingerprint, tokens, self.host.block_size)

    def _fork(self, tables: list[BlockTable] | None) -> list[BlockTable] | None:
        if tables is None:
            return None
        return [self.host.fork(t) for t in tables]

    # --- operations (each runs in the decode loop's thread) ---------------------------------------
    def open(self, block_keys: list[str], particle_ids: list[str], reserve: int = 0) -> None:
        """Reserve the KV of ``reserve`` particles (default: as many as ``particle_ids``) up front, then
        create ``particle_ids`` from the prompt's KV; none: an empty group (particles will be imported).
        ``OutOfBlocks`` before anything is loaded when the pool cannot promise that much."""
        self._check_open()
        if self.patch.entropy_auto:  # before anything is held: a failure leaves nothing to free
            threshold = calibrate(self.host.prompt_logits(self.prompt), self.params.temperature)
            self.patch = dataclasses.replace(self.patch, entropy_threshold=threshold, entropy_auto=False)
        need = self.blocks_needed(reserve or len(particle_ids))
        self.host.reserve(self.request_id, Reservation(need, lambda: self.held_blocks))
        if not particle_ids:
            return
        pots = [self.fresh_potentials() for _ in particle_ids]  # before any KV is held
        roots: list[BlockTable] = []
        try:
            roots.append(self.host.load(self.prompts[0][:-1], block_keys))
            for prompt in self.prompts[1:]:
                roots.append(self.host.load(prompt[:-1], self.keys(prompt[:-1])))
        except BaseException:
            self._free([Particle([], [], roots)])
            raise
        for i, pid in enumerate(particle_ids):
            self.particles[pid] = Particle([], pots[i], roots if i == 0 else self._fork(roots))
        self._count_held()

    def blocks_needed(self, n: int) -> int:
        """The most KV blocks ``n`` particles may hold at once: each prompt's KV (shared by all), and for
        each particle and prompt the blocks its generated tokens fill (up to ``max_tokens``, starting in
        the prompt's partial block) plus one copy-on-write copy in flight."""
        bs, t = self.host.block_size, self.params.max_tokens
        ceil = lambda tokens: -(-tokens // bs)  # noqa: E731
        shared = sum(ceil(len(p) - 1) for p in self.prompts)
        own = sum(ceil(len(p) - 1 + t) - (len(p) - 1) // bs + 1 for p in self.prompts)
        return shared + n * own

    def _count_held(self) -> None:
        """Count the distinct KV blocks the particles hold, after each operation (in the loop's thread),
        for the reservation to read from other threads (between counts it overstates the claim)."""
        self.held_blocks = len({b for p in self.particles.values() for t in p.tables or () for b in t.blocks})

    def export(self, ids: list[str]) -> list[tuple[str, list[int], bool]]:
        """Write the listed particles' KV to the store and return (id, generated tokens, finished) of
        each, for the scheduler to hand to the workers that import them.

        Each KV table (one per prompt) covers that prompt + generated[:-1] and is stored under the
        chained content keys of exactly those tokens, so an importer finds it from the tokens alone
        and recomputes whatever the store has lost. A finished particle has no KV: only its tokens
        travel. The particles stay here (a source may also keep offspring locally) until ``reshape``.
        """
        out = []
        for i, pid in enumerate(ids):
            p = self._particle(pid, f"particle_ids[{i}]")
            if not p.finished:
                for prompt, table in zip(self.prompts, p.tables):
                    tokens = self.kv_tokens(p, prompt)
                    self.host.save(table, tokens, self.keys(tokens))
            out.append((pid, list(p.generated), p.finished))
        return out

    def reshape(self, keep: list[tuple[str, list[str]]], imports: list[tuple[str, list[int], bool]]) -> None:
        """Replace this worker's particles with its share of the new population.

        ``keep`` maps a particle (or child) here to its offspring ids: the first offspring takes the
        particle itself, each other one forks its KV tables (copy-on-write: blocks are shared until
        written) and clones its potentials. ``imports`` are particles migrating in, as ``export``
        gave them: their potentials are rebuilt from the specs and replayed along their tokens, and
        their KV is read from the store under its content keys (recomputed where missing). Every
        particle not kept is freed. On failure every particle, old or new, stays reachable from
        ``self.particles``, so closing the request frees all of it."""
        self._check_open()
        for i, (source, _) in enumerate(keep):
            self._particle(source, f"keep[{i}].source_id")
        ids = [nid for _, new_ids in keep for nid in new_ids] + [nid for nid, _, _ in imports]
        if len(set(ids)) != len(ids) or len({source for source, _ in keep}) != len(keep):
            raise InvalidCall("keep, imports: every particle id at most once")
        new: dict[str, Particle] = {}
        try:
            for source, new_ids in keep:
                p = self.particles.pop(source)
                for j, nid in enumerate(new_ids):
                    new[nid] = (
                        p
                        if j == 0
                        else Particle(
                            list(p.generated), clone_all(p.potentials), self._fork(p.tables), p.finished, p.ahead
                        )
                    )
        except BaseException:
            self.particles.update(new)
            raise
        self._free(self.particles.values())  # the particles not kept, before any import takes blocks
        self.particles = new
        for nid, generated, finished in imports:  # a failure half-way leaves them in self.particles (freed on close)
            p = new[nid] = Particle(list(generated), self.fresh_potentials(generated), None, finished)
            if not finished:
                p.tables = []
                for prompt in self.prompts:
                    tokens = self.kv_tokens(p, prompt)
                    p.tables.append(self.host.load(tokens, self.keys(tokens)))
        self._count_held()
        self.host.count_imported(len(imports))

    def close(self) -> None:
        """Free every particle; a step still queued for this request is dropped (``ExtendJob.live``)."""
        self.closed = True
        self._free(self.particles.values())
        self.particles = {}
        self.host.release(self.request_id)

    def _particle(self, pid: str, field: str) -> Particle:
        p = self.particles.get(pid)
        if p is None:
            raise InvalidCall(f"{field}: no particle {pid!r} in this request")
        return p

    def _check_open(self) -> None:
        """A call that arrives after ``close`` (it raced a cancel) must not hold KV again."""
        if self.closed:
            raise RequestClosed(f"steering request {self.request_id} was closed")

    def _free(self, particles) -> None:
        for p in particles:
            self.host.free(p.tables or [])
            p.tables, p.ahead = None, None

    # --- extension: a patch of batched steps -------------------------------------------------------
    def _check_items(self, items: list[tuple[str, int, int]]) -> list[Particle]:
        self._check_open()
        if len({pid for pid, _, _ in items}) != len(items):
            raise InvalidCall("items: each particle at most once")
        for i, (_, _, k) in enumerate(items):
            if not 1 <= k <= 64:
                raise InvalidCall(f"items[{i}].k: must be in [1, 64], got {k}")
        parents = [self._particle(pid, f"items[{i}].particle_id") for i, (pid, _, _) in enumerate(items)]
        for (pid, _, _), p in zip(items, parents):
            if p.finished:
                raise ValueError(f"particle {pid} has finished and cannot be extended")
        return parents

    def _job(self, particles: list[Particle], complete) -> ExtendJob:
        """One batched step for ``particles`` (none of them ``ahead``): ``complete`` gets their logits."""
        return ExtendJob(
            [t for p in particles for t in p.tables],
            [t for p in particles for t in self.feed_tokens(p)],
            complete,
            live=lambda: not self.closed,
        )

    def extend_job(self, step: int, items: list[tuple[str, int, int]]) -> ExtendJob:
        """The per-token step (a patch of one token): its job's result is the children."""
        parents = self._check_items(items)
        return self._job(parents, lambda logits: self._children(step, items, parents, logits)[0])

    def extend_patch(self, step: int, items: list[tuple[str, int, int]]) -> Future:
        """Extend every listed particle by a patch (``self.patch``): K children each at the first token,
        then each child alone, token by token, until its boundary (``smc.patch``). Every position is
        one batched step of the decode loop shared by the request's particles still in their patch;
        the next position's job is queued from the last one's ``complete``, so no position waits on
        the caller. The future gets the children (their tokens and summed increments)."""
        parents = self._check_items(items)
        done: Future = Future()

        def failed(f: Future) -> None:  # a dropped or failed position fails the patch
            if f.exception() is not None and not done.done():
                done.set_exception(f.exception())

        def follow(job: ExtendJob) -> None:
            job.future.add_done_callback(failed)
            self.host.extend(job)

        def first(logits) -> None:
            out, lanes = self._children(step, items, parents, logits)
            advance(out, lanes, 1)

        def advance(out: list[Child], lanes: list[tuple[Child, Particle, int]], position: int) -> None:
            if not lanes:
                done.set_result(out)
                return
            ps = [p for _, p, _ in lanes]
            follow(
                self._job(ps, lambda logits: advance(out, self._continue(step, lanes, logits, position), position + 1))
            )

        forward = [p for p in parents if p.ahead is None]
        if forward:
            follow(self._job(forward, first))
        else:  # every parent stopped before its next token: its logits are here already
            first(None)
        return done

    def _logits(self, particles: list[Particle], forwarded: torch.Tensor | None) -> torch.Tensor:
        """Every particle's next-token logits, one row per prompt: kept ones (``ahead``) and the forward's
        rows of the others, in order."""
        m = len(self.prompts)
        if all(p.ahead is None for p in particles):
            return forwarded
        rows, r = [], 0
        for p in particles:
            if p.ahead is not None:
                rows.append(p.ahead)
            else:
                rows.append(forwarded[r : r + m])
                r += m
        return torch.cat(rows)

    def _proposal(self, particles: list[Particle], logits: torch.Tensor, u: torch.Tensor):
        m = len(self.prompts)
        logp = torch.log_softmax(logits.double() / self.params.temperature, dim=-1).view(len(particles), m, -1)
        factors = [combined_log_factor(p.potentials, list(logp[r, 1:])) for r, p in enumerate(particles)]
        rows = with_factors(logp[:, 0], factors)
        allowed = stacked_masks([combined_mask(p.potentials) for p in particles], rows.shape[1], rows.device)
        return propose(rows, allowed, u), rows, allowed

    def _extend(self, p: Particle, prop, row: int, col: int):
        return extend(
            p.potentials,
            p.generated,
            prop,
            row,
            col,
            self.vocab.eos_ids,
            self.params.max_tokens,
            self.params.ignore_eos,
        )

    def _children(self, step: int, items, parents: list[Particle], logits: torch.Tensor | None):
        """The patch's first token: propose every listed particle's children (``smc.proposal``), advance
        their potentials. Returns the children and the lanes (child, its particle, population index)
        that go on with their patch.

        Children are built aside and swapped in only when all exist, so a failure half-way frees what
        was made and leaves the parents (with this step's slot appended) for closing the request to
        free: no KV is ever referenced by nothing.
        """
        logits = self._logits(parents, logits)
        k_max = max(k for _, _, k in items)
        u = torch.tensor(
            [[seeded_uniform(self.params.seed, step, index, j) for j in range(k_max)] for _, index, _ in items],
            dtype=torch.float64,
            device=logits.device,
        )
        prop, _, _ = self._proposal(parents, logits, u)
        made: dict[str, Particle] = {}
        out: list[Child] = []
        lanes: list[tuple[Child, Particle, int]] = []
        try:
            for row, ((pid, index, k), p) in enumerate(zip(items, parents)):
                for j in range(k):
                    cid = f"{pid}/{j}"
                    child = made[cid] = Particle(list(p.generated), clone_all(p.potentials), self._fork(p.tables))
                    ext = self._extend(child, prop, row, j)
                    child.finished = ext.finished
                    c = Child(pid, cid, ext.token, ext.log_increment, ext.finished, ext.reason)
                    c.tokens = [ext.token] if ext.token >= 0 else []
                    out.append(c)
                    if child.finished:
                        self._free([child])
                    elif not stops_after(self.patch, 0, ext.log_increment):
                        lanes.append((c, child, index))
        except BaseException:
            self._free(made.values())
            raise
        for (pid, _, _), p in zip(items, parents):
            self._free([p])
            del self.particles[pid]
        self.particles.update(made)
        self._count_held()
        return out, lanes

    def _continue(self, step: int, lanes, logits: torch.Tensor, position: int):
        """One more token of each lane's patch (k = 1, drawn with the uniform of (seed, step, index,
        child, position)), or its boundary; returns the lanes that go on. The particles are extended
        in place: they are already the request's (a failure leaves them for the close to free)."""
        particles = [p for _, p, _ in lanes]
        u = torch.tensor(
            [
                [seeded_uniform(self.params.seed, step, index, int(c.child_id.rsplit("/", 1)[1]), position)]
                for c, _, index in lanes
            ],
            dtype=torch.float64,
            device=logits.device,
        )
        prop, rows, allowed = self._proposal(particles, logits, u)
        h = entropy(rows, allowed) if math.isfinite(self.patch.entropy_threshold) else None
        m = len(self.prompts)
        going = []
        for r, (c, p, index) in enumerate(lanes):
            if h is not None and stops_before(self.patch, position, float(h[r])):
                p.ahead = logits[r * m : (r + 1) * m].clone()
                continue
            ext = self._extend(p, prop, r, 0)
            if ext.token >= 0:
                c.tokens.append(ext.token)
            c.log_increment += ext.log_increment
            if ext.finished:
                p.finished = c.finished = True
                c.finish_reason = ext.reason
                self._free([p])
            elif not stops_after(self.patch, position, ext.log_increment):
                going.append((c, p, index))
        self._count_held()
        return going
