"""Patches on one decode worker (``decode.particles.ParticleGroup.extend_patch``, ``smc.patch``): a
patch of one token is the per-token step, draw for draw; a longer patch's increment is the sum of its
tokens' increments, recomputed here from the model; boundaries end patches where the rule says; a
particle stopped before a token (entropy) continues from its kept logits exactly as if recomputed."""

from __future__ import annotations

import math

import pytest
import torch

from smcserve.decode.loop import DecodeLoop
from smcserve.decode.particles import ParticleGroup
from smcserve.engine.sampling import SamplingParams
from smcserve.kvstore import KVStore
from smcserve.smc.patch import PatchRule, calibrate, entropy, stops_after, stops_before
from smcserve.smc.potentials import PotentialSpec
from smcserve.smc.vocab import get_vocab

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine(tiny_model_dir, redis_url):
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    eng = DecodeLoop(lm, KVStore(redis_url, key_prefix="t-patch:"), 16, 256).start()
    yield eng
    eng.close()


def group(engine, rid: str, patch: PatchRule, seed: int = 5, specs=None) -> ParticleGroup:
    lm = engine.lm
    vocab = get_vocab(lm.tokenizer, size=lm.config.vocab_size, eos_ids=sorted(lm.eos_token_ids))
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=seed)
    prompt = lm.tokenizer("Tell me a short story about a cat.")["input_ids"]
    specs = specs if specs is not None else [PotentialSpec("max_word_length", max_len=4)]
    return ParticleGroup(rid, prompt, params, specs, vocab, engine, patch=patch)


def run(engine, g: ParticleGroup, ids, step: int = 0, k: int = 1):
    items = [(pid, i, k) for i, pid in enumerate(ids)]
    return engine.call(lambda: g.extend_patch(step, items)).result().result()


def test_a_patch_of_one_token_is_the_per_token_step(engine):
    a, b = group(engine, "one-a", PatchRule()), group(engine, "one-b", PatchRule(max_tokens=1))
    for g in (a, b):
        engine.call(lambda g=g: g.open([], ["p0", "p1", "p2"])).result()
    try:
        job = engine.call(lambda: a.extend_job(0, [("p0", 0, 2), ("p1", 1, 2), ("p2", 2, 2)])).result()
        per_token = engine.extend(job).result()
        patched = run(engine, b, ["p0", "p1", "p2"], k=2)
    finally:
        for g in (a, b):
            engine.call(g.close).result()
    assert [(c.child_id, c.token, c.tokens, c.finished) for c in per_token] == [
        (c.child_id, c.token, c.tokens, c.finished) for c in patched
    ]
    assert [c.log_increment for c in per_token] == pytest.approx([c.log_increment for c in patched], abs=1e-9)
    assert all(len(c.tokens) == 1 for c in patched)
    assert engine.stats().kv_blocks_in_use == 0


