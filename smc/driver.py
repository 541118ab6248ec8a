"""Single-process reference SMC over a ``FeynmanKacModel`` (pure; for tests and as the reference).

* ``run_smc``: standard SMC. Each unfinished particle proposes one token, is reweighted by G_t, and
  the population is resampled (multinomial / stratified / systematic / residual) when ESS/N falls
  below ``ess_threshold``. Finished particles are carried unchanged (G = 1).
* ``run_smc_steer``: Algorithm 4 (K children per unfinished particle, without-replacement
  resampling every step; finished particles carried with K_i = 1).

Proposals: ``"prior"`` samples M_t and multiplies the weight by G_t(token). ``"masked"`` (the locally
optimal proposal for the 0/1 part of G) samples M_t restricted to {G_t > 0}, renormalised, and
multiplies the weight by Σ_{G_t>0} M_t · G_t(token); both keep Ẑ unbiased.

Dead particles (weight 0, e.g. a violated hard constraint) are not extended further; with steer they
count as carried (K_i = 1; N′ only rescales all candidates alike, so this changes nothing). At the
end log Ẑ = logsumexp(log w) − log N; all weights zero → log Ẑ = −inf and status
``ALL_VIOLATED``. Log weights are never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .model import FeynmanKacModel, State
from .proposal import propose as propose_tokens
from .resampling import IntArray, Scheme
from .step import ALL_VIOLATED, OK, WITHOUT_REPLACEMENT, smc_step
from .weights import FloatArray, as_log_weights, log_mean_exp

Proposal = Literal["prior", "masked"]
__all__ = ["ALL_VIOLATED", "OK", "SMCResult", "propose", "run_smc", "run_smc_steer"]


@dataclass(frozen=True)
class SMCResult:
    """Final weighted particles and the evidence estimate."""

    particles: list[State]
    log_weights: FloatArray
    log_z: float  # log Ẑ, an unbiased estimate of Z in linear space
    steps: int
    n_resample: int
    status: str  # OK or ALL_VIOLATED

    def posterior(self) -> dict[State, float]:
        """Normalised weight per distinct sequence (empty when all weights are zero)."""
        if self.log_z == -math.inf:
            return {}
        out: dict[State, float] = {}
        for x, lw in zip(self.particles, self.log_weights):
            if lw > -math.inf:
                out[x] = out.get(x, 0.0) + math.exp(lw - self.log_z - math.log(len(self.particles)))
        return out


def propose(
    model: FeynmanKacModel, states: Sequence[State], k: int, rng: np.random.Generator, proposal: Proposal = "prior"
) -> tuple[IntArray, FloatArray]:
    """K next tokens per state and their log-weight increments, shapes (len(states), k).

    Draws ``rng.random((len(states), k))`` once and hands it to ``smc.proposal.propose``, the same
    proposal the decode workers run. A token of −1 marks a state with no allowed continuation
    (masked proposal; increment −inf).
    """
    if proposal not in ("prior", "masked"):
        raise ValueError(f"unknown proposal {proposal!r}")
    u = rng.random((len(states), k))
    if not states:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k))
    lp = as_log_weights(np.stack([model.proposal_logprobs(s) for s in states]))
    if not (lp > -math.inf).any(axis=1).all():
        raise ValueError("proposal_logprobs gave a state no possible next token")
    allowed = None
    if proposal == "masked":
        lg = as_log_weights(np.stack([model.log_potentials(s) for s in states]))
        allowed = torch.from_numpy(lg > -math.inf)
    prop = propose_tokens(torch.from_numpy(lp), allowed, torch.from_numpy(u))
    tokens = prop.tokens.numpy()
    incr = as_log_weights(
        [
            [prop.increment(i, model.potential(s, int(t))) if t >= 0 else -math.inf for t in row]
            for i, (s, row) in enumerate(zip(states, tokens))
        ]
    )
    return tokens, incr.reshape(len(states), k)


def _finish(states: list[State], logw: FloatArray, steps: int, n_res: int) -> SMCResult:
    log_z = log_mean_exp(logw)
    return SMCResult(list(states), logw, log_z, steps, n_res, OK if log_z > -math.inf else ALL_VIOLATED)


def run_smc(
    model: FeynmanKacModel,
    n: int,
    rng: np.random.Generator,
    scheme: Scheme | Literal["without_replacement"] = "systematic",
    ess_threshold: float = 0.5,
    proposal: Proposal = "prior",
    k: int = 2,
    max_steps: int = 100_000,
) -> SMCResult:
    """SMC with ``smc.step.smc_step``, the step the served coordinator runs.

    Standard schemes extend each live particle once and resample when ESS < ess_threshold·N (always
    when ess_threshold ≥ 1, never at 0, never once every live particle is finished). With
    ``scheme="without_replacement"``: Algorithm 4 with ``k`` children per particle.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    k = k if scheme == WITHOUT_REPLACEMENT else 1
    states: list[State] = [model.initial_state()] * n
    logw = np.zeros(n)
    done = np.array([model.is_finished(s) for s in states], dtype=bool)
    steps = n_res = 0
    while True:
        carried = done | (logw == -math.inf)
        if carried.all():
            break
        if steps >= max_steps:
            raise RuntimeError(f"SMC did not finish within {max_steps} steps")
        steps += 1
        active = np.flatnonzero(~carried)
        tokens = np.full((n, k), -1, dtype=np.int64)
        incr = np.full((n, k), -math.inf)
        tokens[active], incr[active] = propose(model, [states[i] for i in active], k, rng, proposal)
        child_done = np.ones((n, k), dtype=bool)
        for i in active:
            for j in range(k):
                if tokens[i, j] >= 0:
                    child_done[i, j] = model.is_finished(states[i] + (int(tokens[i, j]),))
        out = smc_step(logw, carried, incr, child_done, scheme, ess_threshold, rng)
        states = [
            states[p] + ((int(tokens[p, c]),) if c >= 0 and tokens[p, c] >= 0 else ())
            for p, c in zip(out.parent, out.child)
        ]
        logw, done = out.log_weights, out.finished
        n_res += out.resampled
        if out.status != OK:
            break
    return _finish(states, logw, steps, n_res)


def run_smc_steer(
    model: FeynmanKacModel,
    n: int,
    k: int,
    rng: np.random.Generator,
    proposal: Proposal = "prior",
    max_steps: int = 100_000,
) -> SMCResult:
    """SMC steering (Algorithm 4): K children per unfinished particle, N survivors without replacement."""
    return run_smc(model, n, rng, WITHOUT_REPLACEMENT, proposal=proposal, k=k, max_steps=max_steps)
