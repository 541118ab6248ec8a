"""The decode loop of one worker: continuous batching over paged KV.

A thread runs steps; each step advances every active sequence of every request by one token in
one batched forward. Sequences join (after their prompt KV is loaded from the worker's prefix
cache, the KV store, or recomputed) and leave at any step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from decode.sequence import DecodeEvent, Sequence
from engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from engine.model import LoadedModel
from engine.model_runner import ModelRunner, SeqBatchItem
from engine.sampling import sample_tokens
from kvstore import KVStore

log = logging.getLogger(__name__)

ERROR = "error"  # a sequence's finish reason when the worker failed it (DecodeEvent.error says how)


def append_tokens(
    bm: BlockManager, runner: ModelRunner, tables: list[BlockTable], tokens: list[int]
) -> list[SeqBatchItem]:
    """Give each table a slot for its next token (allocating, or copying a shared block on write).

    Returns the batch for :meth:`ModelRunner.forward`, which yields one row of next-token logits per table.
    """
    items = []
    for table, token in zip(tables, tokens):
        start = table.num_tokens
        _, copy = bm.append_slot(table)
        if copy is not None:
            runner.copy_block(*copy)
        items.append(SeqBatchItem([token], start, table.blocks))
    return items


@dataclass
class ExtendJob:
    """Sequences outside the plain decode path (SMC particles) that ride in the next batched step.

    ``complete`` receives their next-token logits (one row per table) in the engine thread.
    """

    tables: list[BlockTable]
    tokens: list[int]
    complete: Callable[[Any], Any]
    live: Callable[[], bool] = lambda: True  # False once its request was closed: the job is dropped
    future: Future = field(default_factory=Future)


class DecodeEngine:
    def __init__(self, lm: LoadedModel, store: KVStore, block_size: int, num_blocks: int):
        self.lm = lm
        self.store = store
        self.bm = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(lm, num_blocks, block_size)
        self.block_size = block_size
        self.active: dict[str, Sequence] = {}
        self.pending: list[Sequence] = []
        self.aborted: set[str] = set()
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.jobs: list[ExtendJob] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.counters = dict(
            requests_served=0,
            tokens_generated=0,
            prompt_recomputes=0,
            prompt_blocks_reused=0,
            batch_steps=0,
            batched_tokens=0,
            max_batch_size=0,
            particles_imported=0,
        )
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self.thread.start()

    # --- called from gRPC threads -------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence) -> int:
        """Blocks ``seq`` may still allocate before it finishes (+1 for a copy-on-write)."""
        total = len(seq.prompt_ids) + seq.params.max_tokens
        return max(0, self.bm.blocks_for(total) - len(seq.table.blocks)) + 1

    def submit(self, seq: Sequence, first_token: int) -> None:
        """Start decoding ``seq`` whose first completion token (from prefill) is ``first_token``.

        Raises :class:`OutOfBlocks` when the pool cannot hold it next to what is already admitted.
        """
        with self.lock:
            reserved = sum(self._blocks_needed(s) for s in [*self.active.values(), *self.pending])
            need = self._blocks_needed(seq)
            if need > self.bm.available() - reserved:
                raise OutOfBlocks(
                    f"out of KV blocks: the request needs up to {need}, "
                    f"{max(0, self.bm.available() - reserved)} of {self.bm.num_blocks} are unreserved"
                )
            self.counters["requests_served"] += 1
            self._emit(seq, first_token)
            if not seq.finish_reason:
                self.pending.append(seq)
                self.wakeup.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the engine thread between steps (for SMC bookkeeping that touches the KV pool)."""
        fut: Future = Future()
        with self.lock:
            self.calls.append((fn, fut))
            self.wakeup.notify()
        return fut

    def extend(self, job: ExtendJob) -> Future:
        """Advance ``job``'s tables by one token in the next batched step; its future gets ``complete``'s result."""
        with self.lock:
            self.jobs.append(job)
            self.wakeup.notify()
        return job.future

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.add(request_id)
            self.wakeup.notify()

    def stats(self) -> dict:
        with self.lock:
            st = self.bm.stats()
            st.update(
                self.counters,
                active_sequences=len(self.active) + len(self.pending),
                kv_bytes_in_use=st["kv_blocks_in_use"] * self.runner.block_bytes,
            )
            return st

    def close(self) -> None:
        with self.lock:
            self.running = False
            self.wakeup.notify()
        self.thread.join(timeout=10)

    # --- the engine thread ---------------------------------------------------------------------
    def _emit(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, decide whether the sequence is finished and queue its event."""
        seq.output_ids.append(token)
        self.counters["tokens_generated"] += 1
        is_eos = token in self.lm.eos_token_ids and not seq.params.ignore_eos
        text = "" if is_eos else seq.detok.push(token)
        if is_eos or seq.detok.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason and not seq.detok.stopped:
            text += seq.detok.flush()
        seq.events.put(DecodeEvent([token], text, seq.finish_reason, len(seq.output_ids)))

    def _end(self, seq: Sequence, reason: str, error: str = "", out_of_kv: bool = False) -> None:
        """Free the sequence's KV and, unless it already finished, tell its stream why it ended."""
        with self.lock:
            self.active.pop(seq.request_id, None)
            self.bm.free_table(seq.table)
        if not seq.finish_reason:
            seq.finish_reason = reason
            seq.events.put(DecodeEvent([], "", reason, len(seq.output_ids), error, out_of_kv))

    def load_kv(self, token_ids: list[int], keys: list[str]) -> BlockTable:
        """A block table holding the KV of ``token_ids`` (whose chained keys are ``keys``): blocks come from
        the worker's prefix cache, else the KV store, else are recomputed (and written back). Engine thread."""
        table = BlockTable()
        try:
            return self._load_into(table, token_ids, keys)
        except BaseException:
            with self.lock:
                self.bm.free_table(table)
            raise

    def _load_into(self, table: BlockTable, token_ids: list[int], keys: list[str]) -> BlockTable:
        bs, n = self.block_size, len(token_ids)
        with self.lock:
            while len(table.blocks) < len(keys) and (b := self.bm.lookup(keys[len(table.blocks)])) is not None:
                table.blocks.append(b)
            self.counters["prompt_blocks_reused"] += len(table.blocks)
        first_miss = len(table.blocks)
        if first_miss < len(keys):
            for i, block in enumerate(self.store.get_blocks(keys[first_miss:]), start=first_miss):
                want = self.runner.layout.block_shape(min(bs, n - i * bs))
                if block is None or tuple(block.shape) != want or block.dtype != self.lm.dtype:
                    break  # a miss (or foreign KV): recompute from here
                with self.lock:
                    b = self.bm.allocate()
                    table.blocks.append(b)
                self.runner.write_block(b, block)
                with self.lock:
                    self.bm.register(keys[i], b)
        loaded = len(table.blocks)
        table.num_tokens = min(loaded * bs, n)
        if table.num_tokens < n:
            with self.lock:
                self.counters["prompt_recomputes"] += 1
                start = table.num_tokens
                for _ in range(start, n):
                    self.bm.append_slot(table)
            self.runner.forward([SeqBatchItem(token_ids[start:], start, table.blocks)])
            self.save_kv(table, token_ids, keys, first=loaded)
        return table

    def save_kv(self, table: BlockTable, token_ids: list[int], keys: list[str], first: int = 0) -> None:
        """Write blocks ``first..`` of a table to the store (those it lacks) and to the worker's prefix cache."""
        bs, n = self.block_size, len(token_ids)
        todo = [i for i, present in zip(range(first, len(keys)), self.store.contains(keys[first:])) if not present]
        self.store.put_blocks([(keys[i], self.runner.read_block(table.blocks[i], min(bs, n - i * bs))) for i in todo])
        with self.lock:
            for i in range(first, len(keys)):
                self.bm.register(keys[i], table.blocks[i])

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not (self.pending or self.active or self.aborted or self.calls or self.jobs):
                    self.wakeup.wait()
                if not self.running:
                    return
                new, self.pending = self.pending, []
                aborted, self.aborted = self.aborted, set()
                calls, self.calls = self.calls, []
                jobs, self.jobs = self.jobs, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as err:  # reported to the caller, never fatal to the loop
                    fut.set_exception(err)
            for seq in new:
                if seq.request_id in aborted:
                    self._end(seq, "abort")
                    continue
                try:
                    seq.table = self.load_kv(seq.prompt_ids, seq.block_keys)
                except OutOfBlocks as err:
                    self._end(seq, ERROR, str(err), out_of_kv=True)
                    continue
                except Exception as err:  # a worker never dies on one request
                    log.exception("loading the prompt of %s failed", seq.request_id)
                    self._end(seq, ERROR, f"loading the prompt failed: {type(err).__name__}")
                    continue
                with self.lock:
                    self.active[seq.request_id] = seq
            for rid in aborted:
                if rid in self.active:
                    self._end(self.active[rid], "abort")
            if self.active or jobs:
                self._step(list(self.active.values()), jobs)

    def _step(self, seqs: list[Sequence], jobs: list[ExtendJob]) -> None:
        full: list[tuple[Sequence, OutOfBlocks]] = []  # out of blocks: only these sequences fail
        try:
            with self.lock:
                items, running = [], []
                for seq in seqs:
                    try:
                        items += append_tokens(self.bm, self.runner, [seq.table], [seq.output_ids[-1]])
                        running.append(seq)
                    except OutOfBlocks as err:
                        full.append((seq, err))
                seqs = running
                ready = []
                for job in jobs:
                    if not job.live():
                        job.future.set_exception(RuntimeError("the steering request was closed"))
                        continue
                    try:
                        job_items = append_tokens(self.bm, self.runner, job.tables, job.tokens)
                    except OutOfBlocks as err:
                        job.future.set_exception(err)
                        continue
                    ready.append((job, len(items), len(job_items)))
                    items += job_items
            for seq, err in full:
                self._end(seq, ERROR, str(err), out_of_kv=True)
            logits = self.runner.forward(items) if items else None
        except Exception as err:
            log.exception("decode step failed")
            for seq in seqs:
                self._end(seq, ERROR, f"the decode step failed: {type(err).__name__}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        for job, start, n in ready:
            try:
                job.future.set_result(job.complete(logits[start : start + n]))
            except Exception as err:
                job.future.set_exception(err)
        with self.lock:
            self.counters["batch_steps"] += 1
            self.counters["batched_tokens"] += len(items)
            self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(items))
        if not seqs:
            return
        with self.lock:
            tokens = sample_tokens(logits[: len(seqs)], [s.params for s in seqs], [s.num_tokens for s in seqs])
            for seq, token in zip(seqs, tokens):
                self._emit(seq, token)
        for seq in seqs:
            if seq.finish_reason:
                self._end(seq, seq.finish_reason)
