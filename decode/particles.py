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
    generated: list[int]                    # the last one is pending: its KV is not computed yet
    potentials: list[Potential]
    table: BlockTable | None = None         # KV of prompt + generated[:-1]; None once finished
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
    """The particles of one SMC request on this worker."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    specs: list
    vocab: Vocab
    engine: DecodeEngine
    particles: dict[str, Particle] = field(default_factory=dict)

    def fresh_potentials(self, generated: list[int] = ()) -> list[Potential]:
        pots = build_potentials(self.specs, self.vocab)
        for tok in generated:
            for p in pots:
                p.advance(tok)
        return pots

    def feed_token(self, p: Particle) -> int:
        return p.generated[-1] if p.generated else self.prompt_ids[-1]

    def kv_tokens(self, p: Particle) -> list[int]:
        return self.prompt_ids + p.generated[:-1] if p.generated else self.prompt_ids[:-1]

    # --- operations (each runs in the engine thread) ----------------------------------------------
    def open(self, block_keys: list[str], particle_ids: list[str]) -> None:
        root = self.engine.load_kv(self.prompt_ids[:-1], block_keys)
        for i, pid in enumerate(particle_ids):
            table = root if i == 0 else self.engine.bm.fork(root)
            self.particles[pid] = Particle([], self.fresh_potentials(), table)

    def export(self, ids: list[str]) -> list[tuple[str, list[int], list[str], bool]]:
        out = []
        for pid in ids:
            p = self.particles[pid]
            keys: list[str] = []
            if not p.finished:
                tokens = self.kv_tokens(p)
                keys = chain_keys(self.engine.lm.fingerprint, tokens, self.engine.block_size)
                self.engine.save_kv(p.table, tokens, keys)
            out.append((pid, list(p.generated), keys, p.finished))
        return out

    def reshape(self, keep: list[tuple[str, list[str]]], imports: list[tuple[str, list[int], list[str], bool]]) -> None:
        bm = self.engine.bm
        new: dict[str, Particle] = {}
        for source, new_ids in keep:
            p = self.particles.pop(source)
            for j, nid in enumerate(new_ids):
                if j == 0:
                    new[nid] = p
                else:
                    with self.engine.lock:
                        table = bm.fork(p.table) if p.table is not None else None
                    new[nid] = Particle(list(p.generated), [q.clone() for q in p.potentials], table, p.finished)
        self._free(self.particles.values())
        with self.engine.lock:
            self.engine.counters["particles_imported"] += len(imports)
        for nid, generated, keys, finished in imports:
            p = Particle(list(generated), self.fresh_potentials(generated), None, finished)
            if not finished:
                p.table = self.engine.load_kv(self.kv_tokens(p), keys)
            new[nid] = p
        self.particles = new

    def close(self) -> None:
        self._free(self.particles.values())
        self.particles = {}

    def _free(self, particles) -> None:
        with self.engine.lock:
            for p in particles:
                if p.table is not None:
                    self.engine.bm.free_table(p.table)
                    p.table = None

    # --- extension: one batched step ---------------------------------------------------------------
    def extend_job(self, step: int, items: list[tuple[str, int, int]]) -> ExtendJob:
        parents = [self.particles[pid] for pid, _, _ in items]
        for (pid, _, _), p in zip(items, parents):
            if p.finished:
                raise ValueError(f"particle {pid} has finished and cannot be extended")
        return ExtendJob([p.table for p in parents], [self.feed_token(p) for p in parents],
                         lambda logits: self._children(step, items, parents, logits))

    def _children(self, step: int, items, parents: list[Particle], logits: torch.Tensor) -> list[Child]:
        temperature = self.params.temperature
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        out: list[Child] = []
        for (pid, index, k), p, row in zip(items, parents, logp):
            mask = combined_mask(p.potentials)
            if mask is not None:
                row = row.masked_fill(~mask[: row.numel()], float("-inf"))
            log_mass = float(torch.logsumexp(row, 0))
            cdf = torch.cumsum(torch.exp(row - log_mass), 0) if log_mass > -math.inf else None
            del self.particles[pid]
            for j in range(k):
                cid = f"{pid}/{j}"
                last = j == k - 1
                pots = p.potentials if last else [q.clone() for q in p.potentials]
                with self.engine.lock:
                    table = p.table if last else self.engine.bm.fork(p.table)
                child = Particle(list(p.generated), pots, table)
                if cdf is None:  # every next token violates a hard constraint: a dead particle
                    out.append(Child(pid, cid, -1, -math.inf, True))
                    child.finished = True
                else:
                    u = _seed_uniform(self.params.seed, step, index, j) * float(cdf[-1])
                    token = min(int(torch.searchsorted(cdf, torch.tensor([u]), right=True)), cdf.numel() - 1)
                    inc = log_mass + advance_all(pots, token)
                    child.generated.append(token)
                    child.finished = (token in self.vocab.eos_ids and not self.params.ignore_eos) or \
                        len(child.generated) >= self.params.max_tokens
                    if child.finished:
                        inc += finish_all(pots)
                    out.append(Child(pid, cid, token, inc if inc == inc else -math.inf, child.finished))
                if child.finished:
                    self._free([child])
                self.particles[cid] = child
        return out
