"""SMC particles on one decode worker: their KV, their potentials, and how they extend.

The scheduler owns the particle set (weights, resampling); a worker owns its particles' KV. Each
step the scheduler asks the worker to extend particles, each by a patch of tokens (``smc.patch``: one
token unless the request asks for more); every particle's next-token distribution
comes out of the worker's shared batched forward step and goes through ``smc.proposal`` (the LM
times its potentials' factors, masked by the hard constraints and renormalised; the weight gets the
allowed mass) and ``smc.extension``, the same code the reference driver runs. Each child's uniform
is a hash of (request seed, step, population index, child), so it does not depend on placement or
batching; a patch's later tokens hash (seed, step, index, child, position).

With ``--speculative mtp`` (and unless the request opts out) a patch's later tokens are drafted by the
MTP heads, k per lane, and verified in one multi-position forward per lane set against exactly the
proposal the per-token path would draw from at each position (``smc.speculative``): the patch's tokens,
boundaries and increments have the same law as without drafts. The first token of a patch (K children
from one proposal, maybe without replacement) is never speculative.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from smcserve.decode.batcher import ExtendJob, InvalidCall, RequestClosed, Reservation
from smcserve.decode.host import ParticleHost
from smcserve.engine.block_manager import BlockTable
from smcserve.engine.kv import chain_keys
from smcserve.engine.sampling import SamplingParams, seeded_uniform
from smcserve.engine.speculative import Draft, Speculator
from smcserve.smc import speculative
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
from smcserve.smc.proposal import Proposal, propose, stacked_masks, with_factors
from smcserve.smc.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass
class Particle:
    generated: list[int]  # the last one is pending: its KV is not computed yet
    potentials: list[Potential]
    tables: list[BlockTable] | None = None  # KV of each prompt + generated[:-1]; None once finished
    finished: bool = False
    # a patch that ended before a token (an entropy boundary) keeps that token's logits (one row per
    # prompt): the tables then cover every generated token, and the next step needs no forward for it
    ahead: torch.Tensor | None = None
    # speculative patches: the trunk's hidden states (prompt 0) of this patch's positions with KV, newest
    # last (the heads' drafting window); between patches only the row of a particle kept ``ahead``
    hidden: torch.Tensor | None = None


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
                            list(p.generated),
                            clone_all(p.potentials),
                            self._fork(p.tables),
                            p.finished,
                            p.ahead,
                            p.hidden,
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
            p.tables, p.ahead, p.hidden = None, None, None

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
        the caller. The future gets the children (their tokens and summed increments).

        Speculating (:meth:`_speculator`), each position after the first is instead a verify step of
        every lane: up to k drafts each, one forward over [last token, drafts] (:meth:`_verify`), so a
        lane may advance several tokens per step and the lanes' positions differ."""
        parents = self._check_items(items)
        done: Future = Future()
        spec = self._speculator()

        def failed(f: Future) -> None:  # a dropped or failed position fails the patch
            if f.exception() is not None and not done.done():
                done.set_exception(f.exception())

        def follow(job: ExtendJob) -> None:
            job.future.add_done_callback(failed)
            self.host.extend(job)

        def first(logits, hidden=None) -> None:
            if spec is not None:
                windows = self._first_windows(items, parents, hidden)
            out, lanes = self._children(step, items, parents, logits)
            if spec is None:
                advance(out, lanes, 1)
                return
            for c, p, _ in lanes:
                p.hidden = windows.get(c.parent_id)
            verify(out, lanes)

        def verify(out: list[Child], lanes: list[tuple[Child, Particle, int]]) -> None:
            """The lanes' next tokens, drafted and verified in one forward (positions vary by lane)."""
            if not lanes:
                done.set_result(out)
                return
            drafts = self._draft(spec, step, lanes)
            ps = [p for _, p, _ in lanes]
            job = self._job(ps, None)
            job.drafts = [d.tokens for p, d in zip(ps, drafts) for _ in p.tables]
            job.hidden = True
            job.complete = lambda logits, hidden: verify(out, self._verify(step, lanes, drafts, job, logits, hidden))
            follow(job)

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
            job = self._job(forward, first)
            job.hidden = spec is not None  # the drafting windows start at the parents' last token
            follow(job)
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
        rows, allowed = self._targets(particles, logits)
        return propose(rows, allowed, u), rows, allowed

    def _targets(self, particles: list[Particle], logits: torch.Tensor):
        """Each particle's proposal before masking, log p0 + log φ [P, V], and its mask [P, V] (or None)."""
        m = len(self.prompts)
        logp = torch.log_softmax(logits.double() / self.params.temperature, dim=-1).view(len(particles), m, -1)
        factors = [combined_log_factor(p.potentials, list(logp[r, 1:])) for r, p in enumerate(particles)]
        rows = with_factors(logp[:, 0], factors)
        allowed = stacked_masks([combined_mask(p.potentials) for p in particles], rows.shape[1], rows.device)
        return rows, allowed

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

    # --- speculative patches (--speculative mtp; smc.speculative) ------------------------------------
    def _speculator(self) -> Speculator | None:
        """The drafter when this request's patches speculate: the worker has MTP heads, the request did not
        opt out (``disable_speculation``) and its patches have later tokens (``patch.max_tokens`` > 1). Not
        the plain path's ``--speculative-max-batch`` limit: whether a lane speculates never depends on the
        load, so a seeded request draws the same tokens however it is batched."""
        spec = self.host.speculator
        if spec is None or self.params.disable_speculation or self.patch.per_token:
            return None
        return spec

    def _first_windows(self, items, parents: list[Particle], hidden: torch.Tensor | None) -> dict:
        """Each parent's drafting window for its children's lanes, by particle id: the hidden state of its
        last token (the forward's row of its first prompt, or the row it kept with ``ahead``). A window
        depends on the particle's tokens alone, never on where it ran before: a seeded request reproduces."""
        m, r, out = len(self.prompts), 0, {}
        for (pid, _, _), p in zip(items, parents):
            if p.ahead is not None:
                row = p.hidden
            else:
                row = None if hidden is None else hidden[r * m : r * m + 1].clone()
                r += 1
            if row is not None:
                out[pid] = row
        return out

    def _draft(self, spec: Speculator, step: int, lanes) -> list[Draft]:
        """Each lane's drafts from the heads (unmasked; a forbidden draft is rejected at verification):
        k = up to the worker's k, never past the patch's last position or the request's max_tokens; none for
        a lane without a window yet. The draws hash (seed, step, index, child, position) in their stream."""
        out = [Draft([]) for _ in lanes]
        ready, seqs = [], []
        for i, (c, p, index) in enumerate(lanes):
            position = len(c.tokens)
            k = min(spec.k, self.patch.max_tokens - 1 - position, self.params.max_tokens - len(p.generated) - 1)
            if k < 1 or p.hidden is None:
                continue
            child = int(c.child_id.rsplit("/", 1)[1])
            seed = speculative.draft_seed(self.params.seed, step, index, child, position)
            params = dataclasses.replace(self.params, seed=seed, top_k=0, top_p=1.0)
            ready.append(i)
            seqs.append((p.hidden, self.prompts[0] + p.generated, params, k))
        if seqs:
            try:
                for i, d in zip(ready, spec.draft(seqs)):
                    out[i] = d
            except Exception:  # drafting is an optimisation: the lanes go on a token at a time
                log.exception("drafting for the steering request %s failed", self.request_id)
        return out

    def _verify(self, step: int, lanes, drafts: list[Draft], job: ExtendJob, logits, hidden):
        """Each lane's tokens from its verify rows ([last token, d1..dk] per prompt), then its boundary;
        returns the lanes that go on. The discarded positions' slots are rolled back."""
        if job.drafts is None:  # no room for the drafts in the pool: each lane ran its token alone
            drafts = [Draft([]) for _ in lanes]
        m, row, going = len(self.prompts), 0, []
        w = self.host.speculator.window
        for (c, p, index), d in zip(lanes, drafts):
            n = len(d.tokens) + 1
            rows = logits[row : row + m * n].view(m, n, -1)
            h = hidden[row : row + n]
            row += m * n
            starts = [t.num_tokens - n for t in p.tables]
            kept, judged, accepted, goes = self._verify_lane(step, c, p, index, d, rows)
            if judged:  # drafts a boundary discarded before their verdict are not counted
                self.host.count_drafts(judged, accepted)
            if p.finished:
                continue  # freed
            for t, start in zip(p.tables, starts):
                self.host.truncate(t, start + kept)
            window = h[:kept] if p.hidden is None else torch.cat([p.hidden, h[:kept]])
            p.hidden = window[-w:].clone() if goes else (window[-1:].clone() if p.ahead is not None else None)
            if goes:
                going.append((c, p, index))
        self._count_held()
        return going

    def _verify_lane(self, step: int, c: Child, p: Particle, index: int, d: Draft, rows: torch.Tensor):
        """Position by position j (patch position ``len(c.tokens)``): the target p_j from ``rows[:, j]`` with
        the potentials as the tokens so far left them; the entropy boundary before the token; the token
        (the draft, accepted with probability min(1, p_j/q_j), else a draw from the residual; after every
        draft, one from p_j); its increment and the boundaries after it, exactly as :meth:`_continue`.
        Returns (slots kept: the fed positions up to j, drafts judged, drafts accepted, whether the lane
        goes on)."""
        k = len(d.tokens)
        child = int(c.child_id.rsplit("/", 1)[1])
        judged, accepted, uses = 0, 0, (speculative.ACCEPT, speculative.RESAMPLE)
        for j in range(k + 1):
            position = len(c.tokens)
            target, allowed = self._targets([p], rows[:, j])
            if math.isfinite(self.patch.entropy_threshold) and stops_before(
                self.patch, position, float(entropy(target, allowed)[0])
            ):
                p.ahead = rows[:, j].clone()
                return j + 1, judged, accepted, False
            masked = target if allowed is None else target.masked_fill(~allowed[:, : target.shape[1]], -math.inf)
            log_mass = torch.logsumexp(masked, dim=1)
            token, hit = -1, False
            if float(log_mass[0]) > -math.inf:
                u = [speculative.lane_uniform(self.params.seed, step, index, child, position, use) for use in uses]
                draft = d.tokens[j] if j < k else None
                q = d.q[j] if j < k else None
                token, hit = speculative.verify_token(torch.exp(masked[0] - log_mass[0]), q, draft, *u)
            prop = Proposal(torch.tensor([[token]], dtype=torch.int64, device=log_mass.device), log_mass)
            ext = self._extend(p, prop, 0, 0)
            if ext.token >= 0:
                c.tokens.append(ext.token)
            c.log_increment += ext.log_increment
            judged, accepted = judged + (j < k and token >= 0), accepted + hit
            if ext.finished:
                p.finished = c.finished = True
                c.finish_reason = ext.reason
                self._free([p])
                return j + 1, judged, accepted, False
            if stops_after(self.patch, position, ext.log_increment):
                return j + 1, judged, accepted, False
            if not hit:  # a draw of its own (rejection, or past the drafts): the next verify starts from it
                return j + 1, judged, accepted, True
        raise AssertionError("unreachable: the position after the drafts never accepts a draft")
