"""One sequence being decoded on a worker, and the events its stream receives."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

from smcserve.engine.block_manager import BlockTable
from smcserve.engine.detok import IncrementalDetokenizer
from smcserve.engine.finish import FinishReason
from smcserve.engine.sampling import SamplingParams


@dataclass
class DecodeEvent:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None  # None while running
    completion_tokens: int = 0
    error: str = ""  # with ERROR: what failed (the traceback is in the worker's log)
    out_of_kv: bool = False  # with ERROR: the pool ran out of blocks (RESOURCE_EXHAUSTED, not a bug)
    logprobs: list = field(default_factory=list)  # with sampling.logprobs: a TokenLogprob per token


@dataclass
class DecodeSeq:
    request_id: str
    prompt_ids: list[int]
    block_keys: list[str]
    params: SamplingParams
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)  # KV of prompt_ids + output_ids[:-1]
    finish_reason: FinishReason | None = None
    events: queue.Queue[DecodeEvent] = field(default_factory=queue.Queue)
    hidden: Any = None  # --speculative mtp: the trunk's hidden states of its last positions with KV (drafting)

    def kv_token_ids(self) -> list[int]:
        """The tokens whose KV ``table`` must hold before the sequence runs (``block_keys`` are their keys)."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
