"""Standard resampling schemes: multinomial, stratified, systematic, residual.

Each scheme takes normalised weights ``p`` (non-negative, at least one positive) and returns exactly
``n`` ancestor indices; a zero-weight index is never returned. Every scheme is unbiased:
E[#copies of j] = n·p_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .weights import AllWeightsZero, FloatArray, as_log_weights, logsumexp, normalize

IntArray = NDArray[np.int64]
Scheme = Literal["multinomial", "stratified", "systematic", "residual"]
SCHEMES: tuple[Scheme, ...] = ("multinomial", "stratified", "systematic", "residual")


def _check_probs(p: ArrayLike) -> FloatArray:
    q = np.asarray(p, dtype=np.float64).ravel()
    if q.size == 0 or not np.isfinite(q).all() or (q < 0).any():
        raise ValueError("weights must be a non-empty array of finite non-negative numbers")
    if not (q > 0).any():
        raise AllWeightsZero("cannot resample: every weight is zero")
    return q


def inverse_cdf(p: ArrayLike, u: ArrayLike) -> IntArray:
    """Index j with cdf[j-1] <= u < cdf[j] for each u in [0, 1) (``p`` need not sum to 1).

    Zero-weight indices are never returned, also when float rounding puts u at 1.
    """
    q = _check_probs(p)
    cdf = np.cumsum(q)
    cdf /= cdf[-1]  # cdf[-1] == 1.0 exactly; zero weights give repeated values, never picked
    idx = np.searchsorted(cdf, np.asarray(u, dtype=np.float64), side="right")
    last_positive = int(np.flatnonzero(q > 0)[-1])
    return np.minimum(idx, last_positive).astype(np.int64)


def multinomial(p: ArrayLike, n: int, rng: np.random.Generator) -> IntArray:
    """n i.i.d. draws from p (returned sorted)."""
    return inverse_cdf(p, np.sort(rng.random(n)))


def stratified(p: ArrayLike, n: int, rng: np.random.Generator) -> IntArray:
    """One uniform draw in each stratum [i/n, (i+1)/n)."""
    return inverse_cdf(p, (np.arange(n) + rng.random(n)) / n)


def systematic(p: ArrayLike, n: int, rng: np.random.Generator) -> IntArray:
    """A single uniform offset shared by the n evenly spaced points."""
    return inverse_cdf(p, (np.arange(n) + rng.random()) / n)


def residual(p: ArrayLike, n: int, rng: np.random.Generator) -> IntArray:
    """floor(n·p_j) copies of j, the remaining slots multinomially from the residuals."""
    q = _check_probs(p)
    q = q / q.sum()
    counts = np.floor(n * q).astype(np.int64)
    while counts.sum() > n:  # float guard; never triggers for sane inputs
        counts[int(np.argmax(counts))] -= 1
    rest = n - int(counts.sum())
    det = np.repeat(np.arange(q.size, dtype=np.int64), counts)
    if rest == 0:
        return det
    resid = np.clip(n * q - counts, 0.0, None)
    resid[q == 0] = 0.0
    if not (resid > 0).any():  # float guard
        resid = q
    return np.sort(np.concatenate([det, multinomial(resid, rest, rng)]))


_FUNCS: dict[str, Callable[[ArrayLike, int, np.random.Generator], IntArray]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def resample(scheme: Scheme, logw: ArrayLike, n: int, rng: np.random.Generator) -> tuple[IntArray, FloatArray]:
    """Resample n ancestors from log weights; every survivor gets log weight log(Σw / n).

    The total weight Σw is preserved, so log Ẑ = logsumexp(logw) − log n stays unbiased.
    Raises ``AllWeightsZero`` when every weight is zero.
    """
    if scheme not in _FUNCS:
        raise ValueError(f"unknown resampling scheme {scheme!r}; expected one of {SCHEMES}")
    a = as_log_weights(logw)
    p = normalize(a)
    ancestors = _FUNCS[scheme](p, n, rng)
    new_logw = np.full(n, logsumexp(a) - math.log(n))
    return ancestors, new_logw
