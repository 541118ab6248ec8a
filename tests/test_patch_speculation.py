"""MTP drafts inside SMC patches (``decode.particles``, ``smc.speculative``) on one decode worker.

The tiny 8-token Llama of ``tests/tiny_vocab.py`` (the served unbiasedness test's) with MTP heads at
random initialisation (their quality is irrelevant to exactness; they draft well enough that drafts
are both accepted and rejected), two hard potentials (no "x", words of one letter) and a patch rule
whose boundaries fall at varied places (entropy before a token, a weight drop after one, EOS, the
patch's length). A patch's first token is the per-token proposal; its later tokens are drafted (up to
3 per lane, unmasked) and verified. Checks, against an exact enumeration of the first patch's
outcomes (HF forward passes, the boundary rule replayed; independent of the worker):

* the distribution of a patch's tokens (chi-square over the enumerated outcomes, pooled where
  expected counts are small) is the non-speculative one, and each child's log-weight increment is
  exactly the sum of its tokens' log allowed masses (so weights and log Ẑ are those without MTP);
* negative controls: verification that accepts every draft must emit outcomes outside the support,
  and verification that accepts every draft the mask allows, whatever p/q, or draws from p instead of
  the residual after a rejection must fail the same chi-square check;
* a draft the mask forbids is made (the heads draft unmasked) but never emitted;
* a seeded request draws the same patches twice; an opted-out request drafts nothing (and passes the
  same check: a positive control of the enumeration).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_vocab import EOS_ID, PIECES, build_tiny_llama, hard_ok

from smcserve.decode.loop import DecodeLoop
from smcserve.decode.particles import ParticleGroup
from smcserve.decode.speculation import Speculation
from smcserve.engine.model import load_model
from smcserve.engine.mtp import MTPHeads, MTPSpec
from smcserve.engine.sampling import SamplingParams
from smcserve.engine.speculative import Speculator
from smcserve.kvstore import KVStore
from smcserve.smc import speculative
from smcserve.smc.patch import PatchRule
from smcserve.smc.potentials import PotentialSpec
from smcserve.smc.vocab import get_vocab

PROMPT = "ab c."
FORBIDDEN, MAX_WORD = "x", 1
SPECS = [PotentialSpec("forbidden_chars", chars=FORBIDDEN), PotentialSpec("max_word_length", max_len=MAX_WORD)]
PATCH, MAX_TOKENS, K = 5, 8, 3  # patch length, the request's max_tokens, drafts per lane
PARENTS, CHILDREN, GROUPS = 64, 4, 8  # samples: GROUPS seeds × PARENTS × CHILDREN (i.i.d. first patches)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny8-patch-spec"), seed=12, logit_scale=2.5)
    return load_model(str(path), "float32")


@pytest.fixture(scope="module")
def engine(lm, redis_url):
    torch.manual_seed(0)
    heads = MTPHeads(lm.model, MTPSpec("deepseek", K, 8)).eval()
    loop = DecodeLoop(
        lm, KVStore(redis_url, key_prefix="t-patch-spec:"), 4, 2048, speculation=Speculation(Speculator(heads, K, 8), 8)
    ).start()
    yield loop
    loop.close()


def prompt_ids(lm) -> list[int]:
    return lm.tokenizer.encode(PROMPT, add_special_tokens=False)


# ------------------------------------------------------------------------------------ exact enumeration
def step_table(lm, prefix: tuple[int, ...]):
    """(log allowed mass, normalised masked proposal [V], its entropy) after the prompt + ``prefix``."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt_ids(lm) + list(prefix)])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1).numpy()
    allowed = np.array([hard_ok(prefix + (v,), FORBIDDEN, MAX_WORD) for v in range(len(PIECES))])
    masked = np.where(allowed, logp, -np.inf)
    mass = float(np.logaddexp.reduce(masked))
    q = np.exp(masked - mass)
    h = float(-(q[allowed] * (masked[allowed] - mass)).sum())
    return mass, q, h


def enumerate_patch(lm, rule: PatchRule) -> dict[tuple[int, ...], tuple[float, float]]:
    """Every outcome of a first patch: tokens → (probability, log-weight increment), replaying the rule:
    stop before position i > 0 when the proposal's entropy exceeds the threshold, after a token whose
    increment is below −weight_drop or that fills the patch, at EOS."""
    out: dict = {}
    tables: dict = {}

    def visit(prefix: tuple[int, ...], prob: float, inc: float) -> None:
        if prefix not in tables:
            tables[prefix] = step_table(lm, prefix)
        mass, q, h = tables[prefix]
        if prefix and h > rule.entropy_threshold:
            out[prefix] = (prob, inc)
            return
        for v in np.flatnonzero(q > 0):
            y, p, w = prefix + (int(v),), prob * float(q[v]), inc + mass
            if v == EOS_ID or len(y) >= rule.max_tokens or mass < -rule.weight_drop:
                out[y] = (p, w)
            else:
                visit(y, p, w)

    visit((), 1.0, 0.0)
    return out


