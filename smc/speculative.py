"""Speculative rejection sampling against the SMC proposal: MTP drafts inside a patch (issue 13 §4).

Inside a patch (``smc.patch``), a lane's later tokens are drafted by the MTP heads (k at a time, from
their distribution q_j, unmasked) and verified in one multi-position forward. At each drafted position
j the target is exactly the proposal the non-speculative path draws from there (``smc.proposal``: the
LM times the potentials' factors, masked by the hard constraints, renormalised), p_j, computed from the
verified logits with the potentials advanced along the tokens accepted so far. Draft d is accepted with
probability min(1, p_j(d)/q_j(d)); at the first rejection the token is drawn from norm((p_j − q_j)+),
and when every draft is accepted one more token is drawn from p_{k}. Each token is then distributed
exactly as p_j given its prefix (Leviathan et al. 2023; Chen et al. 2023), so a patch's tokens, its
boundaries and its log-weight increments (computed from the verified p_j as without MTP) have the same
law as without drafts: particle weights and log Ẑ are unchanged in distribution. A draft the mask
forbids has p_j(d) = 0: it is always rejected, and the residual gives it no mass either.

Uniforms: the draws of a lane token at patch position ``position`` hash (seed, step, population
index, child, position) on the non-speculative path; here they hash the same key followed by
``STREAM`` and what the uniform is for (draft, accept, resample), a stream of their own.
"""

from __future__ import annotations

import torch

from smcserve.engine.sampling import inverse_cdf, seeded_uniform

STREAM = 13  # the speculative lane draws' stream (the tuple's length alone already keeps it apart)
DRAFT, ACCEPT, RESAMPLE = 1, 2, 3


def lane_uniform(seed: int, step: int, index: int, child: int, position: int, use: int) -> float:
    """The uniform of one speculative draw of a lane token (``use``: DRAFT, ACCEPT or RESAMPLE)."""
    return seeded_uniform(seed, step, index, child, position, STREAM, use)


def draft_seed(seed: int, step: int, index: int, child: int, position: int) -> int:
    """A seed (53 bits) for the heads' draws of a lane's drafts from ``position`` on: the drafter keys its
    uniforms by (seed, token index), so each lane and position gets a seed of its own."""
    return int(lane_uniform(seed, step, index, child, position, DRAFT) * 2.0**53)


def verify_token(
    p: torch.Tensor, q: torch.Tensor | None, draft: int | None, u_accept: float, u_resample: float
) -> tuple[int, bool]:
    """The token at one position: ``p`` [V] the target (float64, normalised, zero where masked),
    ``q`` [V] the distribution ``draft`` was drawn from (None and None: no draft, a draw from p).
    Returns (token, whether it is the accepted draft)."""
    target = p
    if draft is not None:
        q = q.to(p.device, torch.float64)
        qd, pd = float(q[draft]), float(p[draft])
        if qd > 0 and u_accept * qd < pd:  # u < p/q
            return draft, True
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) > 0:  # p == q leaves no residual (and no rejection): numerically guard
            target = residual
    u = torch.tensor([[u_resample]], dtype=torch.float64, device=p.device)
    return int(inverse_cdf(target[None], u)[0, 0]), False
