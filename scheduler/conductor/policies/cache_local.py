"""``cache_local``: prefix hits in each instance's own cache only."""

from __future__ import annotations

from smcserve.scheduler.conductor.policies.cache_global import CacheGlobalPolicy


class CacheLocalPolicy(CacheGlobalPolicy):
    """Prefix hits in each instance's own cache only: the Conductor's rule with no global hits."""

    name = "cache_local"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        return super().choose_prefill(req, instances, 0, cost)
