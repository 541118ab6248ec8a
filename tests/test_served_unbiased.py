"""The served, distributed SMC path is unbiased against exact enumeration.

The model is a tiny random Llama over 8 tokens (``tests/tiny_vocab.py``: a, b, c, x, " ", ".", e and
EOS; byte-level tokenizer; fp32), served by the real stack: the gRPC scheduler, one prefill worker
and **two decode workers** (Ray actors, each with its own gRPC service and paged KV), embedded Redis
as the KV store. Every request goes through the public API (``Client.steer`` on the raw-prompt
path), so particles are split over both workers and resampling migrates the surplus through the
KV store (checked with the workers' ``particles_imported``).

The request's target, with max_tokens = 3, temperature T, prompt P and intersected prompt Q::

    Z = Σ_y Π_t p_P(y_t | y<t) · p_Q(y_t | y<t)^w · G(y)

over every complete output y (ends at EOS, or has 3 tokens), p_· = softmax(logits / T) after the
prompt + y<t, G(y) = 1 when y's text has no "x" and no two letters in a row (max_word_length 1),
else 0. That is what the served path estimates: the workers propose from the masked, renormalised
product p_P · p_Q^w (prompt_intersection's factor, ``smc/potentials/intersection.py``) and add
log Σ_allowed p_P · p_Q^w to the weight (``decode/particles.py``, ``smc/proposal.py``), the hard
potentials' ``finish`` adds nothing for a live particle, and the scheduler resamples
(``smc/step.py``). The exact Z is computed independently: HF transformers
forward passes on every prompt + prefix, then enumeration of all complete outputs
(``tiny_vocab.exact_z``).

Checks: (1) with no resampling, each served particle's log weight is Σ_t log (allowed product mass)
from the enumeration tables (deterministic); (2) for ``without_replacement`` (K = 2) and
``multinomial`` (resampling every step), the mean of Ẑ = exp(log_z) over M seeded requests is within
3 standard errors of Z, with SE < 5 % of Z so that the check has power; likewise (SE < 10 %) the
unnormalised posterior mass Z·π(A) of two events A (ended at EOS early; the most likely first
token), estimated without bias by (1/N) Σ_i w_i 1[x_i ∈ A]; (3) a negative control: the same check,
through the same served path, fails when Algorithm 4 uses llamppl's ``find_c`` (which undershoots c*
when a candidate saturates) as c*, for the split and in the survivors' weight (N/N′)·Σw/c.

Why the control patches ``smc.without_replacement.resample_without_replacement`` rather than only
``find_c_star``: our implementation weights the stochastic survivors by Σ_{I_stoch} w / (N − |I_det|),
which equals (N/N′)·Σw/c* but does not read c; a wrong c* then only moves candidates between I_det
and I_stoch, and on this model that moves the mean of Ẑ by 0.0 % (llamppl's c) and −0.2 % (c*/2)
over 3000 runs of the pure driver (SE 0.8 %): a control that cannot fail. The resampling runs in the
scheduler, so the stack is started in this process (``scheduler.stack.Stack``, exactly what
``smcserve serve`` runs: its asyncio gRPC server on a background event loop here, the workers in
Ray actor processes) and the monkeypatch reaches the served path. The control asserts that the
patched function was called, so a refactor that bypasses it fails loudly instead of passing vacuously.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_smc import llamppl_find_c
from tiny_vocab import EOS_ID, PIECES, TEXTS, build_tiny_llama, exact_z, hard_ok, next_token_logprobs

from smcserve.client import Client

pytestmark = pytest.mark.e2e

# Chosen (by enumeration) so that both constraints bite and outputs end both ways: under the LM alone
# 42 % of outputs contain an "x" and 37 % have two letters in a row; under the target ≈ 42 % end at
# EOS before max_tokens. The relative SD of Ẑ is ≈ 0.45 (without_replacement) and ≈ 0.65 (multinomial).
MODEL_SEED, LOGIT_SCALE = 12, 2.5
PROMPT, OTHER, WEIGHT = "ab c.", "ba e ", 0.5
FORBIDDEN, MAX_WORD = "x", 1
MAX_TOKENS, N = 3, 4
M = 1000  # seeded requests per scheme (seeds 0..M-1)
M_CONTROL = 500  # llamppl's c inflates Ẑ by ≈ 18 % here: ≈ 6 standard errors at 500 requests
CONCURRENCY = 4  # requests in flight: the decode workers batch them together
POTENTIALS = [
    {"kind": "forbidden_chars", "chars": FORBIDDEN},
    {"kind": "max_word_length", "max_len": MAX_WORD},
    {"kind": "prompt_intersection", "prompts": [OTHER], "weight": WEIGHT},
]
SCHEMES = {  # name → (steer keyword arguments, temperature)
    "without_replacement": (dict(scheme="without_replacement", extensions=2), 1.0),
    "multinomial": (dict(scheme="multinomial", ess_threshold=1.0), 0.8),
}
# Patches (smc/patch.py) of up to MAX_TOKENS tokens, the boundaries at quantiles of the entropy and of the
# log-mass drop of the target's proposals (``patch_rule``): they fall at varied places, depending on what
# was sampled. Resampling only between patches: every time (K = 2 without replacement), and by the ESS rule.
ENTROPY_Q, DROP_Q = 0.75, 0.9
PATCH_SCHEMES = {
    "patches, without_replacement": "without_replacement",
    "patches, systematic at ESS < N/2": "systematic",
}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-8"), seed=MODEL_SEED, logit_scale=LOGIT_SCALE)


@pytest.fixture(scope="module")
def tables(tiny_dir):
    """Next-token log-probabilities of both prompts after every prefix, per temperature (HF, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = [tok.encode(p, add_special_tokens=False) for p in (PROMPT, OTHER)]
    assert [TEXTS[i] for i in ids[0]] == list(PROMPT) and [TEXTS[i] for i in ids[1]] == list(OTHER)
    temps = sorted({t for _, t in SCHEMES.values()} | {1.0})
    return {t: tuple(next_token_logprobs(model, i, MAX_TOKENS, t) for i in ids) for t in temps}


def targets(tables, temperature: float) -> dict:
    """name → (exact value, event or None): Z itself, and Z·π(A) for two events A (ended at EOS before
    max_tokens; began with the target's most likely first token), by enumeration."""
    lp1, lp2 = tables[temperature]
    z, post = exact_z(lp1, lp2, WEIGHT, MAX_TOKENS, FORBIDDEN, MAX_WORD)
    first: dict[int, float] = {}
    for y, p in post.items():
        first[y[0]] = first.get(y[0], 0.0) + p
    top = max(first, key=first.get)
    out = {"Z": (z, None)}
    for name, inside in (
        ("Z·π(ended early)", lambda y: len(y) < MAX_TOKENS),
        (f"Z·π(first token {TEXTS[top]!r})", lambda y: y[0] == top),
    ):
        out[name] = (z * math.fsum(p for y, p in post.items() if inside(y)), inside)
    return out


def tiny_stack_config(tiny_dir, **more):
    """The served tests' configuration: the tiny model, one prefill and two decode workers (``more``: other
    ``ServeConfig`` fields)."""
    from smcserve.scheduler.stack import ServeConfig

    return ServeConfig(
        model=str(tiny_dir),
        dtype="float32",
        prefill_workers=1,
        decode_workers=2,
        port=0,
        threads=1,
        kv_cache="16mb",
        redis_maxmemory="64mb",
        **more,
    )


@pytest.fixture(scope="module")
def stack(tiny_dir, in_process_stack):
    """The real stack on the tiny model, its scheduler in this process (see the module docstring)."""
    with in_process_stack(tiny_stack_config(tiny_dir), num_cpus=3) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.address) as c:
        c.wait_ready(60)
        yield c


