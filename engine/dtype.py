"""``--dtype auto``: choose float32 or bfloat16 by timing this machine, not by its CPU flags.

A CPU that advertises AVX512-BF16 can still be slow in bf16 where it matters. On an AMD EPYC
(AVX512-BF16, no AMX; torch 2.13, 2 threads) bf16 GEMMs are ~2.2x faster than fp32, but
``scaled_dot_product_attention`` with one query token (every decode step) is ~5x slower (its CPU
flash kernel in bf16), so a batch-64 decode step is 2.2x slower in bf16 while batch 1 and prefill
are faster. So ``auto`` times, in each candidate dtype and at the model's own sizes, the ops of a
decoder layer — RMSNorm, the fused QKV GEMM, rotary, the KV gather and SDPA over a context (the
calls the paged engine makes), the output projection, the fused gate/up GEMM, SiLU, the down GEMM —
and the LM head, for a decode step at batch 1, a decode step at batch 64 and a prefill chunk. Each
op is timed alone many times, dtypes interleaved, and a step is the sum of its ops' minima (~1.5 s
in all). bf16 wins only if it is at least ``THRESHOLD``x faster on every decode shape (prefill is
reported, not decisive: decode is where a server spends its time).

The decision is cached in ``cache_dir()/dtype-choice.json`` keyed by the CPU, the torch version,
the thread count and the model's sizes, so later starts (and every process of one machine that
resolves ``auto``) agree without measuring again; delete the file to measure again. If other
processes kept the CPU busy while measuring (contention slows multi-threaded ops at random, far
beyond their share), the timings are not trusted: float32, not cached. A server resolves ``auto``
once, in its launcher, and hands the concrete dtype to all its workers (the KV block keys include it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CANDIDATES = ("float32", "bfloat16")
THRESHOLD = 1.2  # bf16 must be this much faster on every decode shape
BUSY = 0.25  # other processes' share of the CPU above which the timings are not trusted
CACHE_FILE = "dtype-choice.json"
CACHE_VERSION = 1  # bump when what is measured changes, so old decisions are not reused


@dataclass(frozen=True)
class ModelDims:
    """The sizes that decide a step's cost (default: SmolLM2-135M's)."""

    hidden: int = 576
    intermediate: int = 1536
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152

    @classmethod
    def from_config(cls, cfg: Mapping | object | None) -> ModelDims:
        """From an HF config (object or ``config.json`` dict); missing sizes keep the defaults."""
        if cfg is None:
            return cls()
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        d = cls()
        hidden = int(get("hidden_size", None) or d.hidden)
        heads = int(get("num_attention_heads", None) or d.heads)
        kv_default = heads if get("num_attention_heads", None) else d.kv_heads  # no GQA where not stated
        return cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size", None) or d.intermediate),
            layers=int(get("num_hidden_layers", None) or d.layers),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", None) or kv_default),
            head_dim=int(get("head_dim", None) or hidden // heads),
            vocab=int(get("vocab_size", None) or d.vocab),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> ModelDims:
        try:
            return cls.from_config(json.loads((Path(path) / "config.json").read_text()))
        except (TypeError, OSError, ValueError):
            return cls()


@dataclass(frozen=True)
class Shape:
    """One timed workload: ``tokens`` new tokens per sequence, ``batch`` sequences, ``context`` KV."""

    name: str
    batch: int
    tokens: int
    context: int
    decode: bool


SHAPES = (
    Shape("decode_b1", batch=1, tokens=1, context=512, decode=True),
    Shape("decode_b64", batch=64, tokens=1, context=512, decode=True),
    Shape("prefill_128", batch=1, tokens=128, context=128, decode=False),
)

# (dtype name, shape, dims) → seconds of one whole step of that shape (all layers + LM head), or
# those seconds split into named parts (summed after taking each part's min over rounds)
TimeFn = Callable[[str, Shape, ModelDims], "float | Mapping[str, float]"]


@dataclass
class DtypeChoice:
    dtype: str  # "float32" or "bfloat16"
    reason: str  # one line for logs and `smcserve info`
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # dtype → shape → ms per step
    measured: bool = False  # timed now (False: explicit, or read from the cache)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def canonical(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {name!r} (choose auto, float32 or bfloat16)")
    return str(DTYPES[name]).removeprefix("torch.")


# --- the key: this machine, this torch, these threads, this model --------------------------------
def cpu_name() -> str:
    """The CPU's model name, family/model/stepping and bf16 ISA (a hypervisor may hide the exact model)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')} stepping {info.get('stepping', '?')})"
    isa = [
        n
        for n, ok in (
            ("amx", _supported("_is_amx_tile_supported")),
            ("avx512_bf16", _supported("_is_avx512_bf16_supported")),
        )
        if ok
    ]
    return f"{name} [{'+'.join(isa) or 'no bf16 isa'}]"


