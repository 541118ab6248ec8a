"""The potential interface: the ``Potential`` ABC, what every potential promises, and the helpers the
server calls on a particle's potentials (``combined_mask``, ``combined_log_factor``,
``companion_prompts``, ``clone_all``, ``advance_all``, ``finish_all``), plus ``scaled`` (weights) and
``PotentialError`` (invalid specs).

Per particle and step the server calls, in this order::

    m = combined_mask(pots)          # None, or bool [vocab.size]: the allowed next tokens
    f = combined_log_factor(pots, companion_logps)   # None, or float64 [vocab.size]: log φ(x)
    ...sample token from p0·φ restricted to m, renormalised (weight *= Σ_{x in m} p0(x)·φ(x))...
    logw += sum(p.advance(token) for p in pots)   # also for EOS
    ...and once at the end (EOS sampled or max tokens hit): logw += sum(p.finish() for p in pots)

Companion prompts (optional; prompt_intersection uses them, a potential whose factor is another
prompted LM): ``prompts()`` lists extra prompts (token ids) whose next-token log-probabilities the
potential needs. The worker runs each as a companion sequence that shares the particle's generated
tokens (its KV: the prompt + the generated tokens) and, each step, hands the potential the
log-softmax of each of its prompts' logits at the request's temperature, in the order ``prompts()``
gave them; ``log_factor(logps)`` turns them into a vocabulary-wide log factor log φ(x) (for
prompt_intersection: weight · Σ_i log p_i(x)). The proposal multiplies φ into the LM's distribution
before masking, so the increment is log Σ_x p0(x)·φ(x)·mask(x): φ's share of G_t is paid through the
proposal's mass, and ``advance`` must not count it again. A potential with a factor must return the
same ``prompts()`` for every particle of a request (they come from its spec).

Contract of every built-in potential (``tests/test_potential_contract.py`` checks it):

* ``mask()`` is a superset of the tokens with G > 0 and allows EOS exactly when ending now is
  acceptable (regex/cfg/json_schema: a full match; required_phrases: every phrase seen). It is
  exact for every built-in except forbidden_chars, whose static mask cannot see a forbidden
  non-ASCII character assembled from partial-UTF-8 tokens (``advance`` catches it). Masks are CPU
  bool tensors, cached and shared: treat them as read-only (``combined_mask`` returns a fresh
  one). A particle that already violated a constraint gets an EOS-only mask.
* ``advance(token)`` returns ``weight · log G_t``: 0.0 or −inf for the hard built-ins; never NaN.
* ``finish()`` returns ``weight · log G`` of the end (−inf: unmatched regex, missing phrase); it may
  be called after ``advance(EOS)`` and does not count anything twice.
* ``weight`` is the exponent: 0 disables a potential (mask None, log G 0); any weight > 0 leaves a
  0/1 potential unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

NEG_INF = -math.inf


class PotentialError(ValueError):
    """An invalid potential spec; the message starts with the offending field's path."""


def scaled(weight: float, log_g: float) -> float:
    """``weight · log_g`` with G^0 = 1 (so 0·(−inf) = 0, never NaN)."""
    if log_g == 0.0 or weight == 0.0:
        return 0.0
    return log_g if weight == 1.0 else weight * log_g


