"""Prefill on the paged model runner: its logits and KV equal the model's own, repeated prefixes come from
the worker's own cache, then the store, and the scheduler's view of that cache is what the worker holds."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from smcserve.engine.model import load_model
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.prefill.prefiller import Prefiller
from smcserve.prefill.result import PrefillResult
from smcserve.scheduler.server import DecodeHandle, ModelSummary, PrefillHandle, Running, SchedulerService
from smcserve.scheduler.validate import Limits

ATOL = 2e-3  # fp32 logits are O(10); the paged path reorders sums only
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32")


def spy_logits(prefiller: Prefiller) -> list[torch.Tensor]:
    """The last position's logits of every prefill ``prefiller`` runs from now on."""
    seen: list[torch.Tensor] = []
    forward = prefiller.runner.forward

    def spy(items):
        out = forward(items)
        seen.append(out[-1])
        return out

    prefiller.runner.forward = spy
    return seen


def dense_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1].float()


def test_logits_equal_the_model_computed_whole_from_the_workers_cache_or_from_the_store(real_model, redis_url):
    store = KVStore(redis_url, key_prefix="t-prefill-eq:")
    worker, other = Prefiller(real_model, store, 16), Prefiller(real_model, store, 16)
    seen_worker, seen_other = spy_logits(worker), spy_logits(other)
    shared = list(range(300, 348))  # 3 whole blocks
    cases = [
        (worker, seen_worker, shared + [1, 2, 3], (0, 0)),  # computed whole
        (worker, seen_worker, shared + [4, 5], (3, 0)),  # the prefix from the worker's own cache
        (other, seen_other, shared + [6], (0, 3)),  # the prefix from the store (the other worker wrote it)
    ]
    for prefiller, seen, ids, (local, loaded) in cases:
        result = prefiller.prefill(ids, GREEDY)
        assert (result.local_hit_blocks, result.loaded_blocks) == (local, loaded)
        assert result.cached_tokens == 16 * (local + loaded)
        reference = dense_logits(real_model, ids)
        assert torch.allclose(seen[-1], reference, atol=ATOL), (ids[-3:], (seen[-1] - reference).abs().max())
        assert result.first_token == int(torch.argmax(reference))


def test_a_repeated_prompt_is_served_from_the_workers_own_blocks(tiny, redis_url):
    store = KVStore(redis_url, key_prefix="t-prefill-again:")
    prefiller = Prefiller(tiny, store, 16)
    seen = spy_logits(prefiller)
    ids = list(range(100, 141))  # 41 tokens: 2 whole blocks to reuse, the last block computed
    params = SamplingParams(temperature=1.0, seed=3)
    first = prefiller.prefill(ids, params)
    assert first.cached_tokens == 0 and first.local_hit_blocks == first.loaded_blocks == 0
    assert set(first.local_keys) == set(first.block_keys[:2]) == set(prefiller.bm.cache)
    store.delete(first.block_keys)  # the store forgets them: only the worker's own blocks can serve the prefix
    second = prefiller.prefill(ids, params)
    assert second.local_hit_blocks == 2 and second.loaded_blocks == 0 and second.cached_tokens == 32
    assert (second.first_token, second.block_keys) == (first.first_token, first.block_keys)
    assert torch.allclose(seen[1], seen[0], atol=ATOL)
    assert store.contains(first.block_keys) == [True] * 3  # written back for the decode workers
    assert second.local_version == first.local_version + 1
    assert prefiller.bm.stats()["kv_blocks_in_use"] == 0  # only the cache holds blocks between prefills


def test_the_store_gets_the_models_own_kv_in_the_block_layout(tiny, redis_url):
    store = KVStore(redis_url, key_prefix="t-prefill-layout:")
    prefiller = Prefiller(tiny, store, 16)
    ids = list(range(5, 42))  # 37 tokens: two whole blocks and one of 5
    blocks = store.get_blocks(prefiller.prefill(ids, GREEDY).block_keys)
    assert [b.shape[3] for b in blocks] == [16, 16, 5] and blocks[0].shape == prefiller.runner.layout.block_shape()
    with torch.inference_mode():
        cache = tiny.model(torch.tensor([ids]), use_cache=True).past_key_values
    for block, start in zip(blocks, (0, 16, 32)):
        end = start + block.shape[3]
        for i, layer in enumerate(cache.layers):
            assert torch.allclose(block[i, 0], layer.keys[0, :, start:end], atol=1e-5)
            assert torch.allclose(block[i, 1], layer.values[0, :, start:end], atol=1e-5)