@pytest.fixture(scope="module")
def patch_rule(tables) -> dict:
    """Boundaries at quantiles, over every live prefix of 1 or 2 tokens, of the proposal's entropy and
    of −log (allowed product mass; Σ p_P·p_Q^w < 1 always, so most tokens drop it): steer keyword arguments."""
    out = {}
    for temperature, (lp1, lp2) in tables.items():
        hs, drops = [], []
        for y, row in lp1.items():
            if not 1 <= len(y) < MAX_TOKENS or EOS_ID in y or not hard_ok(y, FORBIDDEN, MAX_WORD):
                continue
            allowed = [v for v in range(len(PIECES)) if hard_ok(y + (v,), FORBIDDEN, MAX_WORD)]
            logq = np.array([row[v] + WEIGHT * lp2[y][v] for v in allowed])
            mass = float(np.logaddexp.reduce(logq))
            q = np.exp(logq - mass)
            hs.append(float(-(q * (logq - mass)).sum()))
            drops.append(-mass)
        out[temperature] = dict(
            patch_max_tokens=MAX_TOKENS,
            entropy_threshold=float(np.quantile(hs, ENTROPY_Q)),
            weight_drop=float(np.quantile(drops, DROP_Q)),
        )
    return out


# ------------------------------------------------------------------------------------ helpers
def steer(client, seed: int, temperature: float, **kw):
    return client.steer(
        PROMPT, particles=N, potentials=POTENTIALS, max_tokens=MAX_TOKENS, seed=seed, temperature=temperature, **kw
    )


