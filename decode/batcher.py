"""Continuous batching on one decode worker: who waits, who runs, who leaves, and each step's plan.

Bookkeeping only (a :class:`BlockManager`, no model, no lock): :class:`decode.loop.DecodeLoop`
calls it under its lock and runs the plans. A step advances every running sequence and every SMC
extension job by one token; admitted sequences join the step in which their prompt KV is loaded. A
prompt whose KV must be recomputed (not in the store) is ``loading`` meanwhile: one chunk of it runs
per step, next to the running batch, so the batch never waits for the whole prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from smcserve.decode.admission import check_fits, require, unreserved
from smcserve.decode.sequence import DecodeEvent, DecodeSeq
from smcserve.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from smcserve.engine.chunked_prefill import ChunkedPrefill
from smcserve.engine.finish import FinishReason
from smcserve.engine.model_runner import SeqBatchItem


class InvalidCall(ValueError):
    """A worker call that names what the request does not have (a particle), or asks for the impossible."""


class RequestClosed(Exception):
    """Work for a steering request that was closed (cancelled) meanwhile: dropped, nothing to report."""


@dataclass
class Reservation:
    """The KV blocks a steering request's particles may hold at most on this worker; ``held()`` counts
    the distinct blocks they hold now (the rest, ``unheld``, stays claimed for them)."""

    blocks: int
    held: Callable[[], int]

    def unheld(self) -> int:
        return max(0, self.blocks - self.held())


@dataclass
class ExtendJob:
    """Sequences outside the plain decode path (SMC particles) that ride in the next batched step.

    ``complete`` receives their next-token logits (one row per table) in the loop's thread; with
    ``drafts`` (or ``hidden``) a row per token fed, and the trunk's hidden states of those tokens.
    """

    tables: list[BlockTable]
    tokens: list[int]
    complete: Callable[..., Any]
    live: Callable[[], bool] = lambda: True  # False once its request was closed: the job is dropped
    future: Future = field(default_factory=Future)
    # speculative steering lanes (decode/particles.py): each table's drafted tokens, run after its token
    # (rows [token, d1..dk] per table); set to None by :meth:`Batcher.allocate` when they do not fit
    drafts: list[list[int]] | None = None
    hidden: bool = False  # ``complete(logits, hidden)``: a row of each per token (the trunk's hidden states too)


@dataclass
class Batch:
    """What one forward runs: a slot per sequence and per job table; logits rows in this order."""

    items: list[SeqBatchItem] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write, before the forward
    seqs: list[DecodeSeq] = field(default_factory=list)  # rows 0 .. len(seqs) - 1
    jobs: list[tuple[ExtendJob, int, int]] = field(default_factory=list)  # (job, first row, rows)
    drafts: dict = field(default_factory=dict)  # request id → engine.speculative.Draft (speculative steps)
    hidden: Any = None  # forward_all steps: the trunk's last hidden states, a row per new token
    speculative: bool = False  # the sequences' drafts were verified (a speculative step)

    @property
    def rows(self) -> int:
        """Logits rows of the forward (a sequence's drafts add rows of their own)."""
        return sum(len(it.tokens) for it in self.items)


@dataclass
class StepPlan:
    """One step, as :meth:`Batcher.schedule` decided it (aborted sequences are already retired)."""

    joins: list[DecodeSeq]  # admitted; their prompt KV is loaded first, then they run in this step
    running: list[DecodeSeq]  # running since an earlier step: one token each
    jobs: list[ExtendJob]  # SMC extension jobs of open requests
    aborted: list[DecodeSeq]  # retired before the step
    loading: list[DecodeSeq] = field(default_factory=list)  # prompts being recomputed, a chunk per step
    batch: Batch | None = None  # the slots of the step, once the joins are loaded (:meth:`Batcher.allocate`)


def append_slots(
    bm: BlockManager, tables: list[BlockTable], tokens: list[int], copies: list[tuple[int, int]]
) -> list[SeqBatchItem]:
    """Give each table a slot for its next token; a shared block written into is copied first
    (its (src, dst) is added to ``copies`` at once, so a failure half-way keeps the copies made so far).

    Returns the items for :meth:`ModelRunner.forward`, which yields one row of next-token logits per table.
    """
    items = []
    for table, token in zip(tables, tokens):
        start = table.num_tokens
        _, copy = bm.append_slot(table)
        if copy is not None:
            copies.append(copy)
        items.append(SeqBatchItem([token], start, table.blocks))
    return items


def merge_items(items: list[SeqBatchItem]) -> SeqBatchItem:
    """One sequence's consecutive one-token items as one item (its token and drafts, one forward row each)."""
    return SeqBatchItem([t for it in items for t in it.tokens], items[0].start, items[-1].blocks)


class Batcher:
    def __init__(self, bm: BlockManager, eos_token_ids: set[int]):
        self.bm = bm
        self.eos_token_ids = eos_token_ids
        self.active: dict[str, DecodeSeq] = {}  # running, in the order they joined
        self.pending: list[DecodeSeq] = []  # admitted, prompt KV not loaded yet
        # admitted, prompt KV being recomputed chunk by chunk (oldest first), by request id
        self.loading: dict[str, tuple[DecodeSeq, ChunkedPrefill]] = {}
        self.aborted: set[str] = set()
        self.jobs: list[ExtendJob] = []
        self.reservations: dict[str, Reservation] = {}  # open steering requests on this worker
        self.requests_served = 0
        self.tokens_generated = 0

    @property
    def num_sequences(self) -> int:
        return len(self.active) + len(self.pending) + len(self.loading)

    def admitted(self) -> list[DecodeSeq]:
        """Every sequence that holds or may still claim blocks (not retired)."""
        return [*self.active.values(), *self.pending, *(seq for seq, _ in self.loading.values())]

    def has_sequence(self, request_id: str) -> bool:
        return (
            request_id in self.active
            or request_id in self.loading
            or any(s.request_id == request_id for s in self.pending)
        )

    def has_work(self) -> bool:
        return bool(self.pending or self.active or self.loading or self.aborted or self.jobs)

    # --- requests arriving ---------------------------------------------------------------------
    def submit(self, seq: DecodeSeq, first_token: int, first_logprob=None) -> None:
        """Admit ``seq`` whose first completion token (from prefill) is ``first_token``, or raise
        :class:`OutOfBlocks` when the pool cannot hold it next to what is already admitted."""
        check_fits(self.bm, self.admitted(), seq, self.groups_unheld())
        self.requests_served += 1
        self.emit(seq, first_token, first_logprob)
        if not seq.finish_reason:
            self.pending.append(seq)

    def resume(self, seq: DecodeSeq) -> None:
        """Admit ``seq`` that continues a generation begun elsewhere: its ``output_ids`` (already
        streamed) are set and none is emitted again; :class:`OutOfBlocks` as in :meth:`submit`."""
        check_fits(self.bm, self.admitted(), seq, self.groups_unheld())
        self.requests_served += 1
        self.pending.append(seq)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def groups_unheld(self) -> int:
        return sum(r.unheld() for r in self.reservations.values())

    def reserve(self, request_id: str, reservation: Reservation) -> None:
        """Hold ``reservation.blocks`` for a steering request until :meth:`release`, or raise
        :class:`OutOfBlocks` (before it loads anything) when they are not free of other claims."""
        free = unreserved(self.bm, self.admitted(), self.groups_unheld())
        require(self.bm, reservation.blocks, free, "the steering request")
        self.reservations[request_id] = reservation

    def release(self, request_id: str) -> None:
        self.reservations.pop(request_id, None)

    def add_job(self, job: ExtendJob) -> None:
        self.jobs.append(job)

    # --- steps ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step: joins, running sequences and live jobs; aborted sequences retire now and
        jobs of closed requests are dropped (their futures fail)."""
        pending, self.pending = self.pending, []
        aborted, self.aborted = self.aborted, set()
        jobs, self.jobs = self.jobs, []
        plan = StepPlan([], [], [], [])
        for seq in pending:
            (plan.aborted if seq.request_id in aborted else plan.joins).append(seq)
        plan.aborted += [self.active[rid] for rid in aborted if rid in self.active]
        plan.aborted += [self.loading[rid][0] for rid in aborted if rid in self.loading]
        for seq in plan.aborted:
            self.retire(seq, FinishReason.ABORT)
        plan.running = list(self.active.values())
        plan.loading = [seq for seq, _ in self.loading.values()]
        for job in jobs:
            if job.live():
                plan.jobs.append(job)
            else:
                job.future.set_exception(RequestClosed("the steering request was closed"))
        return plan

    def start_loading(self, seq: DecodeSeq, fill: ChunkedPrefill) -> None:
        """``seq``'s prompt KV is partly recomputed (``fill``; ``seq.table`` is ``fill.table``): a chunk a step."""
        self.loading[seq.request_id] = (seq, fill)

    def join(self, seq: DecodeSeq) -> None:
        """``seq``'s prompt KV is loaded: it runs from now on."""
        self.loading.pop(seq.request_id, None)
        self.active[seq.request_id] = seq

    def allocate(self, seqs: list[DecodeSeq], jobs: list[ExtendJob], drafts: dict | None = None) -> Batch:
        """A slot for each sequence's and each job's next token (and each of a sequence's ``drafts``, by request
        id: dropped when they do not fit). A sequence the pool cannot extend retires (out of KV); a job that
        does not fit fails its future; the rest make the batch."""
        batch = Batch()
        full: list[tuple[DecodeSeq, OutOfBlocks]] = []
        for seq in seqs:
            draft = (drafts or {}).get(seq.request_id)
            if draft is not None and draft.tokens:
                start = seq.table.num_tokens
                try:
                    tokens = [seq.output_ids[-1], *draft.tokens]
                    batch.items += append_slots(self.bm, [seq.table] * len(tokens), tokens, batch.copies)
                except OutOfBlocks:  # no room for the drafts: the token alone (copies made so far are kept)
                    self.bm.truncate(seq.table, start)
                    del batch.items[len(batch.seqs) :]
                else:
                    batch.items[len(batch.seqs) :] = [merge_items(batch.items[len(batch.seqs) :])]
                    batch.seqs.append(seq)
                    batch.drafts[seq.request_id] = draft
                    continue
            try:
                batch.items += append_slots(self.bm, [seq.table], [seq.output_ids[-1]], batch.copies)
                batch.seqs.append(seq)
            except OutOfBlocks as err:
                full.append((seq, err))
        for job in jobs:
            try:
                job_items = self._job_items(job, batch.copies)
            except OutOfBlocks as err:
                job.future.set_exception(err)
                continue
            batch.jobs.append((job, batch.rows, sum(len(it.tokens) for it in job_items)))
            batch.items += job_items
        for seq, err in full:
            self.retire(seq, FinishReason.ERROR, str(err), out_of_kv=True)
        return batch

    def _job_items(self, job: ExtendJob, copies: list[tuple[int, int]]) -> list[SeqBatchItem]:
        """Slots for a job's tokens: one per table, or with ``job.drafts`` the token and its drafts (one item
        per table). Drafts that do not fit are dropped (``job.drafts`` = None): each table's token alone."""
        if job.drafts:
            starts = [t.num_tokens for t in job.tables]
            try:
                return [
                    merge_items(append_slots(self.bm, [t] * (1 + len(d)), [token, *d], copies))
                    for t, token, d in zip(job.tables, job.tokens, job.drafts)
                ]
            except OutOfBlocks:  # the copies made so far are kept (their blocks are the tables' own now)
                for t, start in zip(job.tables, starts):
                    self.bm.truncate(t, start)
                job.drafts = None
        return append_slots(self.bm, job.tables, job.tokens, copies)

    def emit(self, seq: DecodeSeq, token: int, logprob=None) -> None:
        """Record a sampled token, decide whether the sequence is finished and queue its event."""
        seq.output_ids.append(token)
        self.tokens_generated += 1
        is_eos = token in self.eos_token_ids and not seq.params.ignore_eos
        text = "" if is_eos else seq.detok.push(token)
        if is_eos or seq.detok.stopped:
            seq.finish_reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason and not seq.detok.stopped:
            text += seq.detok.flush()
        event = DecodeEvent([token], text, seq.finish_reason, len(seq.output_ids))
        if logprob is not None:  # an engine.sampling.TokenLogprob (asked for by sampling.logprobs)
            event.logprobs = [logprob]
        seq.events.put(event)

    def retire(self, seq: DecodeSeq, reason: FinishReason, error: str = "", out_of_kv: bool = False) -> None:
        """Free the sequence's KV and, unless it already finished, tell its stream why it ended."""
        self.active.pop(seq.request_id, None)
        self.loading.pop(seq.request_id, None)
        self.bm.free_table(seq.table)
        if not seq.finish_reason:
            seq.finish_reason = reason
            seq.events.put(DecodeEvent([], "", reason, len(seq.output_ids), error, out_of_kv))
