"""Decode-sized forwards run their small ops on one thread (engine/model_runner.py ``SERIAL_MAX_TOKENS``):
the logits are bit for bit those of the all-threads forward, and the thread count is restored."""

from __future__ import annotations

import torch

from smcserve.decode.loop import append_tokens
from smcserve.engine import model_runner, single_row
from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem


def decode_logits(lm, steps: int = 3, n: int = 12) -> list[torch.Tensor]:
    """A prompt's prefill, ``n`` forks of ragged lengths, ``steps`` batched decode steps: every logits row."""
    bm, runner = BlockManager(96, 16), ModelRunner(lm, 96, 16)
    ids = list(range(200, 237))
    root = BlockTable()
    for _ in ids:
        bm.append_slot(root)
    out = [runner.forward([SeqBatchItem(ids, 0, root.blocks)])]
    tables = [bm.fork(root) for _ in range(n)]
    for j, t in enumerate(tables):  # ragged: sequence j has j % 4 more (zero) KV slots
        for _ in range(j % 4):
            bm.append_slot(t)
    tokens = [500 + j for j in range(n)]
    for _ in range(steps):
        logits = runner.forward(append_tokens(bm, runner, tables, tokens))
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
    return out


def test_serial_small_ops_change_no_logit_and_restore_the_threads(real_model, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = decode_logits(real_model)
        assert torch.get_num_threads() == 2  # restored after every forward
        monkeypatch.setattr(model_runner, "SERIAL_MAX_TOKENS", 0)  # every op on every thread
        wide = decode_logits(real_model)
    finally:
        torch.set_num_threads(threads)
    assert len(serial) == len(wide) == 4
    for a, b in zip(serial, wide):
        assert torch.equal(a, b)


def single_row_logits(lm, one_thread_ops: frozenset[str], seen: dict[str, set[int]]) -> torch.Tensor:
    """A prompt's prefill then 4 one-row decode steps with ``one_thread_ops`` on one thread; ``seen``
    collects the thread counts the Q/K/V and O products ran with."""
    runner = ModelRunner(lm, 16, 16)
    for name, linears in (("qkv", runner.qkv), ("o", runner.o_proj)):
        for i, f in enumerate(linears):
            linears[i] = lambda x, f=f, name=name: seen[name].add(torch.get_num_threads()) or f(x)
    blocks = list(range(16))
    runner.forward([SeqBatchItem(list(range(200, 237)), 0, blocks)])
    for counts in seen.values():  # the prompt's forward (37 rows) runs every product on all threads
        counts.clear()
    runner.one_thread_ops = one_thread_ops
    token, rows = 500, []
    for pos in range(37, 41):
        rows.append(runner.forward([SeqBatchItem([token], pos, blocks)]))
        token = int(rows[-1].argmax())
    return torch.cat(rows)


def test_one_row_ops_on_one_thread_change_no_logit(real_model):
    """engine/single_row.py: a single stream's step may run any of its ops on one thread (chosen by timing);
    the logits are bit for bit the same, and the chosen ops really run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        narrow_seen, wide_seen = {"qkv": set(), "o": set()}, {"qkv": set(), "o": set()}
        narrow = single_row_logits(real_model, frozenset(single_row.OPS), narrow_seen)
        wide = single_row_logits(real_model, frozenset(), wide_seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert narrow_seen == {"qkv": {1}, "o": {1}}
    assert wide_seen == {"qkv": {2}, "o": {2}}
    assert torch.equal(narrow, wide)


def test_the_one_thread_choice_is_timed_once_and_restores_the_threads(real_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = ModelRunner(real_model, 4, 16)
        chosen = single_row.narrow_ops(runner, 2)
        assert torch.get_num_threads() == 2
        assert chosen <= frozenset(single_row.OPS)
        assert single_row.narrow_ops(ModelRunner(real_model, 4, 16), 2) is chosen  # once per process and shape
        assert single_row.narrow_ops(runner, 1) == frozenset()  # one thread: nothing to choose
    finally:
        torch.set_num_threads(threads)