def check_particles(res) -> None:
    """Every particle finished; the live ones satisfy the hard constraints; weights are never NaN."""
    assert res.status == "ok" and math.isfinite(res.log_z), (res.status, res.log_z)
    assert len(res.particles) == N
    for p in res.particles:
        ids = list(p.token_ids)
        assert not math.isnan(p.log_weight)
        assert p.finished and 1 <= len(ids) <= MAX_TOKENS and all(0 <= t < len(PIECES) for t in ids), p
        assert EOS_ID not in ids[:-1] and (ids[-1] == EOS_ID or len(ids) == MAX_TOKENS), ids
        assert p.text == "".join(TEXTS[t] for t in ids)
        if p.log_weight > -math.inf:
            assert hard_ok(ids, FORBIDDEN, MAX_WORD), p.text


def imported(client) -> int:
    return sum(w.particles_imported for w in client.info().decode_workers)


def estimates(client, scheme: str, seeds, exact: dict, on_done=None, patch=None, results=None) -> dict:
    """Per request: Ẑ = exp(log_z), and (1/N) Σ_i w_i 1[x_i ∈ A] for each event A of ``exact``
    (an unbiased estimate of Z·π(A), as Ẑ is of Z). ``on_done(n)`` is called as the n-th request ends.
    ``patch``: steer keyword arguments of a patch rule (with ``scheme`` a standard one: ESS < N/2);
    ``results``: a list that gets every request's result."""
    if patch is None:
        kw, temperature = SCHEMES[scheme]
    else:
        temperature = 1.0
        kw = dict(patch, scheme=scheme, **(dict(extensions=2) if scheme == "without_replacement" else {}))
    done = iter(range(1, len(seeds) + 1))
    lock = threading.Lock()

    def one(seed):
        res = steer(client, seed, temperature, **kw)
        check_particles(res)
        if results is not None:
            results.append(res)
        if on_done is not None:
            with lock:
                n = next(done)
            on_done(n)
        return [
            math.exp(res.log_z)
            if inside is None
            else math.fsum(math.exp(p.log_weight) for p in res.particles if inside(tuple(p.token_ids))) / N
            for _, inside in exact.values()
        ]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        rows = np.array(list(pool.map(one, seeds)))
    return {name: rows[:, j] for j, name in enumerate(exact)}


def report(label: str, exact: dict, est: dict, seconds: float) -> dict[str, tuple[float, float, float]]:
    """name → (exact, mean, standard error); printed (``pytest -s``)."""
    out = {}
    print(f"\n[{label}] {len(est['Z'])} requests in {seconds:.1f} s")
    for name, (value, _) in exact.items():
        xs = est[name]
        mean, se = float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(xs.size))
        out[name] = (value, mean, se)
        print(
            f"  {name:28s} exact {value:.6g}   mean {mean:.6g} (ratio {mean / value:.4f})   "
            f"SE {se:.3g} ({se / value:.2%})   z = {(mean - value) / se:+.2f}"
        )
    return out


