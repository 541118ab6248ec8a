"""The decode loop's scheduling without a model: admission, joins, aborts, slots, retirement, SMC jobs."""

from __future__ import annotations

import pytest

from smcserve.decode.admission import blocks_needed
from smcserve.decode.batcher import Batcher, ExtendJob, RequestClosed
from smcserve.decode.sequence import DecodeSeq
from smcserve.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from smcserve.engine.finish import FinishReason
from smcserve.engine.sampling import SamplingParams

EOS = 0
BS = 4  # tokens per block


class FakeDetok:
    """Every token reads as one character; no stop strings."""

    stopped = False

    def push(self, token: int) -> str:
        return "x"

    def flush(self) -> str:
        return ""


def seq(rid: str, prompt_len: int = 6, max_tokens: int = 5) -> DecodeSeq:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return DecodeSeq(rid, list(range(1, prompt_len + 1)), [], params, FakeDetok())


def load(bm: BlockManager, s: DecodeSeq) -> None:
    """What loading a prompt leaves behind: a table of its tokens' blocks (here without KV contents)."""
    for _ in s.prompt_ids:
        bm.append_slot(s.table)


def events(s: DecodeSeq) -> list:
    out = []
    while not s.events.empty():
        out.append(s.events.get_nowait())
    return out


def test_admitted_sequences_join_then_run():
    bm = BlockManager(32, BS)
    b = Batcher(bm, {EOS})
    first, second = seq("a"), seq("b")
    b.submit(first, 7)
    b.submit(second, 8)
    assert [e.token_ids for e in events(first)] == [[7]] and first.output_ids == [7]
    plan = b.schedule()
    assert plan.joins == [first, second] and plan.running == [] and plan.aborted == []
    for s in plan.joins:
        load(bm, s)
        b.join(s)
    plan = b.schedule()
    assert plan.joins == [] and plan.running == [first, second]
    batch = b.allocate(plan.running, plan.jobs)
    assert batch.seqs == [first, second]
    assert [(it.tokens, it.start) for it in batch.items] == [([7], 6), ([8], 6)]
    assert first.table.num_tokens == 7 and batch.copies == []


def test_aborts_retire_waiting_and_running_sequences():
    bm = BlockManager(32, BS)
    b = Batcher(bm, {EOS})
    waiting, running, other = seq("w"), seq("r"), seq("o")
    for s in (waiting, running, other):
        b.submit(s, 5)
    for s in b.schedule().joins:
        load(bm, s)
        b.join(s)
    b.submit(waiting_again := seq("w2"), 5)
    b.abort("r")
    b.abort("w2")
    b.abort("nobody")  # an unknown request id is ignored
    plan = b.schedule()
    assert plan.aborted == [waiting_again, running]
    assert plan.joins == [] and plan.running == [waiting, other]
    assert running.finish_reason == FinishReason.ABORT == "abort" and running.table.blocks == []
    assert events(running)[-1].finish_reason == "abort"
    assert waiting_again.finish_reason == FinishReason.ABORT
    assert bm.num_free == bm.num_blocks - 2 * bm.blocks_for(6)  # only the two still running hold blocks
    assert not b.pending and not b.aborted  # nothing queued any more


def test_a_request_that_does_not_fit_next_to_the_admitted_ones_is_refused():
    bm = BlockManager(8, BS)
    b = Batcher(bm, {EOS})
    big = seq("big", prompt_len=12, max_tokens=12)  # 24 tokens: 6 blocks + 1 for a copy-on-write
    assert blocks_needed(bm, big) == 7
    b.submit(big, 5)
    with pytest.raises(OutOfBlocks, match="out of KV blocks"):
        b.submit(seq("late", prompt_len=4, max_tokens=4), 5)  # needs 3: only 1 is unreserved
    assert b.num_sequences == 1 and b.requests_served == 1
    b.abort("big")
    assert b.schedule().aborted == [big] and b.num_sequences == 0
    b.submit(late := seq("late", prompt_len=4, max_tokens=4), 5)  # its reservation is free again
    assert b.schedule().joins == [late]


def test_a_running_sequence_the_pool_cannot_extend_retires_out_of_kv():
    bm = BlockManager(2, BS)
    b = Batcher(bm, {EOS})
    a, c = seq("a", prompt_len=4), seq("c", prompt_len=4)
    for s in (a, c):  # loaded directly, past admission: each fills one block exactly
        s.output_ids.append(9)
        load(bm, s)
        b.join(s)
    assert bm.num_free == 0  # the next token of either needs a new block
    batch = b.allocate([a, c], [])
    assert batch.seqs == [] and batch.items == []
    for s in (a, c):
        (ev,) = events(s)
        assert ev.finish_reason == FinishReason.ERROR and ev.out_of_kv and "KV blocks" in ev.error
    assert bm.num_free == bm.num_blocks and not b.active


def test_a_finished_sequence_retires_and_frees_its_blocks():
    bm = BlockManager(16, BS)
    b = Batcher(bm, {EOS})
    s, other = seq("s", max_tokens=10), seq("o", max_tokens=10)
    for x in (s, other):
        b.submit(x, 5)
    for x in b.schedule().joins:
        load(bm, x)
        b.join(x)
    batch = b.allocate(b.schedule().running, [])
    held = bm.num_blocks - bm.num_free
    b.emit(s, EOS)
    b.emit(other, 11)
    assert s.finish_reason == FinishReason.STOP and other.finish_reason is None
    b.retire(s, s.finish_reason)
    assert s.table.blocks == [] and bm.num_free == bm.num_blocks - held + bm.blocks_for(7)
    assert list(b.active) == ["o"] and b.schedule().running == [other]
    assert batch.seqs == [s, other]
    assert [e.finish_reason for e in events(s)] == [None, FinishReason.STOP]  # first token, then EOS
    b.retire(other, FinishReason.ABORT)
    assert bm.num_free == bm.num_blocks


def test_length_finishes_at_max_tokens():
    b = Batcher(BlockManager(8, BS), {EOS})
    s = seq("s", max_tokens=2)
    b.submit(s, 3)
    b.emit(s, 4)
    assert s.finish_reason == FinishReason.LENGTH and [e.completion_tokens for e in events(s)] == [1, 2]


def test_an_extend_job_of_a_closed_request_is_dropped():
    bm = BlockManager(16, BS)
    b = Batcher(bm, {EOS})
    table = BlockTable()
    for _ in range(5):
        bm.append_slot(table)
    child = bm.fork(table)  # shares the partial block: the job's write copies it
    live = ExtendJob([child], [3], complete=lambda logits: logits)
    closed = ExtendJob([table], [4], complete=lambda logits: logits, live=lambda: False)
    b.add_job(closed)
    b.add_job(live)
    plan = b.schedule()
    assert plan.jobs == [live]
    with pytest.raises(RequestClosed, match="closed"):
        closed.future.result(timeout=0)
    assert table.num_tokens == 5  # the dropped job took no slot
    batch = b.allocate(plan.running, plan.jobs)
    assert batch.jobs == [(live, 0, 1)] and child.num_tokens == 6
    assert batch.copies == [(table.blocks[1], child.blocks[1])]
