"""``load``: the prefill instance with the shortest predicted queue."""

from __future__ import annotations

from smcserve.scheduler.conductor.policies.base import DecodeByLoad, no_cache_choice, require_instances


class LoadPolicy(DecodeByLoad):
    """Shortest predicted queue; TTFT predicted without cache hits: queue + prefill(all tokens)."""

    name = "load"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        require_instances(instances)
        inst = min(instances, key=lambda p: p.queue_ms)  # first of equals
        return no_cache_choice(req, inst, cost)
