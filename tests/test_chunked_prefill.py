"""Chunked prefill: chunks give the KV and logits of one forward; a prefill worker interleaves its prompts
chunk by chunk (a short one between a long one's chunks); a decode worker's prompt recompute runs a chunk
per step next to the running batch. The order of the work is asserted, never its timing."""

from __future__ import annotations

import pytest
import torch

from smcserve.decode.loop import DecodeLoop
from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.chunked_prefill import ChunkedPrefill
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.kv import chain_keys
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.prefill.prefiller import Prefiller
from smcserve.prefill.queue import MAX_OVERTAKES, PrefillQueue

GREEDY = SamplingParams(temperature=0.0)
TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32: chunks only regroup the sums


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32")


def record_forwards(runner: ModelRunner, prompts: list[list[int]]) -> list[tuple]:
    """Every forward ``runner`` runs from now on: (first token, start, tokens) for a chunk of one of
    ``prompts``, ("batch", sequences) for anything else (a decode step: one token per sequence)."""
    seen: list[tuple] = []
    forward = runner.forward

    def spy(items):
        it = items[0]
        if len(items) == 1 and any(p[it.start : it.start + len(it.tokens)] == it.tokens for p in prompts):
            seen.append((it.tokens[0] - it.start, it.start, len(it.tokens)))
        else:
            seen.append(("batch", len(items)))
        return forward(items)

    runner.forward = spy
    return seen


def dense_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1].float()


def test_chunks_give_the_kv_and_logits_of_one_forward(tiny):
    bm, runner = BlockManager(64, 16), ModelRunner(tiny, 64, 16)
    ids = [(37 * i) % 5000 + 100 for i in range(45)]
    results = {}
    for chunk in (0, 1, 7, 16, 20):
        table = BlockTable()
        for _ in ids:
            bm.append_slot(table)
        fill = ChunkedPrefill(ids, table, 0, chunk)
        sizes = []
        while not fill.finished:
            sizes.append(fill.run_chunk(runner))
        assert sum(sizes) == len(ids) and max(sizes) == (chunk or len(ids))
        slots = runner._slots(table.blocks, 0, len(ids))
        results[chunk] = (fill.logits, runner.k_cache[:, slots].clone(), runner.v_cache[:, slots].clone())
        bm.free_table(table)
    logits, k, v = results[0]
    assert torch.allclose(logits, dense_logits(tiny, ids), atol=1e-4)
    for chunk, (c_logits, c_k, c_v) in results.items():
        assert torch.allclose(c_logits, logits, **TOL), chunk
        assert torch.allclose(c_k, k, **TOL) and torch.allclose(c_v, v, **TOL), chunk


def test_a_chunked_prefill_stores_the_kv_and_first_token_of_an_unchunked_one(tiny, redis_url):
    ids = [(11 * i) % 7000 + 100 for i in range(70)]
    whole = Prefiller(tiny, KVStore(redis_url, key_prefix="t-chunk-whole:"), 16, chunk=0)
    store = KVStore(redis_url, key_prefix="t-chunk-7:")
    chunked = Prefiller(tiny, store, 16, chunk=7)
    seen = record_forwards(chunked.runner, [ids])
    a, b = whole.prefill(ids, GREEDY), chunked.prefill(ids, GREEDY)
    assert [n for *_, n in seen] == [7] * 10
    assert (b.first_token, b.block_keys, b.cached_tokens) == (a.first_token, a.block_keys, 0)
    for x, y in zip(whole.store.get_blocks(a.block_keys), store.get_blocks(b.block_keys)):
        assert torch.allclose(x, y, **TOL)


# --- the prefill worker's queue -------------------------------------------------------------------------
A = [1000 + i for i in range(100)]  # a long prompt: 7 chunks of 16
SHORT = [[2000 + 100 * k + i for i in range(10)] for k in range(6)]  # short ones: one chunk each
B = [3000 + i for i in range(60)]  # a shorter long prompt: 4 chunks


def queue_of(tiny, redis_url, name: str, **kw) -> tuple[PrefillQueue, list[tuple]]:
    prefiller = Prefiller(tiny, KVStore(redis_url, key_prefix=f"t-queue-{name}:"), 16, prefix_cache=False, **kw)
    return PrefillQueue(prefiller), record_forwards(prefiller.runner, [A, B, *SHORT])  # not started: the test steps


def run_all(queue: PrefillQueue) -> None:
    while queue.step():
        pass


