"""``random``: a uniformly random prefill instance."""

from __future__ import annotations

import random as _random

from smcserve.scheduler.conductor.policies.base import DecodeByLoad, no_cache_choice, require_instances


class RandomPolicy(DecodeByLoad):
    """Uniformly random prefill instance (seeded); predicted TTFT ignores the cache."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = _random.Random(seed)

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        require_instances(instances)
        return no_cache_choice(req, instances[self._rng.randrange(len(instances))], cost)
