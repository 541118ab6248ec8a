"""Engine pieces in one process: sampling, detokenisation, block layout, prefill → store → decode."""

from __future__ import annotations

import pytest
import torch

from smcserve.decode.loop import DecodeLoop
from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.kv import chain_keys
from smcserve.engine.model import load_model, model_fingerprint
from smcserve.engine.sampling import SamplingParams, sample_token
from smcserve.kvstore import KVStore
from smcserve.prefill.worker import Prefiller


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    assert sample_token(logits, SamplingParams(temperature=0.0), 0) == 1
    assert sample_token(logits, SamplingParams(temperature=1.0, top_k=1), 0) == 1
    assert sample_token(logits, SamplingParams(temperature=1.0, top_p=0.01), 5) == 1
    p = SamplingParams(temperature=1.0, seed=42)
    draws = [sample_token(logits, p, pos) for pos in range(200)]
    assert draws == [sample_token(logits, p, pos) for pos in range(200)]  # same seed and position, same draw
    assert draws != [sample_token(logits, SamplingParams(temperature=1.0, seed=43), pos) for pos in range(200)]
    assert 3 not in [sample_token(logits, SamplingParams(top_k=3, seed=s), 0) for s in range(200)]
    freq1 = sum(d == 1 for d in draws) / len(draws)  # p(1) = 0.49 under softmax
    assert 0.35 < freq1 < 0.63


def test_detokenizer_stop_strings_across_tokens(real_model):
    tok = real_model.tokenizer
    ids = tok.encode("The answer is forty-two. END of story", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=[". END"])
    out = ""
    for t in ids:
        out += d.push(t)
        if d.stopped:
            break
    assert d.stopped and out == "The answer is forty-two"
    d = IncrementalDetokenizer(tok, stop=["zzz"])
    out = "".join(d.push(t) for t in ids) + d.flush()
    assert out == "The answer is forty-two. END of story" and not d.stopped
    # text that could still become a stop string is held back until it cannot
    d = IncrementalDetokenizer(tok, stop=["forty-three"])
    shown = "".join(d.push(t) for t in tok.encode("forty-t", add_special_tokens=False))
    assert "forty" not in shown


def test_chain_keys_are_prefix_hashes():
    a = chain_keys("fp", list(range(40)), 16)
    b = chain_keys("fp", list(range(32)) + [7] * 8, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert chain_keys("other", list(range(40)), 16)[0] != a[0]
    assert chain_keys("fp", list(range(33)), 16)[:2] == a[:2]


def _run_disaggregated(lm, store, prompts, max_tokens, evict=False):
    """Prefill each prompt into the store, then decode it on a separate engine reading the store."""
    prefiller = Prefiller(lm, store, 16)
    engine = DecodeLoop(lm, store, 16, 512).start()
    outs = []
    try:
        for prompt in prompts:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            pre = prefiller.prefill(prompt, params)
            if evict:
                store.delete(pre.block_keys[1:])
            seq = DecodeSeq("r", prompt, pre.block_keys, params, IncrementalDetokenizer(lm.tokenizer))
            engine.submit(seq, pre.first_token)
            while not seq.events.get(timeout=120).finish_reason:
                pass
            outs.append(seq.output_ids)
        assert engine.stats().kv_blocks_in_use == 0
        return outs, engine.stats()
    finally:
        engine.close()


def _hf_greedy(lm, prompt, max_tokens):
    out = lm.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


def test_disaggregated_equals_hf_generate_tiny(tiny_model_dir, redis_url):
    lm = load_model(str(tiny_model_dir), "float32")
    prompts = [list(range(100, 100 + n)) for n in (3, 16, 37)]
    outs, _ = _run_disaggregated(lm, KVStore(redis_url, key_prefix="t-tiny:"), prompts, 20)
    for prompt, out in zip(prompts, outs):
        assert out == _hf_greedy(lm, prompt, 20)


@pytest.mark.parametrize("evict", [False, True], ids=["from-store", "evicted-recompute"])
def test_disaggregated_equals_hf_generate_real_model(real_model, redis_url, evict):
    tok = real_model.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")
    ]
    store = KVStore(redis_url, key_prefix=f"t-real-{evict}:")
    outs, stats = _run_disaggregated(real_model, store, prompts, 24, evict=evict)
    for prompt, out in zip(prompts, outs):
        assert out == _hf_greedy(real_model, prompt, 24)
    assert stats.prompt_recomputes == (len(prompts) if evict else 0)
    # every prompt block came from the worker's prefix cache or was read from the store (the first
    # block even when the rest was evicted), and reading them took time
    blocks = sum(len(chain_keys(real_model.fingerprint, p, 16)) for p in prompts)
    if not evict:
        assert stats.kv_blocks_loaded + stats.prompt_blocks_reused == blocks
    assert stats.kv_blocks_loaded >= 1 and stats.kv_load_ms > 0


def test_prefill_reuses_cached_prefix(tiny_model_dir, redis_url):
    lm = load_model(str(tiny_model_dir), "float32")
    prefiller = Prefiller(lm, KVStore(redis_url, key_prefix="t-prefix:"), 16)
    shared = list(range(200, 248))  # 3 full blocks
    first = prefiller.prefill(shared + [1, 2, 3], SamplingParams(temperature=0.0))
    assert first.cached_tokens == 0
    second = prefiller.prefill(shared + [4, 5], SamplingParams(temperature=0.0))
    assert second.cached_tokens == 48 and second.block_keys[:3] == first.block_keys[:3]
    # the reused prefix gives the same next token as a from-scratch computation
    with torch.inference_mode():
        assert second.first_token == int(torch.argmax(lm.model(torch.tensor([shared + [4, 5]])).logits[0, -1]))


def test_fingerprint_depends_on_dtype(tiny_model_dir):
    assert model_fingerprint(tiny_model_dir, torch.float32) != model_fingerprint(tiny_model_dir, torch.bfloat16)
