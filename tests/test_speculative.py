"""Self-speculative decoding with MTP heads (engine/speculative.py): lossless, greedy and sampled."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from smcserve.engine import speculative
from smcserve.engine.block_manager import BlockManager
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner
from smcserve.engine.mtp import MTPHeads, MTPSpec
from smcserve.engine.mtp_train import Corpus, TrainConfig, train, trunk_hidden
from smcserve.engine.sampling import SamplingParams
from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    from tiny_vocab import build_tiny_llama

    return load_model(str(build_tiny_llama(tmp_path_factory.mktemp("tiny8"), seed=3)), "float32")


def decoder(lm, heads, k, num_blocks=4096, block_size=4, max_batch=10_000):
    """A decoder on a fresh pool (block size 4: drafts cross block boundaries often)."""
    runner = ModelRunner(lm, num_blocks, block_size)
    return SpeculativeDecoder(runner, BlockManager(num_blocks, block_size), heads, k, lm.eos_token_ids, max_batch)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def tiny8_heads(tiny8, tmp_path_factory):
    """Heads self-distilled (seconds) on the tiny model's own greedy continuations: they draft well."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 8, (4,), generator=g).tolist() for _ in range(24)]
    plain = decoder(tiny8, None, 0)
    outs = plain.generate([SpecSeq(p, greedy(36)) for p in prompts])
    seqs = [p + o for p, o in zip(prompts, outs)]
    corpus = Corpus([torch.tensor(s) for s in seqs], [trunk_hidden(tiny8, s) for s in seqs])
    cfg = TrainConfig(steps=40, batch=8, seq_len=24, lr=1e-2, checkpoint_every=1000)
    work = tmp_path_factory.mktemp("heads8")
    from smcserve.engine.mtp import load_heads

    res = train(
        tiny8, MTPSpec("deepseek", 3, 16), cfg, work, work / "h.safetensors", show_progress=False, corpus=corpus
    )
    return load_heads(tiny8, res.path)


def test_greedy_is_token_identical_and_accepts_drafts(tiny8, tiny8_heads):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 8, (n,), generator=g).tolist() for n in (1, 3, 5, 8, 13)]
    plain = decoder(tiny8, None, 0).generate([SpecSeq(p, greedy(30)) for p in prompts])
    for k in (1, 3):
        dec = decoder(tiny8, tiny8_heads, k)
        assert dec.generate([SpecSeq(p, greedy(30)) for p in prompts]) == plain
        assert dec.stats.mean_accepted_length > 1.3, dec.stats  # the drafts are used
        assert dec.bm.stats()["kv_blocks_used"] == sum(dec.bm.blocks_for(len(p) + 29) for p in prompts)
    # opted out, or above the batch limit: plain steps, same tokens, nothing drafted
    dec = decoder(tiny8, tiny8_heads, 3, max_batch=2)
    seqs = [SpecSeq(p, greedy(30), speculate=i != 0) for i, p in enumerate(prompts)]
    assert dec.generate(seqs) == plain and dec.stats.steps == 0


def test_forked_sequences_copy_on_write(tiny8, tiny8_heads):
    """A sequence forked mid-generation (shared blocks) whose child continues from another token:
    both continue exactly as if decoded alone, so neither wrote into the other's blocks."""
    prompt = [1, 2, 3, 5, 1, 2]
    dec = decoder(tiny8, tiny8_heads, 3)
    parent = SpecSeq(prompt, greedy(24))
    dec.prefill(parent)
    for _ in range(3):
        dec.step([parent])
    child = SpecSeq(prompt, greedy(24), output=parent.output[:-1] + [(parent.output[-1] % 7) + 1])
    child.table, child.hidden = dec.bm.fork(parent.table), parent.hidden.clone()
    assert any(dec.bm.ref[b] > 1 for b in child.table.blocks)
    fork = len(child.output)
    dec.generate([parent, child])
    assert parent.output[:fork] != child.output[:fork]
    for seq in (parent, child):
        ref = SpecSeq(prompt, greedy(24), output=seq.output[:fork])
        decoder(tiny8, None, 0).generate([ref])
        assert ref.output == seq.output


def exact_joint(lm, prompt: list[int], n: int) -> dict[tuple[int, ...], float]:
    """P(x1..xn | prompt) of every n-token continuation, by HF forward passes over full sequences."""
    V = lm.config.vocab_size
    probs = {}
    with torch.no_grad():
        for cont in itertools.product(range(V), repeat=n - 1):
            ids = torch.tensor([prompt + list(cont)])
            lp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
            base = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
            for last in range(V):
                probs[(*cont, last)] = math.exp(base + float(lp[-1, last]))
    return probs


