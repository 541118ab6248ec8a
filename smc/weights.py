"""Log-space weight helpers: stable sums, normalisation, effective sample size.

Log weights may be -inf (a zero weight); NaN and +inf are rejected with ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


class AllWeightsZero(ValueError):
    """Raised where a weighted operation needs at least one non-zero weight."""


def as_log_weights(logw: ArrayLike) -> FloatArray:
    """``logw`` as a float64 array; rejects NaN and +inf."""
    a = np.asarray(logw, dtype=np.float64)
    if not (a < math.inf).all():  # one pass: False for NaN and +inf
        raise ValueError("log weights contain " + ("NaN" if np.isnan(a).any() else "+inf"))
    return a


def logsumexp(logw: ArrayLike) -> float:
    """log Σ exp(logw); -inf for an empty array or all -inf."""
    a = as_log_weights(logw).ravel()
    if a.size == 0:
        return -math.inf
    m = float(a.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(a - m).sum()))


def log_mean_exp(logw: ArrayLike) -> float:
    """log((1/n) Σ exp(logw)); -inf when every weight is zero."""
    a = as_log_weights(logw).ravel()
    if a.size == 0:
        raise ValueError("log_mean_exp of an empty array")
    return logsumexp(a) - math.log(a.size)


def normalize(logw: ArrayLike) -> FloatArray:
    """Probabilities exp(logw)/Σexp(logw) (summing to 1).

    All weights zero → an all-zero array (no NaN); callers check ``p.sum() == 0``.
    """
    a = as_log_weights(logw)
    lse = logsumexp(a)
    if lse == -math.inf:
        return np.zeros(a.shape, dtype=np.float64)
    p = np.exp(a - lse)
    return p / p.sum()


def ess(logw: ArrayLike) -> float:
    """Effective sample size (Σw)²/Σw², computed in log space; 0 when all weights are zero."""
    a = as_log_weights(logw).ravel()
    lse = logsumexp(a)
    if lse == -math.inf:
        return 0.0
    return math.exp(2.0 * lse - logsumexp(2.0 * a))
