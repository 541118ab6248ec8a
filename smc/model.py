"""The Feynman-Kac model the reference driver runs, built from the server's own pieces.

A request's target over finished sequences y (ended at EOS, or at ``max_tokens`` tokens):

    P(y) ∝ Π_t p0(y_t | prompt, y<t) · G(y),      Z = Σ_y Π_t p0(y_t | ...) · G(y)

where p0 is the LM and G the product of the request's potentials — ``Potential`` objects, exactly
what ``build_potentials`` gives the decode workers: their ``advance``/``finish`` values, their masks
(the masked proposal), their vocabulary-wide factors φ over companion prompts (prompt_intersection:
the LM under another prompt, evaluated by the same ``lm`` on that prompt + y<t).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from .potentials import Potential
from .weights import FloatArray

State = tuple[int, ...]
LM = Callable[[State], FloatArray]  # a context (prompt + generated tokens) → next-token log-probabilities


@dataclass(frozen=True)
class FeynmanKacModel:
    """An LM, a prompt and potentials: the model of one request, for ``run_smc``."""

    lm: LM
    vocab_size: int
    potentials: Sequence[Potential]  # for the first particle; every particle gets its own clones
    eos_ids: Collection[int]
    max_tokens: int
    prompt: State = ()
    ignore_eos: bool = False

    def logprobs(self, generated: State, prompt: Sequence[int] | None = None) -> FloatArray:
        """log p0(· | prompt, generated); ``prompt`` defaults to the request's (others: companions)."""
        return self.lm(tuple(self.prompt if prompt is None else prompt) + tuple(generated))
