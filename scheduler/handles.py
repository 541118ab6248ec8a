"""The scheduler's handles on its workers: what it knows of each (load, KV reports, whether it is alive)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from smcserve.prefill.result import PrefillResult
from smcserve.protos import smcserve_pb2, worker_pb2_grpc


@dataclass(eq=False)  # handles are compared and hashed by identity
class PrefillHandle:
    worker_id: str
    actor: ray.actor.ActorHandle
    node_id: str = ""
    alive: bool = True  # answering; False from a failure until Ray has restarted it (out of placement meanwhile)
    restarts: int = 0  # times it was lost and came back
    queued: int = 0  # prefill calls sent and not yet answered
    served: int = 0
    queue_ms: float = 0.0  # predicted time to finish what it was sent
    local_blocks: set[str] = field(default_factory=set)  # the keys its own prefix cache holds, as it last said
    local_version: int = 0  # the worker's prefill count at that report

    def report(self, result: PrefillResult) -> None:
        """Take the worker's own account of its prefix cache; an older one (answers to concurrent calls
        may arrive out of order) is ignored."""
        if result.local_version > self.local_version:
            self.local_blocks, self.local_version = set(result.local_keys), result.local_version


@dataclass(eq=False)
class DecodeHandle:
    worker_id: str
    actor: ray.actor.ActorHandle
    address: str
    stub: worker_pb2_grpc.DecodeWorkerStub
    alive: bool = True  # reachable; False from a failure until Ray has restarted it (out of placement meanwhile)
    restarts: int = 0  # times it was lost and came back (at a new address)
    active: int = 0  # requests streaming from this worker
    incoming: int = 0  # admitted requests still in prefill that will decode here (predicted load)
    reserved_blocks: int = 0  # KV blocks (prompt + max_tokens) of the requests placed here, not yet finished
    # the worker's last Stats report (kv_blocks_total 0: none yet), and reserved_blocks when it came
    kv_blocks_total: int = 0
    kv_blocks_in_use: int = 0
    reserved_at_report: int = 0
    reported_at: float = -float("inf")  # time.monotonic() of that report
    kv_blocks_loaded: int = 0  # its cumulative KV-store loads at that report: blocks, and the time they took
    kv_load_ms: float = 0.0
    last_stats: smcserve_pb2.WorkerStats | None = None  # the whole last report (for /metrics)

    def report(self, stats: smcserve_pb2.WorkerStats) -> tuple[int, float] | None:
        """Take the worker's ``Stats``: its KV pool and the blocks sequences and particles hold. Returns the
        KV-store loads since the last report as one (blocks, ms) sample for the cost model; None when none."""
        self.last_stats = stats
        self.kv_blocks_total, self.kv_blocks_in_use = stats.kv_blocks_total, stats.kv_blocks_in_use
        self.reserved_at_report = self.reserved_blocks
        self.reported_at = time.monotonic()
        blocks, ms = stats.kv_blocks_loaded, stats.kv_load_ms
        if blocks < self.kv_blocks_loaded:  # counters that went back: a restarted worker, counting from 0
            self.kv_blocks_loaded, self.kv_load_ms = 0, 0.0
        load = (blocks - self.kv_blocks_loaded, ms - self.kv_load_ms)
        self.kv_blocks_loaded, self.kv_load_ms = blocks, ms
        return load if load[0] > 0 else None

    def free_blocks(self) -> int:
        """KV blocks a newly placed request can count on: the pool, less the blocks reserved for the
        requests placed here, less what other holders (SMC particles) held at the last report — the
        blocks in use then beyond the reservations then. Blocks held only by the worker's prefix cache
        count as free (it evicts them). No report yet: no limit (1 << 30)."""
        if not self.kv_blocks_total:
            return 1 << 30
        others = max(0, self.kv_blocks_in_use - self.reserved_at_report)
        return max(0, self.kv_blocks_total - others - self.reserved_blocks)
