"""One forward pass over a batch-1 sequence with an HF cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache


@torch.inference_mode()
def forward(model, token_ids: list[int], cache: DynamicCache) -> torch.Tensor:
    """Run ``token_ids`` after what ``cache`` holds (the cache grows in place); return the last logits."""
    out = model(input_ids=torch.tensor([token_ids]), cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]
