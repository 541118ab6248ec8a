"""The proposal of every SMC step, shared by the reference driver and the decode workers.

For a particle with generated tokens y<t, let p0(x) be the LM's next-token probability (float64, at
the request's temperature), φ(x) = Π_i p_i(x)^{w_i} the product of its potentials' vocabulary-wide
factors (prompt_intersection: the LM under other prompts; φ = 1 without one) and m(x) ∈ {0, 1} the
AND of its potentials' masks (their hard next-token constraints). The proposal is the masked,
renormalised product

    q(x) = p0(x)·φ(x)·m(x) / L,      L = Σ_x p0(x)·φ(x)·m(x)      (the allowed mass)

and each of the particle's K children draws one token from q by inverse CDF with its own uniform.
A child that drew x gets the log-weight increment

    log L + log G(x)      (G: what the potentials' ``advance``/``finish`` say of the drawn token)

so that its weight times q(x) is p0(x)·φ(x)·m(x)·G(x), the target's own factor for x: Ẑ stays
unbiased. With nothing masked and no factor, L = 1 and this is the plain proposal p0 with weight
G. A particle with L = 0 (no allowed token) gets token −1 and increment −inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smcserve.engine.sampling import inverse_cdf


@dataclass(frozen=True)
class Proposal:
    tokens: torch.Tensor  # (P, K) int64; −1 where no token is allowed
    log_mass: torch.Tensor  # (P,) float64: log L = log Σ_{allowed} p0·φ; −inf where no token is allowed

    def increment(self, row: int, log_g: float) -> float:
        """The log-weight increment of a child of particle ``row`` whose token has log G = ``log_g``."""
        mass = float(self.log_mass[row])
        return -math.inf if mass == -math.inf or log_g == -math.inf else mass + log_g


def stacked_masks(
    masks: Sequence[torch.Tensor | None], width: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """The rows' masks as one bool [P, width] tensor on ``device`` (the logits'; default: the CPU; a row
    without a mask allows everything), or None when no row has one. A mask longer than ``width`` (the
    model's logit rows) is cut. The potentials build masks on the host; the stack is copied once."""
    if all(m is None for m in masks):
        return None
    every = torch.ones(width, dtype=torch.bool, device="cpu")  # beside the potentials' host masks
    stacked = torch.stack([every if m is None else m[:width].to(torch.bool) for m in masks])
    return stacked if device is None else stacked.to(device, non_blocking=True)


def with_factors(logp: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """log p0 + log φ per row (float64 [P, V]): ``factors[r]`` is row r's log φ, or None (φ = 1)."""
    rows = logp.double()
    if all(f is None for f in factors):
        return rows
    return torch.stack([row if f is None else row + f[: row.shape[0]] for row, f in zip(rows, factors)])


def propose(logp: torch.Tensor, allowed: torch.Tensor | None, u: torch.Tensor) -> Proposal:
    """Draw ``u.shape[1]`` tokens per row of ``logp`` [P, V] within ``allowed`` [P, V].

    ``logp`` holds log p0 + log φ per row (``with_factors``; normalised or not: only ratios and the
    sum L matter). ``u`` [P, K] holds uniforms in [0, 1): the caller decides where randomness comes
    from (a seeded generator in the driver, a hash of (seed, step, particle, child) on the workers).
    """
    logp = logp.double()
    masked = logp if allowed is None else logp.masked_fill(~allowed[:, : logp.shape[1]], -math.inf)
    log_mass = torch.logsumexp(masked, dim=1)
    ok = log_mass > -math.inf
    tokens = torch.full(u.shape, -1, dtype=torch.int64, device=logp.device)
    if bool(ok.any()):
        probs = torch.exp(masked[ok] - log_mass[ok, None])
        tokens[ok] = inverse_cdf(probs, u[ok])
    return Proposal(tokens, log_mass)
