"""Per-request records and the aggregate metrics, as ``vllm bench serve`` defines them.

Per request (times relative to the send; a "chunk" is one streamed response that carries tokens — for an
SMC request, one progress message = one step):

- TTFT: send → first chunk;  E2E ("e2el"): send → end of the stream (the final message);
- ITL: every gap between consecutive chunks (a chunk of several tokens is one gap, as in vLLM);
- output tokens: ``usage.completion_tokens`` (SMC: the number of steps, ``result.steps``);
- TPOT = (E2E − TTFT) / (output tokens − 1), for requests with more than one output token only.

Aggregates over the completed requests (percentiles by ``numpy.percentile``, linear interpolation; an
empty list gives 0, as in vLLM): mean/median/std/pXX of TTFT, TPOT, ITL (all gaps of all requests
pooled) and E2E, in ms; request and output-token throughput over the benchmark duration; goodput =
completed requests meeting every given SLO (``ttft``, ``tpot``, ``e2el`` in ms; a request with one
output token has TPOT 0 here, as in vLLM) per second. Failures (``failed`` = ``num_rejected`` +
``num_errors`` + ``num_incomplete``) are counted by gRPC status code and message prefix
(:func:`reason_prefix`): RESOURCE_EXHAUSTED under ``rejected``, requests cut off (cancelled by the
client) when the run stopped — time limit or Ctrl-C; on an overloaded server, typically most of them —
under ``incomplete``, anything else (including a CANCELLED status from the server) under ``errors``.
``cache_hit_rate`` = Σ usage.cached_prompt_tokens / Σ usage.prompt_tokens (server-reported,
completed requests).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (90, 99)


@dataclass
class RequestRecord:
    index: int
    kind: str = "text"  # "text" or "smc"
    run: str = ""  # a sweep's run label
    scheduled_s: float = 0.0  # intended send time (s from the start of the run)
    send_s: float = 0.0  # actual send time (s from the start of the run)
    chunk_s: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk, s after the send
    chunk_tokens: list[int] = field(default_factory=list)
    end_s: float | None = None  # end of the stream, s after the send
    status: str = "pending"  # ok | rejected | error | incomplete
    code: str = ""  # gRPC status code name on failure
    message: str = ""
    finish_reason: str = ""
    output_tokens: int = 0
    completion_tokens: int = 0  # usage.completion_tokens (SMC: summed over particles)
    prompt_tokens: int = 0  # usage.prompt_tokens (server's count)
    cached_prompt_tokens: int = 0
    intended_prompt_tokens: int = 0  # words sent (= tokens on the default model)
    max_tokens: int = 0
    server_ttft_ms: float = 0.0
    server_e2e_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft_s(self) -> float | None:
        if self.chunk_s:
            return self.chunk_s[0]
        return self.end_s  # no token-bearing chunk at all: the whole request

    @property
    def e2e_s(self) -> float | None:
        return self.end_s

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT)/(output tokens − 1); None with fewer than two output tokens."""
        if self.output_tokens < 2 or self.end_s is None or self.ttft_s is None:
            return None
        return (self.end_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            ttft_ms=_ms(self.ttft_s),
            tpot_ms=_ms(self.tpot_s),
            e2e_ms=_ms(self.e2e_s),
            itl_ms=[x * 1e3 for x in self.itl_s],
        )
        return d


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def reason_prefix(message: str, max_len: int = 80) -> str:
    """A failure's message reduced to a reason that groups: numbers → N, at most two ``:``-separated parts.

    ``"server busy: 8 requests in flight (limit 8)"`` → ``"server busy: N requests in flight (limit N)"``;
    ``"decode worker decode-0: out of KV blocks: the request needs 80"``
    → ``"decode worker decode-N: out of KV blocks"``.
    """
    text = re.sub(r"\d+(\.\d+)?", "N", " ".join(message.split()))
    text = ":".join(text.split(":")[:2]).strip()
    return text[:max_len] or "(no message)"


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft=2000,tpot=200"`` → {"ttft": 2000.0, "tpot": 200.0} (ms). Keys: ttft, tpot, e2el (or e2e)."""
    out: dict[str, float] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        key = "e2el" if key == "e2e" else key
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {part!r}: use ttft=MS, tpot=MS or e2el=MS, comma-separated")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO value in {part!r}") from None
        if out[key] < 0:
            raise ValueError(f"SLO {key} must be >= 0")
    return out


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    v = np.asarray(values_s, dtype=float) * 1e3 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(np.mean(v)),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(np.std(v)),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(v, p))
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (ms); TPOT counts as 0 with < 2 output tokens."""
    values = {"ttft": rec.ttft_s, "tpot": rec.tpot_s or 0.0, "e2el": rec.e2e_s}
    return all(values[k] is not None and values[k] * 1e3 <= v for k, v in slo.items())


def compute_metrics(
    records: Iterable[RequestRecord],
    duration_s: float,
    slo: dict[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict:
    """The aggregate metrics (vLLM-like keys) of one run lasting ``duration_s``."""
    records = list(records)
    done = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    itls = [x for r in done for x in r.itl_s]
    e2es = [r.e2e_s for r in done if r.e2e_s is not None]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_prompt_tokens for r in done)
    dur = max(duration_s, 1e-9)
    rejected = Counter(reason_prefix(r.message) for r in records if r.status == "rejected")
    errors = Counter(f"{r.code}: {reason_prefix(r.message)}" for r in records if r.status == "error")
    incomplete = Counter(f"{r.code}: {reason_prefix(r.message)}" for r in records if r.status == "incomplete")
    m = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "num_rejected": sum(rejected.values()),
        "num_errors": sum(errors.values()),
        "num_incomplete": sum(incomplete.values()),
        "duration": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "goodput": None,
        "slo": dict(slo or {}),
    }
    if slo:
        m["goodput"] = sum(meets_slo(r, slo) for r in done) / dur
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2es)):
        m.update(_stats(name, values, percentiles))
    m["cache_hit_rate"] = cached / in_tokens if in_tokens else 0.0
    m["total_cached_prompt_tokens"] = cached
    m["rejected"] = dict(sorted(rejected.items()))
    m["errors"] = dict(sorted(errors.items()))
    m["incomplete"] = dict(sorted(incomplete.items()))
    kinds = Counter(r.kind for r in records)
    if len(kinds) > 1 or "smc" in kinds:
        m["by_kind"] = {
            k: {
                "requests": n,
                "completed": sum(r.ok for r in records if r.kind == k),
                "mean_ttft_ms": float(np.mean([r.ttft_s for r in done if r.kind == k] or [0])) * 1e3,
                "mean_e2el_ms": float(np.mean([r.e2e_s for r in done if r.kind == k] or [0])) * 1e3,
            }
            for k, n in sorted(kinds.items())
        }
    return m
