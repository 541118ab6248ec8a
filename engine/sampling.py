"""Sampling parameters and seeded, position-keyed token sampling.

Each draw uses a generator seeded from (request seed, position), so a token depends only on the
request's seed and where it is in the sequence — not on which worker drew it or what it was
batched with.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    ignore_eos: bool = False


def position_generator(seed: int, position: int) -> torch.Generator:
    digest = hashlib.blake2b(struct.pack("<qq", seed, position), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Draw the token at ``position`` from 1-D ``logits``."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= params.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=position_generator(params.seed, position)))
