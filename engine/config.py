"""Configuration shared by the launcher and every worker."""
from __future__ import annotations

from dataclasses import dataclass

from engine.kv import DEFAULT_BLOCK_SIZE


@dataclass
class WorkerConfig:
    """What a prefill or decode worker needs to start (plain data: it crosses Ray)."""

    model: str | None = None          # None → the default SmolLM2 model; else a local HF directory
    dtype: str = "auto"               # auto (bf16 where the CPU has it, else fp32), float32, bfloat16
    block_size: int = DEFAULT_BLOCK_SIZE
    redis_url: str = ""
    threads: int = 0                  # torch threads per worker; 0 → all cores
    host: str = ""                    # decode workers: address to bind and advertise; "" → the Ray node's IP
