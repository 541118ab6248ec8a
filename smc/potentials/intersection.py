"""prompt_intersection: a potential whose factor is the same LM under other prompts.

With the request's prompt P and prompts Q_1..Q_m at weight w, the target is

    Π_t p(y_t | P, y<t) · Π_i p(y_t | Q_i, y<t)^w · (the other potentials' G)

so the potential's next-token factor is φ(x) = Π_i p(x | Q_i, y<t)^w, known over the whole vocabulary
before the token is drawn. It is multiplied into the proposal (``log_factor``) and paid through the
proposal's mass, so ``advance`` and ``finish`` add nothing and there is no mask. The prompts travel
as token ids (``spec.prompt_ids``): the scheduler tokenises ``spec.prompts`` the way it tokenised the
request's own input (raw or chat template), which a potential cannot know.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..vocab import Vocab
from .interface import Potential, PotentialError, _shallow_copy
from .spec import PotentialSpec, _strings


class PromptIntersection(Potential):
    """φ(x) = Π_i p(x | Q_i, y<t)^weight over the prompts ``prompt_ids``; stateless per particle."""

    __slots__ = ("prompt_ids", "weight")

    def __init__(self, prompt_ids: Sequence[Sequence[int]], weight: float = 1.0):
        self.prompt_ids = tuple(tuple(int(t) for t in q) for q in prompt_ids)
        self.weight = weight

    def clone(self) -> PromptIntersection:
        return _shallow_copy(self)

    def prompts(self) -> Sequence[Sequence[int]]:
        return self.prompt_ids if self.weight != 0.0 else ()

    def log_factor(self, logps: Sequence[torch.Tensor]) -> torch.Tensor | None:
        if self.weight == 0.0:
            return None
        total = logps[0].double()
        for lp in logps[1:]:
            total = total + lp.double()
        return total if self.weight == 1.0 else self.weight * total


def _build_prompt_intersection(spec: PotentialSpec, vocab: Vocab, where: str) -> PromptIntersection:
    if spec.prompts is not None:
        _strings(spec, "prompts", where)
    ids = spec.prompt_ids
    if ids is None:
        raise PotentialError(f"{where}.prompt_ids: required for '{spec.kind}' (the scheduler tokenises prompts)")
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise PotentialError(f"{where}.prompt_ids: must be a non-empty list of token id lists")
    if spec.prompts is not None and len(spec.prompts) != len(ids):
        raise PotentialError(f"{where}.prompt_ids: {len(ids)} for {len(spec.prompts)} prompts")
    for j, q in enumerate(ids):
        if isinstance(q, (str, bytes)) or not isinstance(q, Sequence) or not q:
            raise PotentialError(f"{where}.prompt_ids[{j}]: must be a non-empty list of token ids")
        for t in q:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab.size:
                raise PotentialError(f"{where}.prompt_ids[{j}]: token id {t!r} is not in [0, {vocab.size})")
    return PromptIntersection(ids, spec.weight)
