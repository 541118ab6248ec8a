"""``--speculative-max-batch auto`` and ``--num-speculative-tokens auto`` (engine/spec_pays.py): the measured
step costs weighed against the heads' held-out acceptance, cached per machine and heads; on the tiny random
Llama."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from fake_load import FakeLoad

from smcserve.engine import spec_pays
from smcserve.engine.model import load_model
from smcserve.engine.mtp import MTPHeads, MTPSpec, save_heads
from smcserve.engine.spec_pays import accepted_length, choose_k, pays_up_to, resolve
from smcserve.scheduler.stack import parse_max_batch, parse_num_speculative_tokens


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Timings count as taken on an idle machine, whatever else runs here now (the busy case is its own test)."""
    monkeypatch.setattr(spec_pays, "CpuLoad", FakeLoad(0.0))


@pytest.fixture()
def model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model (its ``mtp/`` folder is this test's own)."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


def write_heads(model_dir, acceptance: list[float] | None) -> None:
    lm = load_model(str(model_dir), "float32")
    heads = MTPHeads(lm.model, MTPSpec("deepseek", depths=3, window=8))
    info = {} if acceptance is None else {"acceptance_per_depth": acceptance}
    save_heads(heads, lm, model_dir / "mtp" / "deepseek.safetensors", steps=1, **info)


def test_accepted_length_and_the_largest_batch_that_pays():
    assert accepted_length([0.4, 0.2, 0.1], 2) == pytest.approx(1.6)
    assert accepted_length([0.4, 0.2, 0.1], 3) == pytest.approx(1.7)
    ratios = {1: 1.3, 2: 1.5, 4: 1.9, 8: 2.6}
    assert pays_up_to(ratios, 1.6) == 2
    assert pays_up_to(ratios, 1.2) == 0  # slower even for one sequence: never speculate
    assert pays_up_to(ratios, 3.0) == 8
    assert pays_up_to({1: 1.2, 2: 1.7, 4: 1.4}, 1.6) == 1  # up to the first size where it does not pay


def test_auto_weighs_the_measured_ratios_against_the_heads_acceptance_and_caches(model_dir, tmp_path):
    write_heads(model_dir, [0.5, 0.2, 0.1])
    calls = []

    def ratios(k, accepted, batches):
        calls.append((k, accepted))
        return {1: 1.3, 2: 1.6, 4: 1.75}

    cache = tmp_path / "choice.json"
    first = resolve(model_dir, "deepseek", 2, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert calls == [(2, pytest.approx(1.7))]
    assert first.k == 2 and first.max_batch == 2 and first.ratios == {1: 1.3, 2: 1.6, 4: 1.75}
    assert "1.70 tokens" in first.reason and "pays up to 2" in first.reason
    again = resolve(model_dir, "deepseek", 2, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert len(calls) == 1 and again.max_batch == 2 and "cached" in again.reason
    # another k, thread count or dtype is another question: measured again
    third = resolve(model_dir, "deepseek", 1, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert calls[-1] == (1, pytest.approx(1.5)) and third.max_batch == 1
    resolve(model_dir, "deepseek", 2, "float32", "none", 1, cache_path=cache, ratios_fn=ratios)
    assert len(calls) == 3
    # retrained heads (another file) are measured again, against their own acceptance
    write_heads(model_dir, [0.1, 0.05, 0.0])
    fourth = resolve(model_dir, "deepseek", 2, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert len(calls) == 4 and fourth.max_batch == 0


def test_timings_taken_on_a_busy_machine_are_used_once_and_not_cached(model_dir, tmp_path):
    write_heads(model_dir, [0.5, 0.2, 0.1])
    calls = []

    def ratios(k, accepted, batches):
        calls.append(k)
        return {1: 1.3, 2: 1.6, 4: 1.75}

    def choose(load):
        return resolve(
            model_dir,
            "deepseek",
            2,
            "float32",
            "none",
            2,
            cache_path=tmp_path / "c",
            ratios_fn=ratios,
            load_probe=FakeLoad(load),
        )

    busy = choose(0.6)
    assert busy.max_batch == 2 and "busy while timing: not cached" in busy.reason and "other load 60%" in busy.reason
    calm = choose(0.1)
    assert calls == [2, 2] and "busy" not in calm.reason  # measured again, now cached
    assert "cached" in choose(0.6).reason and calls == [2, 2]


def test_heads_without_a_heldout_acceptance_get_the_default(model_dir, tmp_path):
    write_heads(model_dir, None)

    def never(k, accepted, batches):
        raise AssertionError("nothing to weigh the ratios against: not measured")

    choice = resolve(model_dir, "deepseek", 2, "float32", "none", 2, cache_path=tmp_path / "c.json", ratios_fn=never)
    assert choice.max_batch == spec_pays.DEFAULT_SPECULATIVE_MAX_BATCH and "retrain" in choice.reason
    assert choice.k == 2
    auto = resolve(model_dir, "deepseek", None, "float32", "none", 2, cache_path=tmp_path / "c.json", ratios_fn=never)
    assert auto.k == spec_pays.DEFAULT_NUM_SPECULATIVE_TOKENS and "retrain" in auto.reason


def test_choose_k_yields_the_most_tokens_per_unit_of_time_for_one_sequence():
    acceptance = [0.35, 0.13, 0.05]  # 1.35, 1.48, 1.53 tokens a step
    assert choose_k({1: 1.22, 2: 1.89, 3: 2.13}, acceptance) == 1  # this EPYC: 1.11 against 0.78 and 0.72
    assert choose_k({1: 1.05, 2: 1.07, 3: 1.6}, acceptance) == 2  # 3 positions cost about 1 (our Xeon)
    assert choose_k({1: 1.0, 2: 1.0, 3: 1.0}, acceptance) == 3  # free drafts: draft them all
    assert choose_k({1: 1.5, 2: 1.75}, [0.5, 0.25]) == 1  # a tie: the fewer drafts
    assert choose_k({1: 3.0, 2: 5.0}, [0.35, 0.13]) == 1  # none pays: still a k (the limit says 0)


def test_auto_k_times_each_depth_alone_then_sweeps_the_chosen_one(model_dir, tmp_path):
    write_heads(model_dir, [0.5, 0.3, 0.1])  # 1.5, 1.8, 1.9 tokens a step
    calls = []
    costs = {1: {1: 1.2, 2: 1.4, 4: 1.7}, 2: {1: 1.3, 2: 1.5, 4: 1.7, 8: 1.9}, 3: {1: 1.9, 2: 2.0}}

    def ratios(k, accepted, batches):
        calls.append((k, tuple(batches)))
        return {b: r for b, r in costs[k].items() if b in batches}

    cache = tmp_path / "choice.json"
    choice = resolve(model_dir, "deepseek", None, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    # 1.5 / 1.2 = 1.25, 1.8 / 1.3 = 1.38, 1.9 / 1.9 = 1.0: k = 2, then its sweep from batch 2 on
    assert calls[:3] == [(1, (1,)), (2, (1,)), (3, (1,))]
    assert calls[3] == (2, spec_pays.BATCHES[1:]) and len(calls) == 4
    assert choice.k == 2 and choice.single_by_k == {1: 1.2, 2: 1.3, 3: 1.9}
    assert choice.ratios == costs[2] and choice.max_batch == 4  # 1.9 ≥ 1.8 at 8
    assert "k = 2 yields the most" in choice.reason
    again = resolve(model_dir, "deepseek", None, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert len(calls) == 4 and (again.k, again.max_batch) == (2, 4) and again.single_by_k == choice.single_by_k
    # a given k is another question, cached apart from auto's
    resolve(model_dir, "deepseek", 2, "float32", "none", 2, cache_path=cache, ratios_fn=ratios)
    assert calls[4] == (2, spec_pays.BATCHES)


def test_auto_k_where_no_depth_pays_sweeps_nothing(model_dir, tmp_path):
    write_heads(model_dir, [0.1, 0.05, 0.01])
    calls = []

    def ratios(k, accepted, batches):
        calls.append(k)
        return {1: 1.5 + k}

    choice = resolve(model_dir, "deepseek", None, "float32", "none", 2, cache_path=tmp_path / "c", ratios_fn=ratios)
    assert calls == [1, 2, 3] and choice.k == 1 and choice.max_batch == 0 and choice.ratios == {1: 2.5}


def test_auto_times_real_steps_and_decides_from_what_it_timed(model_dir, tmp_path):
    """Without injection: speculative and plain steps of the tiny model and its heads are timed (the
    decision is whatever those timings say, by the same rule, never a fixed answer)."""
    write_heads(model_dir, [0.9, 0.8, 0.7])
    choice = resolve(model_dir, "deepseek", 2, "float32", "none", torch.get_num_threads(), cache_path=tmp_path / "c")
    assert choice.ratios and min(choice.ratios) == 1 and all(r > 0 for r in choice.ratios.values())
    assert choice.max_batch == pays_up_to(choice.ratios, 2.7)
    # it stopped at the first size where speculation did not pay (or ran them all)
    sizes = sorted(choice.ratios)
    assert all(choice.ratios[b] < 2.7 for b in sizes[:-1])
    assert sizes == list(spec_pays.BATCHES[: len(sizes)])
    # k auto: each depth timed at batch 1, the best by the same rule, then its sweep
    auto = resolve(model_dir, "deepseek", None, "float32", "none", torch.get_num_threads(), cache_path=tmp_path / "c")
    assert sorted(auto.single_by_k) == [1, 2, 3] and all(r > 0 for r in auto.single_by_k.values())
    assert auto.k == choose_k(auto.single_by_k, [0.9, 0.8, 0.7]) and auto.ratios[1] == auto.single_by_k[auto.k]
    assert auto.max_batch == pays_up_to(auto.ratios, accepted_length([0.9, 0.8, 0.7], auto.k))


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (" Auto", None), ("1", 1), (3, 3)])
def test_parse_num_speculative_tokens(value, expected):
    assert parse_num_speculative_tokens(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", 0, "1.5"])
def test_parse_num_speculative_tokens_refuses(value):
    with pytest.raises(ValueError, match="--num-speculative-tokens"):
        parse_num_speculative_tokens(value)


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("AUTO", None), ("3", 3), (0, 0), (5, 5)])
def test_parse_max_batch(value, expected):
    assert parse_max_batch(value) == expected


@pytest.mark.parametrize("value", ["-1", "many", -2, "1.5"])
def test_parse_max_batch_refuses(value):
    with pytest.raises(ValueError, match="--speculative-max-batch"):
        parse_max_batch(value)


def test_a_limit_of_zero_drafts_nothing_and_loads_no_heads(model_dir):
    """0 (``auto`` where speculation never pays): the decode worker runs without the heads, so steering
    patches, which ignore the limit otherwise, do not draft either."""
    from smcserve.decode.worker import _speculation
    from smcserve.engine.config import WorkerConfig

    lm = load_model(str(model_dir), "float32")  # a copy without heads
    config = WorkerConfig(model=str(model_dir), speculative="mtp", speculative_max_batch=0)
    assert _speculation(lm, config) is None
    with pytest.raises(FileNotFoundError, match="smcserve mtp train"):  # 1: the heads are loaded (none here)
        _speculation(lm, dataclasses.replace(config, speculative_max_batch=1))