class Potential(ABC):
    """One particle's potential: a next-token mask (hard part) and log G_t increments.

    Subclasses implement ``_mask``/``_advance``/``_finish`` (unweighted) and ``clone``; the public
    methods apply ``weight``. Plugins may instead override the public methods directly.
    """

    __slots__ = ()
    weight: float = 1.0

    @abstractmethod
    def clone(self) -> Potential:
        """An independent copy for a forked particle (cheap)."""

    def mask(self) -> torch.Tensor | None:
        """bool [vocab.size] of allowed next tokens, or None (no hard constraint on the next token)."""
        if self.weight == 0.0:
            return None
        return self._mask()

    def advance(self, token: int) -> float:
        """Consume the sampled token; return weight · log G_t (0.0 neutral, −inf violated)."""
        return scaled(self.weight, self._advance(token))

    def finish(self) -> float:
        """weight · log G at the end (EOS sampled or max tokens hit)."""
        return scaled(self.weight, self._finish())

    def prompts(self) -> Sequence[Sequence[int]]:
        """Token ids of the extra prompts whose next-token log-probabilities ``log_factor`` needs
        (default: none). Fixed by the spec: the same for every particle and step."""
        return ()

    def log_factor(self, logps: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A vocabulary-wide log factor log φ(x) (float64 [vocab]) that the proposal multiplies into the
        LM's next-token distribution, from ``logps``: the next-token log-probabilities under each of
        ``prompts()`` (same order) after the particle's generated tokens. Default: None (no factor)."""
        return None

    def _mask(self) -> torch.Tensor | None:
        return None

    def _advance(self, token: int) -> float:
        return 0.0

    def _finish(self) -> float:
        return 0.0


_SLOT_NAMES: dict[type, tuple[str, ...]] = {}


def _shallow_copy(obj: Any) -> Any:
    """A shallow copy (all built-in potential state is immutable or shared read-only); ~1 µs."""
    cls = type(obj)
    names = _SLOT_NAMES.get(cls)
    if names is None:
        seen: list[str] = []
        for k in cls.__mro__:
            slots = getattr(k, "__slots__", ())
            for n in (slots,) if isinstance(slots, str) else slots:
                if n not in seen and n not in ("__dict__", "__weakref__"):
                    seen.append(n)
        names = _SLOT_NAMES[cls] = tuple(seen)
    c = object.__new__(cls)
    for n in names:
        try:
            object.__setattr__(c, n, getattr(obj, n))
        except AttributeError:
            pass
    d = getattr(obj, "__dict__", None)
    if d:
        c.__dict__.update(d)
    return c


def combined_mask(potentials: Iterable[Potential]) -> torch.Tensor | None:
    """AND of the potentials' masks (a fresh CPU tensor), or None when none constrains the next token.

    Done in numpy: torch's intra-op thread pool makes element-wise ops on a 50k-element tensor
    100-1000x slower when the CPU is oversubscribed (measured: 2 ms vs 3 µs per clone)."""
    masks = [m for m in (p.mask() for p in potentials) if m is not None]
    if not masks:
        return None
    if any(m.device.type != "cpu" for m in masks):  # plugin masks on an accelerator
        out = masks[0].to(torch.bool, copy=True)
        for m in masks[1:]:
            out &= m.to(out.device, torch.bool)
        return out
    out_np = masks[0].numpy().astype(np.bool_, copy=True)
    for m in masks[1:]:
        np.logical_and(out_np, m.numpy(), out=out_np)
    return torch.from_numpy(out_np)


def _prompts(p: Potential) -> Sequence[Sequence[int]]:
    """``p.prompts()``; () for a plugin that is no ``Potential`` subclass and does not define it."""
    f = getattr(p, "prompts", None)
    return () if f is None else f()


def companion_prompts(potentials: Iterable[Potential]) -> list[list[int]]:
    """Every potential's ``prompts()``, in order: the companion sequences a particle runs under."""
    return [list(q) for p in potentials for q in _prompts(p)]


def combined_log_factor(potentials: Iterable[Potential], logps: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Σ of the potentials' ``log_factor``s (float64), or None when none has one. ``logps`` holds the
    next-token log-probabilities under ``companion_prompts(potentials)``, in that order; each
    potential gets the slice for its own prompts."""
    counts = [(p, len(_prompts(p))) for p in potentials]
    if sum(n for _, n in counts) != len(logps):
        raise ValueError(f"{len(logps)} companion log-probabilities for {sum(n for _, n in counts)} prompts")
    total, start = None, 0
    for p, n in counts:
        factor = getattr(p, "log_factor", None)
        f = None if factor is None else factor(logps[start : start + n])
        start += n
        if f is not None:
            f = f.double()
            total = f if total is None else total + f
    return total


def clone_all(potentials: Sequence[Potential]) -> list[Potential]:
    return [p.clone() for p in potentials]


def _checked(total: float, what: str) -> float:
    if math.isnan(total) or total == math.inf:
        raise ValueError(f"potential {what} returned {total}")
    return total


def advance_all(potentials: Iterable[Potential], token: int) -> float:
    """Σ advance(token): the particle's log-weight increment from its potentials."""
    return _checked(math.fsum(p.advance(token) for p in potentials), "advance")


def finish_all(potentials: Iterable[Potential]) -> float:
    """Σ finish(): the particle's final log-weight increment from its potentials."""
    return _checked(math.fsum(p.finish() for p in potentials), "finish")
