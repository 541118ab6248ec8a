"""Paged KV: attention over blocks equals dense attention, forks and copy-on-write, bookkeeping, batching."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smcserve.decode.batcher import ExtendJob
from smcserve.decode.loop import DecodeLoop, append_tokens
from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.prefill.worker import Prefiller

ATOL = 2e-3  # fp32 logits are O(10); the paged path reorders sums only


def prefill(bm: BlockManager, runner: ModelRunner, ids: list[int]) -> tuple[BlockTable, torch.Tensor]:
    table = BlockTable()
    for _ in ids:
        bm.append_slot(table)
    return table, runner.forward([SeqBatchItem(ids, 0, table.blocks)])[0]


def dense_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1]


def test_paged_equals_dense_with_forks(real_model):
    bm, runner = BlockManager(128, 16), ModelRunner(real_model, 128, 16)
    prompts = [list(range(300, 300 + n)) for n in (3, 16, 21, 40)]
    tables, seqs = [], []
    for ids in prompts:
        table, logits = prefill(bm, runner, ids)
        assert torch.allclose(logits, dense_logits(real_model, ids), atol=ATOL)
        tables.append(table)
        seqs.append(list(ids))
    # fork two sequences mid-block (21 tokens: block 1 is partial and now shared) and one at a boundary
    for parent in (2, 2, 1):
        tables.append(bm.fork(tables[parent]))
        seqs.append(list(seqs[parent]))
    assert any(bm.ref[b] > 1 for b in tables[2].blocks)
    for step in range(3):  # every sequence gets its own token: the forks diverge from their parents
        tokens = [1000 + 7 * i + step for i in range(len(tables))]
        logits = runner.forward(append_tokens(bm, runner, tables, tokens))
        for i, tok in enumerate(tokens):
            seqs[i].append(tok)
            assert torch.allclose(logits[i], dense_logits(real_model, seqs[i]), atol=ATOL), (step, i)
    for t in tables:  # a write never lands in a shared block
        assert bm.ref[t.blocks[-1]] == 1
        bm.free_table(t)
    assert bm.num_free == bm.num_blocks


def test_forked_sequence_continues_like_its_parent(real_model):
    bm, runner = BlockManager(64, 16), ModelRunner(real_model, 64, 16)
    ids = real_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    table, logits = prefill(bm, runner, ids)
    out = [int(torch.argmax(logits))]
    for _ in range(4):
        out.append(int(torch.argmax(runner.forward(append_tokens(bm, runner, [table], out[-1:]))[0])))
    child = bm.fork(table)
    parent_out, child_out = list(out), list(out)
    for _ in range(8):
        logits = runner.forward(append_tokens(bm, runner, [table, child], [parent_out[-1], child_out[-1]]))
        parent_out.append(int(torch.argmax(logits[0])))
        child_out.append(int(torch.argmax(logits[1])))
    assert child_out == parent_out
    ref = real_model.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=13,
        do_sample=False,
    )[0, len(ids) :].tolist()
    assert parent_out == ref


# --- block-manager bookkeeping, property-based ------------------------------------------------------
ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "fork", "append", "free", "cache", "lookup"]), st.integers(0, 1000), st.integers(1, 40)
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_block_manager_invariants(program):
    bm = BlockManager(48, 4)
    tables: list[BlockTable] = []
    keys = [f"k{i}" for i in range(6)]

    def check():
        holders = [0] * bm.num_blocks
        for t in tables:
            for b in t.blocks:
                holders[b] += 1
        for b in bm.cache.values():
            holders[b] += 1
        assert holders == bm.ref  # every reference is a table entry or a cache entry
        assert all(r >= 0 for r in bm.ref)
        assert sorted(bm.free) == [b for b in range(bm.num_blocks) if bm.ref[b] == 0]

    for op, pick, count in program:
        try:
            if op == "new":
                t = BlockTable()
                tables.append(t)  # held before it fills: running out half-way leaves a shorter table
                for _ in range(count):
                    bm.append_slot(t)
            elif op == "fork" and tables:
                tables.append(bm.fork(tables[pick % len(tables)]))
            elif op == "append" and tables:
                t = tables[pick % len(tables)]
                for _ in range(count % 6 + 1):
                    bm.append_slot(t)
                    assert bm.ref[t.blocks[-1]] == 1  # no block is shared after a write
            elif op == "free" and tables:
                bm.free_table(tables.pop(pick % len(tables)))
            elif op == "cache" and tables and tables[pick % len(tables)].blocks:
                t = tables[pick % len(tables)]
                bm.register(keys[count % len(keys)], t.blocks[pick % len(t.blocks)])
            elif op == "lookup":
                b = bm.lookup(keys[count % len(keys)])
                if b is not None:
                    tables.append(BlockTable([b], bm.block_size))
        except OutOfBlocks:
            pass  # refused cleanly; the state must still be consistent
        check()
    for t in tables:
        bm.free_table(t)
    bm.clear_cache()
    assert bm.num_free == bm.num_blocks and not any(bm.ref)


# --- the engine: batching across requests, leaks, running out of blocks ---------------------------------
def _submit(engine, lm, prefiller, text, max_tokens, rid):
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pre = prefiller.prefill(ids, params)
    seq = DecodeSeq(rid, ids, pre.block_keys, params, IncrementalDetokenizer(lm.tokenizer))
    engine.submit(seq, pre.first_token)
    return seq


def _wait(seq):
    while not seq.events.get(timeout=120).finish_reason:
        pass


def test_engine_batches_requests_and_leaks_nothing(tiny_model_dir, redis_url):
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    store = KVStore(redis_url, key_prefix="t-paged:")
    prefiller = Prefiller(lm, store, 16)
    engine = DecodeLoop(lm, store, 16, 64).start()
    held = release = threading.Event()
    try:
        shared = "The same long system prompt for every request, long enough to fill blocks. " * 2

        def submit(i):
            return _submit(engine, lm, prefiller, shared + f"Question {i}?", 10 + 3 * i, f"r{i}")

        # three requests start together; three more join them while they run (the engine is held in a
        # step meanwhile, so this overlap does not depend on the machine's speed)
        held = _hold_engine(engine)
        seqs = [submit(i) for i in range(3)]
        parked, release = _hold_mid_step(engine)
        held.set()
        assert parked.wait(timeout=120), "the engine did not run a step"
        seqs += [submit(i) for i in range(3, 6)]
        release.set()
        for s in seqs:
            _wait(s)
        st_ = engine.stats()
        assert [len(s.output_ids) for s in seqs] == [10 + 3 * i for i in range(6)]
        assert st_.max_batch_size == 6 and st_.batched_tokens > st_.batch_steps
        assert st_.prompt_blocks_reused > 0  # the shared prefix came from the worker's cache
        assert st_.kv_blocks_in_use == 0 and st_.active_sequences == 0
        with engine.lock:
            engine.bm.clear_cache()
            assert engine.bm.num_free == engine.bm.num_blocks
    finally:
        held.set()
        release.set()
        engine.close()


def _hold_engine(engine) -> threading.Event:
    """Park the decode loop's thread between steps until the returned event is set: nothing it holds (pending
    or running sequences, their reservations) changes meanwhile, however fast the machine is."""
    parked, release = threading.Event(), threading.Event()
    engine.call(lambda: (parked.set(), release.wait()))
    assert parked.wait(timeout=120), "the decode loop did not run the call"
    return release


def _hold_mid_step(engine) -> tuple[threading.Event, threading.Event]:
    """(parked, release): the decode loop parks inside its next batched step (after the forward,
    before sampling), via an extension job with no sequences of its own, so the sequences of that
    step stay running until ``release`` is set."""
    parked, release = threading.Event(), threading.Event()

    def park(_logits):
        parked.set()
        release.wait()

    engine.extend(ExtendJob([], [], park))
    return parked, release


def test_engine_refuses_when_out_of_blocks(tiny_model_dir, redis_url):
    """A request that does not fit next to an admitted one is refused, and the admitted one loses
    nothing. The engine is held while the second arrives, so the first cannot finish early on a fast
    machine: both while it waits to be loaded and while it is running mid-step."""
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    store = KVStore(redis_url, key_prefix="t-oob:")
    prefiller = Prefiller(lm, store, 16)
    engine = DecodeLoop(lm, store, 16, 8).start()  # 128 token slots
    releases: list[threading.Event] = []
    try:
        # 1. admitted but not yet loaded: the decode loop is parked before it takes the request
        releases.append(_hold_engine(engine))
        running = _submit(engine, lm, prefiller, "A running request.", 60, "ok")
        with pytest.raises(OutOfBlocks, match="out of KV blocks"):
            _submit(engine, lm, prefiller, "One too many.", 60, "too-big")  # would fit in an empty pool
        # 2. running: the engine loads it and is parked inside the step that advances it
        parked, release = _hold_mid_step(engine)
        releases.append(release)
        releases[0].set()
        assert parked.wait(timeout=120), "the engine did not run a step"
        now = engine.stats()
        assert now.active_sequences == 1 and now.kv_blocks_in_use > 0 and not running.finish_reason, now
        with pytest.raises(OutOfBlocks, match="out of KV blocks"):
            _submit(engine, lm, prefiller, "One too many.", 60, "too-big")  # would fit in an empty pool
        releases[1].set()
        _wait(running)
        assert running.finish_reason == "length" and len(running.output_ids) == 60  # nothing lost
        assert engine.stats().kv_blocks_in_use == 0
    finally:
        for r in releases:
            r.set()
        engine.close()


def test_engine_abort_frees_blocks(tiny_model_dir, redis_url):
    """An abort ends a running sequence and frees its KV. The abort lands while the engine is held
    inside a step that advances the sequence, so the sequence is certainly running then and cannot
    finish first, however fast the machine is."""
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    store = KVStore(redis_url, key_prefix="t-abort:")
    engine = DecodeLoop(lm, store, 16, 32).start()
    held = release = threading.Event()
    try:
        held = _hold_engine(engine)
        seq = _submit(engine, lm, Prefiller(lm, store, 16), "Abort me.", 480, "x")
        parked, release = _hold_mid_step(engine)
        held.set()
        assert parked.wait(timeout=120), "the engine did not run a step"
        assert engine.stats().kv_blocks_in_use > 0 and not seq.finish_reason
        engine.abort("x")
        release.set()
        _wait(seq)
        # prefill's token, the held step's, at most one more before the engine sees the abort
        assert seq.finish_reason == "abort" and 2 <= len(seq.output_ids) <= 3
        assert engine.stats().kv_blocks_in_use == 0
    finally:
        held.set()
        release.set()
        engine.close()


def test_a_sequence_that_fails_in_a_step_fails_alone(tiny_model_dir, redis_url):
    """A sequence whose token handling raises (here its detokenizer, on its third token) ends with an
    error and frees its KV; the sequences batched with it in the same steps finish normally."""
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    store = KVStore(redis_url, key_prefix="t-isolate:")
    engine = DecodeLoop(lm, store, 16, 64).start()

    class Broken(IncrementalDetokenizer):
        def push(self, token_id):
            if len(self.token_ids) == 2:
                raise UnicodeError("a detokenizer bug")
            return super().push(token_id)

    held = _hold_engine(engine)  # all three join the same first step
    try:
        prefiller = Prefiller(lm, store, 16)
        good = [_submit(engine, lm, prefiller, f"Question {i}?", 8, f"ok{i}") for i in range(2)]
        ids = lm.tokenizer.encode("Broken one?", add_special_tokens=False)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        pre = prefiller.prefill(ids, params)
        bad = DecodeSeq("bad", ids, pre.block_keys, params, Broken(lm.tokenizer))
        engine.submit(bad, pre.first_token)
    finally:
        held.set()
    for s in [*good, bad]:
        _wait(s)
    assert bad.finish_reason == "error" and len(bad.output_ids) == 3
    assert [s.finish_reason for s in good] == ["length", "length"] and all(len(s.output_ids) == 8 for s in good)
    st_ = engine.stats()
    assert st_.kv_blocks_in_use == 0 and st_.active_sequences == 0
    engine.close()
