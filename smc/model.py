"""The Feynman-Kac model interface over token sequences: kernels M_t, potentials G_t, termination.

Target: P(x) ∝ M(x)·Π_t G_t over finished sequences x; Z = E_M[Π_t G_t].
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .weights import FloatArray

State = tuple[int, ...]


class FeynmanKacModel(ABC):
    """A request's model. States are token tuples; the initial state s0 is the prompt."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of tokens."""

    def initial_state(self) -> State:
        """s0 (default: the empty sequence)."""
        return ()

    @abstractmethod
    def proposal_logprobs(self, state: State) -> FloatArray:
        """log M_t(·|state): the LM's normalised next-token log-probabilities, shape (vocab_size,)."""

    @abstractmethod
    def potential(self, state: State, token: int) -> float:
        """log G_t(state, state + (token,)); −inf for a hard-constraint violation."""

    def log_potentials(self, state: State) -> FloatArray:
        """log G_t for every next token (used by the masked proposal); override to vectorise."""
        return np.array([self.potential(state, t) for t in range(self.vocab_size)], dtype=np.float64)

    @abstractmethod
    def is_finished(self, state: State) -> bool:
        """True when ``state`` is in F (EOS-terminated) or at the length limit."""
