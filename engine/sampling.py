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


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of logits."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= params.top_p  # the first token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """Draw one token per row of ``logits`` [B, V]: inverse-CDF with one seeded uniform per row."""
    logits = logits.float()
    out = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if rows:
        scaled = torch.stack([
            _filter(logits[i], params[i]) if params[i].top_k or params[i].top_p < 1.0
            else logits[i] / params[i].temperature for i in rows])
        cdf = torch.cumsum(torch.softmax(scaled, dim=-1), dim=-1)
        u = torch.cat([torch.rand(1, generator=position_generator(params[i].seed, positions[i])) for i in rows])
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        out[rows] = picked.clamp_(max=logits.shape[1] - 1)
    return out.tolist()


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Draw the token at ``position`` from 1-D ``logits``."""
    return sample_tokens(logits[None], [params], [position])[0]
