"""The served exact-enumeration unbiasedness test (``tests/test_served_unbiased.py``) with MTP drafts on.

The same tiny 8-token model, prompts, potentials, patch rule (boundaries at quantiles of the entropy
and of the mass drop, patches of up to 3 tokens) and statistical criterion (mean of Ẑ within 3
standard errors of the exact Z, SE < 5 % of Z; Z·π(A) within 3 SE, SE < 10 %), through the real
stack started with ``--speculative mtp`` (deepseek heads at random initialisation, saved for the
model: their quality does not matter to exactness) and two decode workers. Each patch's first token
is the per-token proposal (K = 2 children, without replacement); its later tokens are drafted by the
heads and verified against the masked proposal (``smc.speculative``). Besides E[Ẑ] = Z, the test
asserts that speculation happened (drafts verified, some accepted, some rejected), that each
particle's log weight is still Σ_t log (allowed product mass), that a seeded request reproduces, and
that an opted-out request drafts nothing.
"""

from __future__ import annotations

import time

import pytest
from test_served_unbiased import (  # noqa: F401  (module-scoped fixtures, one instance for this module)
    allowed_product_log_weight,
    check_particles,
    check_unbiased,
    estimates,
    imported,
    patch_rule,
    report,
    steer,
    tables,
    targets,
    tiny_dir,
    tiny_stack_config,
)

from smcserve.client import Client

pytestmark = pytest.mark.e2e

M = 300  # seeded requests: SE ≈ 2.5 % of Z, ≈ 6.5 % of Z·π(ended early), within the criterion's limits
K_DRAFT = 2


@pytest.fixture(scope="module")
def stack(tiny_dir, in_process_stack):  # noqa: F811
    """The real stack on the tiny model with ``--speculative mtp`` (heads at random init, saved for it)."""
    import torch

    from smcserve.engine.model import load_model
    from smcserve.engine.mtp import MTPHeads, MTPSpec, save_heads

    lm = load_model(str(tiny_dir), "float32")
    torch.manual_seed(0)
    save_heads(MTPHeads(lm.model, MTPSpec("deepseek", K_DRAFT, 8)), lm)
    # k auto: these heads carry no held-out acceptance to weigh timings against, so the default k (2)
    config = tiny_stack_config(tiny_dir, speculative="mtp", num_speculative_tokens="auto")
    with in_process_stack(config, num_cpus=3) as st:
        yield st


@pytest.fixture(scope="module")
def rule(patch_rule) -> dict:  # noqa: F811
    """The served test's entropy boundary (0.75 quantile), patches of up to 3 tokens, no weight-drop
    boundary: −log of the allowed mass at the prompt (1.63) is above every later one, so a drop rule that
    fires at all ends every first patch after one token, and max_tokens = 3 then leaves no room to draft.
    (The weight drop inside a drafted run is checked on one worker, ``tests/test_patch_speculation.py``.)"""
    return {k: v for k, v in patch_rule[1.0].items() if k != "weight_drop"}


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.address) as c:
        c.wait_ready(60)
        yield c


def spec_counts(client) -> tuple[int, int, int]:
    """(verify steps, drafts judged, drafts accepted) summed over the decode workers."""
    ws = client.info().decode_workers
    return (
        sum(w.spec_steps for w in ws),
        sum(sum(w.spec_drafted) for w in ws),
        sum(sum(w.spec_accepted) for w in ws),
    )


def test_served_speculative_patches_are_unbiased(client, tables, rule):  # noqa: F811
    exact = targets(tables, 1.0)
    before, moved = spec_counts(client), imported(client)
    results: list = []
    t0 = time.perf_counter()
    est = estimates(client, "without_replacement", range(M), exact, patch=rule, results=results)
    check_unbiased(report("MTP patches, without_replacement", exact, est, time.perf_counter() - t0))
    steps, drafted, accepted = (a - b for a, b in zip(spec_counts(client), before))
    print(f"  verify steps {steps}, drafts judged {drafted}, accepted {accepted}")
    assert steps > 0 and 0 < accepted < drafted, "speculation did not happen (or never rejected a draft)"
    assert len({r.steps for r in results}) > 1, "the boundaries did not vary"
    assert imported(client) > moved, "resampling never moved a particle (with no drafting window) between workers"


def test_served_speculative_patch_weights_are_the_allowed_product_mass(client, tables, rule):  # noqa: F811
    """No resampling: each particle's log weight is Σ_t log Σ_allowed p_P·p_Q^w, as without MTP."""
    for seed in range(3):
        res = steer(client, seed, 1.0, scheme="multinomial", ess_threshold=0.0, **rule)
        check_particles(res)
        for p in res.particles:
            y = tuple(p.token_ids)
            assert p.log_weight == pytest.approx(allowed_product_log_weight(tables[1.0], y), abs=1e-4), y


def test_seeded_steering_with_mtp_reproduces_and_opting_out_drafts_nothing(client, rule):
    kw = dict(scheme="systematic", **rule)

    def run(seed, **extra):
        res = steer(client, seed, 1.0, **kw, **extra)
        check_particles(res)
        return [tuple(p.token_ids) for p in res.particles], [p.log_weight for p in res.particles], res.log_z

    info = client.info()
    assert info.num_speculative_tokens == K_DRAFT and info.speculative_max_batch == 1  # the defaults, for auto
    before = spec_counts(client)
    tokens, weights, log_z = run(7)
    assert spec_counts(client)[1] > before[1]
    again = run(7)
    assert again[0] == tokens and again[1] == pytest.approx(weights, abs=1e-9) and again[2] == pytest.approx(log_z)
    assert run(8)[0] != tokens
    before = spec_counts(client)
    run(7, disable_speculation=True)
    assert spec_counts(client) == before
