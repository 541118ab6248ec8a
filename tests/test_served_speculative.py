"""``smcserve serve --speculative mtp``: self-speculative decoding through the served path.

The real stack (gRPC scheduler in this process, Ray prefill and decode workers, embedded Redis) serves
the tiny 8-token Llama of ``tests/tiny_vocab.py`` with deepseek heads self-distilled for it in seconds
(they draft its greedy continuations well). Greedy output equals plain decoding token for token,
stop strings, EOS, max_tokens and logprobs end and report exactly as a plain (opted-out) request
does, a seeded sampled request is reproducible, opted-out requests draft nothing, every KV block is
free afterwards, and ``GetModelInfo`` and ``/metrics`` show the acceptance figures. The fall-back
above ``--speculative-max-batch`` is tested on the decode loop itself, where the batch is known.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
import torch
from tiny_vocab import build_tiny_llama

from smcserve.client import Client
from smcserve.engine.block_manager import BlockManager
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner
from smcserve.engine.mtp import HeadsMismatch, MTPSpec, check_heads, load_heads
from smcserve.engine.mtp_train import Corpus, TrainConfig, train, trunk_hidden
from smcserve.engine.sampling import SamplingParams
from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder

PROMPTS = ["ab", "c x", "a.e", "xxa b", "e", "bca"]
MAX_BATCH = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny model with heads at ``MODEL/mtp/deepseek.safetensors`` (trained on its greedy continuations)."""
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny8-spec"), seed=3)
    lm = load_model(str(path), "float32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 8, (4,), generator=g).tolist() for _ in range(24)]
    runner = ModelRunner(lm, 4096, 4)
    plain = SpeculativeDecoder(runner, BlockManager(4096, 4), None, 0, lm.eos_token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True)
    outs = plain.generate([SpecSeq(p, params) for p in prompts])
    seqs = [p + o for p, o in zip(prompts, outs)]
    corpus = Corpus([torch.tensor(s) for s in seqs], [trunk_hidden(lm, s) for s in seqs])
    cfg = TrainConfig(steps=40, batch=8, seq_len=24, lr=1e-2, checkpoint_every=1000)
    work = tmp_path_factory.mktemp("heads-work")
    out = path / "mtp" / "deepseek.safetensors"
    train(lm, MTPSpec("deepseek", 3, 16), cfg, work, out, show_progress=False, corpus=corpus)
    return path


@pytest.fixture(scope="module")
def plain_greedy(tiny_dir):
    """Greedy continuation of a prompt's token ids by the plain engine (no heads), in this process."""
    lm = load_model(str(tiny_dir), "float32")

    def run(ids: list[int], max_tokens: int) -> list[int]:
        dec = SpeculativeDecoder(ModelRunner(lm, 256, 16), BlockManager(256, 16), None, 0, lm.eos_token_ids)
        return dec.generate([SpecSeq(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))])[0]

    return lm.tokenizer, run


@pytest.fixture(scope="module")
def stack(tiny_dir, in_process_stack):
    from smcserve.scheduler.stack import ServeConfig

    config = ServeConfig(
        model=str(tiny_dir),
        dtype="float32",
        prefill_workers=1,
        decode_workers=1,
        port=0,
        http_port=0,
        threads=1,
        kv_cache="4mb",
        redis_maxmemory="64mb",
        speculative="mtp",
        num_speculative_tokens=3,
        speculative_max_batch=MAX_BATCH,
    )
    with in_process_stack(config) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.address) as c:
        c.wait_ready(60)
        yield c


def spec_steps(client) -> int:
    return sum(w.spec_steps for w in client.info().decode_workers)


def test_greedy_output_is_plain_decoding_and_drafts_are_accepted(client, plain_greedy):
    tok, reference = plain_greedy
    before = spec_steps(client)
    for prompt in PROMPTS:
        out = client.generate(prompt, temperature=0.0, max_tokens=40, ignore_eos=True)
        assert out.token_ids == reference(tok.encode(prompt, add_special_tokens=False), 40), prompt
        assert out.finish_reason == "length" and len(out.token_ids) == 40
    info = client.info()
    assert info.speculative == "mtp" and info.num_speculative_tokens == 3 and info.mtp_style == "deepseek"
    assert spec_steps(client) > before
    # drafts were accepted: fewer verify steps than tokens (1 + accepted / steps > 1)
    assert info.mean_accepted_length > 1.2 and len(info.acceptance_per_depth) == 3, info
    assert info.acceptance_per_depth[0] > 0