def test_the_workers_cache_is_bounded_by_its_pool_and_evicts_least_recently_used(tiny, redis_url):
    store = KVStore(redis_url, key_prefix="t-prefill-lru:")
    prefiller = Prefiller(tiny, store, 16, cache_blocks=2, max_prompt_tokens=64)  # a pool of 4 + 2 blocks
    prompts = [[1000 * p + i for i in range(33)] for p in range(1, 5)]  # 3 blocks each, 2 of them reusable
    firsts = []
    for ids in prompts:
        firsts.append(prefiller.prefill(ids, GREEDY))
        assert set(firsts[-1].local_keys) == set(prefiller.bm.cache) and len(prefiller.bm.cache) <= 6
    assert firsts[0].block_keys[0] not in prefiller.bm.cache  # the oldest went first
    again = prefiller.prefill(prompts[0], GREEDY)  # its prefix was evicted here: read back from the store
    assert (again.local_hit_blocks, again.loaded_blocks) == (0, 2) and again.first_token == firsts[0].first_token
    assert set(again.local_keys) == set(prefiller.bm.cache) and set(again.block_keys[:2]) <= set(again.local_keys)
    with pytest.raises(ValueError, match="prompt: 65 tokens"):
        prefiller.prefill(list(range(65)), GREEDY)


def test_without_the_prefix_cache_everything_is_computed(tiny, redis_url):
    store = KVStore(redis_url, key_prefix="t-prefill-off:")
    prefiller = Prefiller(tiny, store, 16, prefix_cache=False)
    ids = list(range(200, 250))
    first, second = prefiller.prefill(ids, GREEDY), prefiller.prefill(ids, GREEDY)
    assert first.cached_tokens == second.cached_tokens == 0 and second.local_keys == ()
    assert second.first_token == first.first_token and store.contains(first.block_keys) == [True] * 4


# --- the scheduler's view of a worker's cache ----------------------------------------------------------
class FakeContext:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def test_the_schedulers_view_of_a_workers_cache_is_what_the_worker_holds(tiny, redis_url):
    """Live placement and one real Prefiller behind a fake actor: after every prefill the scheduler's
    ``local_blocks`` for the worker is exactly the worker's cache, so the Conductor's predicted local hits
    and store loads are the ones the worker then really has."""
    store = KVStore(redis_url, key_prefix="t-prefill-view:")
    prefiller = Prefiller(tiny, store, 16, cache_blocks=2, max_prompt_tokens=64)

    async def remote(token_ids, params, ticket=""):
        return prefiller.prefill(token_ids, params)

    svc = SchedulerService(
        tokenizer=None,
        limits=Limits(max_context=512, max_tokens_limit=100, model_name="tiny"),
        model=ModelSummary("tiny", tiny.fingerprint, "float32", tiny.config.vocab_size, 16),
        prefill=[PrefillHandle("prefill-0", SimpleNamespace(prefill=SimpleNamespace(remote=remote)))],
        decode=[DecodeHandle("decode-0", None, "addr", None)],
        store=store,
        stats_interval_s=float("inf"),  # no decode worker to ask
    )
    a, b, c = ([1000 * p + i for i in range(32)] for p in (1, 2, 3))
    prompts = [a + [1], a + [2, 3], b + [4], c + [5], a + [6], b + [7], a + [8]]
    handle, evicted, results = svc.prefill[0], set(), []

    async def main():
        for ids in prompts:
            before = set(handle.local_blocks)
            placement = await svc.place(ids, 4)
            pre = await svc._prefill(placement, ids, GREEDY, FakeContext(), Running())
            assert isinstance(pre, PrefillResult) and handle.local_blocks == set(prefiller.bm.cache)
            assert (placement.prefill.local_hit_blocks, placement.prefill.load_blocks) == (
                pre.local_hit_blocks,
                pre.loaded_blocks,
            )
            evicted.update(before - handle.local_blocks)
            results.append(pre)

    asyncio.run(main())
    assert any(r.local_hit_blocks for r in results) and any(r.loaded_blocks for r in results) and evicted
    assert list(svc.cost.load) == [(r.loaded_blocks, pytest.approx(r.load_ms)) for r in results if r.loaded_blocks]


def test_an_older_report_of_a_workers_cache_is_ignored():
    handle = PrefillHandle("p", None)
    handle.report(PrefillResult(1, [], 1, 0, 1.0, local_keys=("new",), local_version=2))
    handle.report(PrefillResult(1, [], 1, 0, 1.0, local_keys=("old",), local_version=1))  # answered late
    assert handle.local_blocks == {"new"} and handle.local_version == 2
