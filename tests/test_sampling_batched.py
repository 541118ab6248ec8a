"""The batched sampler draws exactly what the row-by-row sampler draws, for every mix of parameters."""

from __future__ import annotations

import random

import pytest
import torch

from smcserve.engine import sampling
from smcserve.engine.sampling import SamplingParams, _filter, sample_tokens, seeded_uniform


def reference_sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """One row, as the sampler did before it was batched: argmax, or temperature (a Python scalar),
    top-k/top-p, float64 softmax, float64 running sum, the seeded uniform by (seed, position)."""
    logits = logits.float()
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    if params.top_k or params.top_p < 1.0:
        scaled = _filter(logits, params)
    else:
        scaled = logits / params.temperature
    probs = torch.softmax(scaled.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = seeded_uniform(params.seed, position)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    last_positive = int(torch.nonzero(probs > 0).max())
    return min(idx, last_positive)


def mixed_batch(seed: int, n: int, vocab: int) -> tuple[torch.Tensor, list[SamplingParams], list[int]]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * rng.choice([0.5, 3.0, 12.0])
    logits[0, : vocab // 2] = float("-inf")  # a row whose mass is on half the vocabulary
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 1.0, 1.0, 0.7, 1.3, 0.05]),
            top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
            top_k=rng.choice([0, 0, 5, 50]),
            seed=rng.randrange(2**64) - 2**63,
        )
        for _ in range(n)
    ]
    positions = [rng.randrange(10_000) for _ in range(n)]
    return logits, params, positions


@pytest.mark.parametrize("seed", range(6))
def test_batched_sampling_equals_row_by_row_draw_for_draw(seed):
    logits, params, positions = mixed_batch(seed, 64, 3000)
    batched = sample_tokens(logits, params, positions)
    assert batched == [reference_sample(logits[i], p, pos) for i, (p, pos) in enumerate(zip(params, positions))]
    # and each row alone through the batched code gives the same token
    rows = enumerate(zip(params, positions))
    assert batched == [sample_tokens(logits[i : i + 1], [p], [pos])[0] for i, (p, pos) in rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.8])
def test_uniform_batches_equal_row_by_row(temperature):
    """All greedy, all T = 1 (no division at all) and all one temperature: the batched fast paths."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(32, 5000, generator=g) * 4
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(32)]
    positions = list(range(100, 132))
    before = logits.clone()
    batched = sample_tokens(logits, params, positions)
    assert torch.equal(logits, before)  # the caller's logits are not changed
    assert batched == [reference_sample(logits[i], params[i], positions[i]) for i in range(32)]
    if temperature:
        assert len(set(batched)) > 1  # really drawn, not the argmax of each row


def test_filtered_rows_do_not_change_the_callers_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g)
    before = logits.clone()
    params = [SamplingParams(temperature=1.0, top_k=3, seed=i) for i in range(4)]
    sample_tokens(logits, params, [5] * 4)
    assert torch.equal(logits, before)


def test_a_misplaced_draw_is_caught(monkeypatch):
    """Negative control: the batched sampler keying a row's uniform by the next position (as a batch
    that mixed up its rows' positions would) no longer equals the reference."""
    real = sampling.seeded_uniform
    monkeypatch.setattr(sampling, "seeded_uniform", lambda seed, position: real(seed, position + 1))
    logits, params, positions = mixed_batch(0, 64, 3000)
    batched = sample_tokens(logits, params, positions)
    assert batched != [reference_sample(logits[i], p, pos) for i, (p, pos) in enumerate(zip(params, positions))]
