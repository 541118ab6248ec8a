"""Self-speculative decoding in the decode loop (``smcserve serve --speculative mtp``).

Each step with at most ``max_batch`` sequences and SMC particles, every running plain request that
speculates drafts up to k tokens from the MTP heads (engine/speculative.py :class:`Speculator`), the
step's one forward runs ``[last token, d1..dk]`` per sequence over the paged KV, and the verdict
appends the accepted drafts and one more token; the rejected drafts' slots are released. A
sequence drafts from the trunk's hidden states of its last positions (``DecodeSeq.hidden``, kept
from the steps it ran in); it has none in its first step, after a plain step (above ``max_batch``)
or when it opted out (``sampling.disable_speculation``): then it decodes one token, exactly as
without speculation (same sampling, same keys). Greedy output is the plain output token for token;
sampled output keeps the model's distribution (speculative rejection sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.sampling import sample_tokens
from smcserve.engine.speculative import Draft, Speculator


@dataclass
class Speculation:
    speculator: Speculator
    max_batch: int  # above this many sequences and particles in a step, it decodes plainly

    def drafts(self, seqs: list[DecodeSeq], rows: int) -> dict[str, Draft] | None:
        """The drafts of a step of ``rows`` sequences and particles, by request id; None: a plain step
        (too many rows), after which every sequence's window is stale and dropped."""
        if rows > self.max_batch:
            for s in seqs:
                s.hidden = None
            return None
        spec = self.speculator
        ready, ks = [], []
        for s in seqs:
            k = min(spec.k, s.params.max_tokens - len(s.output_ids) - 1)  # never a slot past the last token
            if s.hidden is not None and k >= 1 and not s.params.disable_speculation:
                ready.append(s)
                ks.append(k)
        if not ready:
            return {}
        made = spec.draft([(s.hidden, s.prompt_ids + s.output_ids, s.params, k) for s, k in zip(ready, ks)])
        return {s.request_id: d for s, d in zip(ready, made)}

    def decide(self, seq: DecodeSeq, logits: torch.Tensor, draft: Draft | None) -> list[int]:
        """The tokens ``seq`` appends from its rows of ``logits`` (``[last, d1..dk]``)."""
        if draft is None or not draft.tokens:  # one token, as plain decoding samples it
            return sample_tokens(logits[:1], [seq.params], [seq.num_tokens])
        return self.speculator.verify(logits, draft, seq.params, seq.num_tokens)[1]

    def keep(self, seq: DecodeSeq, hidden: torch.Tensor) -> None:
        """Append the hidden states of the positions whose KV the step kept (the window's newest last)."""
        w = self.speculator.window
        seq.hidden = hidden[-w:].clone() if seq.hidden is None else torch.cat([seq.hidden, hidden])[-w:]
