"""SMC particles on one decode worker: their KV, their potentials, and how they extend.

The scheduler owns the particle set (weights, resampling); a worker owns its particles' KV. Each
step the scheduler asks the worker to extend particles; every particle's next-token distribution
comes out of the worker's shared batched forward step, hard constraints mask it (the proposal is
the masked, renormalised LM; the weight gets the allowed mass), and each child's draw is seeded by
(request seed, step, population index, child) so it does not depend on placement or batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from decode.block_manager import BlockTable
from decode.engine import DecodeEngine, ExtendJob
from engine.kv import chain_keys
from engine.sampling import SamplingParams, position_generator
from smc.potentials import Potential, advance_all, build_potentials, combined_mask, finish_all
from smc.vocab import Vocab


@dataclass
class Particle:
    generated: list[int]                      # the last one is pending: its KV is not computed yet
    potentials: list[Potential]
    tables: list[BlockTable] | None = None    # KV of each prompt + generated[:-1]; None once finished
    finished: bool = False


@dataclass
class Child:
    parent_id: str
    child_id: str
    token: int
    log_increment: float
    finished: bool


def _seed_uniform(seed: int, step: int, index: int, k: int) -> float:
    mixed = (seed * 1_000_003 + step) * 1_000_033 + index
    return float(torch.rand(1, generator=position_generator(mixed, k)))


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
        roots = [self.engine.load_kv(self.prompts[0][:-1], block_keys)]
        roots += [self.engine.load_kv(prompt[:-1], self.keys(prompt[:-1])) for prompt in self.prompts[1:]]
        for i, pid in enumerate(particle_ids):
            self.particles[pid] = Particle([], self.fresh_potentials(), roots if i == 0 else self._fork(roots))

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
        new: dict[str, Particle] = {}
        for source, new_ids in keep:
            p = self.particles.pop(source)
            for j, nid in enumerate(new_ids):
                new[nid] = p if j == 0 else Particle(list(p.generated), [q.clone() for q in p.potentials],
                                                     self._fork(p.tables), p.finished)
        self._free(self.particles.values())
        with self.engine.lock:
            self.engine.counters["particles_imported"] += len(imports)
        for nid, generated, finished in imports:
            p = Particle(list(generated), self.fresh_potentials(generated), None, finished)
            if not finished:
                p.tables = [self.engine.load_kv(t, self.keys(t)) for t in (self.kv_tokens(p, q) for q in self.prompts)]
            new[nid] = p
        self.particles = new

    def close(self) -> None:
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
        return ExtendJob([t for p in parents for t in p.tables], [t for p in parents for t in self.feed_tokens(p)],
                         lambda logits: self._children(step, items, parents, logits))

    def _children(self, step: int, items, parents: list[Particle], logits: torch.Tensor) -> list[Child]:
        m = len(self.prompts)
        logp = torch.log_softmax(logits.float() / self.params.temperature, dim=-1).view(len(parents), m, -1)
        rows = logp[:, 0]
        for i, w in enumerate(self.intersect_weights, start=1):
            rows = rows + w * logp[:, i]
        out: list[Child] = []
        for (pid, index, k), p, row in zip(items, parents, rows):
            mask = combined_mask(p.potentials)
            if mask is not None:
                row = row.masked_fill(~mask[: row.numel()], float("-inf"))
            log_mass = float(torch.logsumexp(row, 0))
            cdf = torch.cumsum(torch.exp(row - log_mass), 0) if log_mass > -math.inf else None
            del self.particles[pid]
            for j in range(k):
                last = j == k - 1
                child = Particle(list(p.generated), p.potentials if last else [q.clone() for q in p.potentials],
                                 p.tables if last else self._fork(p.tables))
                cid = f"{pid}/{j}"
                if cdf is None:  # every next token violates a hard constraint: a dead particle
                    out.append(Child(pid, cid, -1, -math.inf, True))
                    child.finished = True
                else:
                    u = _seed_uniform(self.params.seed, step, index, j) * float(cdf[-1])
                    token = min(int(torch.searchsorted(cdf, torch.tensor([u]), right=True)), cdf.numel() - 1)
                    inc = log_mass + advance_all(child.potentials, token)
                    child.generated.append(token)
                    child.finished = (token in self.vocab.eos_ids and not self.params.ignore_eos) or \
                        len(child.generated) >= self.params.max_tokens
                    if child.finished:
                        inc += finish_all(child.potentials)
                    out.append(Child(pid, cid, token, inc, child.finished))
                if child.finished:
                    self._free([child])
                self.particles[cid] = child
        return out