def _supported(fn: str) -> bool:
    try:
        return bool(getattr(torch.cpu, fn)())
    except Exception:  # not on this build/architecture
        return False


def cache_key(dims: ModelDims, threads: int) -> str:
    d = dims
    return (
        f"v{CACHE_VERSION}|{cpu_name()}|torch {torch.__version__}|threads {threads}|"
        f"h{d.hidden} i{d.intermediate} L{d.layers} q{d.heads} kv{d.kv_heads} d{d.head_dim} V{d.vocab}"
    )


def default_cache_path() -> Path:
    from smcserve.engine.model import cache_dir

    return cache_dir() / CACHE_FILE


# --- the measurement -----------------------------------------------------------------------------
class _Layer:
    """A decoder layer's tensors at the model's sizes, in one dtype (random: only the time matters)."""

    HEAD_ROWS = 8192  # LM head rows timed; the time is scaled to the whole vocabulary

    def __init__(self, dtype: torch.dtype, d: ModelDims):
        g = torch.Generator().manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        self.dtype, self.d = dtype, d
        self.norm = torch.ones(d.hidden, dtype=dtype)
        self.qkv = w(q + 2 * kv, d.hidden)
        self.o = w(d.hidden, q)
        self.gate_up = w(2 * d.intermediate, d.hidden)
        self.down = w(d.hidden, d.intermediate)
        self.head = w(min(d.vocab, self.HEAD_ROWS), d.hidden)
        self.inputs: dict[Shape, tuple] = {}

    def _inputs(self, s: Shape) -> tuple:
        if s not in self.inputs:
            d, g = self.d, torch.Generator().manual_seed(1)
            T = s.batch * s.tokens
            x = torch.randn(T, d.hidden, generator=g).to(self.dtype)
            cos = torch.randn(T, 1, d.head_dim, generator=g).to(self.dtype)
            if s.decode:  # each sequence attends over its own padded context, as the paged engine does
                k = torch.randn(s.batch, d.kv_heads, s.context, d.head_dim, generator=g).to(self.dtype)
                mask = torch.ones(s.batch, 1, 1, s.context, dtype=torch.bool)
                mask[:, :, :, -1] = False  # padded, so the masked kernel runs (as in the engine)
            else:
                k = torch.randn(1, d.kv_heads, s.context, d.head_dim, generator=g).to(self.dtype)
                pos = torch.arange(s.context - s.tokens, s.context)
                mask = torch.arange(s.context)[None, :] <= pos[:, None]
            # the paged engine gathers each sequence's K and V from its pool of slots (index_select)
            pool = torch.randn(s.batch * s.context, d.kv_heads * d.head_dim, generator=g).to(self.dtype)
            slots = torch.randperm(s.batch * s.context, generator=g)
            self.inputs[s] = (x, cos, k, k.clone(), mask, pool, slots)
        return self.inputs[s]

    def _rms(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(self.dtype) * self.norm

    def parts(self, s: Shape) -> list[tuple[str, float, Callable[[], object]]]:
        """The step's work as (name, weight, op): one layer's ops in order (each weighted by the layer
        count) and the LM head (weighted up to the vocabulary). Each op's input is computed once."""
        d = self.d
        x, cos, k_ctx, v_ctx, mask, pool, slots = self._inputs(s)
        T, qs, kvs, half = x.shape[0], d.heads * d.head_dim, d.kv_heads * d.head_dim, d.head_dim // 2
        h = self._rms(x)
        qkv = F.linear(h, self.qkv)
        q = qkv[:, :qs].view(T, d.heads, d.head_dim)
        k = qkv[:, qs : qs + kvs].view(T, d.kv_heads, d.head_dim)

        def rope():
            return (
                q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * cos,
                k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * cos,
            )

        if s.decode:  # [B, Hq, 1, D] over each sequence's own [B, Hkv, S, D], as the paged engine calls it
            qa, ma = q[:, :, None], mask
        else:  # [1, Hq, T, D] causal over the context
            qa, ma = q.transpose(0, 1)[None], mask
        o = F.scaled_dot_product_attention(qa, k_ctx, v_ctx, attn_mask=ma, enable_gqa=True).reshape(T, -1)
        gu = F.linear(h, self.gate_up)
        gate, up = gu.chunk(2, -1)
        act = F.silu(gate) * up
        L, head = float(d.layers), d.vocab / self.head.shape[0]
        return [
            ("norm", 2 * L, lambda: self._rms(x)),
            ("qkv", L, lambda: F.linear(h, self.qkv)),
            ("rope", L, rope),
            ("kv_gather", 2 * L if s.decode else 0.0, lambda: torch.index_select(pool, 0, slots)),
            ("attention", L, lambda: F.scaled_dot_product_attention(qa, k_ctx, v_ctx, attn_mask=ma, enable_gqa=True)),
            ("o_proj", L, lambda: x + F.linear(o, self.o)),
            ("gate_up", L, lambda: F.linear(h, self.gate_up)),
            ("act", L, lambda: F.silu(gate) * up),
            ("down", L, lambda: x + F.linear(act, self.down)),
            ("lm_head", head, lambda: F.linear(x[: s.batch], self.head).float()),  # last token of each sequence
        ]


class Timer:
    """The real time function: builds each dtype's tensors once, then times each op of a step of a
    shape separately (see :meth:`_Layer.parts`) and returns their weighted times by name."""

    def __init__(self):
        self.layers: dict[tuple[str, ModelDims], _Layer] = {}
        self.ops: dict[tuple[str, Shape, ModelDims], list] = {}

    def __call__(self, dtype: str, s: Shape, d: ModelDims) -> dict[str, float]:
        key = (dtype, s, d)
        with torch.inference_mode():
            if key not in self.ops:
                if (dtype, d) not in self.layers:
                    self.layers[(dtype, d)] = _Layer(DTYPES[dtype], d)
                self.ops[key] = self.layers[(dtype, d)].parts(s)
            out = {}
            for name, weight, op in self.ops[key]:
                t0 = time.perf_counter()
                op()
                out[name] = (time.perf_counter() - t0) * weight
        return out


def measure(
    dims: ModelDims,
    time_fn: TimeFn,
    *,
    shapes=SHAPES,
    candidates=CANDIDATES,
    budget_s: float = 1.5,
    max_rounds: int = 100,
    min_rounds: int = 3,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(min, median) ms per step, per dtype and shape, over the rounds after one warm-up round.

    ``time_fn`` gives the seconds of one step, or of its parts by name (each op of a layer, weighted
    by the layer count): then a step's time is the sum of each part's min. Each part is short, so
    among many rounds some ran undisturbed by other processes on the machine, and the sum of mins
    is the step's cost on an idle machine; rounds interleave the dtypes (alternating their order)
    so that load hits both alike. Rounds stop after ``budget_s`` once ``min_rounds`` are done. The
    median (the sum of the parts' medians) only shows how disturbed the measurement was."""
    samples: dict[str, dict[str, dict[str, list[float]]]] = {c: {s.name: {} for s in shapes} for c in candidates}
    start = time.perf_counter()
    for rnd in range(max_rounds + 1):
        order = candidates if rnd % 2 == 0 else tuple(reversed(candidates))
        for c in order:
            for s in shapes:
                t = time_fn(c, s, dims)
                if rnd > 0:  # round 0 warms up (oneDNN builds its kernels on first use)
                    for part, sec in t.items() if isinstance(t, Mapping) else [("step", t)]:
                        samples[c][s.name].setdefault(part, []).append(sec * 1e3)
        if rnd >= min_rounds and time.perf_counter() - start > budget_s:
            break
    mins = {c: {n: sum(min(v) for v in parts.values()) for n, parts in per.items()} for c, per in samples.items()}
    medians = {
        c: {n: sum(sorted(v)[len(v) // 2] for v in parts.values()) for n, parts in per.items()}
        for c, per in samples.items()
    }
    return mins, medians


def decide(
    timings_ms: Mapping[str, Mapping[str, float]], shapes=SHAPES, threshold: float = THRESHOLD
) -> tuple[str, str]:
    """(dtype, reason) from measured ms per step: bf16 only if ≥ ``threshold``x faster on every decode shape."""
    fp, bf = timings_ms["float32"], timings_ms["bfloat16"]
    speed = {s.name: fp[s.name] / bf[s.name] if bf[s.name] > 0 else 0.0 for s in shapes}
    decode = [speed[s.name] for s in shapes if s.decode]
    dtype = "bfloat16" if decode and min(decode) >= threshold else "float32"
    figures = ", ".join(f"{s.name} {fp[s.name]:.1f}/{bf[s.name]:.1f} ms ({speed[s.name]:.2f}x)" for s in shapes)
    reason = (
        f"auto chose {dtype} by timing (fp32/bf16 per step: {figures}; "
        f"bf16 needs ≥{threshold:g}x on every decode shape)"
    )
    return dtype, reason


# --- the cache -----------------------------------------------------------------------------------
def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=False)
    os.replace(tmp, path)


@contextmanager
def machine_cache(path: Path) -> Iterator[dict]:
    """The entries of a per-machine JSON cache of measured decisions (this ``auto`` and ``--speculative-max-batch
    auto``), held under an exclusive file lock for the block: one process of the machine measures, the others
    wait and then read its answer. Entries the block adds or changes are written back when it ends normally."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read_cache(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            _write_cache(path, data)


class CpuLoad:
    """Context manager: ``others`` is the share of the machine's CPU time (0-1) that other processes
    used while the block ran (Linux ``/proc/stat`` less this process's own time; 0 elsewhere)."""

    others = 0.0

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait; everything else (steal too) is busy
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuLoad:
        self._t, self._busy, self._own = time.perf_counter(), self._busy_s(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        busy = self._busy_s()
        wall = time.perf_counter() - self._t
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (time.process_time() - self._own)
        self.others = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def choose_auto(
    dims: ModelDims | None = None,
    threads: int | None = None,
    *,
    time_fn: TimeFn | None = None,
    cache_path: Path | None = None,
    budget_s: float = 1.5,
    threshold: float = THRESHOLD,
    load_probe: Callable[[], CpuLoad] | None = None,
) -> DtypeChoice:
    """``auto`` → a concrete dtype for this machine: from the cache, else measured (with ``threads``
    torch threads, the workers' count) and cached. One process measures at a time (a file lock).

    If other processes kept more than ``BUSY`` of the machine's CPU while it measured, the timings
    are not trusted (contention slows a multi-threaded op by whole scheduler slices, at random): the
    choice is float32, the safe one, and nothing is cached, so the next start measures again."""
    dims = dims or ModelDims()
    threads = int(threads or torch.get_num_threads())
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = cache_key(dims, threads)
    with machine_cache(path) as entries:  # every process of this machine gets the same answer
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("dtype") in CANDIDATES:
            reason = f"{hit.get('reason', '')} [cached {hit.get('measured_at', '')}]"
            log.info("dtype: %s (%s)", hit["dtype"], reason)
            return DtypeChoice(hit["dtype"], reason, hit.get("timings_ms", {}), measured=False)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with (load_probe or CpuLoad)() as load:
                t0 = time.perf_counter()
                timings, medians = measure(dims, time_fn or Timer(), budget_s=budget_s)
                took = time.perf_counter() - t0
        finally:
            torch.set_num_threads(saved)
        dtype, reason = decide(timings, threshold=threshold)
        where = f" on {cpu_name()}, {threads} thread{'s' if threads != 1 else ''}, other load {load.others:.0%}"
        if load.others > BUSY:
            figures = reason.split(" by timing (", 1)[-1].removesuffix(")")
            reason = (
                f"auto chose float32: other processes used {load.others:.0%} of the CPU while timing, "
                f"so the timings (which favoured {dtype}: {figures}) were not trusted{where}; "
                f"not cached, measured again at the next start"
            )
            log.warning("dtype: %s", reason)
            return DtypeChoice("float32", reason, timings, measured=True)
        reason += where
        log.info("dtype: %s; measured in %.1f s; cached in %s under %r", reason, took, path, key)
        entries[key] = {
            "dtype": dtype,
            "reason": reason,
            "timings_ms": timings,
            "median_ms": medians,
            "other_load": round(load.others, 3),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return DtypeChoice(dtype, reason, timings, measured=True)


def resolve(name: str, dims: ModelDims | None = None, threads: int | None = None, **kw) -> DtypeChoice:
    """A dtype name (``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16``) → the concrete choice.
    An explicit dtype is used as given, without measuring."""
    if name == "auto":
        return choose_auto(dims, threads, **kw)
    dtype = canonical(name)
    return DtypeChoice(dtype, f"{dtype} as given (--dtype {name})")