def exact_increment(engine, g: ParticleGroup, prefix: list[int], tokens: list[int]) -> float:
    """Σ_t log Σ_{x allowed} p(x | prompt, prefix, tokens<t) for the patch's tokens (max_word_length's
    masks replayed on fresh potentials), from the HF model alone."""
    lm = engine.lm
    pots = g.fresh_potentials(prefix)
    total = 0.0
    with torch.inference_mode():
        for t in range(len(tokens)):
            logits = lm.model(torch.tensor([g.prompt + prefix + tokens[:t]])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            masks = [m for m in (p.mask() for p in pots) if m is not None]
            allowed = torch.ones_like(lp, dtype=torch.bool)
            for m in masks:
                allowed &= m[: lp.shape[0]]
            total += float(torch.logsumexp(lp.masked_fill(~allowed, -math.inf), 0))
            for p in pots:
                p.advance(tokens[t])
    return total


def test_a_patch_sums_its_tokens_increments_and_stops_at_its_length(engine):
    g = group(engine, "sum", PatchRule(max_tokens=4))
    engine.call(lambda: g.open([], ["p0", "p1"])).result()
    try:
        first = run(engine, g, ["p0", "p1"])
        second = run(engine, g, [c.child_id for c in first if not c.finished], step=1)
    finally:
        engine.call(g.close).result()
    for c in first:
        assert len(c.tokens) == 4 or c.finished
        assert c.log_increment == pytest.approx(exact_increment(engine, g, [], c.tokens), abs=1e-5)
    by_id = {c.child_id: c for c in first}
    for c in second:
        prefix = by_id[c.parent_id].tokens
        assert c.log_increment == pytest.approx(exact_increment(engine, g, prefix, c.tokens), abs=1e-5)
    assert engine.stats().kv_blocks_in_use == 0


def test_entropy_boundaries_end_patches_before_uncertain_tokens_and_resume_from_kept_logits(engine):
    """No potential (the tiny random model's entropies all lie near log V, masks would push them all
    below); threshold calibrated on the prompt (``auto``): patches end at varied lengths; every boundary
    falls before a token whose proposal entropy is above it (checked from the model), and the next
    patch, which starts from the kept logits, draws what a fresh forward would give."""
    lm = engine.lm
    probe = group(engine, "probe", PatchRule())
    threshold = calibrate(engine.prompt_logits(probe.prompt), 1.0)
    rule = PatchRule(max_tokens=6, entropy_threshold=threshold)
    g, fresh = group(engine, "ent", rule, specs=[]), group(engine, "ent-fresh", rule, specs=[])
    ids = [f"p{i}" for i in range(6)]
    engine.call(lambda: g.open([], ids)).result()
    try:
        first = run(engine, g, ids)
        going = [c for c in first if not c.finished]
        assert any(g.particles[c.child_id].ahead is not None for c in going)
        second = run(engine, g, [c.child_id for c in going], step=1)
    finally:
        engine.call(g.close).result()
    lengths = {len(c.tokens) for c in first}
    assert len(lengths) > 1, lengths  # boundaries at varied places
    with torch.inference_mode():
        for c in first:
            if c.finished or len(c.tokens) == rule.max_tokens:
                continue
            pots = g.fresh_potentials(c.tokens)
            logits = lm.model(torch.tensor([g.prompt + c.tokens])).logits[0, -1:].double()
            masks = [m for m in (p.mask() for p in pots) if m is not None]
            allowed = None if not masks else masks[0][None, : logits.shape[1]].clone()
            h = float(entropy(torch.log_softmax(logits, -1), allowed)[0])
            assert h > threshold or math.isclose(h, threshold, rel_tol=1e-4), (c.tokens, h, threshold)
    # the same second step with the kept logits recomputed: an importer (no kept logits) draws the same
    engine.call(lambda: fresh.open([], [])).result()
    try:
        imports = [(c.child_id, list(c.tokens), False) for c in going]
        engine.call(lambda: fresh.reshape([], imports)).result()
        again = run(engine, fresh, [c.child_id for c in going], step=1)
    finally:
        engine.call(fresh.close).result()
    assert [c.tokens for c in second] == [c.tokens for c in again]
    assert [c.log_increment for c in second] == pytest.approx([c.log_increment for c in again], abs=1e-5)
    assert engine.stats().kv_blocks_in_use == 0


def test_the_boundary_rules():
    rule = PatchRule(max_tokens=4, entropy_threshold=2.0, weight_drop=1.0)
    assert not stops_before(rule, 0, 9.0)  # a patch has at least one token
    assert stops_before(rule, 1, 2.5) and not stops_before(rule, 1, 1.5)
    assert stops_after(rule, 3, 0.0) and not stops_after(rule, 2, 0.0)
    assert stops_after(rule, 0, -1.5) and not stops_after(rule, 0, -0.5)
    assert stops_after(PatchRule(), 0, 0.0)  # one token: the per-token step
    u = torch.zeros(1, 4, dtype=torch.float64)
    assert float(entropy(u, None)[0]) == pytest.approx(math.log(4))
    assert float(entropy(u, torch.tensor([[True, True, False, False]]))[0]) == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- a peeking boundary is caught
@pytest.fixture(scope="module")
def tiny8(tmp_path_factory, redis_url):
    """The 8-token tiny Llama of the exact-enumeration tests on a decode loop in this process, and its
    exact Z for the prompt "ab c." under forbidden "x" and max_word_length 1, 3 tokens, T = 1."""
    from tiny_vocab import build_tiny_llama, exact_z, next_token_logprobs
    from transformers import AutoModelForCausalLM

    from smcserve.engine.model import load_model

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny8-patch"), seed=12, logit_scale=2.5)
    lm = load_model(str(path), "float32")
    prompt = lm.tokenizer("ab c.", add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    z, _ = exact_z(next_token_logprobs(hf, prompt, 3, 1.0), None, 0.0, 3, "x", 1)
    eng = DecodeLoop(lm, KVStore(redis_url, key_prefix="t-patch8:"), 16, 256).start()
    yield eng, prompt, z
    eng.close()


def smc_z(engine, prompt: list[int], seed: int, rule: PatchRule, n: int = 4) -> float:
    """Ẑ of one run of the served algorithm on one worker: the workers' patches (``extend_patch``),
    the scheduler's ``smc_step`` (systematic at ESS < N/2) and ``reshape``, as ``SteeringRun`` runs them."""
    import numpy as np

    from smcserve.smc import logsumexp
    from smcserve.smc.step import smc_step

    lm = engine.lm
    vocab = get_vocab(lm.tokenizer, size=lm.config.vocab_size, eos_ids=sorted(lm.eos_token_ids))
    params = SamplingParams(temperature=1.0, max_tokens=3, seed=seed)
    specs = [PotentialSpec("forbidden_chars", chars="x"), PotentialSpec("max_word_length", max_len=1)]
    g = ParticleGroup(f"z{seed}", prompt, params, specs, vocab, engine, patch=rule)
    ids = [f"0.{i}" for i in range(n)]
    engine.call(lambda: g.open([], ids)).result()
    logw, finished, rng, step = np.zeros(n), np.zeros(n, bool), np.random.default_rng(seed), 0
    try:
        while not finished.all():
            items = [(ids[i], i, 1) for i in np.flatnonzero(~finished)]
            patch = engine.call(lambda s=step, it=items: g.extend_patch(s, it)).result()
            children = {c.parent_id: c for c in patch.result()}
            incr = np.array([[children[pid].log_increment if pid in children else -math.inf] for pid in ids])
            done = np.array([[children[pid].finished if pid in children else True] for pid in ids])
            out = smc_step(logw, finished, incr, done, "systematic", 0.5, rng)
            step += 1
            sources = [ids[i] if j < 0 else children[ids[i]].child_id for i, j in zip(out.parent, out.child)]
            keep: dict[str, list[str]] = {}
            new_ids = [f"{step}.{i}" for i in range(n)]
            for src, nid in zip(sources, new_ids):
                keep.setdefault(src, []).append(nid)
            plan = list(keep.items())
            engine.call(lambda p=plan: g.reshape(p, [])).result()
            ids, logw, finished = new_ids, out.log_weights, out.finished
    finally:
        engine.call(g.close).result()
    return math.exp(logsumexp(logw) - math.log(n))


LETTERS = (1, 2, 3, 7)  # a, b, c, e (x is forbidden)
M_PEEK = 1000  # the peeking boundary moves Ẑ by ≈ +1.9 %: ≈ 5.7 standard errors


@pytest.mark.parametrize("peeking", [False, True])
def test_a_boundary_that_peeks_at_the_next_token_biases_z(tiny8, monkeypatch, peeking):
    """Patches of up to 3 tokens on the 8-token model: the mean of Ẑ over M_PEEK seeds is within 3 standard
    errors of the exact Z when the boundary reads only the past, and a boundary that looks at the token
    about to be drawn (end the patch before it when it is a letter: that draw is thrown away and made
    again at the next step, a proposal the weights do not describe) is caught by the same check
    (negative control)."""
    import numpy as np

    import smcserve.decode.particles as particles

    engine, prompt, z = tiny8
    rule = PatchRule(max_tokens=3, entropy_threshold=100.0)  # finite: the entropy boundary is consulted
    if peeking:
        real_propose, seen = particles.propose, {}

        def recording_propose(*a):
            seen["prop"], seen["row"] = real_propose(*a), 0
            return seen["prop"]

        def peeking_stops_before(rule, position, h):  # called once per lane, in row order
            r, seen["row"] = seen["row"], seen["row"] + 1
            seen["calls"] = seen.get("calls", 0) + 1
            return position > 0 and int(seen["prop"].tokens[r, 0]) in LETTERS

        monkeypatch.setattr(particles, "propose", recording_propose)
        monkeypatch.setattr(particles, "stops_before", peeking_stops_before)
    zs = np.array([smc_z(engine, prompt, seed, rule) for seed in range(M_PEEK)])
    mean, se = zs.mean(), zs.std(ddof=1) / math.sqrt(zs.size)
    print(f"\n[peeking={peeking}] exact {z:.6g} mean {mean:.6g} SE {se:.3g} z = {(mean - z) / se:+.2f}")
    assert se < 0.05 * z
    if peeking:
        assert seen["calls"], "the patched boundary was never consulted"
        assert abs(mean - z) > 3 * se, "the check did not catch a boundary that peeks"
    else:
        assert abs(mean - z) < 3 * se


def test_the_patch_fields_from_the_client_cli_and_http_to_the_workers():
    """``entropy_threshold="auto"`` (client, HTTP ``steering``, CLI) becomes ``entropy_auto``; the
    scheduler's validation names the field; P defaults to 1 (the per-token step)."""
    import argparse

    from smcserve.entrypoints import steer
    from smcserve.protos import smcserve_pb2 as pb
    from smcserve.protos.messages import build_request
    from smcserve.scheduler.steering import validate_patch
    from smcserve.scheduler.validate import InvalidRequest

    req = build_request("hi", steering={"particles": 2, "patch_max_tokens": 4, "entropy_threshold": "auto"})
    patch = validate_patch(req.steering)
    assert req.steering.entropy_auto and patch.entropy_auto and patch.max_tokens == 4
    assert not patch.HasField("entropy_threshold") and not patch.HasField("weight_drop")
    patch = validate_patch(build_request("hi", steering={"particles": 2, "entropy_threshold": 1.5}).steering)
    assert patch.max_tokens == 1 and patch.entropy_threshold == 1.5 and not patch.entropy_auto
    for spec, field in (
        ({"patch_max_tokens": 0}, "steering.patch_max_tokens"),
        ({"entropy_threshold": -1.0}, "steering.entropy_threshold"),
        ({"weight_drop": math.nan}, "steering.weight_drop"),
    ):
        with pytest.raises(InvalidRequest, match=f"^{field}: "):
            validate_patch(pb.SteeringSpec(particles=2, **spec))
    parser = argparse.ArgumentParser()
    steer.add_arguments(parser)
    args = parser.parse_args(["p", "--patch-max-tokens", "8", "--entropy-threshold", "auto", "--weight-drop", "2"])
    assert (args.patch_max_tokens, args.entropy_threshold, args.weight_drop) == (8, "auto", 2.0)
    assert parser.parse_args(["p", "--entropy-threshold", "1.25"]).entropy_threshold == 1.25
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--entropy-threshold", "high"])
