"""Sampling parameters and seeded, position-keyed token sampling.

Each draw's uniform is a hash of a tuple of integers — (request seed, position) for plain decoding,
(request seed, step, particle index, child) for SMC — so a token depends only on the request's seed
and where it is, not on which worker drew it or what it was batched with. Any integers (a 64-bit
seed included) hash without overflow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16  # stop strings in one request: each is looked for in the text at every token
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_TOP_LOGPROBS = 20  # most alternatives a token's logprobs may list (OpenAI's limit)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    ignore_eos: bool = False
    logprobs: int = -1  # ≥ 0: report each token's log-probability and this many most likely alternatives
    disable_speculation: bool = False  # decode plainly on a server with --speculative mtp


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (before temperature, top-k and top-p) and the
    most likely alternatives, (token, logprob) in descending order."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """For each row of ``logits`` [B, V]: the log-probability of ``tokens[b]`` and the ``tops[b]`` best."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for b, (token, k) in enumerate(zip(tokens, tops)):
        top = ()
        if k > 0:
            values, ids = torch.topk(lp[b], min(k, lp.shape[-1]))
            top = tuple(zip(ids.tolist(), values.tolist()))
        out.append(TokenLogprob(token, float(lp[b, token]), top))
    return out


def seeded_uniform(*key: int) -> float:
    """A uniform in [0, 1) determined by the tuple of integers ``key`` alone (53 random bits)."""
    data = b"".join(int(k).to_bytes(17, "little", signed=True) for k in key)  # any |k| < 2**135
    digest = hashlib.blake2b(data, digest_size=8, person=b"smcserve-u").digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


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
    """Draw one token per row of ``logits`` [B, V]: inverse CDF (float64) with one seeded uniform per row.

    Batched over the rows: argmax over the greedy rows only, one division by the rows' temperatures
    (none when every temperature is 1), top-k/top-p row by row only where asked. Bit for bit the
    draws of :func:`sample_token` on each row alone (tests/test_sampling_batched.py).
    """
    logits = logits.float()
    out = torch.zeros(len(params), dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if greedy:
        out[greedy] = torch.argmax(logits if len(greedy) == len(params) else logits[greedy], dim=-1)
    if rows:
        scaled = logits if len(rows) == len(params) else logits[rows]
        temps = [params[i].temperature for i in rows]
        if any(t != 1.0 for t in temps):  # x / 1.0 is x exactly: no pass over the batch for T = 1
            scaled = scaled / torch.tensor(temps, dtype=scaled.dtype, device=scaled.device)[:, None]
        filtered = [j for j, i in enumerate(rows) if params[i].top_k or params[i].top_p < 1.0]
        if filtered:
            scaled = scaled.clone() if scaled is logits else scaled
            for j in filtered:
                scaled[j] = _filter(logits[rows[j]], params[rows[j]])
        u = [seeded_uniform(params[i].seed, positions[i]) for i in rows]
        u = torch.tensor(u, dtype=torch.float64, device=logits.device)
        out[rows] = inverse_cdf(torch.softmax(scaled.double(), dim=-1), u.unsqueeze(1)).squeeze(1)
    return out.tolist()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i per (row, column) of ``u`` [B, K] with cdf[i-1] <= u·total < cdf[i], from ``probs`` [B, V].

    Float64 throughout: a float32 running sum over a 50k vocabulary drifts by ~1e-4 and leaves
    tokens of small probability undrawable. Zero-probability indices are never returned.
    """
    probs = probs.double()
    cdf = torch.cumsum(probs, dim=-1)
    idx = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True)
    # An index below V has cdf[i] > cdf[i-1]: a positive probability. Only u·total rounded up to the total
    # gives V; then the last index of positive probability (looked for in those rows alone).
    over = (idx >= probs.shape[-1]).any(dim=1)
    if bool(over.any()):
        rows = over.nonzero().squeeze(1)
        last_positive = probs.shape[-1] - 1 - torch.argmax((probs[rows] > 0).flip(-1).view(torch.int8), dim=-1)
        idx[rows] = torch.minimum(idx[rows], last_positive.unsqueeze(1))
    return idx


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Draw the token at ``position`` from 1-D ``logits``."""
    return sample_tokens(logits[None], [params], [position])[0]
