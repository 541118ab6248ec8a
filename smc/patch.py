"""Patches: a particle advances several tokens between two synchronisations of the particle set.

A decode worker extends each of its particles by up to ``max_tokens`` tokens without asking the
scheduler (after the Byte-Latent Transformer, whose patches end where next-byte entropy is high).
Every token is drawn from the step's proposal (``smc.proposal``) and its log-weight increment is
added to the patch's. A particle's patch ends early at a boundary:

* **entropy**: the proposal of its next token has entropy (nats) above ``entropy_threshold``: the
  patch ends *before* that token, so the uncertain choice opens the next SMC step (where the
  scheduler may resample first and, for ``without_replacement``, K children branch on it);
* **weight drop**: a token's log-weight increment fell below −``weight_drop``: the patch ends
  *after* it, so the particle's weight is looked at (and resampled) at once;
* EOS, ``max_tokens`` of the request, or a ruled-out particle (it has finished).

Both rules read only what the particle has already sampled (its prefix, and the proposal computed
from it), never a token not yet drawn, so a patch is one SMC step whose kernel runs the proposal
until a stopping time: Ẑ stays unbiased (the argument is in the README). ``max_tokens = 1`` is the
per-token step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AUTO_QUANTILE = 0.9  # ``auto``: this quantile of the model's next-token entropies along the prompt
MAX_PATCH_TOKENS = 256


@dataclass(frozen=True)
class PatchRule:
    max_tokens: int = 1
    entropy_threshold: float = math.inf  # nats; inf: no entropy boundary
    entropy_auto: bool = False  # calibrate entropy_threshold on the prompt (``calibrate``)
    weight_drop: float = math.inf  # a boundary after an increment below −weight_drop; inf: none

    @property
    def per_token(self) -> bool:
        return self.max_tokens == 1


def entropy(logp: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Entropy (nats, float64 [P]) of each row's proposal: ``logp`` [P, V] (log p0 + log φ, normalised
    or not) restricted to ``allowed`` [P, V] and renormalised; 0 for a row that allows nothing."""
    logp = logp.double()
    masked = logp if allowed is None else logp.masked_fill(~allowed[:, : logp.shape[1]], -math.inf)
    log_mass = torch.logsumexp(masked, dim=1, keepdim=True)
    lq = masked - log_mass
    q = torch.exp(lq)
    h = -(q * torch.where(q > 0, lq, torch.zeros_like(lq))).sum(dim=1)
    return torch.where(torch.isfinite(log_mass[:, 0]), h, torch.zeros_like(h))


def calibrate(prompt_logits: torch.Tensor, temperature: float) -> float:
    """``auto``'s entropy threshold: the ``AUTO_QUANTILE`` of the next-token entropies (at the
    request's temperature) the model has along the prompt, ``prompt_logits`` [L, V]."""
    h = entropy(torch.log_softmax(prompt_logits.double() / temperature, dim=-1), None)
    return float(torch.quantile(h, AUTO_QUANTILE))


def stops_before(rule: PatchRule, position: int, h: float) -> bool:
    """Whether the patch ends before the token at ``position`` (0-based in the patch) whose proposal
    has entropy ``h``: never before its first token."""
    return position > 0 and h > rule.entropy_threshold


def stops_after(rule: PatchRule, position: int, increment: float) -> bool:
    """Whether the patch ends after the token at ``position`` (its log-weight increment given): the
    patch is full, or the weight dropped by more than ``weight_drop``."""
    return position + 1 >= rule.max_tokens or increment < -rule.weight_drop