def chi_square_p(counts: dict, probs: dict, total: int) -> float:
    """Pearson's test of ``counts`` against ``probs``; cells expecting < 5 are pooled."""
    cells, pool_obs, pool_exp = [], 0, 0.0
    for key, p in probs.items():
        e = p * total
        if e < 5:
            pool_obs, pool_exp = pool_obs + counts.get(key, 0), pool_exp + e
        else:
            cells.append((counts.get(key, 0), e))
    if pool_exp > 0:
        cells.append((pool_obs, pool_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def sample_joint(lm, heads, k, n_samples, prompt, n):
    dec = decoder(lm, heads, k, num_blocks=4 * n_samples)
    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, seed=s) for s in range(n_samples)]
    seqs = [SpecSeq(prompt, p) for p in params]
    outs = dec.generate(seqs)
    counts: dict = {}
    for o in outs:
        counts[tuple(o)] = counts.get(tuple(o), 0) + 1
    return counts, dec.stats


def test_sampling_keeps_the_model_distribution(tiny8, monkeypatch):
    """Untrained heads (drafts far from the model): the joint law of 3 tokens matches the exact one by
    chi-square; accepting every draft unconditionally (negative control) is rejected by the same test."""
    torch.manual_seed(0)
    heads = MTPHeads(tiny8.model, MTPSpec("deepseek", 2, 8))
    prompt, n, N = [1, 5, 2], 3, 2000
    exact = exact_joint(tiny8, prompt, n)
    counts, stats = sample_joint(tiny8, heads, 2, N, prompt, n)
    assert stats.steps > 0 and 0 < sum(stats.accepted) < sum(stats.drafted)  # some drafts in, some out
    assert chi_square_p(counts, exact, N) > 0.01
    # seeded: the same seeds give the same tokens
    again, _ = sample_joint(tiny8, heads, 2, N, prompt, n)
    assert again == counts

    def accept_all(p, q, drafts, seed, first_index):
        bonus = speculative.inverse_cdf(p[len(drafts)][None], torch.tensor([[0.5]], dtype=torch.float64))
        return len(drafts), [*drafts, int(bonus[0, 0])]

    monkeypatch.setattr(speculative, "accept_drafts", accept_all)
    bad, _ = sample_joint(tiny8, heads, 2, N, prompt, n)
    assert chi_square_p(bad, exact, N) < 1e-6


def test_real_model_greedy_identical(real_model):
    """SmolLM2 in fp32 with (untrained: drafting from a copy of the last layer) deepseek heads: the
    greedy output of several prompts is the plain decoder's, token for token."""
    tok = real_model.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("What is the capital of France?", "Write a haiku about rain.", "List three colours.")
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    torch.manual_seed(0)
    heads = MTPHeads(real_model.model, MTPSpec("deepseek", 3, 16))
    plain = decoder(real_model, None, 0, num_blocks=256, block_size=16).generate(
        [SpecSeq(p, greedy(16)) for p in prompts]
    )
    dec = decoder(real_model, heads, 3, num_blocks=256, block_size=16)
    assert dec.generate([SpecSeq(p, greedy(16)) for p in prompts]) == plain
    assert dec.stats.steps > 0


def test_heads_with_mid_layer_features_draft_from_the_runners_rows_and_stay_lossless(tiny_model_dir, redis_url):
    """Heads that read the output after trunk layer 1 (``MTPSpec.features``): the runner hands them rows
    [h0, that output] and greedy decoding stays token-identical, whatever they draft."""
    lm = load_model(str(tiny_model_dir), "float32")
    heads = MTPHeads(lm.model, MTPSpec("deepseek", 2, 8, features=(1,))).eval()
    with torch.no_grad():
        heads.f_proj.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 100, (n,), generator=g).tolist() for n in (2, 5, 9)]
    plain = decoder(lm, None, 0).generate([SpecSeq(p, greedy(12)) for p in prompts])
    dec = decoder(lm, heads, 2)
    assert dec.runner.features == (1,)
    seqs = [SpecSeq(p, greedy(12)) for p in prompts]
    assert dec.generate(seqs) == plain and dec.stats.steps > 0
    assert all(s.hidden.shape[1] == 2 * lm.config.hidden_size for s in seqs)
    # the serving loop (decode/loop.py) hands its runner the heads' layers too
    from smcserve.decode.loop import DecodeLoop
    from smcserve.decode.sequence import DecodeSeq
    from smcserve.decode.speculation import Speculation
    from smcserve.engine.detok import IncrementalDetokenizer
    from smcserve.kvstore import KVStore
    from smcserve.prefill.prefiller import Prefiller

    store = KVStore(redis_url, key_prefix="t-features:")
    loop = DecodeLoop(
        lm, store, 16, 64, speculation=Speculation(speculative.Speculator(heads, 2, lm.config.vocab_size), 4)
    )
    assert loop.runner.features == (1,)
    pre = Prefiller(lm, store, 16).prefill(prompts[2], greedy(12))
    seq = DecodeSeq("r", prompts[2], pre.block_keys, greedy(12), IncrementalDetokenizer(lm.tokenizer))
    loop.submit(seq, pre.first_token)
    while seq.finish_reason is None:
        loop.step()
    assert seq.output_ids == plain[2] and loop.speculator.stats.steps > 0
