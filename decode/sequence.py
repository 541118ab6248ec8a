"""One sequence being decoded on a worker."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field

from transformers import DynamicCache

from engine.detok import IncrementalDetokenizer
from engine.sampling import SamplingParams


@dataclass
class DecodeEvent:
    token_ids: list[int]
    text: str
    finish_reason: str = ""   # "" while running; then "stop", "length" or "abort"
    completion_tokens: int = 0


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    block_keys: list[str]
    params: SamplingParams
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None     # KV of prompt_ids + output_ids[:-1]
    finish_reason: str = ""
    events: "queue.Queue[DecodeEvent]" = field(default_factory=queue.Queue)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def cached_tokens(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0
