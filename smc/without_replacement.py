"""Without-replacement resampling of SMC steering (Lew et al. 2023, Algorithm 4).

The steps, with the weights written correctly (N particles, N′ candidates, ŵ normalised):

1. every unfinished particle proposes K children, each with its log-weight increment; a finished
   or dead particle is carried as one candidate (K_i = 1), so N′ = Σ_i K_i;
2. candidate weights: a carried parent w·N′/N, a child w·G·N′/(K·N);
3. c* = inf{c > 0 : Σ min(1, c·ŵ) > N} (exact, ``find_c_star``);
4. I_det = {c*·ŵ ≥ 1} survive deterministically with weight w·N/N′;
5. N − |I_det| of the others survive by a systematic sweep (P(keep j) = c*·ŵ_j);
6. each of those gets (N/N′)·Σ_{I_stoch} w / (N − |I_det|) = (N/N′)·Σw/c*.

Two layers:

* ``resample_without_replacement(cand_logw, n, rng)``: steps 3–6 on N′ candidate log weights that
  already include the N′/N (carried) or N′/(K·N) (child) factors.
* ``steer_resample(parent_logw, carried, child_log_incr, rng)``: steps 1–6 for a driver. It takes the
  N parents' log weights, which parents are carried with K_i = 1 (finished, or dead), and the (N, K)
  children's log-weight increments log G_t (plus any proposal correction); it returns, for each
  of the N survivors, its parent, its child slot (−1 = the carried parent) and its log weight.

Exactly N survivors always. Zero-weight candidates are never selected; when at most N candidates
have non-zero weight, all of them are kept deterministically (weight × N/N′) and the remaining
slots are filled with zero-weight ("dead", log weight −inf) candidates. This keeps the total weight
Σ_new w = (N/N′)·Σ_candidates w *exactly* (not only in expectation), so Ẑ stays unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .resampling import IntArray
from .weights import FloatArray, as_log_weights, logsumexp

OK = "ok"
ALL_ZERO = "all_zero"


@dataclass(frozen=True)
class CStar:
    """c* = inf{c > 0 : Σ min(1, c·ŵ) > n} and the split it induces."""

    c: float  # math.inf when at most n candidates have non-zero weight
    det: IntArray  # I_det = {c*·ŵ ≥ 1}, by decreasing ŵ
    stoch: IntArray  # I_stoch: the other non-zero candidates, in input order


def find_c_star(w_hat: ArrayLike, n: int) -> CStar:
    """Exact c* by sort and scan (not llamppl's ``find_c``, which undershoots c*).

    With ŵ sorted decreasingly and T_d = Σ_{i≥d} ŵ_(i), c* = (n − d)/T_d for the smallest d with
    (n − d)·ŵ_(d) ≤ T_d (i.e. the largest unsaturated weight has c*·ŵ ≤ 1); such d < n exists
    whenever more than n weights are positive, and then the top d are exactly those with c*·ŵ > 1.
    A weight with c*·ŵ == 1 exactly lands in I_stoch, where the sweep keeps it with probability 1.
    """
    w = np.asarray(w_hat, dtype=np.float64).ravel()
    if n < 1:
        raise ValueError("n must be >= 1")
    positive = np.flatnonzero(w > 0)
    if positive.size <= n:
        return CStar(math.inf, positive.astype(np.int64), np.empty(0, dtype=np.int64))
    order = positive[np.argsort(-w[positive], kind="stable")]
    s = w[order]
    tail = np.cumsum(s[::-1])[::-1]  # tail[d] = Σ_{i≥d} s[i], summed small to large
    d_range = np.arange(n)
    ok = (n - d_range) * s[:n] <= tail[:n]
    d = int(np.argmax(ok))  # ok[n-1] is always True (s[n] > 0)
    det = order[:d]
    stoch = np.sort(order[d:])
    return CStar((n - d) / float(tail[d]), det.astype(np.int64), stoch.astype(np.int64))


@dataclass(frozen=True)
class WRResample:
    """The result of one without-replacement resampling step."""

    ancestors: IntArray  # n candidate indices: I_det, then stochastic survivors, then dead slots
    log_weights: FloatArray  # n log weights (−inf for dead slots)
    c_star: float
    n_det: int
    n_stoch: int
    status: str  # OK, or ALL_ZERO when every candidate weight is zero


def _sweep(w_stoch: FloatArray, m: int, rng: np.random.Generator) -> IntArray:
    """Keep exactly m of the (positive) stochastic weights; P(keep j) = ŵ_j / α.

    Vectorised form of "U ~ Uniform[0, α); U −= ŵ_j; if U < 0: keep j, U += α": j is kept for
    every point U + r·α (r = 0..m−1) with cum[j−1] ≤ U + r·α < cum[j].
    """
    cum = np.cumsum(w_stoch)
    alpha = float(cum[-1]) / m
    points = rng.random() * alpha + alpha * np.arange(m)
    picked = np.minimum(np.searchsorted(cum, points, side="right"), w_stoch.size - 1)
    picked = np.unique(picked)
    if picked.size < m:  # float drift only (needs ŵ_j within rounding of α): fill largest first
        rest = np.setdiff1d(np.arange(w_stoch.size), picked)
        rest = rest[np.argsort(-w_stoch[rest], kind="stable")][: m - picked.size]
        picked = np.sort(np.concatenate([picked, rest]))
    return picked.astype(np.int64)


def resample_without_replacement(cand_logw: ArrayLike, n: int, rng: np.random.Generator) -> WRResample:
    """Steps 3–6: resample n of the N′ = len(cand_logw) candidates without replacement.

    I_det keeps weight w·N/N′; each stochastic survivor gets (N/N′)·α·Σ_all w
    (= (N/N′)·Σ_{I_stoch} w / (N − |I_det|)). All weights zero → status ALL_ZERO, all −inf.
    """
    a = as_log_weights(cand_logw).ravel()
    n_prime = a.size
    if n_prime == 0 or n < 1:
        raise ValueError("need at least one candidate and n >= 1")
    log_ratio = math.log(n) - math.log(n_prime)
    total = logsumexp(a)
    if total == -math.inf:
        anc = np.arange(n, dtype=np.int64) % n_prime
        return WRResample(anc, np.full(n, -math.inf), math.inf, 0, 0, ALL_ZERO)
    w_hat = np.exp(a - total)
    split = find_c_star(w_hat, n)
    det, stoch = split.det, split.stoch
    m = n - det.size
    if stoch.size and m > 0:
        kept = stoch[_sweep(w_hat[stoch], m, rng)]
        stoch_logw = logsumexp(a[stoch]) - math.log(m) + log_ratio
    else:
        kept = np.empty(0, dtype=np.int64)
        stoch_logw = -math.inf
    n_dead = n - det.size - kept.size
    dead = np.empty(0, dtype=np.int64)
    if n_dead:  # only when at most n candidates are non-zero: fill with zero-weight candidates
        zeros = np.flatnonzero(a == -math.inf)
        dead = zeros[np.arange(n_dead) % zeros.size] if zeros.size else np.resize(det, n_dead)
    ancestors = np.concatenate([det, kept, dead]).astype(np.int64)
    log_weights = np.concatenate([a[det] + log_ratio, np.full(kept.size, stoch_logw), np.full(n_dead, -math.inf)])
    return WRResample(ancestors, log_weights, split.c, int(det.size), int(kept.size), OK)


@dataclass(frozen=True)
class Candidates:
    """Step 1–2: the N′ candidates of one SMC-steering step."""

    log_weights: FloatArray  # length N′, including the N′/N or N′/(K·N) factor
    parent: IntArray  # parent particle of each candidate
    child: IntArray  # child slot k in [0, K), or −1 for a carried parent
    n_prime: int


def steer_candidates(parent_logw: ArrayLike, carried: ArrayLike, child_log_incr: ArrayLike) -> Candidates:
    """Carried parents (K_i = 1) get w·N′/N; each of an active parent's K children w·G·N′/(K·N).

    ``child_log_incr`` has shape (N, K); rows of carried parents are ignored.
    """
    lw = as_log_weights(parent_logw).ravel()
    car = np.asarray(carried, dtype=bool).ravel()
    incr = np.asarray(child_log_incr, dtype=np.float64)
    n = lw.size
    if incr.ndim != 2 or incr.shape[0] != n or incr.shape[1] < 1 or car.size != n:
        raise ValueError("child_log_incr must have shape (N, K) with K >= 1, carried shape (N,)")
    k = incr.shape[1]
    as_log_weights(incr[~car])  # rejects NaN / +inf in the rows that are used
    k_i = np.where(car, 1, k)
    n_prime = int(k_i.sum())
    parent = np.repeat(np.arange(n, dtype=np.int64), k_i)
    offsets = np.concatenate([[0], np.cumsum(k_i)[:-1]])
    child = np.arange(n_prime, dtype=np.int64) - offsets[parent]
    is_car = car[parent]
    child[is_car] = -1
    child_incr = incr[parent, np.where(is_car, 0, child)] + math.log(n_prime) - math.log(k * n)
    logw = lw[parent] + np.where(is_car, math.log(n_prime) - math.log(n), child_incr)
    return Candidates(logw, parent, child, n_prime)


@dataclass(frozen=True)
class SteerStep:
    """One full step of Algorithm 4's resampling, indexed by the N survivors."""

    parent: IntArray
    child: IntArray  # −1: the carried parent itself
    log_weights: FloatArray
    c_star: float
    n_det: int
    n_prime: int
    status: str  # OK or ALL_ZERO


def steer_resample(
    parent_logw: ArrayLike, carried: ArrayLike, child_log_incr: ArrayLike, rng: np.random.Generator
) -> SteerStep:
    """Build the N′ candidates and resample N = len(parent_logw) of them without replacement."""
    cand = steer_candidates(parent_logw, carried, child_log_incr)
    n = int(np.asarray(parent_logw).size)
    res = resample_without_replacement(cand.log_weights, n, rng)
    return SteerStep(
        cand.parent[res.ancestors],
        cand.child[res.ancestors],
        res.log_weights,
        res.c_star,
        res.n_det,
        cand.n_prime,
        res.status,
    )
