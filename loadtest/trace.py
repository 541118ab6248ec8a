"""Mooncake JSONL trace replay, scaled down to fit a CPU.

A row is ``{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}`` with
chained prefix-block hashes at 512 tokens per block (``len(hash_ids) == ceil(input_length / 512)``).

Replay (:func:`trace_requests`):

- each hash id maps to a FIXED pseudo-random block of ``block_tokens`` words
  (:func:`loadtest.workloads.word_block`, seeded by the hash id and a salt), so rows that share their
  first k ids share their first k blocks of prompt text, and distinct ids give different blocks;
- the prompt is the row's blocks in order, the last one cut to its share of ``input_length``:
  ``round(share · block_tokens / 512)`` words (at least 1), ``share = input_length − 512·(n − 1)``;
- output lengths: ``max(min_output, round(output_length · output_scale))``, optionally capped;
- send times: ``(timestamp − first timestamp of the slice) / 1000 · time_scale`` seconds.

Words are tokens on the default model (see :mod:`loadtest.workloads`), so with ``block_tokens`` equal to
the server's KV block size the trace's blocks line up with the server's. The salt defaults to 0: a
second replay against the same server finds the first one's blocks in its prefix cache unless it uses
another salt.

:data:`DEFAULT_TRACE` is the Mooncake synthetic trace shipped in the repository
(``loadtest/traces/synthetic_trace.jsonl``; source, license and checksum in ``loadtest/traces/README.md``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from smcserve.loadtest.workloads import RequestSpec, SmcMix, Workload, ids_to_text, request_seed, word_block

TRACE_BLOCK_TOKENS = 512
# the Mooncake synthetic trace, shipped with the repository (read relative to it: an editable install)
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "synthetic_trace.jsonl"


@dataclass(frozen=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_row(obj: dict, line_no: int = 0) -> TraceRow:
    try:
        row = TraceRow(
            float(obj["timestamp"]),
            int(obj["input_length"]),
            int(obj["output_length"]),
            tuple(int(h) for h in obj["hash_ids"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"trace line {line_no}: bad row ({err!r}): {str(obj)[:200]}") from None
    if row.input_length < 1 or row.output_length < 0 or not row.hash_ids:
        raise ValueError(f"trace line {line_no}: needs input_length >= 1, output_length >= 0 and hash_ids")
    return row


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Parse a JSONL trace (blank lines skipped); ``limit``: stop after that many rows."""
    rows: list[TraceRow] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON: {err}") from None
                rows.append(parse_row(obj, n))
    return rows


def select_rows(
    rows: Sequence[TraceRow],
    *,
    first: int | None = None,
    start: int = 0,
    stop: int | None = None,
    window_s: tuple[float, float] | None = None,
    max_blocks: int | None = None,
) -> list[TraceRow]:
    """A slice of the trace: rows ``start:stop``, then only those whose timestamp (s, trace time) lies in
    ``[window_s[0], window_s[1])``, then only those of at most ``max_blocks`` hash blocks (prompts that fit
    the server), then the first ``first`` of those."""
    out = list(rows[start:stop])
    if window_s is not None:
        lo, hi = window_s
        out = [r for r in out if lo * 1000 <= r.timestamp_ms < hi * 1000]
    if max_blocks is not None:
        out = [r for r in out if len(r.hash_ids) <= max_blocks]
    if first is not None:
        out = out[:first]
    return out


def parse_slice(text: str) -> dict:
    """``"200"`` → the first 200 rows; ``"100:300"`` → rows 100..299; ``"t=10:20"`` → trace seconds [10, 20)."""
    text = text.strip()
    m = re.fullmatch(r"t=([\d.]*):([\d.]*)", text)
    if m:
        lo = float(m.group(1)) if m.group(1) else 0.0
        hi = float(m.group(2)) if m.group(2) else math.inf
        return {"window_s": (lo, hi)}
    m = re.fullmatch(r"(\d*):(\d*)", text)
    if m:
        return {"start": int(m.group(1) or 0), "stop": int(m.group(2)) if m.group(2) else None}
    if re.fullmatch(r"\d+", text):
        return {"first": int(text)}
    raise ValueError(f"bad trace slice {text!r}: use N, START:STOP or t=T0:T1 (seconds)")