@pytest.fixture(scope="module")
def rule(lm) -> PatchRule:
    """Boundaries at quantiles of the entropies and mass drops over the prefixes (0.7 and 0.8), set midway
    between neighbouring values so that float noise cannot move one."""
    hs, drops = [], []
    full = enumerate_patch(lm, PatchRule(max_tokens=3))
    for prefix in {y[:n] for y in full for n in range(1, len(y))}:
        mass, _, h = step_table(lm, prefix)
        hs.append(h)
        drops.append(-mass)

    def midway(xs, quantile):
        xs = np.unique(np.round(xs, 9))
        i = int(quantile * (len(xs) - 1))
        return float((xs[i] + xs[i + 1]) / 2)

    return PatchRule(max_tokens=PATCH, entropy_threshold=midway(hs, 0.7), weight_drop=midway(drops, 0.8))


@pytest.fixture(scope="module")
def exact(lm, rule):
    out = enumerate_patch(lm, rule)
    assert math.isclose(sum(p for p, _ in out.values()), 1.0, abs_tol=1e-9)
    return out


# ------------------------------------------------------------------------------------ sampling
def first_patches(engine, rule: PatchRule, seeds, disable: bool = False, drafts: list | None = None):
    """The first patch of CHILDREN children of each of PARENTS particles, for each seed: (tokens,
    increment, finished) per child. ``drafts`` gets (prefix, drafted tokens) of every drafting call."""
    lm, out = engine.lm, []
    vocab = get_vocab(lm.tokenizer, size=len(PIECES), eos_ids=[EOS_ID])
    spec = engine.speculator
    real = spec.draft

    def recording(seqs):
        made = real(seqs)
        n = len(prompt_ids(lm))
        drafts.extend((tuple(tokens[n:]), tuple(d.tokens)) for (_, tokens, _, _), d in zip(seqs, made))
        return made

    ids = [f"p{i}" for i in range(PARENTS)]
    items = [(pid, i, CHILDREN) for i, pid in enumerate(ids)]
    if drafts is not None:
        spec.draft = recording
    try:
        for seed in seeds:
            params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=seed, disable_speculation=disable)
            g = ParticleGroup(f"s{seed}-{disable}", prompt_ids(lm), params, SPECS, vocab, engine, patch=rule)
            engine.call(lambda g=g: g.open([], ids)).result()
            try:
                children = engine.call(lambda g=g: g.extend_patch(0, items)).result().result()
            finally:
                engine.call(g.close).result()
            out += [(tuple(c.tokens), c.log_increment, c.finished) for c in children]
    finally:
        spec.draft = real
    assert engine.stats().kv_blocks_in_use == 0
    return out


