"""Admission on a decode worker: a request joins only if the pool can hold it to its last token.

Every admitted sequence reserves the blocks it may still allocate, so a running sequence never
runs out of blocks because a later one took them; a request that does not fit is refused
(``OutOfBlocks``, RESOURCE_EXHAUSTED on the wire) and the scheduler tries another worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.block_manager import BlockManager, OutOfBlocks


def blocks_needed(bm: BlockManager, seq: DecodeSeq) -> int:
    """Blocks ``seq`` may still allocate before it finishes (+1 for a copy-on-write)."""
    total = len(seq.prompt_ids) + seq.params.max_tokens
    return max(0, bm.blocks_for(total) - len(seq.table.blocks)) + 1


def check_fits(bm: BlockManager, admitted: Iterable[DecodeSeq], seq: DecodeSeq) -> None:
    """Raise :class:`OutOfBlocks` unless ``seq`` fits in the pool next to the ``admitted`` sequences."""
    reserved = sum(blocks_needed(bm, s) for s in admitted)
    need = blocks_needed(bm, seq)
    free = bm.available() - reserved
    if need > free:
        raise OutOfBlocks(
            f"out of KV blocks: the request needs up to {need}, {max(0, free)} of {bm.num_blocks} are unreserved"
        )
