"""Decode-sized forwards run their small ops on one thread (engine/model_runner.py ``SERIAL_MAX_TOKENS``):
the logits are bit for bit those of the all-threads forward, and the thread count is restored."""

from __future__ import annotations

import torch

from smcserve.decode.loop import append_tokens
from smcserve.engine import model_runner
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