def chi_square(samples, exact) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of the samples' outcomes against ``exact``; outcomes whose
    expected count is below 5 are pooled (and that pool with the smallest bin if it is still small)."""
    n = len(samples)
    seen = Counter(y for y, _, _ in samples)
    assert set(seen) <= set(exact), f"outcomes outside the support: {set(seen) - set(exact)}"
    big = [y for y in exact if n * exact[y][0] >= 5]
    bins = [(n * exact[y][0], seen[y]) for y in big]
    rest = [y for y in exact if y not in set(big)]
    if rest:
        pooled = (n * sum(exact[y][0] for y in rest), sum(seen[y] for y in rest))
        if pooled[0] < 5:
            i = min(range(len(bins)), key=lambda i: bins[i][0])
            bins[i] = (bins[i][0] + pooled[0], bins[i][1] + pooled[1])
        else:
            bins.append(pooled)
    stat = sum((o - e) ** 2 / e for e, o in bins)
    dof = len(bins) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    return stat, dof, p


@pytest.fixture(scope="module")
def speculated(engine, rule):
    before = engine.stats().spec
    drafts: list = []
    samples = first_patches(engine, rule, range(GROUPS), drafts=drafts)
    after = engine.stats().spec
    drafted = sum(after.drafted) - sum(before.drafted)
    accepted = sum(after.accepted) - sum(before.accepted)
    return samples, drafts, drafted, accepted


# ------------------------------------------------------------------------------------ tests
def test_speculative_patches_have_the_exact_distribution_and_weights(speculated, exact, rule):
    samples, _, drafted, accepted = speculated
    lengths = Counter(len(y) for y, _, _ in samples)
    print(f"\n{len(samples)} patches; lengths {sorted(lengths.items())}; drafts {drafted}, accepted {accepted}")
    assert 0 < accepted < drafted, "speculation did not happen (or never rejected)"
    assert len(lengths) >= 4 and max(lengths) == PATCH, "the boundaries did not vary"
    stat, dof, p = chi_square(samples, exact)
    print(f"chi-square {stat:.1f} on {dof} degrees of freedom: p = {p:.3g}")
    assert dof >= 20 and p > 1e-3
    for y, inc, finished in samples:  # the weights are the non-speculative ones, token for token
        assert inc == pytest.approx(exact[y][1], abs=1e-5), y
        assert finished == (y[-1] == EOS_ID)


def accept_every_draft(p, q, draft, u_accept, u_resample):
    if draft is not None:
        return draft, True
    return REAL_VERIFY(p, q, None, u_accept, u_resample)


def accept_every_allowed_draft(p, q, draft, u_accept, u_resample):
    if draft is not None and float(p[draft]) > 0:
        return draft, True
    return REAL_VERIFY(p, q, None, u_accept, u_resample)


def resample_from_p(p, q, draft, u_accept, u_resample):
    if draft is not None and float(q[draft]) > 0 and u_accept * float(q[draft]) < float(p[draft]):
        return draft, True
    return REAL_VERIFY(p, q, None, u_accept, u_resample)


REAL_VERIFY = speculative.verify_token


@pytest.mark.parametrize(
    "wrong", [accept_every_draft, accept_every_allowed_draft, resample_from_p], ids=lambda f: f.__name__
)
def test_control_a_wrong_verification_is_detected(engine, rule, exact, monkeypatch, wrong):
    """Accepting every draft emits forbidden tokens (outcomes outside the support); accepting every
    allowed draft, or drawing from p instead of the residual, keeps the support but not the law."""
    calls = []

    def counted(*args):
        calls.append(1)
        return wrong(*args)

    monkeypatch.setattr(speculative, "verify_token", counted)
    samples = first_patches(engine, rule, range(GROUPS))
    assert calls, "the lanes no longer verify through smc.speculative.verify_token"
    outside = sum(y not in exact for y, _, _ in samples)
    if wrong is accept_every_draft:
        print(f"\ncontrol {wrong.__name__}: {outside} of {len(samples)} patches outside the support")
        assert outside > 0, "the exactness check did not catch a verification that ignores the mask"
        return
    stat, dof, p = chi_square(samples, exact)
    print(f"\ncontrol {wrong.__name__}: chi-square {stat:.1f} on {dof} degrees of freedom: p = {p:.3g}")
    assert p < 1e-6, "the exactness check did not catch a wrong verification"


def test_forbidden_drafts_are_made_but_never_emitted(speculated):
    samples, drafts, _, _ = speculated
    forbidden = sum(
        1
        for prefix, made in drafts
        for j in range(len(made))
        if hard_ok(prefix + made[:j], FORBIDDEN, MAX_WORD) and not hard_ok(prefix + made[: j + 1], FORBIDDEN, MAX_WORD)
    )
    print(f"\n{forbidden} forbidden drafts among {sum(len(m) for _, m in drafts)}")
    assert forbidden > 0, "the heads never drafted a forbidden token: the check is vacuous"
    assert all(hard_ok(y, FORBIDDEN, MAX_WORD) for y, _, _ in samples)


def test_an_opted_out_request_drafts_nothing_and_passes_the_same_check(engine, rule, exact):
    """``disable_speculation``: the per-token lanes, no drafts; the same check passes (a positive
    control of the enumeration and of the check itself)."""
    before = engine.stats().spec
    samples = first_patches(engine, rule, range(GROUPS), disable=True)
    assert engine.stats().spec == before
    stat, dof, p = chi_square(samples, exact)
    print(f"\nper-token lanes: chi-square {stat:.1f} on {dof} degrees of freedom: p = {p:.3g}")
    assert p > 1e-3
    for y, inc, _ in samples:
        assert inc == pytest.approx(exact[y][1], abs=1e-5), y


def test_seeded_patches_reproduce(engine, rule, speculated):
    samples = speculated[0]
    again = first_patches(engine, rule, [0])
    assert again == samples[: len(again)]
    assert first_patches(engine, rule, [1]) != again