@dataclass
class TraceScaling:
    block_tokens: int = 16  # words per hash-id block (the trace's blocks are 512 tokens)
    time_scale: float = 1.0  # multiply inter-arrival times (0.01: 100x faster)
    output_scale: float = 1.0  # multiply output lengths
    min_output: int = 1
    max_output: int | None = None  # cap on the scaled output length
    trace_block_tokens: int = TRACE_BLOCK_TOKENS

    def __post_init__(self):
        if self.block_tokens < 1 or self.time_scale < 0 or self.output_scale < 0 or self.min_output < 1:
            raise ValueError(f"bad trace scaling: {self}")

    def block_lengths(self, row: TraceRow) -> list[int]:
        """Words per block of ``row``: ``block_tokens`` each, the last cut to its share of input_length."""
        n = len(row.hash_ids)
        share = row.input_length - self.trace_block_tokens * (n - 1)
        share = min(max(share, 1), self.trace_block_tokens)  # rows that break ceil(input/512) == n
        last = min(self.block_tokens, max(1, round(share * self.block_tokens / self.trace_block_tokens)))
        return [self.block_tokens] * (n - 1) + [last]

    def output_tokens(self, row: TraceRow) -> int:
        out = max(self.min_output, round(row.output_length * self.output_scale))
        return min(out, self.max_output) if self.max_output is not None else out

    def describe(self) -> dict:
        return {
            "block_tokens": self.block_tokens,
            "trace_block_tokens": self.trace_block_tokens,
            "time_scale": self.time_scale,
            "output_scale": self.output_scale,
            "min_output": self.min_output,
            "max_output": self.max_output,
        }


def row_prompt_ids(row: TraceRow, scaling: TraceScaling, salt: int | str = 0) -> list[int]:
    ids: list[int] = []
    for h, n in zip(row.hash_ids, scaling.block_lengths(row)):
        ids.extend(word_block(h, n, salt))
    return ids


def trace_requests(
    rows: Sequence[TraceRow],
    scaling: TraceScaling,
    *,
    salt: int | str = 0,
    seed: int = 0,
    temperature: float | None = None,
    ignore_eos: bool = True,
) -> list[tuple[float, RequestSpec]]:
    """``(send_time_s, RequestSpec)`` for each row, in trace order."""
    if not rows:
        return []
    t0 = rows[0].timestamp_ms
    out = []
    for i, row in enumerate(rows):
        ids = row_prompt_ids(row, scaling, salt)
        spec = RequestSpec(
            ids_to_text(ids),
            scaling.output_tokens(row),
            token_ids=ids,
            ignore_eos=ignore_eos,
            temperature=temperature,
            seed=request_seed(seed, i),
            hash_ids=row.hash_ids,
            meta={"trace_input_length": row.input_length, "trace_output_length": row.output_length},
        )
        out.append((max(0.0, (row.timestamp_ms - t0) / 1000.0 * scaling.time_scale), spec))
    return out


def trace_workload(
    rows: Sequence[TraceRow],
    scaling: TraceScaling,
    *,
    salt: int | str = 0,
    seed: int = 0,
    smc: SmcMix | None = None,
    max_concurrency: int | None = None,
    temperature: float | None = None,
    ignore_eos: bool = True,
    source: str = "",
) -> Workload:
    items: Iterable = trace_requests(
        rows, scaling, salt=salt, seed=seed, temperature=temperature, ignore_eos=ignore_eos
    )
    if smc is not None and smc.ratio > 0:
        items = list(smc.apply(items, seed))
    return Workload(
        "trace",
        items,
        max_concurrency,
        len(rows),
        config={
            "workload": "trace",
            "trace": source,
            "rows": len(rows),
            "salt": salt,
            "seed": seed,
            "max_concurrency": max_concurrency,
            "scaling": scaling.describe(),
            "trace_unbounded_hit_rate": unbounded_hit_rate(rows),
            "scaled_token_hit_rate": scaled_token_hit_rate(rows, scaling),
            **({"smc_ratio": smc.ratio, "smc_particles": smc.particles} if smc and smc.ratio > 0 else {}),
        },
    )


# --- cache statistics of a trace ----------------------------------------------------------------------
def unbounded_hit_rate(rows: Iterable[TraceRow]) -> float:
    """Fraction of blocks (hash ids, over all rows in order) seen earlier: an unbounded prefix cache's hit
    rate at block granularity. 0.64 for the whole Mooncake synthetic trace."""
    seen: set[int] = set()
    hits = total = 0
    for row in rows:
        for h in row.hash_ids:
            total += 1
            hits += h in seen
            seen.add(h)
    return hits / total if total else 0.0


def scaled_token_hit_rate(rows: Iterable[TraceRow], scaling: TraceScaling) -> float:
    """The same, weighted by the scaled block lengths (prompt words whose block was seen earlier in full
    or at least as long / all prompt words): what an unbounded cache keyed by these blocks would reuse."""
    seen: dict[int, int] = {}
    hits = total = 0
    for row in rows:
        for h, n in zip(row.hash_ids, scaling.block_lengths(row)):
            total += n
            hits += min(n, seen.get(h, 0))
            seen[h] = max(n, seen.get(h, 0))
    return hits / total if total else 0.0
