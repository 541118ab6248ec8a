"""``--device``: its resolution, and the engine's device-agnostic code run on the CPU with every
implicit tensor sent elsewhere (the ``meta`` device as the default): a tensor made without the runner's
device would end up there and fail the forward, as it would be on the CPU beside a CUDA pool."""

from __future__ import annotations

import shutil

import pytest
import torch

from smcserve.engine import paged_attention
from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.device import resolve_device, to_device, to_host
from smcserve.engine.model import load_model
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.sampling import SamplingParams, sample_tokens
from smcserve.smc.proposal import propose, stacked_masks


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cpu:1", ""):
        with pytest.raises(ValueError, match="^device: must be one of"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: cuda asked for, but torch sees no CUDA device"):
            resolve_device("cuda")


def test_quantization_is_refused_off_the_cpu(tiny_model_dir):
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="^quantization: int8 runs on the CPU only"):
            load_model(str(tiny_model_dir), "float32", quantization="int8", device="cuda")
    assert load_model(str(tiny_model_dir), "float32", device="cpu").device == torch.device("cpu")


def steps(runner: ModelRunner, bm: BlockManager, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill each prompt, fork the first, then two batched decode steps; the logits of each call."""
    out, tables = [], []
    for ids in prompts:
        table = BlockTable()
        for _ in ids:
            bm.append_slot(table)
        out.append(runner.forward([SeqBatchItem(ids, 0, table.blocks)]))
        tables.append(table)
    tables.append(bm.fork(tables[0]))
    for step in range(2):
        items = []
        for i, t in enumerate(tables):
            start = t.num_tokens
            bm.append_slot(t)
            items.append(SeqBatchItem([5 + i + step], start, t.blocks))
        out.append(runner.forward(items))
    return out


def test_the_engine_makes_every_tensor_on_its_device(tiny_model_dir):
    """The same forwards, sampling and proposal with ``meta`` as the default device: the runner, the
    sampler and the proposal put every tensor they make on the model's device, so the results are the
    CPU's own (a factory call without ``device=`` fails here: meta tensors have no data)."""
    lm = load_model(str(tiny_model_dir), "float32", device="cpu")
    prompts = [list(range(3, 3 + n)) for n in (5, 9)]
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.0)]
    mask = torch.zeros(lm.config.vocab_size, dtype=torch.bool)
    mask[10:20] = True

    def run() -> tuple:
        logits = steps(ModelRunner(lm, 16, 4), BlockManager(16, 4), prompts)
        last = logits[-1][:2]
        tokens = sample_tokens(last, params, [7, 7])
        rows = torch.log_softmax(last.double(), -1)
        u = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64, device=rows.device)
        prop = propose(rows, stacked_masks([mask, None], rows.shape[1], rows.device), u)
        return logits, tokens, prop.tokens.tolist(), prop.log_mass

    ref_logits, ref_tokens, ref_prop, ref_mass = run()
    with torch.device("meta"):
        logits, tokens, prop, mass = run()
    assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(logits, ref_logits))
    assert tokens == ref_tokens and prop == ref_prop and torch.equal(mass, ref_mass)
    assert all(10 <= t < 20 for t in prop[0])


def test_kv_blocks_reach_the_pool_and_come_back(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32", device="cpu")
    runner = ModelRunner(lm, 8, 4)
    block = torch.randn(runner.layout.block_shape(3), dtype=lm.dtype)
    runner.write_block(2, block)
    assert torch.equal(runner.read_block(2, 3), block)
    assert torch.equal(runner.read_blocks([(2, 3), (2, 1)])[1], block[:, :, :, :1])
    assert to_device(block, torch.device("cpu")) is block and to_host([block])[0] is block


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine serves --device cuda")
def test_serve_on_cuda_without_a_gpu_is_a_clear_error():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "smcserve.entrypoints.cli", "serve", "--device", "cuda", "--no-http", "--port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "device: cuda asked for, but torch sees no CUDA device" in out.stderr + out.stdout


def assert_flex_matches_sdpa(tiny_model_dir) -> None:
    """Prompts, a forked sequence sharing blocks, ragged batched decode steps and a two-sequence
    multi-position forward (padded queries): the paged FlexAttention path gives the SDPA path's logits."""
    lm = load_model(str(tiny_model_dir), "float32", device="cpu")
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 14)]

    def run(attention: str) -> list[torch.Tensor]:
        runner, bm = ModelRunner(lm, 24, 4), BlockManager(24, 4)
        runner.attention = attention
        out = steps(runner, bm, prompts)
        a, b = BlockTable(), BlockTable()
        for _ in range(6):
            bm.append_slot(a)
        runner.forward([SeqBatchItem(list(range(40, 46)), 0, a.blocks)])
        for _ in range(7):
            bm.append_slot(b)
        out.append(runner.forward_all([SeqBatchItem([50, 51], 4, a.blocks), SeqBatchItem([60] * 7, 0, b.blocks)])[0])
        return out

    sdpa, flex = run("sdpa"), run("flex")
    assert len(sdpa) == len(flex) == 6
    for x, y in zip(sdpa, flex):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_paged_flex_attention_matches_sdpa_over_gathered_slots(tiny_model_dir):
    """engine/paged_attention.py (the CUDA path's attention), run here with FlexAttention's eager reference
    (which applies ``mask_mod`` to the whole pool)."""
    assert_flex_matches_sdpa(tiny_model_dir)


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_paged_flex_attention_reads_only_each_sequences_blocks(tiny_model_dir, monkeypatch):
    """The eager reference applies ``mask_mod`` everywhere; a compiled kernel visits only the blocks the
    ``BlockMask`` lists (its block-sparse half, what CUDA runs). Compiled here for the CPU (static shapes):
    the same logits as SDPA, so each sequence's block list is right."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(paged_attention, "_kernel", lambda _device: compiled)
    compiled = torch.compile(flex_attention, dynamic=False)
    assert_flex_matches_sdpa(tiny_model_dir)


@pytest.mark.parametrize("style", ["deepseek", "gloeckle"])
def test_mtp_speculation_makes_every_tensor_on_its_device(tiny_model_dir, style):
    """Drafting with the MTP heads and verifying (greedy and sampled) with ``meta`` as the default device:
    the same tokens and counters as on the CPU, so no tensor of the speculative path is made elsewhere."""
    from smcserve.engine.mtp import MTPHeads, MTPSpec
    from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder

    lm = load_model(str(tiny_model_dir), "float32", device="cpu")
    torch.manual_seed(0)
    heads = MTPHeads(lm.model, MTPSpec(style, depths=2, window=8)).eval()
    heads.set_vocab(torch.arange(0, lm.config.vocab_size, 3))  # a draft vocabulary of its own

    def run() -> tuple:
        dec = SpeculativeDecoder(ModelRunner(lm, 32, 4), BlockManager(32, 4), heads, 2, frozenset(), 4)
        seqs = [
            SpecSeq(list(range(3, 10)), SamplingParams(temperature=0.0, max_tokens=9)),
            SpecSeq(list(range(20, 25)), SamplingParams(temperature=0.9, seed=5, max_tokens=9)),
        ]
        return dec.generate(seqs), dec.stats.drafted, dec.stats.accepted

    ref = run()
    with torch.device("meta"):
        got = run()
    assert got == ref
    assert sum(ref[1]) > 0  # it drafted
