"""The Conductor's cost model: predicted prefill, KV load and decode-step times, and its fit.

:class:`CostModel` holds the coefficients and predicts; :meth:`CostModel.fit` fits them to measured
samples by non-negative least squares; :class:`CostRecorder` keeps a window of the live scheduler's
measurements and refits as they come.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np


@dataclass
class CostModel:
    """Predicted times in ms, fitted to measured engine timings (see :meth:`fit`).

    prefill_ms(new, cached) = a + b·new + c·new·(new + cached)   (GEMMs grow with new tokens, attention
    with new × context); load_ms(blocks) = d·blocks; tbt_ms(batch) = e + f·batch.
    """

    a: float = 5.0
    b: float = 1.0
    c: float = 0.0
    d: float = 0.5
    e: float = 20.0
    f: float = 2.0

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.a + self.b * new_tokens + self.c * new_tokens * (new_tokens + cached_tokens)

    def load_ms(self, blocks: int) -> float:
        return self.d * blocks

    def tbt_ms(self, batch: int) -> float:
        return self.e + self.f * batch

    # --- fitting --------------------------------------------------------------------------------
    MIN_PREFILL_SAMPLES = 6
    MIN_LOAD_SAMPLES = 2
    MIN_TBT_SAMPLES = 3

    @classmethod
    def fit(
        cls,
        prefill: Iterable[tuple[float, float, float]] | Mapping | None = (),
        load: Iterable[tuple[float, float]] = (),
        tbt: Iterable[tuple[float, float]] = (),
        *,
        base: CostModel | None = None,
    ) -> CostModel:
        """Non-negative least squares fit of the three parts to measured samples.

        ``prefill``: (new_tokens, cached_tokens, ms) → a, b, c; ``load``: (blocks, ms) → d;
        ``tbt``: (batch, ms) → e, f. ``prefill`` may instead be a mapping with the keys
        ``"prefill"``, ``"load"``, ``"tbt"`` (``fit(samples)``). A part with too few samples (or
        samples that cannot separate its coefficients) keeps the values of ``base`` (default: the
        class defaults). Coefficients are never negative (exact NNLS over the few columns).
        """
        if isinstance(prefill, Mapping):
            samples = prefill
            prefill, load, tbt = samples.get("prefill", ()), samples.get("load", ()), samples.get("tbt", ())
        out = replace(base) if base is not None else cls()
        pre = np.asarray(list(prefill or ()), dtype=float).reshape(-1, 3)
        pre = pre[pre[:, 0] > 0] if len(pre) else pre
        if len(pre) >= cls.MIN_PREFILL_SAMPLES:
            new, cached, ms = pre[:, 0], pre[:, 1], pre[:, 2]
            X = np.column_stack([np.ones_like(new), new, new * (new + cached)])
            coef = _nnls(X, ms)
            if coef is not None:
                out.a, out.b, out.c = (float(v) for v in coef)
        ld = np.asarray(list(load or ()), dtype=float).reshape(-1, 2)
        ld = ld[ld[:, 0] > 0] if len(ld) else ld
        if len(ld) >= cls.MIN_LOAD_SAMPLES:
            x, y = ld[:, 0], ld[:, 1]
            out.d = float(max(0.0, (x @ y) / (x @ x)))
        tb = np.asarray(list(tbt or ()), dtype=float).reshape(-1, 2)
        if len(tb) >= cls.MIN_TBT_SAMPLES:
            coef = _nnls(np.column_stack([np.ones(len(tb)), tb[:, 0]]), tb[:, 1])
            if coef is not None:
                out.e, out.f = (float(v) for v in coef)
        return out

    def refit(self, prefill=(), load=(), tbt=()) -> CostModel:
        """:meth:`fit` with this model as the fallback for parts with too few samples."""
        return type(self).fit(prefill, load, tbt, base=self)


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """min ‖Xβ − y‖ subject to β ≥ 0, exactly, for a handful of columns: least squares on every
    subset of columns (the others held at 0), keep the best feasible one. ``None`` when the columns
    cannot be told apart (rank-deficient samples)."""
    n, k = X.shape
    scale = np.linalg.norm(X, axis=0)
    if np.any(scale == 0):
        scale = np.where(scale == 0, 1.0, scale)
    Xs = X / scale
    if np.linalg.matrix_rank(Xs, tol=1e-9) < k:
        return None
    best, best_res = np.zeros(k), float(y @ y)
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sol, *_ = np.linalg.lstsq(Xs[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            beta = np.zeros(k)
            beta[list(cols)] = sol
            res = float(np.sum((Xs @ beta - y) ** 2))
            if res < best_res - 1e-12 * max(1.0, best_res):
                best, best_res = beta, res
    return best / scale


class CostRecorder:
    """Keeps the last ``window`` measured samples of each kind and refits the cost model every
    ``refit_every`` samples (of any kind). The live scheduler feeds it; ``model`` is always usable."""

    def __init__(self, model: CostModel | None = None, window: int = 512, refit_every: int = 32):
        self.model = model if model is not None else CostModel()
        self.refit_every = max(1, int(refit_every))
        self.prefill: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.load: deque[tuple[float, float]] = deque(maxlen=window)
        self.tbt: deque[tuple[float, float]] = deque(maxlen=window)
        self._since = 0
        self.refits = 0
        self._lock = threading.Lock()

    def add_prefill(self, new_tokens: int, cached_tokens: int, ms: float) -> None:
        self._add(self.prefill, (float(new_tokens), float(cached_tokens), float(ms)))

    def add_load(self, blocks: int, ms: float) -> None:
        self._add(self.load, (float(blocks), float(ms)))

    def add_tbt(self, batch: int, ms: float) -> None:
        self._add(self.tbt, (float(batch), float(ms)))

    def _add(self, buf: deque, sample: tuple) -> None:
        with self._lock:
            buf.append(sample)
            self._since += 1
            if self._since >= self.refit_every:
                self._refit_locked()

    def refit(self) -> CostModel:
        with self._lock:
            return self._refit_locked()

    def _refit_locked(self) -> CostModel:
        self._since = 0
        self.refits += 1
        self.model = self.model.refit(list(self.prefill), list(self.load), list(self.tbt))
        return self.model
