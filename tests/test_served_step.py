"""Regression tests of the served SMC step: seeds of any size, no KV leak when a step fails, float64
draws, no resampling once every particle finished, errors blamed on the right party."""

from __future__ import annotations

import math
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from smcserve.decode.batcher import RequestClosed
from smcserve.decode.loop import DecodeLoop
from smcserve.decode.particles import ParticleGroup
from smcserve.decode.worker import DecodeService
from smcserve.engine.sampling import SamplingParams, inverse_cdf, seeded_uniform
from smcserve.kvstore import KVStore
from smcserve.scheduler.server import worker_status
from smcserve.smc.potentials import MaxTokens, PotentialSpec
from smcserve.smc.proposal import propose
from smcserve.smc.step import ALL_VIOLATED, smc_step
from smcserve.smc.vocab import get_vocab


# --------------------------------------------------------------------------- seeds (defect 1)
@pytest.mark.parametrize("seed", [0, 2**31, 2**63 - 1, 2**64 - 1])
def test_any_64_bit_seed_hashes(seed):
    draws = [seeded_uniform(seed, step, index, child) for step in (0, 10**6) for index in (0, 255) for child in (0, 63)]
    assert all(0.0 <= u < 1.0 for u in draws) and len(set(draws)) == len(draws)
    assert seeded_uniform(seed, 1, 2, 3) == seeded_uniform(seed, 1, 2, 3)
    assert seeded_uniform(seed, 1, 2, 3) != seeded_uniform(seed, 1, 3, 2)  # a tuple, not a sum


def test_seeded_uniforms_look_uniform():
    u = np.array([seeded_uniform(7, i) for i in range(20_000)])
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    chi2 = ((hist - 2000) ** 2 / 2000).sum()
    assert chi2 < 30  # 9 degrees of freedom: p ≈ 4e-4


# --------------------------------------------------------------------------- float64 draws (defect 3)
def test_inverse_cdf_reaches_tiny_probabilities_at_the_end_of_a_long_vocabulary():
    v = 50_000
    p = torch.softmax(torch.randn(1, v, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3, -1)
    p[0, -1] = 1e-9
    cdf = torch.cumsum(p[0], 0)
    u = torch.tensor([[(float(cdf[-2]) + 0.5e-9) / float(cdf[-1])]], dtype=torch.float64)
    assert int(inverse_cdf(p, u)) == v - 1
    # a float32 running sum drifts by far more than 1e-9 over 50k terms: the token would be unreachable
    drift = abs(float(torch.cumsum(p[0].float(), 0)[-2]) - float(cdf[-2]))
    assert drift > 1e-8


def test_inverse_cdf_never_returns_zero_probability_tokens():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.4999, 0.5, 0.999999999999]], dtype=torch.float64)
    assert inverse_cdf(p, u).tolist() == [[1, 1, 3, 3]]
    # u = 1 (not a seeded uniform, which stays below 1) lands past the trailing zeros: the last positive
    # index, in that row only
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.0, 0.5, 0.0, 0.0]])
    u = torch.tensor([[1.0, 0.3], [0.5, 0.7], [0.9, 1.0]], dtype=torch.float64)
    assert inverse_cdf(p, u).tolist() == [[3, 1], [2, 3], [2, 2]]


def test_proposal_masks_renormalises_and_weights_by_the_allowed_mass():
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    allowed = torch.tensor([[False, True, False, True], [False, False, False, False]])
    u = torch.tensor([[0.0, 0.99], [0.5, 0.5]], dtype=torch.float64)
    prop = propose(logp, allowed, u)
    assert prop.tokens.tolist() == [[1, 3], [-1, -1]]
    assert prop.increment(0, 0.0) == pytest.approx(math.log(0.6))
    assert prop.increment(1, 0.0) == -math.inf and prop.increment(0, -math.inf) == -math.inf


# --------------------------------------------------------------------------- the step (defect 4)
@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual"])
def test_no_resampling_once_every_particle_has_finished(scheme):
    n = 4
    logw = np.log([0.7, 0.1, 0.1, 0.1])
    incr = np.array([[0.0], [-3.0], [-4.0], [-5.0]])  # ESS far below N: would resample if anyone still ran
    rng = np.random.default_rng(0)
    out = smc_step(logw, np.zeros(n, bool), incr, np.ones((n, 1), bool), scheme, 1.0, rng)
    assert not out.resampled and out.finished.all() and out.parent.tolist() == [0, 1, 2, 3]
    out = smc_step(logw, np.zeros(n, bool), incr, np.array([[True], [True], [True], [False]]), scheme, 1.0, rng)
    assert out.resampled


def test_step_marks_dead_particles_finished_and_reports_all_dead():
    rng = np.random.default_rng(0)
    incr = np.array([[0.0, -math.inf], [-math.inf, -math.inf]])
    out = smc_step(np.zeros(2), np.zeros(2, bool), incr, np.zeros((2, 2), bool), "without_replacement", 0.5, rng)
    assert out.status == "ok" and out.finished[np.isneginf(out.log_weights)].all()
    out = smc_step(
        np.zeros(2),
        np.zeros(2, bool),
        np.full((2, 2), -math.inf),
        np.zeros((2, 2), bool),
        "without_replacement",
        0.5,
        rng,
    )
    assert out.status == ALL_VIOLATED and out.finished.all()


# --------------------------------------------------------------------------- KV after a failed step (defect 2)
class Exploding(MaxTokens):
    """A potential whose third advance raises: a bug in the middle of building a step's children."""

    calls = 0

    def _advance(self, token: int) -> float:
        Exploding.calls += 1
        if Exploding.calls == 3:
            raise RuntimeError("injected failure")
        return 0.0


