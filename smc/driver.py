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
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .model import FeynmanKacModel, State
from .resampling import IntArray, Scheme, resample
from .weights import FloatArray, as_log_weights, ess, log_mean_exp
from .without_replacement import ALL_ZERO, steer_resample

Proposal = Literal["prior", "masked"]
OK = "ok"
ALL_VIOLATED = "all particles violated the constraints"
WITHOUT_REPLACEMENT = "without_replacement"


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


def sample_rows(p: FloatArray, u: FloatArray) -> IntArray:
    """Row-wise inverse CDF: index i with cdf[r, i-1] <= u[r, j] < cdf[r, i], shape u.shape.

    Rows of ``p`` are non-negative with some positive entry; zero-probability indices are never returned.
    """
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    idx = (cdf[:, None, :] <= u[:, :, None]).sum(axis=2)
    last_positive = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
    return np.minimum(idx, last_positive[:, None]).astype(np.int64)


def propose(
    model: FeynmanKacModel, states: Sequence[State], k: int, rng: np.random.Generator, proposal: Proposal = "prior"
) -> tuple[IntArray, FloatArray]:
    """K next tokens per state and their log-weight increments, shapes (len(states), k).

    Draws ``rng.random((len(states), k))`` once. A token of −1 marks a state with no allowed
    continuation (masked proposal; increment −inf).
    """
    if proposal not in ("prior", "masked"):
        raise ValueError(f"unknown proposal {proposal!r}")
    u = rng.random((len(states), k))
    if not states:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k))
    lp = as_log_weights(np.stack([model.proposal_logprobs(s) for s in states]))
    if not (lp > -math.inf).any(axis=1).all():
        raise ValueError("proposal_logprobs gave a state no possible next token")
    if proposal == "prior":
        tokens = sample_rows(np.exp(lp), u)
        incr = as_log_weights([[model.potential(s, int(t)) for t in row] for s, row in zip(states, tokens)])
        return tokens, incr.reshape(len(states), k)
    lg = as_log_weights(np.stack([model.log_potentials(s) for s in states]))
    allowed = (lg > -math.inf) & (lp > -math.inf)
    ok = allowed.any(axis=1)
    masked = np.where(allowed, lp, -math.inf)
    top = np.where(ok, masked.max(axis=1), 0.0)
    with np.errstate(divide="ignore"):  # −inf where nothing is allowed
        log_mass = top + np.log(np.exp(masked - top[:, None]).sum(axis=1))
    tokens = np.full((len(states), k), -1, dtype=np.int64)
    incr = np.full((len(states), k), -math.inf)
    if ok.any():
        p = np.where(allowed[ok], np.exp(masked[ok] - log_mass[ok, None]), 0.0)
        tokens[ok] = sample_rows(p, u[ok])
        incr[ok] = log_mass[ok, None] + np.take_along_axis(lg[ok], tokens[ok], axis=1)
    return tokens, incr


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
    """Standard SMC; resamples when ESS < ess_threshold·N (always when ess_threshold ≥ 1, never at 0).

    No resampling once every live particle is finished (it would not change Ẑ). With
    ``scheme="without_replacement"`` this delegates to ``run_smc_steer`` with ``k``.
    """
    if scheme == WITHOUT_REPLACEMENT:
        return run_smc_steer(model, n, k, rng, proposal=proposal, max_steps=max_steps)
    states: list[State] = [model.initial_state()] * n
    logw = np.zeros(n)
    done = np.array([model.is_finished(s) for s in states], dtype=bool)
    steps = n_res = 0
    while True:
        active = np.flatnonzero(~done & (logw > -math.inf))
        if active.size == 0:
            break
        if steps >= max_steps:
            raise RuntimeError(f"SMC did not finish within {max_steps} steps")
        steps += 1
        tokens, incr = propose(model, [states[i] for i in active], 1, rng, proposal)
        for i, t, g in zip(active, tokens[:, 0], incr[:, 0]):
            logw[i] += g
            if t >= 0:
                states[i] = states[i] + (int(t),)
                done[i] = model.is_finished(states[i])
        alive = logw > -math.inf
        if not alive.any() or not (~done & alive).any():
            continue
        if ess_threshold >= 1.0 or ess(logw) < ess_threshold * n:
            anc, logw = resample(scheme, logw, n, rng)
            states = [states[a] for a in anc]
            done = done[anc]
            n_res += 1
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
    if k < 1:
        raise ValueError("k must be >= 1")
    states: list[State] = [model.initial_state()] * n
    logw = np.zeros(n)
    done = np.array([model.is_finished(s) for s in states], dtype=bool)
    steps = n_res = 0
    while True:
        carried = done | (logw == -math.inf)
        if carried.all():
            break
        if steps >= max_steps:
            raise RuntimeError(f"SMC steering did not finish within {max_steps} steps")
        steps += 1
        active = np.flatnonzero(~carried)
        tokens = np.full((n, k), -1, dtype=np.int64)
        incr = np.full((n, k), -math.inf)
        tokens[active], incr[active] = propose(model, [states[i] for i in active], k, rng, proposal)
        step = steer_resample(logw, carried, incr, rng)
        n_res += 1
        if step.status == ALL_ZERO:
            logw = np.full(n, -math.inf)
            break
        new_states: list[State] = []
        new_done = np.zeros(n, dtype=bool)
        for j, (p, c) in enumerate(zip(step.parent, step.child)):
            s = states[p]
            if c >= 0 and tokens[p, c] >= 0:
                s = s + (int(tokens[p, c]),)
                new_done[j] = model.is_finished(s)
            else:
                new_done[j] = done[p]
            new_states.append(s)
        states, done, logw = new_states, new_done, step.log_weights
    return _finish(states, logw, steps, n_res)
