"""Reporting: the terminal summary, the results JSON, per-request JSONL records and PNG plots (Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from smcserve.loadtest.metrics import RequestRecord

_W = 50


def _line(label: str, value) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}" if math.isfinite(value) else str(value)
    return f"{label:<40}{value!s:>10}"


def _pct_keys(m: dict, name: str) -> list[str]:
    return sorted(
        (k for k in m if k.startswith("p") and k.endswith(f"_{name}_ms")), key=lambda k: float(k[1:].split("_")[0])
    )


def format_summary(m: dict, title: str = "") -> str:
    """A vLLM-style result table."""
    head = " Serving Benchmark Result " + (f"({title}) " if title else "")
    out = [head.center(_W, "=")]
    out.append(_line("Successful requests:", m["completed"]))
    out.append(_line("Failed requests:", m["failed"]))
    if m["failed"]:
        out.append(_line("  rejected (RESOURCE_EXHAUSTED):", m.get("num_rejected", 0)))
        out.append(_line("  errors:", m.get("num_errors", 0)))
        out.append(_line("  incomplete (cancelled at the end):", m.get("num_incomplete", 0)))
    if m.get("stopped_by") and m["stopped_by"] != "done":
        out.append(_line("Stopped by:", m["stopped_by"]))
    out.append(_line("Benchmark duration (s):", m["duration"]))
    out.append(_line("Total input tokens:", m["total_input_tokens"]))
    out.append(_line("Total generated tokens:", m["total_output_tokens"]))
    out.append(_line("Request throughput (req/s):", m["request_throughput"]))
    if m.get("goodput") is not None:
        slo = ",".join(f"{k}={v:g}" for k, v in m.get("slo", {}).items())
        out.append(_line(f"Request goodput (req/s) [{slo}]:", m["goodput"]))
    out.append(_line("Output token throughput (tok/s):", m["output_throughput"]))
    out.append(_line("Total token throughput (tok/s):", m["total_token_throughput"]))
    out.append(_line("Prefix cache hit rate (server):", m["cache_hit_rate"]))
    for name, title_, short in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2el", "End-to-end Latency", "E2EL"),
    ):
        out.append(title_.center(_W, "-"))
        out.append(_line(f"Mean {short} (ms):", m[f"mean_{name}_ms"]))
        out.append(_line(f"Median {short} (ms):", m[f"median_{name}_ms"]))
        for k in _pct_keys(m, name):
            out.append(_line(f"P{k[1:].split('_')[0]} {short} (ms):", m[k]))
    if m.get("by_kind"):
        out.append("By kind".center(_W, "-"))
        for kind, d in m["by_kind"].items():
            out.append(_line(f"{kind}: completed / sent", f"{d['completed']}/{d['requests']}"))
            out.append(_line(f"{kind}: mean TTFT / E2EL (ms)", f"{d['mean_ttft_ms']:.0f}/{d['mean_e2el_ms']:.0f}"))
    if m.get("rejected"):
        out.append("Rejected (RESOURCE_EXHAUSTED)".center(_W, "-"))
        out.extend(f"{n:>6}  {reason}" for reason, n in m["rejected"].items())
    if m.get("errors"):
        out.append("Errors".center(_W, "-"))
        out.extend(f"{n:>6}  {reason}" for reason, n in m["errors"].items())
    if m.get("incomplete"):
        out.append("Incomplete (cut off when the run stopped)".center(_W, "-"))
        out.extend(f"{n:>6}  {reason}" for reason, n in m["incomplete"].items())
    if m.get("machine"):
        out.append("Machine (client side)".center(_W, "-"))
        out.extend(format_machine(m["machine"]))
    out.append("=" * _W)
    return "\n".join(out)


def format_machine(mc: dict) -> list[str]:
    """The machine record's lines: cores and CPU model, load average at the start and at the end."""

    def la(v):
        return "/".join(f"{x:.2f}" for x in v) if v else "n/a"

    return [
        f"{mc.get('cpu_count')} cores, {mc.get('cpu_model') or 'unknown CPU'}",
        f"load average (1/5/15 min): start {la(mc.get('loadavg_start'))}, end {la(mc.get('loadavg_end'))}",
    ]