def test_a_short_prompt_runs_between_the_chunks_of_a_long_one(tiny, redis_url):
    queue, seen = queue_of(tiny, redis_url, "short", chunk=16)
    long = queue.submit(A, GREEDY)
    assert queue.step() and seen == [(1000, 0, 16)]
    short = queue.submit(SHORT[0], GREEDY)
    assert queue.step() and seen[-1] == (2000, 0, 10)
    assert short.done() and not long.done()  # done after one chunk of the long prompt, not all seven
    run_all(queue)
    assert seen == [(1000, 0, 16), (2000, 0, 10), *((1000, s, 16) for s in range(16, 96, 16)), (1000, 96, 4)]
    alone = Prefiller(tiny, KVStore(redis_url, key_prefix="t-queue-alone:"), 16, prefix_cache=False, chunk=0)
    assert long.result().first_token == alone.prefill(A, GREEDY).first_token
    assert short.result().first_token == alone.prefill(SHORT[0], GREEDY).first_token
    assert queue.prefiller.bm.stats()["kv_blocks_in_use"] == 0


def test_a_long_prompt_runs_again_after_max_overtakes_however_many_short_ones_arrive(tiny, redis_url):
    assert MAX_OVERTAKES == 4  # the expected order below
    queue, seen = queue_of(tiny, redis_url, "fair", chunk=16)
    long = queue.submit(A, GREEDY)
    queue.step()
    shorts = [queue.submit(ids, GREEDY) for ids in SHORT]
    run_all(queue)
    a = [(1000, s, 16) for s in range(0, 96, 16)] + [(1000, 96, 4)]
    s = [(2000 + 100 * k, 0, 10) for k in range(6)]
    assert seen == [a[0], *s[:4], a[1], *s[4:], *a[2:]]
    assert long.result() is not None and all(s.result() is not None for s in shorts)


def test_two_long_prompts_run_one_after_the_other_not_side_by_side(tiny, redis_url):
    """Side by side both would finish late; the one with fewer tokens left runs through (up to
    ``MAX_OVERTAKES`` chunks), then the other."""
    queue, seen = queue_of(tiny, redis_url, "two-long", chunk=16)
    first = queue.submit(A, GREEDY)
    queue.step()
    second = queue.submit(B, GREEDY)  # 60 tokens: fewer than the 84 the first has left
    run_all(queue)
    b = [(3000, 0, 16), (3000, 16, 16), (3000, 32, 16), (3000, 48, 12)]
    assert seen == [(1000, 0, 16), *b, *((1000, s, 16) for s in range(16, 96, 16)), (1000, 96, 4)]
    assert second.done() and first.result() is not None and second.result() is not None


def test_a_prompt_the_pool_cannot_hold_yet_waits_for_the_running_one(tiny, redis_url):
    queue, seen = queue_of(tiny, redis_url, "full", chunk=16, max_prompt_tokens=64)  # a pool of 4 blocks
    first = queue.submit(A[:64], GREEDY)
    second = queue.submit(SHORT[0], GREEDY)  # shorter, but no block is free until the first finishes
    run_all(queue)
    assert seen == [(1000, s, 16) for s in range(0, 64, 16)] + [(2000, 0, 10)]
    assert first.result() is not None and second.result() is not None


def test_a_cancelled_prompt_stops_before_its_next_chunk_and_frees_its_blocks(tiny, redis_url):
    queue, seen = queue_of(tiny, redis_url, "cancel", chunk=16)
    stop = {"long": False, "short": True}  # the short one is cancelled before it starts
    long = queue.submit(A, GREEDY, lambda: stop["long"])
    short = queue.submit(SHORT[0], GREEDY, lambda: stop["short"])
    assert queue.step() and seen == [(1000, 0, 16)] and short.result() is None
    stop["long"] = True
    assert not queue.step() and long.result() is None and len(seen) == 1
    assert queue.prefiller.bm.stats()["kv_blocks_in_use"] == 0
    assert not any(queue.prefiller.store.contains(chain_keys(tiny.fingerprint, A, 16)))


