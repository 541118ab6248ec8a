"""The decode loop of one worker: a thread that advances every active sequence one token per step."""
from __future__ import annotations

import logging
import threading
import time

from engine.forward import forward
from engine.kv import KVLayout, blocks_needed, blocks_to_cache, cache_to_blocks
from engine.model import LoadedModel
from engine.sampling import sample_token
from kvstore import KVStore

from decode.sequence import DecodeEvent, Sequence

log = logging.getLogger(__name__)


class DecodeEngine:
    def __init__(self, lm: LoadedModel, store: KVStore, block_size: int):
        self.lm = lm
        self.store = store
        self.layout = KVLayout.from_config(lm.config, lm.dtype, block_size)
        self.active: dict[str, Sequence] = {}
        self.pending: list[Sequence] = []
        self.aborted: set[str] = set()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.requests_served = 0
        self.tokens_generated = 0
        self.prompt_recomputes = 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self.thread.start()

    # --- called from gRPC threads -------------------------------------------------------------
    def submit(self, seq: Sequence, first_token: int) -> None:
        """Start decoding ``seq`` whose first completion token (from prefill) is ``first_token``."""
        with self.lock:
            self.requests_served += 1
            self._emit(seq, first_token)
            if not seq.finish_reason:
                self.pending.append(seq)
                self.wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.add(request_id)
            self.wakeup.notify()

    def stats(self) -> dict:
        with self.lock:
            seqs = list(self.active.values())
            blocks = sum(blocks_needed(s.cached_tokens, self.layout.block_size) for s in seqs)
            return {
                "active_sequences": len(seqs) + len(self.pending),
                "kv_blocks_in_use": blocks,
                "kv_bytes_in_use": sum(s.cached_tokens for s in seqs) * self.layout.bytes_per_token,
                "requests_served": self.requests_served,
                "tokens_generated": self.tokens_generated,
                "prompt_recomputes": self.prompt_recomputes,
            }

    def close(self) -> None:
        with self.lock:
            self.running = False
            self.wakeup.notify()
        self.thread.join(timeout=10)

    # --- the engine thread ---------------------------------------------------------------------
    def _emit(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, decide whether the sequence is finished and queue its event."""
        seq.output_ids.append(token)
        self.tokens_generated += 1
        is_eos = token in self.lm.eos_token_ids and not seq.params.ignore_eos
        text = "" if is_eos else seq.detok.push(token)
        if is_eos or seq.detok.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason and not seq.detok.stopped:
            text += seq.detok.flush()
        seq.events.put(DecodeEvent([token], text, seq.finish_reason, len(seq.output_ids)))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.events.put(DecodeEvent([], "", reason, len(seq.output_ids)))

    def _load_prompt(self, seq: Sequence) -> None:
        """Build the sequence's cache from the store; recompute (and re-store) whatever is missing."""
        blocks = self.store.get_blocks(seq.block_keys)
        good = blocks.index(None) if None in blocks else len(blocks)
        seq.cache = blocks_to_cache(blocks[:good], self.lm.config) if good else None
        start = good * self.layout.block_size
        if start < len(seq.prompt_ids):
            with self.lock:
                self.prompt_recomputes += 1
            from transformers import DynamicCache

            if seq.cache is None:
                seq.cache = DynamicCache(config=self.lm.config)
            forward(self.lm.model, seq.prompt_ids[start:], seq.cache)
            fresh = cache_to_blocks(seq.cache, self.layout, start, len(seq.prompt_ids))
            self.store.put_blocks(list(zip(seq.block_keys[good:], fresh)))

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.pending and not self.active and not self.aborted:
                    self.wakeup.wait()
                if not self.running:
                    return
                new, self.pending = self.pending, []
                aborted, self.aborted = self.aborted, set()
            for seq in new:
                if seq.request_id in aborted:
                    self._finish(seq, "abort")
                    continue
                try:
                    self._load_prompt(seq)
                except Exception as err:  # a worker never dies on one request
                    log.exception("loading prompt of %s failed", seq.request_id)
                    self._finish(seq, f"error: {err}")
                    continue
                with self.lock:
                    self.active[seq.request_id] = seq
            for rid in aborted:
                with self.lock:
                    seq = self.active.pop(rid, None)
                if seq is not None:
                    seq.cache = None
                    self._finish(seq, "abort")
            for seq in list(self.active.values()):
                self._step(seq)

    def _step(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        logits = forward(self.lm.model, seq.output_ids[-1:], seq.cache)
        token = sample_token(logits, seq.params, position=seq.num_tokens)
        with self.lock:
            self._emit(seq, token)
            if seq.finish_reason:
                del self.active[seq.request_id]
                seq.cache = None  # frees the KV
        log.debug("step %s %.1f ms", seq.request_id, (time.perf_counter() - t0) * 1e3)
