"""The proposal of every SMC step, shared by the reference driver and the decode workers.

For each particle the LM's next-token log-probabilities (float64) are restricted to the tokens its
hard potentials allow and renormalised; each of its K children draws one token from that by inverse
CDF with its own uniform, and the child's log-weight increment is

    log(allowed mass) + log G(token)      (G: what the potentials say of the drawn token)

which keeps Ẑ unbiased (ARCHITECTURE.md §4). With nothing masked the mass is 1 and this is the plain
proposal M_t with weight G. A particle with no allowed token gets token −1 and increment −inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.sampling import inverse_cdf


@dataclass(frozen=True)
class Proposal:
    tokens: torch.Tensor  # (P, K) int64; −1 where no token is allowed
    log_mass: torch.Tensor  # (P,) float64: log Σ_{allowed} p; −inf where no token is allowed

    def increment(self, row: int, log_g: float) -> float:
        """The log-weight increment of a child of particle ``row`` whose token has log G = ``log_g``."""
        mass = float(self.log_mass[row])
        return -math.inf if mass == -math.inf or log_g == -math.inf else mass + log_g


def propose(logp: torch.Tensor, allowed: torch.Tensor | None, u: torch.Tensor) -> Proposal:
    """Draw ``u.shape[1]`` tokens per row of ``logp`` [P, V] (log-probabilities) within ``allowed`` [P, V].

    ``u`` [P, K] holds uniforms in [0, 1): the caller decides where randomness comes from (a seeded
    generator in the driver, a hash of (seed, step, particle, child) on the workers).
    """
    logp = logp.double()
    masked = logp if allowed is None else logp.masked_fill(~allowed[:, : logp.shape[1]], -math.inf)
    log_mass = torch.logsumexp(masked, dim=1)
    ok = log_mass > -math.inf
    tokens = torch.full(u.shape, -1, dtype=torch.int64)
    if bool(ok.any()):
        probs = torch.exp(masked[ok] - log_mass[ok, None])
        tokens[ok] = inverse_cdf(probs, u[ok])
    return Proposal(tokens, log_mass)