def test_a_prompt_sharing_a_prefix_in_progress_waits_for_it_and_reuses_its_blocks(tiny, redis_url):
    """Two prompts in flight with one new 64-token prefix compute it once; an unrelated one is not held."""
    prefiller = Prefiller(tiny, KVStore(redis_url, key_prefix="t-queue-shared:"), 16, chunk=16)
    queue = PrefillQueue(prefiller)
    seen = record_forwards(prefiller.runner, [A, B, *SHORT, A[:64] + B[:20]])
    first = queue.submit(A, GREEDY)
    assert queue.step() and seen == [(1000, 0, 16)]
    second = queue.submit(A[:64] + B[:20], GREEDY)  # fewer tokens left than the first: it would run next
    other = queue.submit(SHORT[0], GREEDY)
    run_all(queue)
    a = [(1000, s, 16) for s in range(0, 96, 16)] + [(1000, 96, 4)]
    assert seen == [a[0], (2000, 0, 10), *a[1:], (3000 - 64, 64, 16), (3016 - 80, 80, 4)]  # B[:20] at 64
    assert second.result().cached_tokens == 64 and other.result() is not None and first.result() is not None
    assert prefiller.bm.stats()["kv_blocks_in_use"] == 0


def test_a_prompt_held_for_a_shared_prefix_computes_it_when_that_prompt_is_cancelled(tiny, redis_url):
    prefiller = Prefiller(tiny, KVStore(redis_url, key_prefix="t-queue-shared-cancel:"), 16, chunk=16)
    queue = PrefillQueue(prefiller)
    stop = {"first": False}
    first = queue.submit(A, GREEDY, lambda: stop["first"])
    queue.step()
    second = queue.submit(A[:64] + B[:20], GREEDY)
    queue.step()  # the second is held: another chunk of the first runs
    assert prefiller.computing_keys(queue.running[0].job) and len(queue.running) == 1
    stop["first"] = True
    run_all(queue)
    assert first.result() is None and second.result().cached_tokens == 0
    assert prefiller.bm.stats()["kv_blocks_in_use"] == 0


# --- a decode worker's prompt recompute ------------------------------------------------------------------
def test_a_prompt_recompute_on_a_decode_worker_runs_a_chunk_per_step_beside_the_batch(tiny, redis_url):
    store = KVStore(redis_url, key_prefix="t-recompute:")
    loop = DecodeLoop(tiny, store, 16, 64, prefill_chunk=16)  # not started: the test runs its steps
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    def seq(rid, ids, keys):
        return DecodeSeq(rid, ids, keys, params, IncrementalDetokenizer(tiny.tokenizer))

    running_ids = [300 + i for i in range(20)]
    pre = Prefiller(tiny, store, 16).prefill(running_ids, params)  # its KV is in the store
    running = seq("running", running_ids, pre.block_keys)
    loop.submit(running, pre.first_token)
    loop.step()  # it joins and runs
    assert len(running.output_ids) == 2
    miss_ids = [1000 + i for i in range(50)]  # its KV is nowhere: recomputed here, 16 tokens per step
    aborted_ids = [1500 + i for i in range(40)]
    seen = record_forwards(loop.runner, [miss_ids, aborted_ids])
    miss_keys = chain_keys(tiny.fingerprint, miss_ids, 16)
    miss = seq("miss", miss_ids, miss_keys)
    loop.submit(miss, 7)
    for step in range(3):
        loop.step()
        assert seen[-2:] == [(1000, 16 * step, 16), ("batch", 1)] and len(running.output_ids) == 3 + step
        assert loop.stats().active_sequences == 2 and len(miss.output_ids) == 1
    loop.step()  # its last 2 tokens, then it joins the batch
    assert seen[-2:] == [(1000, 48, 2), ("batch", 2)] and len(miss.output_ids) == 2
    assert miss.output_ids[1] == int(torch.argmax(dense_logits(tiny, miss_ids + [7])))
    assert loop.stats().prompt_recomputes == 1 and all(store.contains(miss_keys))
    # an abort while recomputing frees the blocks at once
    aborted = seq("aborted", aborted_ids, chain_keys(tiny.fingerprint, aborted_ids, 16))
    loop.submit(aborted, 7)
    loop.step()
    assert seen[-2:] == [(1500, 0, 16), ("batch", 2)] and len(aborted.table.blocks) == 3
    loop.abort("aborted")
    loop.step()
    assert aborted.finish_reason == "abort" and seen[-1] == ("batch", 2) and not aborted.table.blocks
    assert not loop.has_sequence("aborted")
    assert loop.stats().kv_blocks_in_use == len(set(running.table.blocks) | set(miss.table.blocks))


def test_a_negative_prefill_chunk_is_refused_before_anything_starts():
    import asyncio

    from smcserve.scheduler.stack import ServeConfig, Stack

    stack = Stack(ServeConfig(prefill_chunk=-1))
    with pytest.raises(ValueError, match="--prefill-chunk: -1"):
        asyncio.run(stack.start())
    assert stack.redis is None and not stack.started_ray
