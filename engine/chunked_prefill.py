"""A prompt's KV computed in chunks of ``chunk`` tokens, one forward each, so that other work (another
prompt, a decode step) can run between them. Every chunk attends over the KV of the ones before it
(already in the table), so the KV and the last logits are those of one forward over the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from smcserve.engine.block_manager import BlockTable
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem


@dataclass
class ChunkedPrefill:
    """``tokens``' KV into ``table`` (which has a slot for every token): the first ``cached`` came from a
    cache, ``done`` are in the table so far."""

    tokens: list[int]
    table: BlockTable
    cached: int  # leading tokens whose KV was reused, not computed
    chunk: int = 0  # tokens per forward; 0: the rest at once
    done: int = field(init=False)  # tokens whose KV is in the table (the cached ones count)
    logits: torch.Tensor | None = None  # of the last token computed: the prompt's next token, once finished

    def __post_init__(self):
        self.done = self.cached

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done

    @property
    def finished(self) -> bool:
        return self.done >= len(self.tokens)

    def run_chunk(self, runner: ModelRunner, budget: int = 0) -> int:
        """Compute the next chunk (at most ``budget`` tokens when > 0); returns its length."""
        n = self.remaining if self.chunk <= 0 else min(self.remaining, self.chunk)
        if budget > 0:
            n = min(n, budget)
        if n <= 0:
            return 0
        s = self.done
        self.logits = runner.forward([SeqBatchItem(self.tokens[s : s + n], s, self.table.blocks)])[0]
        self.done = s + n
        return n