# ------------------------------------------------------------------------------------ tests
def test_tiny_model_is_served_with_its_vocabulary(stack, client):
    """The stack serves the tiny model: its 8-token vocab, both decode workers, token texts right."""
    from transformers import AutoTokenizer

    from smcserve.smc.vocab import get_vocab

    info = client.info()
    assert info.vocab_size == len(PIECES) and info.dtype == "float32" and len(info.decode_workers) == 2
    tok = AutoTokenizer.from_pretrained(stack.config.model)
    vocab = get_vocab(tok, size=len(PIECES), eos_ids=[EOS_ID])
    assert vocab.token_bytes == [t.encode() for t in TEXTS] and vocab.eos_ids == (EOS_ID,)
    out = client.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=1)
    assert out.text == "".join(TEXTS[t] for t in out.token_ids if t != EOS_ID)


def allowed_product_log_weight(tables_t, y: tuple[int, ...]) -> float:
    """Σ_t log Σ_v G(v) p_P(v)·p_Q(v)^w at the prefixes of ``y``, from one temperature's enumeration tables."""
    lp1, lp2 = tables_t
    out = 0.0
    for t in range(len(y)):
        allowed = [v for v in range(len(PIECES)) if hard_ok(y[:t] + (v,), FORBIDDEN, MAX_WORD)]
        out += math.log(math.fsum(math.exp(lp1[y[:t]][v] + WEIGHT * lp2[y[:t]][v]) for v in allowed))
    return out


def test_served_weights_are_the_allowed_product_mass(client, tables):
    """No resampling: each particle's log weight is Σ_t log Σ_v G(v) p_P(v)·p_Q(v)^w at its prefixes,
    computed from the enumeration tables (tempered at T = 0.8 here), with no finish term."""
    res = steer(client, 123, 0.8, scheme="multinomial", ess_threshold=0.0)
    check_particles(res)
    for p in res.particles:
        y = tuple(p.token_ids)
        assert p.log_weight == pytest.approx(allowed_product_log_weight(tables[0.8], y), abs=1e-4), y


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_served_smc_is_unbiased(client, tables, scheme):
    exact = targets(tables, SCHEMES[scheme][1])
    before = imported(client)
    t0 = time.perf_counter()
    check_unbiased(report(scheme, exact, estimates(client, scheme, range(M), exact), time.perf_counter() - t0))
    workers = client.info().decode_workers
    print(
        "  decode workers: "
        + ", ".join(
            f"{w.worker_id} batch_steps={w.batch_steps} particles_imported={w.particles_imported}" for w in workers
        )
    )
    assert all(w.batch_steps > 0 for w in workers)
    assert imported(client) > before, "resampling never moved a particle between the two decode workers"


@pytest.mark.parametrize("label", list(PATCH_SCHEMES))
def test_served_patches_are_unbiased(client, tables, patch_rule, label):
    """Patches whose boundaries fall at varied places (entropy before a token, a weight drop after
    one, EOS, max_tokens): Ẑ and Z·π(A) stay unbiased, with fewer round trips than tokens."""
    exact = targets(tables, 1.0)
    results: list = []
    t0 = time.perf_counter()
    est = estimates(client, PATCH_SCHEMES[label], range(M), exact, patch=patch_rule[1.0], results=results)
    check_unbiased(report(label, exact, est, time.perf_counter() - t0))
    steps = {r.steps for r in results}
    per_patch = np.array([r.tokens_per_patch for r in results])
    print(f"  steps per request: {sorted(steps)}; tokens per patch: mean {per_patch.mean():.3f}")
    assert len(steps) > 1 and min(steps) < MAX_TOKENS, "the boundaries did not vary"
    assert 1.0 < per_patch.mean() < MAX_TOKENS
    assert np.mean([r.roundtrips_per_token for r in results]) < 1.0