SWEEP_COLUMNS = (
    ("rate", "workload.request_rate", "{:g}"),
    ("done", "completed", "{:d}"),
    ("fail", "failed", "{:d}"),
    ("cut", "num_incomplete", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("goodput", "goodput", "{:.2f}"),
    ("tok/s", "output_throughput", "{:.1f}"),
    ("TTFT p50", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50", "median_tpot_ms", "{:.1f}"),
    ("TPOT p99", "p99_tpot_ms", "{:.1f}"),
    ("E2E p50", "median_e2el_ms", "{:.0f}"),
    ("hit", "cache_hit_rate", "{:.2f}"),
)


def _get(m: dict, dotted: str):
    for part in dotted.split("."):
        m = m.get(part) if isinstance(m, dict) else None
    return m


def format_sweep_table(runs: Sequence[dict]) -> str:
    """One line per rate of a sweep."""
    cols = [(h, k, f) for h, k, f in SWEEP_COLUMNS]
    rows = [[h for h, _, _ in cols]]
    for m in runs:
        row = []
        for _, key, fmt in cols:
            v = _get(m, key)
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return " Rate sweep ".center(len(lines[0]), "=") + "\n" + "\n".join(lines)


def sweep_document(runs: Sequence[dict]) -> dict:
    return {"sweep": True, "rates": [_get(m, "workload.request_rate") for m in runs], "runs": list(runs)}


def _clean(x):
    """inf/nan → strings, so the file stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
    return path


def write_records(path: str | Path, records: Iterable[RequestRecord]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(_clean(r.to_dict()), allow_nan=False) + "\n")
    return path


# --- plots --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_cdfs(runs: dict[str, Sequence[RequestRecord]], path: str | Path) -> Path:
    """Empirical CDFs of TTFT, TPOT and E2E latency (completed requests), one line per run."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, get) in zip(
        axes, (("TTFT", lambda r: r.ttft_s), ("TPOT", lambda r: r.tpot_s), ("E2E latency", lambda r: r.e2e_s))
    ):
        for label, records in runs.items():
            v = np.sort([get(r) * 1e3 for r in records if r.ok and get(r) is not None])
            if len(v):
                ax.step(
                    np.r_[v[0], v],
                    np.r_[0.0, np.arange(1, len(v) + 1) / len(v)],
                    where="post",
                    label=f"{label} (n={len(v)})",
                )
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(runs: Sequence[dict], path: str | Path) -> Path:
    """Throughput and latency against the offered request rate (one point per run of a sweep)."""
    plt = _pyplot()
    pts = sorted(
        (
            (_get(m, "workload.request_rate"), i)
            for i, m in enumerate(runs)
            if isinstance(_get(m, "workload.request_rate"), (int, float))
        )
    )
    ms = [runs[i] for _, i in pts]
    finite = [r for r, _ in pts if math.isfinite(r)]
    inf_x = max(finite) * 1.5 if finite else 1.0  # where rate = inf (everything at once) is drawn
    rates = [r if math.isfinite(r) else inf_x for r, _ in pts]
    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid.ravel()
    ax = axes[0]
    ax.plot(rates, [m["request_throughput"] for m in ms], "o-", label="completed req/s")
    if any(m.get("goodput") is not None for m in ms):
        ax.plot(rates, [m.get("goodput") or 0.0 for m in ms], "s--", label="goodput req/s")
    if finite:
        ax.plot([0, max(finite)], [0, max(finite)], ":", color="gray", label="offered")
    ax2 = ax.twinx()
    ax2.plot(rates, [m["output_throughput"] for m in ms], "^-", color="tab:green", label="output tok/s")
    ax2.set_ylabel("output tokens/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    for ax, name, title in ((axes[1], "ttft", "TTFT"), (axes[2], "tpot", "TPOT"), (axes[3], "e2el", "E2E latency")):
        ax.plot(rates, [m[f"mean_{name}_ms"] for m in ms], "o-", label="mean")
        ax.plot(rates, [m[f"median_{name}_ms"] for m in ms], "s-", label="median")
        for k in _pct_keys(ms[0], name) if ms else []:
            ax.plot(rates, [m.get(k, 0.0) for m in ms], "^--", label=k.split("_")[0])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs rate")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        if len(finite) < len(rates):
            ticks = [t for t in ax.get_xticks() if 0 <= t <= max(finite or [0])]
            ax.set_xticks(ticks + [inf_x], [f"{t:g}" for t in ticks] + ["inf"])
    return _save(fig, path)


def write_plots(directory: str | Path, results: Sequence, runs: Sequence[dict], sweep: bool = False) -> list[Path]:
    """``latency_cdf.png`` (every run's CDFs) and, for a sweep, ``sweep.png``."""
    directory = Path(directory)
    paths = [plot_cdfs({r.label: r.records for r in results}, directory / "latency_cdf.png")]
    if sweep:
        paths.append(plot_sweep(runs, directory / "sweep.png"))
    return paths
