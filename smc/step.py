"""One SMC step after the children are proposed: reweight, resample, carry, mark finished and dead.

Shared by the reference driver (``smc.driver``) and the served coordinator
(``scheduler.steering.SteeringRun``): both hand over the population's log weights, which particles
were not extended (finished or dead: carried unchanged), the children's log-weight increments and
which children finished, and get back, for each of the N new particles, where it came from.

* ``without_replacement`` (Algorithm 4): the N′ candidates are resampled down to N every step.
* standard schemes (K = 1): weights are updated in place; the population is resampled when
  ESS < threshold·N (always at threshold ≥ 1), but never once every live particle has finished
  (it would not change Ẑ).
Dead particles (log weight −inf) count as finished: they are never extended again. When every
weight is zero the step reports ``ALL_VIOLATED``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from smcserve.engine.finish import FinishReason

from .resampling import IntArray, resample
from .weights import FloatArray, as_log_weights, ess
from .without_replacement import ALL_ZERO, steer_resample

OK = "ok"
ALL_VIOLATED = "all particles violated the constraints"
WITHOUT_REPLACEMENT = "without_replacement"
# how a particle ended: EOS, max tokens, ruled out
STOP, LENGTH, VIOLATED = FinishReason.STOP, FinishReason.LENGTH, FinishReason.VIOLATED


@dataclass(frozen=True)
class StepOutcome:
    """The new population, indexed by its N slots."""

    parent: IntArray  # index into the previous population
    child: IntArray  # the parent's child slot, or −1: the parent carried unchanged
    log_weights: FloatArray
    finished: np.ndarray  # bool: finished or dead (never extended again)
    resampled: bool
    status: str  # OK or ALL_VIOLATED
    ess_ratio: float = math.nan  # ESS / population size of the weights the resampling decision saw


def smc_step(
    log_weights: FloatArray,
    carried: np.ndarray,
    incr: FloatArray,
    child_finished: np.ndarray,
    scheme: str,
    ess_threshold: float,
    rng: np.random.Generator,
) -> StepOutcome:
    """``incr`` and ``child_finished`` have shape (N, K) (K = 1 for standard schemes); rows of carried
    particles are ignored."""
    logw = np.asarray(log_weights, dtype=np.float64)
    carried = np.asarray(carried, dtype=bool)
    incr = np.asarray(incr, dtype=np.float64)
    n, k = incr.shape
    as_log_weights(incr[~carried])  # NaN or +inf is a bug upstream: raise here, not deep in resampling
    if scheme == WITHOUT_REPLACEMENT:
        st = steer_resample(logw, carried, incr, rng)
        if st.status == ALL_ZERO:
            return _all_dead(carried, n, resampled=True)
        parent, child, new_logw, resampled = st.parent, st.child, np.asarray(st.log_weights), True
        cand = (logw[:, None] + np.where(carried[:, None], np.r_[0.0, np.full(k - 1, -math.inf)], incr)).ravel()
        ess_ratio = float(ess(cand)) / max(1, int((cand > -math.inf).sum()))
    else:
        if k != 1:
            raise ValueError(f"scheme {scheme!r} extends each particle once (K = 1), got K = {k}")
        parent = np.arange(n, dtype=np.int64)
        child = np.where(carried, -1, 0).astype(np.int64)
        new_logw = logw + np.where(carried, 0.0, incr[:, 0])
        resampled = False
        ess_ratio = math.nan
    finished = np.where(child >= 0, np.asarray(child_finished, dtype=bool)[parent, np.maximum(child, 0)], True)
    finished |= new_logw == -math.inf
    if not (new_logw > -math.inf).any():
        return _all_dead(carried, n, resampled)
    if (
        scheme != WITHOUT_REPLACEMENT
        and not finished.all()
        and (ess_threshold >= 1.0 or ess(new_logw) < ess_threshold * n)
    ):
        ess_ratio = float(ess(new_logw)) / n
        anc, new_logw = resample(scheme, new_logw, n, rng)
        parent, child, finished, resampled = parent[anc], child[anc], finished[anc], True
    return StepOutcome(parent, child, new_logw, finished, resampled, OK, ess_ratio)


def _all_dead(carried: np.ndarray, n: int, resampled: bool) -> StepOutcome:
    """Every weight is zero: keep each slot's own (first) child so its tokens show how it died."""
    return StepOutcome(
        np.arange(n, dtype=np.int64),
        np.where(carried, -1, 0).astype(np.int64),
        np.full(n, -math.inf),
        np.ones(n, dtype=bool),
        resampled,
        ALL_VIOLATED,
    )
