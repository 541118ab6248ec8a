"""The scheduler's Prometheus metrics (``GET /metrics``), named after vLLM's where the meaning is the same.

Request-level series are recorded as responses pass through :meth:`SchedulerService.Generate`, so gRPC
and HTTP requests count alike. Worker-level series (``worker`` label) are read at scrape time from the
workers' latest ``Stats`` (:class:`WorkerCollector`), pulled over the worker gRPC just before the scrape.
Each service has a registry of its own (several servers in one process stay apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "smcserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; after vLLM's buckets, extended down for a small CPU model's fast tokens
_TTFT = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_ESS = tuple(i / 10 for i in range(1, 11))


class Metrics:
    """Counters, gauges and histograms of one scheduler; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token", buckets=_TTFT, registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Time between tokens", buckets=_ITL, registry=r)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "End-to-end request latency", buckets=_E2E, registry=r)
        self.queue = Histogram(
            f"{p}request_queue_time_seconds",
            "Time from arrival to admission (validation, waiting for a worker, placement)",
            buckets=_E2E,
            registry=r,
        )
        self.running = Gauge(f"{p}num_requests_running", "Requests admitted and not finished", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests received and not yet admitted", registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens (all particles)", registry=r)
        self.cache_queries = Counter(
            f"{p}prefix_cache_queries", "Prompt tokens looked up in the prefix cache (KV store)", registry=r
        )
        self.cache_hits = Counter(f"{p}prefix_cache_hits", "Prompt tokens whose KV the prefix cache had", registry=r)
        self.finished = Counter(
            f"{p}request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.rejected = Counter(
            f"{p}request_rejected", "Requests refused or failed, by reason (the gRPC code)", ["reason"], registry=r
        )
        for reason in ("stop", "length", "abort"):  # every series present from the start, at 0
            self.finished.labels(reason)
        for code in ("invalid_argument", "unauthenticated", "already_exists", "resource_exhausted", "unavailable"):
            self.rejected.labels(code)
        self.smc_steps = Counter(f"{p}smc_steps", "SMC steps run (all steering requests)", registry=r)
        self.smc_resamples = Counter(f"{p}smc_resamples", "SMC steps that resampled", registry=r)
        self.smc_ess = Histogram(
            f"{p}smc_ess_at_resample_ratio", "ESS / N at the steps that resampled", buckets=_ESS, registry=r
        )
        self.smc_migrated = Counter(
            f"{p}smc_particles_migrated", "Particles moved between decode workers at resampling", registry=r
        )
        self.smc_migrated_bytes = Counter(
            f"{p}smc_migrated_bytes",
            "KV bytes covered by the particles moved between decode workers (through the KV store)",
            registry=r,
        )

        # patches (smc.patch): round trips per generated token = smc_steps / smc_token_positions,
        # tokens per patch = smc_patch_tokens / smc_patches
        self.smc_token_positions = Counter(
            f"{p}smc_token_positions", "Tokens of the longest particle of each finished steering request", registry=r
        )
        self.smc_patches = Counter(f"{p}smc_patches", "Children proposed by the decode workers (patches)", registry=r)
        self.smc_patch_tokens = Counter(f"{p}smc_patch_tokens", "Tokens of those patches", registry=r)
        self.smc_step_seconds = Counter(
            f"{p}smc_step_seconds",
            "Time of SMC steps: compute (the slowest worker's extension) and sync (the rest: transfers, "
            "weights, resampling, reshaping)",
            ["phase"],
            registry=r,
        )
        for phase in ("compute", "sync"):
            self.smc_step_seconds.labels(phase)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class RequestMeter:
    """One request's path through ``Generate``: received (waiting) → admitted (running) → tokens → end."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.t0 = time.perf_counter()
        self.state = "waiting"
        self.last_token: float | None = None
        metrics.waiting.inc()

    def admitted(self) -> None:
        if self.state == "waiting":
            self.m.waiting.dec()
            self.m.running.inc()
            self.m.queue.observe(time.perf_counter() - self.t0)
            self.state = "running"

    def tokens(self, n: int) -> None:
        """``n`` tokens arrived in one response (a steering step counts as one arrival for the TTFT)."""
        now = time.perf_counter()
        if self.last_token is None:
            self.m.ttft.observe(now - self.t0)
        elif n:
            gap = (now - self.last_token) / n
            for _ in range(n):
                self.m.itl.observe(gap)
        self.last_token = now

    def finished(self, reason: str, usage) -> None:
        self.m.finished.labels(reason).inc()
        self.m.e2e.observe(time.perf_counter() - self.t0)
        self.m.prompt_tokens.inc(usage.prompt_tokens)
        self.m.generation_tokens.inc(usage.completion_tokens)
        self.m.cache_queries.inc(usage.prompt_tokens)
        self.m.cache_hits.inc(usage.cached_prompt_tokens)

    def failed(self, reason: str) -> None:
        self.m.rejected.labels(reason).inc()

    def close(self) -> None:
        if self.state == "waiting":
            self.m.waiting.dec()
        elif self.state == "running":
            self.m.running.dec()
        self.state = "closed"


# (series name, help, WorkerStats field, kind) for every decode worker's report
_DECODE_SERIES = (
    ("kv_blocks_in_use", "KV blocks held by live sequences and particles", "kv_blocks_in_use", "gauge"),
    ("kv_blocks_total", "KV blocks in the worker's pool", "kv_blocks_total", "gauge"),
    ("kv_blocks_cached", "Prompt blocks in the worker's prefix cache", "kv_blocks_cached", "gauge"),
    ("num_sequences_active", "Sequences and particles on the worker", "active_sequences", "gauge"),
    ("worker_generation_tokens", "Tokens generated by the worker", "tokens_generated", "counter"),
    ("worker_batch_steps", "Forward steps run by the worker", "batch_steps", "counter"),
    ("worker_batched_tokens", "Sequences advanced, summed over steps", "batched_tokens", "counter"),
    ("worker_prompt_recomputes", "Loads that recomputed prompt KV (store miss)", "prompt_recomputes", "counter"),
    ("worker_kv_blocks_loaded", "KV blocks read from the store into the pool", "kv_blocks_loaded", "counter"),
    ("worker_particles_imported", "SMC particles migrated to the worker", "particles_imported", "counter"),
)


class StoreCollector(Collector):
    """The KV store's state at scrape time: ``state()`` gives ("ok" | "down" | "off", restarts)."""

    def __init__(self, state: Callable[[], tuple[str, int]]):
        self.state = state

    def collect(self):
        name, restarts = self.state()
        up = GaugeMetricFamily(
            f"{PREFIX}kv_store_up", "1 while the KV store answers (0: down, restarting or reconnecting; off: no sample)"
        )
        if name != "off":
            up.add_metric([], 1.0 if name == "ok" else 0.0)
        yield up
        yield CounterMetricFamily(f"{PREFIX}kv_store_restarts", "Times the KV store went down and came back", restarts)


