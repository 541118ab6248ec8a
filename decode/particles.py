"""SMC particles on one decode worker: their KV, their potentials, and how they extend.

The scheduler owns the particle set (weights, resampling); a worker owns its particles' KV. Each
step the scheduler asks the worker to extend particles; every particle's next-token distribution
comes out of the worker's shared batched forward step and goes through ``smc.proposal`` (the LM
masked by the hard constraints and renormalised; the weight gets the allowed mass), the same code the
reference driver runs. Each child's uniform is a hash of (request seed, step, population index,
child), so it does not depend on placement or batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from decode.engine import DecodeEngine, ExtendJob
from engine.block_manager import BlockTable
from engine.kv import chain_keys
from engine.sampling import SamplingParams, seeded_uniform
from smc.potentials import Potential, advance_all, build_potentials, clone_all, combined_mask, finish_all
from smc.proposal import Proposal, propose
from smc.step import LENGTH, STOP, VIOLATED
from smc.vocab import Vocab


@dataclass
class Particle:
    generated: list[int]  # the last one is pending: its KV is not computed yet
    potentials: list[Potential]
    tables: list[BlockTable] | None = None  # KV of each prompt + generated[:-1]; None once finished
    finished: bool = False


@dataclass
class Child:
    parent_id: str
    child_id: str
    token: int
    log_increment: float
    finished: bool  # finished or dead: never extended again
    finish_reason: str = ""  # STOP, LENGTH or VIOLATED once finished


@dataclass
class ParticleGroup:
    """The particles of one SMC request on this worker.

    ``prompts[0]`` is the request's prompt; further prompts are intersected with it: every particle
    also runs under them (companion sequences that share its generated tokens) and the proposal is
    the product of the next-token distributions, the others raised to ``intersect_weights``.
    """

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    specs: list
    vocab: Vocab
    engine: DecodeEngine
    intersect_weights: list[float] = field(default_factory=list)  # one per prompt after the first
    particles: dict[str, Particle] = field(default_factory=dict)
    closed: bool = False

    def fresh_potentials(self, generated: list[int] = ()) -> list[Potential]:
        pots = build_potentials(self.specs, self.vocab)
        for tok in generated:
            for p in pots:
                p.advance(tok)
        return pots

    def feed_tokens(self, p: Particle) -> list[int]:
        return [p.generated[-1] if p.generated else prompt[-1] for prompt in self.prompts]

    def kv_tokens(self, p: Particle, prompt: list[int]) -> list[int]:
        return prompt + p.generated[:-1] if p.generated else prompt[:-1]

    def keys(self, tokens: list[int]) -> list[str]:
        return chain_keys(self.engine.lm.fingerprint, tokens, self.engine.block_size)

    def _fork(self, tables: list[BlockTable] | None) -> list[BlockTable] | None:
        if tables is None:
            return None
        with self.engine.lock:
            return [self.engine.bm.fork(t) for t in tables]

    # --- operations (each runs in the engine thread) ----------------------------------------------
    def open(self, block_keys: list[str], particle_ids: list[str]) -> None:
        pots = [self.fresh_potentials() for _ in particle_ids]  # before any KV is held
        roots: list[BlockTable] = []
        try:
            roots.append(self.engine.load_kv(self.prompts[0][:-1], block_keys))
            for prompt in self.prompts[1:]:
                roots.append(self.engine.load_kv(prompt[:-1], self.keys(prompt[:-1])))
        except BaseException:
            self._free([Particle([], [], roots)])
            raise
        for i, pid in enumerate(particle_ids):
            self.particles[pid] = Particle([], pots[i], roots if i == 0 else self._fork(roots))

    def export(self, ids: list[str]) -> list[tuple[str, list[int], bool]]:
        """Write the particles' KV to the store (content keys, so the receiver can recompute them)."""
        out = []
        for pid in ids:
            p = self.particles[pid]
            if not p.finished:
                for prompt, table in zip(self.prompts, p.tables):
                    tokens = self.kv_tokens(p, prompt)
                    self.engine.save_kv(table, tokens, self.keys(tokens))
            out.append((pid, list(p.generated), p.finished))
        return out

    def reshape(self, keep: list[tuple[str, list[str]]], imports: list[tuple[str, list[int], bool]]) -> None:
        """The new population: ``keep`` maps a particle here to its offspring ids (the first takes the
        particle itself, the others fork its KV); ``imports`` are particles migrating in (their KV is
        read from the store under its content keys, else recomputed); everything else is freed.
        On failure every particle stays reachable, so closing the request frees all of it."""
        new: dict[str, Particle] = {}
        try:
            for source, new_ids in keep:
                p = self.particles.pop(source)
                for j, nid in enumerate(new_ids):
                    new[nid] = (
                        p
                        if j == 0
                        else Particle(list(p.generated), clone_all(p.potentials), self._fork(p.tables), p.finished)
                    )
            for nid, generated, finished in imports:
                p = new[nid] = Particle(list(generated), self.fresh_potentials(generated), None, finished)
                if not finished:
                    p.tables = []  # filled one by one: a failure half-way still frees what was loaded
                    for prompt in self.prompts:
                        tokens = self.kv_tokens(p, prompt)
                        p.tables.append(self.engine.load_kv(tokens, self.keys(tokens)))
        except BaseException:
            self.particles.update(new)
            raise
        self._free(self.particles.values())
        self.particles = new
        with self.engine.lock:
            self.engine.counters["particles_imported"] += len(imports)

    def close(self) -> None:
        """Free every particle; a step still queued for this request is dropped (``ExtendJob.live``)."""
        self.closed = True
        self._free(self.particles.values())
        self.particles = {}

    def _free(self, particles) -> None:
        with self.engine.lock:
            for p in particles:
                for t in p.tables or []:
                    self.engine.bm.free_table(t)
                p.tables = None

    # --- extension: one batched step ---------------------------------------------------------------
    def extend_job(self, step: int, items: list[tuple[str, int, int]]) -> ExtendJob:
        parents = [self.particles[pid] for pid, _, _ in items]
        for (pid, _, _), p in zip(items, parents):
            if p.finished:
                raise ValueError(f"particle {pid} has finished and cannot be extended")
        return ExtendJob(
            [t for p in parents for t in p.tables],
            [t for p in parents for t in self.feed_tokens(p)],
            lambda logits: self._children(step, items, parents, logits),
            live=lambda: not self.closed,
        )

    def _children(self, step: int, items, parents: list[Particle], logits: torch.Tensor) -> list[Child]:
        """Propose every listed particle's children (``smc.proposal``), advance their potentials.

        Children are built aside and swapped in only when all exist, so a failure half-way frees what
        was made and leaves the parents (with this step's slot appended) for closing the request to
        free: no KV is ever referenced by nothing.
        """
        m = len(self.prompts)
        logp = torch.log_softmax(logits.double() / self.params.temperature, dim=-1).view(len(parents), m, -1)
        rows = logp[:, 0]
        for i, w in enumerate(self.intersect_weights, start=1):
            rows = rows + w * logp[:, i]
        masks = [combined_mask(p.potentials) for p in parents]
        allowed = None
        if any(mask is not None for mask in masks):
            every = torch.ones(rows.shape[1], dtype=torch.bool)
            allowed = torch.stack([every if mask is None else mask[: rows.shape[1]] for mask in masks])
        k_max = max(k for _, _, k in items)
        u = torch.tensor(
            [[seeded_uniform(self.params.seed, step, index, j) for j in range(k_max)] for _, index, _ in items],
            dtype=torch.float64,
        )
        prop = propose(rows, allowed, u)
        made: dict[str, Particle] = {}
        out: list[Child] = []
        try:
            for row, ((pid, _, k), p) in enumerate(zip(items, parents)):
                for j in range(k):
                    cid = f"{pid}/{j}"
                    child = made[cid] = Particle(list(p.generated), clone_all(p.potentials), self._fork(p.tables))
                    out.append(self._advance(child, pid, cid, int(prop.tokens[row, j]), prop, row))
                    if child.finished:
                        self._free([child])
        except BaseException:
            self._free(made.values())
            raise
        for (pid, _, _), p in zip(items, parents):
            self._free([p])
            del self.particles[pid]
        self.particles.update(made)
        return out

    def _advance(self, child: Particle, pid: str, cid: str, token: int, prop: Proposal, row: int) -> Child:
        """Append ``token`` to ``child`` and return its log-weight increment and how it ended, if it did."""
        if token < 0:  # every next token violates a hard constraint: a dead particle
            child.finished = True
            return Child(pid, cid, -1, -math.inf, True, VIOLATED)
        log_g = advance_all(child.potentials, token)
        child.generated.append(token)
        reason = ""
        if token in self.vocab.eos_ids and not self.params.ignore_eos:
            reason = STOP
        elif len(child.generated) >= self.params.max_tokens:
            reason = LENGTH
        if reason:
            log_g += finish_all(child.potentials)
        inc = prop.increment(row, log_g)
        if inc == -math.inf and reason != LENGTH:
            reason = VIOLATED  # a potential ruled it out (at EOS: the text is incomplete for it)
        child.finished = bool(reason)
        return Child(pid, cid, token, inc, child.finished, reason)
