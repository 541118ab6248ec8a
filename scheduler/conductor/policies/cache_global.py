"""``cache_global`` (the Conductor, the default): prefix hits anywhere in the global KV store, paying
the transfer time of the blocks the instance lacks."""

from __future__ import annotations

from smcserve.scheduler.conductor.policies.base import (
    DecodeByLoad,
    PrefillChoice,
    predict_ttft_ms,
    prefix_hits,
    require_instances,
)


class CacheGlobalPolicy(DecodeByLoad):
    """The Conductor: local hits L_i, global hits G; blocks [L_i, G) are fetched at load_ms(G − L_i);
    TTFT_i = queue_i + prefill(beyond G, cached) + load. Pick the minimum."""

    name = "cache_global"

    def choose_prefill(self, req, instances, global_hit_blocks, cost):
        require_instances(instances)
        best = None
        for inst in instances:
            local = prefix_hits(req.block_keys, inst.local_blocks)
            g = max(int(global_hit_blocks), local)
            ttft, cached = predict_ttft_ms(req, inst, g, g - local, cost)
            if best is None or ttft < best.ttft_ms:
                best = PrefillChoice(inst, ttft, cached, local_hit_blocks=local, load_blocks=g - local)
        return best