class WorkerCollector(Collector):
    """Per-worker series from the latest reports: ``reports()`` gives (worker id, role, WorkerStats or
    None, alive, restarts) for every worker."""

    def __init__(self, reports: Callable[[], Iterable[tuple[str, str, object, bool, int]]]):
        self.reports = reports

    def collect(self):
        p = PREFIX
        alive = GaugeMetricFamily(
            f"{p}worker_alive", "1 while the scheduler can reach the worker", labels=["worker", "role"]
        )
        restarts = CounterMetricFamily(
            f"{p}worker_restarts", "Times the worker died and came back", labels=["worker", "role"]
        )
        usage = GaugeMetricFamily(f"{p}kv_cache_usage_perc", "KV pool usage (1 = full)", labels=["worker"])
        families = {
            name: (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"{p}{name}", help, labels=["worker"])
            for name, help, _, kind in _DECODE_SERIES
        }
        reports = list(self.reports())
        for worker, role, st, is_alive, n in reports:
            alive.add_metric([worker, role], 1.0 if is_alive else 0.0)
            restarts.add_metric([worker, role], n)
            if st is None or role != "decode":
                continue
            for name, _, attr, _ in _DECODE_SERIES:
                families[name].add_metric([worker], getattr(st, attr))
            usage.add_metric([worker], st.kv_blocks_in_use / st.kv_blocks_total if st.kv_blocks_total else 0.0)
        yield alive
        yield restarts
        yield usage
        yield from families.values()
        yield from self._speculative(reports)

    @staticmethod
    def _speculative(reports):
        """``--speculative mtp`` (vLLM's spec_decode series): sequence-steps that verified drafts, drafts made
        and accepted, and accepted per draft position (0-based depth)."""
        p = PREFIX
        drafts = CounterMetricFamily(
            f"{p}spec_decode_num_drafts", "Sequence-steps that verified drafts", labels=["worker"]
        )
        tokens = CounterMetricFamily(f"{p}spec_decode_num_draft_tokens", "Draft tokens made", labels=["worker"])
        accepted = CounterMetricFamily(
            f"{p}spec_decode_num_accepted_tokens", "Draft tokens accepted", labels=["worker"]
        )
        per_pos = CounterMetricFamily(
            f"{p}spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position",
            labels=["worker", "position"],
        )
        for worker, role, st, _, _ in reports:
            if st is None or role != "decode" or not st.spec_drafted:
                continue
            drafts.add_metric([worker], st.spec_steps)
            tokens.add_metric([worker], sum(st.spec_drafted))
            accepted.add_metric([worker], sum(st.spec_accepted))
            for j, a in enumerate(st.spec_accepted):
                per_pos.add_metric([worker, str(j)], a)
        yield from (drafts, tokens, accepted, per_pos)
