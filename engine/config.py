"""Configuration shared by the launcher and every worker."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from smcserve.engine.kv import DEFAULT_BLOCK_SIZE

DEFAULT_SPECULATIVE_MAX_BATCH = 1  # running sequences above which a step decodes plainly, where ``auto`` has nothing
# to weigh (heads without a held-out acceptance; CUDA) or for a bare WorkerConfig: bench.mtp's step_cost_ratio (k = 2)
# is 1.37 at 1 and 1.5-2.8 from 2 on our Xeon against 1.51 tokens per step (README); ``smcserve serve`` measures
# its own (engine/spec_pays.py)
DEFAULT_NUM_SPECULATIVE_TOKENS = 2  # drafts per step: MKL's fp32 GEMM over 1-3 rows costs about one row's (the
# weights streamed once), over 4 rows about twice, so verifying 3 drafts costs ~1.6 plain steps, 2 drafts ~1
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per forward (``--prefill-chunk``): a cached request waits at most
# this much of another prompt on the prefill worker; smaller chunks pay each forward's fixed cost more often (on
# our Xeon a 1,024-token prompt took 1.63x as long in 64-token chunks, 1.19x in 128, 1.02x in 256)


@dataclass
class WorkerConfig:
    """What a prefill or decode worker needs to start (plain data: it crosses Ray)."""

    model: str | None = None  # None → the default SmolLM2 model; else a local HF directory
    dtype: str = "auto"  # float32 or bfloat16 (the launcher resolves auto once for all workers;
    # auto here: timed per process, see engine/dtype.py)
    block_size: int = DEFAULT_BLOCK_SIZE
    redis_url: str = field(default="", repr=False)  # may hold a password
    threads: int = 0  # torch threads per worker; 0 → all cores
    host: str = ""  # decode workers: address to bind and advertise; "" → the Ray node's IP
    kv_cache_bytes: int = 1 << 30  # decode workers: size of the paged KV pool; prefill workers: of their
    # own prefix cache (their pool also has room for the longest prompt)
    prefix_cache: bool = True  # prefill workers: reuse prompt blocks already in the KV store
    secret: str = field(default="", repr=False)  # decode workers: callers of their service must send it
    quantization: str = "none"  # the paged engine's weights: none or int8 (engine/quant.py)
    device: str = "cpu"  # cpu or cuda (the launcher resolves auto, engine/device.py)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per forward (prefill, a decode worker's
    # prompt recompute), other work running between chunks; 0: a whole prompt at once
    speculative: str = ""  # decode workers: "mtp" (self-speculative decoding with the model's MTP heads) or off
    mtp_style: str = "deepseek"  # the heads' style: MODEL/mtp/STYLE.safetensors
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS  # drafts per step and sequence (≤ the heads' depths)
    speculative_max_batch: int = DEFAULT_SPECULATIVE_MAX_BATCH  # above this many running sequences: plain steps

    def same_but_secret(self, other: WorkerConfig) -> bool:
        return replace(self, secret="") == replace(other, secret="")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``512mb``, ``2gb`` or ``1048576``."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix) and t[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(suffix)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"not a size: {text!r} (use e.g. 512mb or 2gb)")