@pytest.fixture(scope="module")
def engine(tiny_model_dir, redis_url):
    from smcserve.engine.model import load_model

    lm = load_model(str(tiny_model_dir), "float32")
    eng = DecodeLoop(lm, KVStore(redis_url, key_prefix="t-step:"), 16, 64).start()
    yield eng
    eng.close()


def particle_group(engine, request_id: str, text: str) -> ParticleGroup:
    """A steering request's particle group on ``engine``: the prompt ``text``, at most 8 tokens."""
    lm = engine.lm
    vocab = get_vocab(lm.tokenizer, size=lm.config.vocab_size, eos_ids=sorted(lm.eos_token_ids))
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1)
    prompt = lm.tokenizer(text)["input_ids"]
    return ParticleGroup(request_id, prompt, params, [PotentialSpec("max_tokens", n=8)], vocab, engine)


def test_a_failure_inside_a_particle_step_leaks_no_kv(engine):
    group = particle_group(engine, "leak", "A prompt that fills more than one block of sixteen tokens, to share KV.")
    vocab = group.vocab
    group.fresh_potentials = lambda generated=(): [Exploding(vocab, 8)]
    Exploding.calls = 0
    engine.call(lambda: group.open([], ["a", "b"])).result()
    assert engine.stats().kv_blocks_in_use > 0
    job = engine.call(lambda: group.extend_job(0, [("a", 0, 2), ("b", 1, 2)])).result()
    with pytest.raises(RuntimeError, match="injected"):
        engine.extend(job).result()
    assert set(group.particles) == {"a", "b"}  # the parents are untouched, the half-built children freed
    engine.call(group.close).result()
    assert engine.stats().kv_blocks_in_use == 0


# --------------------------------------------------------------------------- who is blamed (defect 5)
class Aborted(Exception):
    pass


class FakeContext:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(details)


def test_a_worker_bug_is_internal_not_invalid_argument(engine):
    service = DecodeService(engine, "w0", "127.0.0.1:0", "node")
    ctx = FakeContext()
    with pytest.raises(Aborted):
        service._run(lambda: {}["no such particle"], ctx, "SmcExtend")
    assert ctx.code == grpc.StatusCode.INTERNAL and "see the server log" in ctx.details


@pytest.mark.parametrize(
    "code, expected",
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL),  # the scheduler sent it: our bug
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL),
    ],
)
def test_worker_errors_map_to_client_codes(code, expected):
    err = SimpleNamespace(code=lambda: code, details=lambda: "x")
    assert worker_status(err) == expected


def test_closing_a_request_with_a_step_still_queued_leaks_no_kv(engine):
    """A close (client gone, or another worker's step failed) can overtake a queued step: the step is
    dropped instead of appending slots to tables that were just freed."""
    group = particle_group(engine, "closed", "Another prompt, long enough to fill a block of sixteen tokens or more.")
    engine.call(lambda: group.open([], ["a", "b"])).result()
    job = engine.call(lambda: group.extend_job(0, [("a", 0, 2), ("b", 1, 2)])).result()
    closed = engine.call(group.close)  # queued first: runs before the job's step
    with pytest.raises(RequestClosed, match="closed"):
        engine.extend(job).result()
    closed.result()
    assert engine.stats().kv_blocks_in_use == 0


def test_a_chat_template_that_refuses_the_messages_is_the_clients_mistake():
    from jinja2 import TemplateError

    from smcserve.protos import smcserve_pb2
    from smcserve.scheduler.validate import InvalidRequest, Limits, tokenize_request

    class Strict:
        def apply_chat_template(self, *a, **kw):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    req = smcserve_pb2.GenerateRequest()
    req.chat.messages.add(role="user", content="a")
    req.chat.messages.add(role="user", content="b")
    with pytest.raises(InvalidRequest, match=r"^chat\.messages: .*alternate"):
        tokenize_request(req, Strict(), Limits(max_context=2048, max_tokens_limit=128, model_name=""))


def test_a_companion_prompt_factor_enters_the_proposal_and_the_increment(engine):
    """prompt_intersection on a worker: the particle also runs under the other prompt, and a child's
    increment is log Σ_x p(x | P)·p(x | Q)^w, with both distributions recomputed here by the model."""
    lm = engine.lm
    vocab = get_vocab(lm.tokenizer, size=lm.config.vocab_size, eos_ids=sorted(lm.eos_token_ids))
    params = SamplingParams(temperature=0.7, max_tokens=8, seed=3)
    p, q = (lm.tokenizer(t)["input_ids"] for t in ("Name a fruit, please.", "Something red."))
    spec = PotentialSpec("prompt_intersection", weight=0.5, prompt_ids=[q])
    group = ParticleGroup("companion", p, params, [spec], vocab, engine)
    assert group.prompts == [p, q]
    engine.call(lambda: group.open([], ["a"])).result()
    try:
        job = engine.call(lambda: group.extend_job(0, [("a", 0, 1)])).result()
        (child,) = engine.extend(job).result()
        job = engine.call(lambda: group.extend_job(1, [(child.child_id, 0, 1)])).result()
        (grandchild,) = engine.extend(job).result()
    finally:
        engine.call(group.close).result()
    with torch.inference_mode():
        for prefix, c in (([], child), ([child.token], grandchild)):
            lp, lq = (
                torch.log_softmax(lm.model(torch.tensor([x + prefix])).logits[0, -1].double() / 0.7, -1) for x in (p, q)
            )
            assert c.log_increment == pytest.approx(float(torch.logsumexp(lp + 0.5 * lq, 0)), abs=1e-4)
    assert engine.stats().kv_blocks_in_use == 0
