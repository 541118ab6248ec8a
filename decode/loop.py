"""The decode loop of one worker: continuous batching over paged KV, in one thread.

Each iteration runs the calls queued for the thread (SMC bookkeeping), then one step:
:meth:`DecodeLoop.schedule` (who joins, runs, leaves: :class:`decode.batcher.StepPlan`),
:meth:`DecodeLoop.forward` (load the joining prompts' KV, a chunk of the prompts being recomputed, one
batched forward for every running sequence and SMC job) and :meth:`DecodeLoop.postprocess` (sample,
stream, retire). gRPC threads
only queue work (:meth:`submit`, :meth:`abort`, :meth:`call`, :meth:`extend`) and read :meth:`stats`.

``engine/`` is the model runtime this loop drives (block manager, model runner, sampling).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from smcserve.decode.batcher import Batch, Batcher, ExtendJob, Reservation, StepPlan, append_slots
from smcserve.decode.sequence import DecodeSeq
from smcserve.decode.speculation import Speculation
from smcserve.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from smcserve.engine.config import DEFAULT_PREFILL_CHUNK
from smcserve.engine.finish import FinishReason
from smcserve.engine.model import LoadedModel
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import TokenLogprob, sample_tokens, token_logprobs
from smcserve.engine.speculative import SpecStats, Speculator
from smcserve.kvstore import KVStore
from smcserve.kvstore.transfer import KVTransfer

log = logging.getLogger(__name__)


def append_tokens(
    bm: BlockManager, runner: ModelRunner, tables: list[BlockTable], tokens: list[int]
) -> list[SeqBatchItem]:
    """:func:`decode.batcher.append_slots` with its block copies done at once (for direct use of a pool)."""
    copies: list[tuple[int, int]] = []
    try:
        return append_slots(bm, tables, tokens, copies)
    finally:
        for src, dst in copies:
            runner.copy_block(src, dst)


@dataclass
class DecodeStats:
    """A worker's decode pool and counters (the decode fields of ``WorkerStats``)."""

    active_sequences: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_in_use: int
    kv_blocks_shared: int
    kv_blocks_cached: int
    kv_bytes_in_use: int
    requests_served: int
    tokens_generated: int
    prompt_recomputes: int
    prompt_blocks_reused: int
    kv_blocks_loaded: int
    kv_load_ms: float
    batch_steps: int
    batched_tokens: int
    max_batch_size: int
    particles_imported: int
    spec: SpecStats | None = None  # --speculative mtp: drafts made and accepted


