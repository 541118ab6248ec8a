"""A prefill worker's prompts, interleaved chunk by chunk in one thread, so that a long prompt does not
hold the worker for its whole length while a short (or mostly cached) one waits.

Prompts start (:meth:`Prefiller.start`: blocks reserved, cached prefix read) in arrival order while the
pool holds them. Each :meth:`PrefillQueue.step` runs one chunk: of the started prompt with the fewest
tokens left (so two long prompts still run one after the other, not side by side, which would delay
both), except that the oldest one runs after ``MAX_OVERTAKES`` chunks of others in a row, so it keeps a
share of the worker however many short ones arrive. A cancelled prompt stops before its next chunk.

A prompt whose leading blocks a started prompt is computing waits until that one finished (its blocks are
then in the worker's cache): two prompts in flight with one new prefix compute it once, as they would one
after the other.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from smcserve.engine.sampling import SamplingParams
from smcserve.prefill.prefiller import Prefiller, PrefillJob

MAX_OVERTAKES = 4  # chunks of other prompts in a row before the oldest one runs a chunk again


@dataclass
class PrefillRequest:
    token_ids: list[int]
    params: SamplingParams
    cancelled: Callable[[], bool]
    reusable_keys: list[str]  # keys of its leading whole blocks that a cache may hold
    future: Future = field(default_factory=Future)  # its PrefillResult; None when cancelled
    job: PrefillJob | None = None  # once started


class PrefillQueue:
    def __init__(self, prefiller: Prefiller):
        self.prefiller = prefiller
        self.lock = threading.Lock()  # guards ``waiting`` (``submit`` runs in the callers' threads)
        self.wakeup = threading.Condition(self.lock)
        self.waiting: deque[PrefillRequest] = deque()  # not started yet, in arrival order
        self.running: list[PrefillRequest] = []  # started, in arrival order (the queue's thread only)
        self.overtakes = 0  # chunks of other prompts run in a row while the oldest waited
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="prefill-queue", daemon=True)

    def start(self) -> PrefillQueue:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wakeup.notify()
        if self.thread.ident is not None:
            self.thread.join(timeout=10)

    def submit(
        self, token_ids: list[int], params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> Future:
        """Queue a prompt; its future gets the :class:`PrefillResult`, None if ``cancelled()`` turned True
        before it finished, or the error. A prompt too long for the pool raises ``ValueError`` here."""
        self.prefiller.check(token_ids)
        req = PrefillRequest(token_ids, params, cancelled, self.prefiller.reusable_keys(token_ids))
        with self.lock:
            self.waiting.append(req)
            self.wakeup.notify()
        return req.future

    def _run(self) -> None:
        while True:
            with self.lock:
                while not (self.closed or self.waiting or self.running):
                    self.wakeup.wait()
                if self.closed:
                    return
            self.step()

    def step(self) -> bool:
        """Drop the cancelled prompts, start those the pool holds, run one chunk (and finish its prompt when
        that was its last). False when there was nothing to run."""
        for req in [r for r in self.running if r.cancelled()]:
            self.running.remove(req)
            self.prefiller.abandon(req.job)
            req.future.set_result(None)
        self._start_waiting()
        if not self.running:
            return False
        req = self._pick()
        try:
            self.prefiller.run_chunk(req.job)
            done = req.job.fill.finished
            result = self.prefiller.finish(req.job) if done else None
        except Exception as err:  # this prompt fails; the others go on
            self.running.remove(req)
            self.prefiller.abandon(req.job)  # a no-op when ``finish`` gave the blocks back already
            req.future.set_exception(err)
            return True
        if done:
            self.running.remove(req)
            req.future.set_result(result)
        return True

    def _start_waiting(self) -> None:
        """Start the waiting prompts in arrival order while the pool holds them, passing over (for now) each
        one that shares a block with what a started prompt is computing."""
        with self.lock:
            waiting = list(self.waiting)
        computing = {k for r in self.running for k in self.prefiller.computing_keys(r.job)}
        for req in waiting:
            job = None
            if not req.cancelled():
                if any(k in computing for k in req.reusable_keys):
                    continue
                try:
                    job = self.prefiller.start(req.token_ids, req.params)
                except Exception as err:
                    self._take(req)
                    req.future.set_exception(err)
                    continue
                if job is None:  # the pool is full: it starts once a running prompt finished
                    assert self.running, "an empty pool holds any prompt the prefiller accepts"
                    return
            self._take(req)
            if job is None:
                req.future.set_result(None)
                continue
            req.job = job
            self.running.append(req)
            computing.update(self.prefiller.computing_keys(job))

    def _take(self, req: PrefillRequest) -> None:
        with self.lock:
            self.waiting.remove(req)

    def _pick(self) -> PrefillRequest:
        oldest = self.running[0]
        shortest = min(self.running, key=lambda r: r.job.remaining)  # the oldest of those on a tie
        req = oldest if self.overtakes >= MAX_OVERTAKES else shortest
        self.overtakes = 0 if req is oldest else self.overtakes + 1
        return req
