"""``round_robin``: prefill instances in turn."""

from __future__ import annotations

from smcserve.scheduler.conductor.policies.base import DecodeByLoad, no_cache_choice, require_instances


class RoundRobinPolicy(DecodeByLoad):
    """Prefill instances in turn; predicted TTFT ignores the cache."""

    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        require_instances(instances)
        inst = instances[self._next % len(instances)]
        self._next += 1
        return no_cache_choice(req, inst, cost)