def test_stop_eos_max_tokens_and_logprobs_end_as_plain_decoding(client):
    """A request with a stop string, EOS and logprobs streams what the same request opted out streams."""
    for prompt, kw in [
        ("ab", dict(stop=["ca"], max_tokens=40)),
        ("c x", dict(max_tokens=40)),  # EOS (not ignored)
        ("a.e", dict(max_tokens=7, logprobs=2)),
        ("xxa b", dict(stop=["b"], max_tokens=40, logprobs=0)),
    ]:
        spec = client.generate(prompt, temperature=0.0, **kw)
        plain = client.generate(prompt, temperature=0.0, disable_speculation=True, **kw)
        assert (spec.text, spec.token_ids, spec.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
        assert spec.usage.completion_tokens == plain.usage.completion_tokens
        assert len(spec.logprobs) == len(plain.logprobs)
        for a, b in zip(spec.logprobs, plain.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


def test_seeded_sampling_is_reproducible(client):
    before = spec_steps(client)
    runs = [client.generate("ab", temperature=1.0, seed=11, max_tokens=30, ignore_eos=True) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 30
    assert spec_steps(client) > before  # they speculated
    other = client.generate("ab", temperature=1.0, seed=12, max_tokens=30, ignore_eos=True)
    assert other.token_ids != runs[0].token_ids


def test_an_opted_out_request_drafts_nothing(client, plain_greedy):
    tok, reference = plain_greedy
    before = spec_steps(client)
    out = client.generate("bca", temperature=0.0, max_tokens=30, ignore_eos=True, disable_speculation=True)
    assert spec_steps(client) == before
    assert out.token_ids == reference(tok.encode("bca", add_special_tokens=False), 30)


def test_steering_runs_unchanged(client):
    result = client.steer(
        "ab", particles=4, potentials=[{"kind": "max_word_length", "max_len": 3}], max_tokens=6, seed=1
    )
    assert result.status == "ok" and len(result.particles) == 4
    assert abs(sum(p.weight for p in result.particles) - 1.0) < 1e-6


def test_metrics_and_no_kv_left(stack, client):
    info = client.info()
    assert all(w.kv_blocks_in_use == 0 for w in info.decode_workers), info.decode_workers
    w = info.decode_workers[0]
    assert w.spec_steps > 0 and len(w.spec_drafted) == 3 and sum(w.spec_accepted) > 0
    body = urllib.request.urlopen(f"{stack.http_address}/metrics", timeout=30).read().decode()
    assert f'smcserve:spec_decode_num_drafts_total{{worker="decode-0"}} {float(w.spec_steps)}' in body
    assert 'smcserve:spec_decode_num_accepted_tokens_per_pos_total{position="0",worker="decode-0"}' in body


def test_heads_are_checked_before_the_server_starts(tiny_dir, tmp_path):
    from smcserve.scheduler.stack import ServeConfig, Stack

    assert check_heads(tiny_dir, "deepseek", 3).depths == 3
    with pytest.raises(HeadsMismatch, match="1 to the heads' 3 depths"):
        check_heads(tiny_dir, "deepseek", 4)
    with pytest.raises(HeadsMismatch, match="no MTP heads"):
        check_heads(tiny_dir, "gloeckle", 1)
    other = build_tiny_llama(tmp_path / "other", seed=5)  # other weights, these heads copied next to them
    (other / "mtp").mkdir()
    (other / "mtp" / "deepseek.safetensors").write_bytes((tiny_dir / "mtp" / "deepseek.safetensors").read_bytes())
    with pytest.raises(HeadsMismatch, match="trained for other model weights"):
        asyncio.run(Stack(ServeConfig(model=str(other), speculative="mtp", port=0)).start())
    with pytest.raises(HeadsMismatch):
        load_heads(load_model(str(other), "float32"))


@pytest.mark.parametrize("n", [MAX_BATCH, MAX_BATCH + 1])
def test_above_the_batch_limit_steps_decode_plainly(tiny_dir, redis_url, plain_greedy, n):
    """The decode loop itself, its steps run by the test (so the batch is known): n sequences running
    together speculate up to ``max_batch`` and decode plainly above it, the same tokens either way."""
    from smcserve.decode.loop import DecodeLoop
    from smcserve.decode.sequence import DecodeSeq
    from smcserve.decode.speculation import Speculation
    from smcserve.engine.detok import IncrementalDetokenizer
    from smcserve.engine.speculative import Speculator
    from smcserve.kvstore import KVStore
    from smcserve.prefill.prefiller import Prefiller

    tok, reference = plain_greedy
    lm = load_model(str(tiny_dir), "float32")
    store = KVStore(redis_url, key_prefix=f"t-spec-{n}:")
    spec = Speculation(Speculator(load_heads(lm), 3, lm.config.vocab_size), MAX_BATCH)
    loop = DecodeLoop(lm, store, 16, 64, speculation=spec)  # not started: the test runs its steps
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seqs = []
    for i, prompt in enumerate(PROMPTS[:n]):
        ids = tok.encode(prompt, add_special_tokens=False)
        pre = Prefiller(lm, store, 16).prefill(ids, params)
        seqs.append(DecodeSeq(f"r{i}", ids, pre.block_keys, params, IncrementalDetokenizer(lm.tokenizer)))
        loop.submit(seqs[-1], pre.first_token)
    while any(not s.finish_reason for s in seqs):
        loop.step()
    for s, prompt in zip(seqs, PROMPTS):
        assert s.output_ids == reference(tok.encode(prompt, add_special_tokens=False), 24)
    steps = loop.stats().spec.steps
    assert (steps > 0) if n <= MAX_BATCH else (steps == 0), steps
    assert loop.stats().kv_blocks_in_use == 0