def test_served_patch_weights_are_the_allowed_product_mass(client, tables, patch_rule):
    """No resampling, patches of up to 3 tokens: each particle's log weight is still the sum over its
    tokens of log Σ_allowed p_P·p_Q^w, however its patches were cut."""
    lp1, lp2 = tables[1.0]
    for seed in range(3):
        res = steer(client, seed, 1.0, scheme="multinomial", ess_threshold=0.0, **patch_rule[1.0])
        check_particles(res)
        for p in res.particles:
            y = tuple(p.token_ids)
            expected = 0.0
            for t in range(len(y)):
                allowed = [v for v in range(len(PIECES)) if hard_ok(y[:t] + (v,), FORBIDDEN, MAX_WORD)]
                expected += math.log(math.fsum(math.exp(lp1[y[:t]][v] + WEIGHT * lp2[y[:t]][v]) for v in allowed))
            assert p.log_weight == pytest.approx(expected, abs=1e-4), y


def check_unbiased(stats: dict) -> None:
    for name, (value, mean, se) in stats.items():
        power = 0.05 if name == "Z" else 0.10  # ended-early mass is small and noisy at T = 0.8
        assert se < power * value, f"{name}: too few requests for the check to have power"
        assert abs(mean - value) < 3 * se, (
            f"{name}: mean {mean:.6g} vs exact {value:.6g}: {(mean - value) / se:+.2f} standard errors"
        )


def test_served_smc_is_unbiased_with_a_decode_worker_killed(stack, client, tables):
    """kill -9 of a decode worker half-way through the requests (several in flight): their steps rerun
    on the other worker, Ray restarts the killed one and it rejoins; the estimates stay unbiased."""
    import os
    import signal

    import psutil

    port = int(stack.decode[0].address.rsplit(":", 1)[1])
    (pid,) = [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp"))
    ]
    before = stack.decode[0].restarts

    def kill_half_way(n):
        if n == M // 2:
            os.kill(pid, signal.SIGKILL)

    exact = targets(tables, SCHEMES["without_replacement"][1])
    t0 = time.perf_counter()
    est = estimates(client, "without_replacement", range(M), exact, on_done=kill_half_way)
    check_unbiased(report("without_replacement, a worker killed", exact, est, time.perf_counter() - t0))
    deadline = time.monotonic() + 300  # only a worker that never comes back reaches it
    while stack.decode[0].restarts == before:
        assert time.monotonic() < deadline, "the killed decode worker never rejoined"
        time.sleep(0.2)
    assert stack.decode[0].alive


def test_control_biased_c_star_is_detected(client, tables, monkeypatch):
    """Algorithm 4 with llamppl's c in place of c* (I_det = {c·ŵ ≥ 1}, stochastic survivors weighted
    (N/N′)·Σw/c), patched into the scheduler's resampling: the same check must now fail."""
    import smcserve.smc.without_replacement as wr
    from smcserve.smc.weights import as_log_weights, logsumexp

    real = wr.resample_without_replacement
    calls = []

    def biased(cand_logw, n, rng):
        calls.append(1)
        a = as_log_weights(cand_logw).ravel()
        total = logsumexp(a)
        if total == -math.inf:
            return real(cand_logw, n, rng)
        w = np.exp(a - total)
        if math.isinf(wr.find_c_star(w, n).c):  # at most n candidates: all are kept, no c involved
            return real(cand_logw, n, rng)
        c = llamppl_find_c(w, n)
        pos = np.flatnonzero(w > 0)
        det, stoch = pos[c * w[pos] >= 1], pos[c * w[pos] < 1]
        m = n - det.size
        kept = stoch[wr._sweep(w[stoch], m, rng)]
        log_ratio = math.log(n) - math.log(a.size)
        log_w = np.concatenate([a[det] + log_ratio, np.full(m, total - math.log(c) + log_ratio)])
        return wr.WRResample(np.concatenate([det, kept]).astype(np.int64), log_w, c, int(det.size), int(m), wr.OK)

    monkeypatch.setattr(wr, "resample_without_replacement", biased)
    exact = {"Z": targets(tables, SCHEMES["without_replacement"][1])["Z"]}
    t0 = time.perf_counter()
    est = estimates(client, "without_replacement", range(M_CONTROL), exact)
    ((value, mean, se),) = report("control: llamppl's c as c*", exact, est, time.perf_counter() - t0).values()
    assert calls, "the served path no longer resamples through smc.without_replacement.resample_without_replacement"
    assert (mean - value) / se > 3.0, "the unbiasedness check did not catch a biased c*"
