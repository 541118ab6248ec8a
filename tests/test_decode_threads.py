"""Decode-sized forwards run their small ops on one thread (engine/model_runner.py ``SERIAL_MAX_TOKENS``):
the logits are bit for bit those of the all-threads forward, and the thread count is restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smcserve.decode.loop import append_tokens
from smcserve.engine import few_rows, model_runner, quant
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


def single_row_logits(
    lm, one_thread_ops: frozenset[str], seen: dict[str, set[int]], columns: bool = False
) -> torch.Tensor:
    """A prompt's prefill then 4 one-row decode steps with ``one_thread_ops`` on one thread and every
    product computed as ``W @ x.T`` if ``columns`` (else as ``F.linear``); ``seen`` collects the thread
    counts the Q/K/V and O products ran with."""
    runner = ModelRunner(lm, 16, 16)
    runner.planned.add(1)  # the formulation is set here, not timed
    for linears in runner.products().values():
        for lin in linears:
            lin.columns = {1} if columns else set()
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


@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_one_row_ops_on_one_thread_change_no_logit(real_model, columns):
    """engine/few_rows.py: a single stream's step may run on one thread any op whose result is the same so
    (``narrowable``, checked on this CPU; the plan then chooses among them by timing): with every such op
    on one thread the logits are bit for bit the same, either way round the products are computed, and
    the ops really run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops = few_rows.narrowable(ModelRunner(real_model, 4, 16), 2)
        narrow_seen, wide_seen = {"qkv": set(), "o": set()}, {"qkv": set(), "o": set()}
        narrow = single_row_logits(real_model, ops, narrow_seen, columns)
        wide = single_row_logits(real_model, frozenset(), wide_seen, columns)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert ops <= frozenset(few_rows.OPS) and ops & {"qkv", "o", "gate_up", "down"}  # products: so far on every CPU
    assert narrow_seen == {name: {1} if name in ops else {2} for name in ("qkv", "o")}
    assert wide_seen == {"qkv": {2}, "o": {2}}
    assert torch.equal(narrow, wide)


def test_only_ops_whose_result_is_the_same_are_narrowable(real_model, monkeypatch):
    """An op whose one-thread result differs (here: attention made to depend on the thread count) is never
    run on one thread, however fast."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        few_rows.F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **k) + torch.get_num_threads()
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(few_rows, "_NARROWABLE", {})  # not what other tests checked
        monkeypatch.setattr(few_rows, "_PLANS", {})
        runner = ModelRunner(real_model, 4, 16)
        assert "attend" not in few_rows.narrowable(runner, 2)
        assert "attend" not in few_rows.plan(runner, 1, 2).one_thread
    finally:
        torch.set_num_threads(threads)


def test_the_plan_is_timed_once_per_row_count_and_restores_the_threads(real_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = ModelRunner(real_model, 4, 16)
        one = few_rows.plan(runner, 1, 2)
        assert torch.get_num_threads() == 2
        assert one.one_thread <= few_rows.narrowable(runner, 2) <= frozenset(few_rows.OPS)
        assert one.columns <= frozenset(few_rows.PRODUCTS)
        assert few_rows.plan(ModelRunner(real_model, 4, 16), 1, 2) is one  # once per process, shape and rows
        three = few_rows.plan(runner, 3, 2)
        assert three.one_thread == frozenset()  # only a one-row forward runs products on one thread
        assert few_rows.plan(runner, 1, 1).one_thread == frozenset()  # one thread: nothing to choose
        assert few_rows.plan(runner, few_rows.FEW_ROWS + 1, 2) == few_rows.RowPlan()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 3])
def test_columns_formulation_runs_and_keeps_the_logits(real_model, rows, monkeypatch):
    """A forward of a few rows with every product as ``W @ x.T`` (engine/few_rows.py) gives F.linear's logits
    up to float rounding and the same greedy tokens; the products really run that way round."""
    calls = []
    real = quant.columns_product
    monkeypatch.setattr(quant, "columns_product", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def logits(columns: bool) -> torch.Tensor:
        runner = ModelRunner(real_model, 16, 16)
        runner.planned.add(rows)
        for linears in runner.products().values():
            for lin in linears:
                lin.columns = {rows} if columns else set()
        blocks = list(range(16))
        runner.forward([SeqBatchItem(list(range(200, 237)), 0, blocks)])
        calls.clear()  # the prompt's last row went through the head
        return runner.forward_all([SeqBatchItem(list(range(500, 500 + rows)), 37, blocks)])[0]

    plain = logits(False)
    assert calls == []
    cols = logits(True)
    assert set(calls) == {rows} and len(calls) == 4 * real_model.config.num_hidden_layers + 1
    torch.testing.assert_close(cols, plain, rtol=0, atol=1e-3)
    assert torch.equal(cols.argmax(-1), plain.argmax(-1))
