"""Single-process reference SMC over a ``FeynmanKacModel`` (pure; for tests and as the reference).

It runs the server's own code on the server's own objects: each particle holds clones of the
request's ``Potential``s, proposes with ``smc.proposal`` and extends with ``smc.extension`` (the
decode workers' arithmetic), and the population steps with ``smc.step.smc_step`` (the scheduler's).
Only the LM (a plain function) and the placement (one process, no KV) differ.

* ``run_smc``: standard SMC. Each unfinished particle proposes one token, is reweighted, and the
  population is resampled (multinomial / stratified / systematic / residual) when ESS/N falls below
  ``ess_threshold``. Finished particles are carried unchanged (G = 1).
* ``run_smc_steer``: Algorithm 4 (K children per unfinished particle, without-replacement
  resampling every step; finished particles carried with K_i = 1).

Proposals: ``"masked"`` is what the workers run: p0·φ restricted to the potentials' masks,
renormalised, with weight × allowed mass × G (``smc.proposal``). ``"prior"`` samples p0 itself and
multiplies the weight by φ(token)·G(token); both keep Ẑ unbiased, and comparing them checks the mask
and factor bookkeeping.

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

from .extension import extend
from .model import FeynmanKacModel, State
from .potentials import Potential, clone_all, combined_log_factor, combined_mask, companion_prompts
from .proposal import propose as propose_tokens
from .proposal import stacked_masks, with_factors
from .resampling import IntArray, Scheme
from .step import ALL_VIOLATED, OK, WITHOUT_REPLACEMENT, smc_step
from .weights import FloatArray, as_log_weights, log_mean_exp

Proposal = Literal["prior", "masked"]
__all__ = ["ALL_VIOLATED", "OK", "Particle", "SMCResult", "propose", "run_smc", "run_smc_steer"]


@dataclass
class Particle:
    """One particle: its generated tokens and its own potentials."""

    generated: list[int]
    potentials: list[Potential]
    finished: bool = False  # finished or dead: never extended again

    def copy(self) -> Particle:
        return Particle(list(self.generated), clone_all(self.potentials), self.finished)


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
    model: FeynmanKacModel,
    particles: Sequence[Particle],
    k: int,
    rng: np.random.Generator,
    proposal: Proposal = "prior",
) -> tuple[IntArray, FloatArray, list[list[Particle]]]:
    """K children per particle: their tokens and log-weight increments, shapes (len(particles), k),
    and the children themselves (extended copies; the parents are left as they were).

    Draws ``rng.random((len(particles), k))`` once and hands it to ``smc.proposal.propose``, the same
    proposal the decode workers run. A token of −1 marks a particle with no allowed continuation
    (masked proposal; increment −inf).
    """
    if proposal not in ("prior", "masked"):
        raise ValueError(f"unknown proposal {proposal!r}")
    u = rng.random((len(particles), k))
    if not particles:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k)), []
    lp = as_log_weights(np.stack([model.logprobs(p.generated) for p in particles]))
    if not (lp > -math.inf).any(axis=1).all():
        raise ValueError("the LM gave a state no possible next token")
    factors = [
        combined_log_factor(
            p.potentials,
            [torch.from_numpy(model.logprobs(p.generated, q)) for q in companion_prompts(p.potentials)],
        )
        for p in particles
    ]
    logp = torch.from_numpy(lp)
    if proposal == "masked":
        rows = with_factors(logp, factors)
        allowed = stacked_masks([combined_mask(p.potentials) for p in particles], model.vocab_size)
    else:
        rows, allowed = logp, None
    prop = propose_tokens(rows, allowed, torch.from_numpy(u))
    tokens = np.full((len(particles), k), -1, dtype=np.int64)
    incr = np.full((len(particles), k), -math.inf)
    children: list[list[Particle]] = []
    for i, p in enumerate(particles):
        row = []
        for j in range(k):
            c = p.copy()
            ext = extend(c.potentials, c.generated, prop, i, j, model.eos_ids, model.max_tokens, model.ignore_eos)
            c.finished = ext.finished
            tokens[i, j], incr[i, j] = ext.token, ext.log_increment
            if proposal == "prior" and factors[i] is not None and ext.token >= 0:
                incr[i, j] += float(factors[i][ext.token])  # φ(token): not in this proposal, so in the weight
            row.append(c)
        children.append(row)
    return tokens, as_log_weights(incr), children


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
    parts = [Particle([], clone_all(model.potentials)) for _ in range(n)]
    logw = np.zeros(n)
    steps = n_res = 0
    while True:
        carried = np.array([p.finished for p in parts], dtype=bool) | (logw == -math.inf)
        if carried.all():
            break
        if steps >= max_steps:
            raise RuntimeError(f"SMC did not finish within {max_steps} steps")
        steps += 1
        active = np.flatnonzero(~carried)
        incr = np.full((n, k), -math.inf)
        child_done = np.ones((n, k), dtype=bool)
        _, incr[active], kids = propose(model, [parts[i] for i in active], k, rng, proposal)
        children = dict(zip(active.tolist(), kids))
        for i, row in children.items():
            child_done[i] = [c.finished for c in row]
        out = smc_step(logw, carried, incr, child_done, scheme, ess_threshold, rng)
        new, taken = [], set()
        for i, j, done in zip(out.parent, out.child, out.finished):
            src = parts[i] if j < 0 else children[int(i)][j]
            p = src.copy() if id(src) in taken else src  # an offspring shares nothing with its siblings
            taken.add(id(src))
            p.finished = bool(done)
            new.append(p)
        parts, logw = new, out.log_weights
        n_res += out.resampled
        if out.status != OK:
            break
    return _finish([tuple(p.generated) for p in parts], logw, steps, n_res)


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
