"""Admission on a decode worker: a request joins only if the pool can hold it to its last token.

Every admitted sequence reserves the blocks it may still allocate, and every steering request the
blocks its particles may hold at most (:meth:`decode.batcher.Batcher.reserve`), so a running
sequence never runs out of blocks because a later one took them; a request that does not fit is refused
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


def unreserved(bm: BlockManager, admitted: Iterable[DecodeSeq], groups_unheld: int = 0) -> int:
    """Blocks nobody may still claim: available, less what the ``admitted`` sequences may still allocate
    and what steering requests reserved and do not hold yet (``groups_unheld``)."""
    return bm.available() - sum(blocks_needed(bm, s) for s in admitted) - groups_unheld


def check_fits(bm: BlockManager, admitted: Iterable[DecodeSeq], seq: DecodeSeq, groups_unheld: int = 0) -> None:
    """Raise :class:`OutOfBlocks` unless ``seq`` fits in the pool next to the ``admitted`` sequences and
    the steering requests' reservations."""
    require(bm, blocks_needed(bm, seq), unreserved(bm, admitted, groups_unheld), "the request")


def require(bm: BlockManager, need: int, free: int, who: str) -> None:
    if need > free:
        raise OutOfBlocks(
            f"out of KV blocks: {who} needs up to {need}, {max(0, free)} of {bm.num_blocks} are unreserved"
        )