class DecodeLoop:
    """One worker's decode loop; the thread runs from :meth:`start` to :meth:`close`.

    It is also the :class:`decode.host.ParticleHost` of the worker's SMC particle groups.
    """

    def __init__(
        self,
        lm: LoadedModel,
        store: KVStore,
        block_size: int,
        num_blocks: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        speculation: Speculation | None = None,
    ):
        """``prefill_chunk``: prompt tokens recomputed per step (a prompt not in the store); 0: a whole prompt.
        ``speculation``: self-speculative decoding of plain requests (``--speculative mtp``)."""
        self.lm = lm
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.speculation = speculation
        self.bm = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(lm, num_blocks, block_size)
        if speculation is not None:  # the heads' mid-layer features, in every row forward_all returns
            self.runner.features = speculation.speculator.heads.spec.features
        self.lock = threading.Lock()  # guards bm, batcher, calls and every counter
        self.wakeup = threading.Condition(self.lock)
        self.batcher = Batcher(self.bm, lm.eos_token_ids)
        self.transfer = KVTransfer(store, self.bm, self.runner, self.lock)
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.batch_steps = 0
        self.batched_tokens = 0
        self.max_batch_size = 0
        self.particles_imported = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    def start(self) -> DecodeLoop:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.running = False
            self.wakeup.notify()
        if self.thread.ident is not None:
            self.thread.join(timeout=10)

    # --- called from gRPC threads -------------------------------------------------------------
    def submit(self, seq: DecodeSeq, first_token: int, first_logprob: TokenLogprob | None = None) -> None:
        """Start decoding ``seq`` whose first completion token (from prefill) is ``first_token``.

        Raises :class:`OutOfBlocks` when the pool cannot hold it next to what is already admitted.
        """
        with self.lock:
            self.batcher.submit(seq, first_token, first_logprob)
            self.wakeup.notify()

    def resume(self, seq: DecodeSeq) -> None:
        """Continue a generation begun on another worker (:meth:`Batcher.resume`)."""
        with self.lock:
            self.batcher.resume(seq)
            self.wakeup.notify()

    def has_sequence(self, request_id: str) -> bool:
        """A sequence of ``request_id`` is admitted or running (not yet retired)."""
        with self.lock:
            return self.batcher.has_sequence(request_id)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the loop's thread between steps (for SMC bookkeeping that touches the KV pool)."""
        fut: Future = Future()
        with self.lock:
            self.calls.append((fn, fut))
            self.wakeup.notify()
        return fut

    def extend(self, job: ExtendJob) -> Future:
        """Advance ``job``'s tables by one token in the next batched step; its future gets ``complete``'s result."""
        with self.lock:
            self.batcher.add_job(job)
            self.wakeup.notify()
        return job.future

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.batcher.abort(request_id)
            self.wakeup.notify()

    def stats(self) -> DecodeStats:
        with self.lock:
            pool, kv = self.bm.stats(), self.transfer.stats
            return DecodeStats(
                active_sequences=self.batcher.num_sequences,
                kv_blocks_total=pool["kv_blocks_total"],
                kv_blocks_used=pool["kv_blocks_used"],
                kv_blocks_in_use=pool["kv_blocks_in_use"],
                kv_blocks_shared=pool["kv_blocks_shared"],
                kv_blocks_cached=pool["kv_blocks_cached"],
                kv_bytes_in_use=pool["kv_blocks_in_use"] * self.runner.block_bytes,
                requests_served=self.batcher.requests_served,
                tokens_generated=self.batcher.tokens_generated,
                prompt_recomputes=kv.prompt_recomputes,
                prompt_blocks_reused=kv.prompt_blocks_reused,
                kv_blocks_loaded=kv.kv_blocks_loaded,
                kv_load_ms=kv.kv_load_ms,
                batch_steps=self.batch_steps,
                batched_tokens=self.batched_tokens,
                max_batch_size=self.max_batch_size,
                particles_imported=self.particles_imported,
                spec=copy.deepcopy(self.speculation.speculator.stats) if self.speculation else None,
            )

    # --- the particle groups' interface (decode.host.ParticleHost); loop thread --------------------
    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def fork(self, table: BlockTable) -> BlockTable:
        with self.lock:
            return self.bm.fork(table)

    def free(self, tables: Iterable[BlockTable]) -> None:
        with self.lock:
            for t in tables:
                self.bm.free_table(t)

    def load(self, tokens: list[int], keys: list[str]) -> BlockTable:
        return self.transfer.load(tokens, keys)

    def save(self, table: BlockTable, tokens: list[int], keys: list[str]) -> None:
        self.transfer.save(table, tokens, keys)

    def reserve(self, request_id: str, reservation: Reservation) -> None:
        with self.lock:
            self.batcher.reserve(request_id, reservation)

    def release(self, request_id: str) -> None:
        with self.lock:
            self.batcher.release(request_id)

    def count_imported(self, n: int) -> None:
        with self.lock:
            self.particles_imported += n

    @property
    def speculator(self) -> Speculator | None:
        """The MTP drafter and its counters (``--speculative mtp``), None without speculation."""
        return self.speculation.speculator if self.speculation is not None else None

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        with self.lock:
            self.bm.truncate(table, num_tokens)

    def count_drafts(self, k: int, accepted: int) -> None:
        with self.lock:
            self.speculation.speculator.stats.count(k, accepted)

    def prompt_logits(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits after every prefix of ``tokens`` ([len, vocab]), by the model itself (no KV kept)."""
        with torch.inference_mode():
            return self.lm.model(torch.tensor([tokens], device=self.lm.device)).logits[0].float()

    # --- the loop's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while self.running and not (self.calls or self.batcher.has_work()):
                    self.wakeup.wait()
                if not self.running:
                    return
                calls, self.calls = self.calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as err:  # reported to the caller, never fatal to the loop
                    fut.set_exception(err)
            self.step()

    def step(self) -> None:
        plan = self.schedule()
        if not (plan.joins or plan.running or plan.jobs or plan.loading):
            return
        try:
            logits = self.forward(plan)
        except Exception as err:
            log.exception("decode step failed")
            self._fail(plan, err)
            return
        self.postprocess(plan, logits)

    def schedule(self) -> StepPlan:
        with self.lock:
            return self.batcher.schedule()

    def forward(self, plan: StepPlan) -> torch.Tensor | None:
        """Load the joining prompts' KV, run a chunk of those being recomputed, give everything in the step
        a slot (``plan.batch``) and run one batched forward: one row of next-token logits per slot (None
        when the batch is empty). When no prompt loaded and nothing else runs, ``plan.batch`` stays None:
        there is no step."""
        joined = [seq for seq in plan.joins if self._load_prompt(seq)]
        joined += self._recompute()
        if not (plan.running or joined or plan.jobs):
            return None
        drafts = self._drafts(plan.running + joined, plan.jobs)
        with self.lock:
            plan.batch = self.batcher.allocate(plan.running + joined, plan.jobs, drafts)
        for src, dst in plan.batch.copies:
            self.runner.copy_block(src, dst)
        if not plan.batch.items:
            return None
        if drafts is None and not any(job.hidden for job, _, _ in plan.batch.jobs):
            return self.runner.forward(plan.batch.items)
        # a row per token and draft (the sequences', and the steering lanes' of jobs that want hidden states)
        logits, plan.batch.hidden = self.runner.forward_all(plan.batch.items)
        plan.batch.speculative = drafts is not None
        return logits

    def _drafts(self, seqs: list[DecodeSeq], jobs: list[ExtendJob]) -> dict | None:
        """With speculation: the step's drafts by request id (decode/speculation.py); None: a plain step."""
        if self.speculation is None:
            return None
        try:
            return self.speculation.drafts(seqs, len(seqs) + sum(len(j.tables) for j in jobs))
        except Exception:  # drafting is an optimisation: the step goes on without drafts
            log.exception("drafting failed")
            return {}

    def postprocess(self, plan: StepPlan, logits: torch.Tensor | None) -> None:
        """Hand the jobs their rows, sample a token for every sequence, stream it, retire the finished."""
        batch = plan.batch
        if batch is None:
            return
        for job, start, n in batch.jobs:
            try:
                if job.hidden:
                    job.future.set_result(job.complete(logits[start : start + n], batch.hidden[start : start + n]))
                else:
                    job.future.set_result(job.complete(logits[start : start + n]))
            except Exception as err:
                job.future.set_exception(err)
        with self.lock:
            self.batch_steps += 1
            self.batched_tokens += len(batch.items)
            self.max_batch_size = max(self.max_batch_size, len(batch.items))
        seqs = batch.seqs
        if not seqs:
            return
        if batch.speculative:
            self._postprocess_speculative(batch, logits)
            return
        with self.lock:
            try:
                tokens = sample_tokens(logits[: len(seqs)], [s.params for s in seqs], [s.num_tokens for s in seqs])
            except Exception:  # find the row that fails: the others go on
                tokens = [self._sample_one(logits[i : i + 1], seq) for i, seq in enumerate(seqs)]
            lps = self._logprobs(logits, seqs, tokens)
            for i, (seq, token) in enumerate(zip(seqs, tokens)):
                if token is None:
                    continue
                try:
                    self.batcher.emit(seq, token, lps.get(i))
                except Exception as err:  # one sequence's detokenising or stop strings: it alone fails
                    log.exception("emitting a token of %s failed", seq.request_id)
                    self.batcher.retire(seq, FinishReason.ERROR, f"the decode step failed: {type(err).__name__}")
            for seq in seqs:
                if seq.finish_reason:
                    self.batcher.retire(seq, seq.finish_reason)

    def _postprocess_speculative(self, batch: Batch, logits: torch.Tensor) -> None:
        """A speculative step: each sequence appends its accepted drafts and one token (streamed one by one,
        so stop strings, EOS and max_tokens end it exactly where plain decoding would), keeps the KV and
        hidden states of what it kept, and releases the rejected drafts' slots."""
        spec, row = self.speculation, 0
        for seq, item in zip(batch.seqs, batch.items):
            n = len(item.tokens)
            rows, hidden = logits[row : row + n], batch.hidden[row : row + n]
            row += n
            with self.lock:
                try:
                    tokens = spec.decide(seq, rows, batch.drafts.get(seq.request_id))
                    lps = self._logprobs(rows, [seq] * len(tokens), tokens)
                    emitted = 0
                    for i, token in enumerate(tokens):
                        self.batcher.emit(seq, token, lps.get(i))
                        emitted += 1
                        if seq.finish_reason:
                            break
                except Exception as err:  # this sequence alone fails
                    log.exception("the speculative step of %s failed", seq.request_id)
                    self.batcher.retire(seq, FinishReason.ERROR, f"the decode step failed: {type(err).__name__}")
                    continue
                if seq.finish_reason:
                    self.batcher.retire(seq, seq.finish_reason)
                    continue
                self.bm.truncate(seq.table, item.start + emitted)  # KV of every token but the newest
            spec.keep(seq, hidden[:emitted])

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[DecodeSeq], tokens: list[int | None]) -> dict[int, TokenLogprob]:
        """The sampled tokens' logprobs of the sequences that asked (``sampling.logprobs``), by row."""
        rows = [i for i, (s, t) in enumerate(zip(seqs, tokens)) if s.params.logprobs >= 0 and t is not None]
        if not rows:
            return {}
        lps = token_logprobs(logits[rows], [tokens[i] for i in rows], [seqs[i].params.logprobs for i in rows])
        return dict(zip(rows, lps))

    def _sample_one(self, logits: torch.Tensor, seq: DecodeSeq) -> int | None:
        """``seq``'s token alone; None when sampling fails for it (it is retired with an error)."""
        try:
            return sample_tokens(logits, [seq.params], [seq.num_tokens])[0]
        except Exception as err:
            log.exception("sampling for %s failed", seq.request_id)
            self.batcher.retire(seq, FinishReason.ERROR, f"the decode step failed: {type(err).__name__}")
            return None

    def _load_prompt(self, seq: DecodeSeq) -> bool:
        """Load ``seq``'s prompt KV and let it run; False when it retired (a failure) or the part of its prompt
        not in the store is to be recomputed first (:meth:`_recompute`)."""
        try:
            fill = self.transfer.start_load(seq.kv_token_ids(), seq.block_keys, self.prefill_chunk)
        except OutOfBlocks as err:
            self._retire(seq, FinishReason.ERROR, str(err), out_of_kv=True)
            return False
        except Exception as err:  # a worker never dies on one request
            log.exception("loading the prompt of %s failed", seq.request_id)
            self._retire(seq, FinishReason.ERROR, f"loading the prompt failed: {type(err).__name__}")
            return False
        seq.table = fill.table
        with self.lock:
            if fill.finished:
                self.batcher.join(seq)
            else:
                self.batcher.start_loading(seq, fill)
        return fill.finished

    def _recompute(self) -> list[DecodeSeq]:
        """One chunk (``prefill_chunk`` tokens, all of them when 0) of the prompts being recomputed, oldest
        first, so the running batch waits for a chunk, not a whole prompt; those it completes join (returned)."""
        with self.lock:
            loading = list(self.batcher.loading.values())
        budget = self.prefill_chunk
        joined = []
        for seq, fill in loading:
            try:
                budget -= fill.run_chunk(self.runner, budget)
                if fill.finished:
                    self.transfer.finish_load(fill, seq.block_keys)
            except Exception as err:
                log.exception("recomputing the prompt of %s failed", seq.request_id)
                self._retire(seq, FinishReason.ERROR, f"loading the prompt failed: {type(err).__name__}")
                continue
            if fill.finished:
                with self.lock:
                    self.batcher.join(seq)
                joined.append(seq)
            if self.prefill_chunk and budget <= 0:
                break
        return joined

    def _fail(self, plan: StepPlan, err: Exception) -> None:
        """The step failed: every sequence in it ends with an error, every job's future fails."""
        seqs = plan.batch.seqs if plan.batch else [*plan.running, *(s for s in plan.joins if not s.finish_reason)]
        for seq in seqs:
            self._retire(seq, FinishReason.ERROR, f"the decode step failed: {type(err).__name__}")
        for job in plan.jobs:
            if not job.future.done():
                job.future.set_exception(err)

    def _retire(self, seq: DecodeSeq, reason: FinishReason, error: str = "", out_of_kv: bool = False) -> None:
        with self.lock:
            self.batcher.retire(seq, reason, error, out_of_kv)
