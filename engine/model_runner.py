"""Batched forward passes over paged KV, with the model's own weights and modules.

The KV cache of a worker is two preallocated tensors per layer of flat token slots
(``[layers, num_blocks * block_size, kv_heads, head_dim]``); a sequence's KV lives in the slots of
its block table. One decode step runs every sequence's next token as one batch: projections and
MLPs are single GEMMs over the batch, and attention gathers each sequence's own slots (padded to
the longest) for one ``scaled_dot_product_attention`` call per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smcserve.engine import paged_attention
from smcserve.engine.device import to_device, to_host
from smcserve.engine.few_rows import FEW_ROWS, plan
from smcserve.engine.kv import KVLayout
from smcserve.engine.model import LoadedModel
from smcserve.engine.paged_attention import PagedMask
from smcserve.engine.quant import make_linear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# Forwards of at most this many tokens (decode batches) run their small elementwise ops (norms, rotary,
# residuals, activation, KV writes) on one thread and only GEMMs and attention on all: waking a sleeping
# OpenMP thread (OMP_WAIT_POLICY=passive, or a busy machine) costs ~60 us, 15x such an op at batch 64.
# Elementwise results do not depend on the thread count, so the logits are unchanged. A one-row forward
# (a single stream) also runs the products that are faster so on one thread, and a forward of a few rows
# computes each product the way round that is faster (engine/few_rows.py).
SERIAL_MAX_TOKENS = 256


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class FusedWeights:
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None


def _fuse(layer) -> FusedWeights:
    """One GEMM for Q, K and V and one for gate and up. The modules' weights become views of the
    fused tensors, so the model is unchanged and no memory is duplicated."""

    def fuse(*linears):
        weight = torch.cat([m.weight.data for m in linears])
        bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
        row = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[row : row + n]
            if bias is not None:
                m.bias.data = bias[row : row + n]
            row += n
        return weight, bias

    a, m = layer.self_attn, layer.mlp
    return FusedWeights(*fuse(a.q_proj, a.k_proj, a.v_proj), *fuse(m.gate_proj, m.up_proj))


@dataclass
class SeqBatchItem:
    """One sequence's part of a forward: ``len(tokens)`` new tokens after ``start`` cached ones."""

    tokens: list[int]
    start: int
    blocks: list[int]


class ModelRunner:
    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int):
        if lm.config.model_type not in SUPPORTED:
            raise ValueError(
                f"model: architecture {lm.config.model_type!r} is not supported by the paged engine "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        self.lm = lm
        self.layout = KVLayout.from_config(lm.config, lm.dtype, block_size)
        inner = lm.model.model
        self.embed, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary, self.lm_head = inner.rotary_emb, lm.model.lm_head
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        self.num_heads = lm.config.num_attention_heads
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = dev = lm.device  # every tensor of a forward lives here (engine/device.py)
        self.k_cache = torch.zeros(L, num_blocks * block_size, H, D, dtype=lm.dtype, device=dev)
        self.v_cache = torch.zeros(L, num_blocks * block_size, H, D, dtype=lm.dtype, device=dev)
        self.arange_block = torch.arange(block_size, device=dev)
        self.fused = [_fuse(layer) for layer in self.layers]
        # every matrix product of the forward (int8 weights under --quantization int8; the modules' own
        # weights otherwise, so the model's numerics are unchanged)
        q = lm.quantization
        self.qkv = [make_linear(q, f.qkv_weight, f.qkv_bias) for f in self.fused]
        self.gate_up = [make_linear(q, f.gate_up_weight, f.gate_up_bias) for f in self.fused]
        self.o_proj = [make_linear(q, la.self_attn.o_proj.weight, la.self_attn.o_proj.bias) for la in self.layers]
        self.down_proj = [make_linear(q, la.mlp.down_proj.weight, la.mlp.down_proj.bias) for la in self.layers]
        self.head = make_linear(q, self.lm_head.weight, self.lm_head.bias)
        self.one_thread_ops: frozenset[str] | None = None  # of a one-row forward: engine/few_rows.py
        # layers (1-based) whose outputs forward_all appends to each row after h0: MTP heads with features
        self.features: tuple[int, ...] = ()
        self.planned: set[int] = set()  # row counts whose products' formulation is chosen (engine/few_rows.py)
        # attention: "flex", paged FlexAttention (engine/paged_attention.py), on CUDA; "sdpa" over gathered
        # slots elsewhere (on the CPU the gather and SDPA beat FlexAttention's eager reference)
        self.attention = "flex" if dev.type == "cuda" and paged_attention.available() else "sdpa"

    @property
    def block_bytes(self) -> int:
        return self.layout.bytes_per_token * self.block_size

    # --- block contents ------------------------------------------------------------------------
    def write_block(self, b: int, block: torch.Tensor) -> None:
        """Copy a store block ``[L, 2, H, T, D]`` (on the host) into pool block ``b``."""
        block = to_device(block, self.device)
        t = block.shape[3]
        s = b * self.block_size
        self.k_cache[:, s : s + t] = block[:, 0].transpose(1, 2)
        self.v_cache[:, s : s + t] = block[:, 1].transpose(1, 2)

    def read_block(self, b: int, tokens: int) -> torch.Tensor:
        """Pool block ``b`` (its first ``tokens`` slots) in the store layout ``[L, 2, H, T, D]``, on the host."""
        return self.read_blocks([(b, tokens)])[0]

    def read_blocks(self, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """:meth:`read_block` of each (block, tokens), copied to the host together."""
        out = []
        for b, tokens in blocks:
            s = b * self.block_size
            k, v = self.k_cache[:, s : s + tokens], self.v_cache[:, s : s + tokens]
            out.append(torch.stack((k.transpose(1, 2), v.transpose(1, 2)), dim=1).contiguous())
        return to_host(out)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k_cache[:, dst * bs : (dst + 1) * bs] = self.k_cache[:, src * bs : (src + 1) * bs]
        self.v_cache[:, dst * bs : (dst + 1) * bs] = self.v_cache[:, src * bs : (src + 1) * bs]

    # --- forward -------------------------------------------------------------------------------
    def _slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids of token positions ``[start, end)`` of a sequence."""
        table = torch.tensor(blocks, dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def forward(self, items: list[SeqBatchItem]) -> torch.Tensor:
        """Run every item's new tokens (writing their KV); return the last token's logits per item."""
        if all(len(it.tokens) == 1 for it in items):
            return self._head(self._decode(items))
        x = self._positions(items)
        last = torch.tensor(list(itertools.accumulate(len(it.tokens) for it in items)), device=self.device) - 1
        return self._head(x[last])

    @torch.inference_mode()
    def forward_all(self, items: list[SeqBatchItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every item's new tokens (writing their KV); return the logits [T, V] and last hidden states
        [T, d] (before the final norm) of every new token, item after item (speculative verification); with
        ``features``, each row is [h0, the outputs after those layers]."""
        keep = self.features
        one = all(len(it.tokens) == 1 for it in items)
        rows = self._decode(items, keep) if one else self._positions(items, keep)
        return self._head(rows[:, : self.lm.config.hidden_size] if keep else rows), rows

    def _decode(self, items: list[SeqBatchItem], keep: tuple[int, ...] = ()) -> torch.Tensor:
        """One new token per sequence, attention over each sequence's own (padded) slots: the last hidden
        states [B, d] (before the final norm)."""
        dev = self.device
        lens = [it.start + 1 for it in items]
        max_len = max(lens)
        max_blocks = -(-max_len // self.block_size)
        rows = [it.blocks[: -(-n // self.block_size)] for it, n in zip(items, lens)]
        table = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.long, device=dev)
        gather = (table[:, :, None] * self.block_size + self.arange_block).view(len(items), -1)[:, :max_len]
        positions = torch.tensor([it.start for it in items], device=dev)
        slots = gather[torch.arange(len(items), device=dev), positions]
        tokens = torch.tensor([it.tokens[0] for it in items], device=dev)
        B, H, D = len(items), self.layout.num_kv_heads, self.layout.head_dim
        if self.attention == "flex":
            paged = PagedMask.build(rows, positions[:, None], self.block_size, self.num_blocks, dev)

            def attend_paged(layer: int, q: torch.Tensor) -> torch.Tensor:  # q [B, Hq, D]
                return paged.attend(q[:, :, None], self.k_cache[layer], self.v_cache[layer]).reshape(B, -1)

            return self.trunk(tokens, positions, slots, attend_paged, keep)

        valid = torch.arange(max_len, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
        # additive, in the query's dtype, made once for every layer (SDPA would convert a bool mask per layer)
        mask = torch.zeros(valid.shape, dtype=self.lm.dtype, device=dev).masked_fill_(~valid, float("-inf"))
        mask = mask[:, None, None, :]  # [B, 1, 1, S]
        flat = gather.reshape(-1)
        k_buf = torch.empty(flat.numel(), H * D, dtype=self.k_cache.dtype, device=dev)  # reused by every layer
        v_buf = torch.empty_like(k_buf)

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q [B, Hq, D]
            torch.index_select(self.k_cache[layer].view(-1, H * D), 0, flat, out=k_buf)
            torch.index_select(self.v_cache[layer].view(-1, H * D), 0, flat, out=v_buf)
            k = k_buf.view(B, max_len, H, D).transpose(1, 2)  # [B, Hkv, S, D]
            v = v_buf.view(B, max_len, H, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
            return o.reshape(B, -1)

        return self.trunk(tokens, positions, slots, attend, keep)

    def _positions(self, items: list[SeqBatchItem], keep: tuple[int, ...] = ()) -> torch.Tensor:
        """Any number of new tokens per sequence (a prompt chunk, a token and its drafts), causal over
        each sequence's cached prefix: the last hidden states [T, d] of every new token, item after item.
        Attention is one call per layer, queries and slots padded to the longest item."""
        dev, B = self.device, len(items)
        ends = [it.start + len(it.tokens) for it in items]
        S, N = max(ends), max(len(it.tokens) for it in items)
        gather = torch.zeros(B, S, dtype=torch.long, device=dev)
        qpos = torch.full((B, N), -1, dtype=torch.long, device=dev)  # each query row's position (-1: padding)
        for b, it in enumerate(items):
            gather[b, : ends[b]] = self._slots(it.blocks, 0, ends[b])
            qpos[b, : len(it.tokens)] = torch.arange(it.start, ends[b], device=dev)
        real = qpos >= 0
        rows = real.view(-1).nonzero().squeeze(1)  # flat [B * N] index of each new token, item after item
        positions = qpos[real]
        slots = gather.gather(1, qpos.clamp(min=0))[real]
        H, D = self.layout.num_kv_heads, self.layout.head_dim
        flat = gather.view(-1)
        paged = mask = None
        if self.attention == "flex":  # a padding row sees position 0 (no NaN; discarded)
            tables = [it.blocks[: -(-e // self.block_size)] for it, e in zip(items, ends)]
            paged = PagedMask.build(tables, qpos.clamp(min=0), self.block_size, self.num_blocks, dev)
        else:
            mask = torch.arange(S, device=dev)[None, None, :] <= qpos[:, :, None]
            mask[:, :, 0] |= ~real  # a padding row attends to slot 0 (no NaN; discarded)
            mask = mask[:, None]  # [B, 1, N, S]

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q [T, Hq, D]
            if B == 1 and N == len(rows):  # one sequence, no padding
                qp = q[None].transpose(1, 2)
            else:
                qp = q.new_zeros(B * N, *q.shape[1:])
                qp[rows] = q
                qp = qp.view(B, N, *q.shape[1:]).transpose(1, 2)  # [B, Hq, N, D]
            if paged is not None:
                o = paged.attend(qp, self.k_cache[layer], self.v_cache[layer])
            else:
                k = self.k_cache[layer].view(-1, H * D)[flat].view(B, S, H, D).transpose(1, 2)
                v = self.v_cache[layer].view(-1, H * D)[flat].view(B, S, H, D).transpose(1, 2)
                o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, enable_gqa=True)
            return o.transpose(1, 2).reshape(B * N, -1)[rows]

        tokens = torch.tensor([t for it in items for t in it.tokens], device=dev)
        return self.trunk(tokens, positions, slots, attend, keep)

    def products(self) -> dict[str, list]:
        """Every matrix product of a forward, by name: each layer's, and the LM head."""
        return {"qkv": self.qkv, "o": self.o_proj, "gate_up": self.gate_up, "down": self.down_proj, "head": [self.head]}

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (float32) of the last hidden states ``x`` [T, d]."""
        self._plan(x.shape[0])
        return self.head(self.norm(x)).float()

    def _plan(self, rows: int) -> None:
        """Choose, once per row count, how a forward of a few rows runs (engine/few_rows.py)."""
        if rows > FEW_ROWS or rows in self.planned:
            return
        chosen = plan(self, rows, torch.get_num_threads())
        products = self.products()
        for name in chosen.columns:
            for lin in products[name]:
                lin.columns.add(rows)
        if rows == 1 and self.one_thread_ops is None:
            self.one_thread_ops = chosen.one_thread
        self.planned.add(rows)

    def trunk(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: Callable[[int, torch.Tensor], torch.Tensor],
        keep: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Every layer over ``tokens`` (writing their KV at ``slots``): the last hidden states [T, d] (before the
        final norm), followed in each row by the outputs after the layers in ``keep`` (1-based)."""
        T = tokens.shape[0]
        H, D = self.layout.num_kv_heads, self.layout.head_dim
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        q_size, kv_size = self.num_heads * D, H * D
        threads = torch.get_num_threads()
        serial = T <= SERIAL_MAX_TOKENS and threads > 1 and self.device.type == "cpu"
        self._plan(T)
        one_thread = (self.one_thread_ops or frozenset()) if serial and T == 1 else frozenset()

        def wide(f, *args, name: str):  # a GEMM or attention on every thread (unless ``one_thread``); with
            if not serial or name in one_thread:  # ``serial``, the ops between on one
                return f(*args)
            torch.set_num_threads(threads)
            try:
                return f(*args)
            finally:
                torch.set_num_threads(1)

        kept: list[torch.Tensor] = []
        if serial:
            torch.set_num_threads(1)
        try:
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                qkv = wide(self.qkv[i], layer.input_layernorm(x), name="qkv")
                q = qkv[:, :q_size].view(T, self.num_heads, D)
                k = qkv[:, q_size : q_size + kv_size].view(T, H, D)
                v = qkv[:, q_size + kv_size :].view(T, H, D)
                if hasattr(attn, "q_norm"):  # qwen3
                    q, k = attn.q_norm(q), attn.k_norm(k)
                    q = q * cos + _rotate_half(q) * sin
                    k = k * cos + _rotate_half(k) * sin
                else:  # Q and K rotated together: the same elementwise ops, half the calls
                    qk = qkv[:, : q_size + kv_size].view(T, self.num_heads + H, D)
                    qk = qk * cos + _rotate_half(qk) * sin
                    q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
                self.k_cache[i][slots] = k
                self.v_cache[i][slots] = v
                x = x + wide(self.o_proj[i], wide(attend, i, q, name="attend"), name="o")
                gate, up = wide(self.gate_up[i], layer.post_attention_layernorm(x), name="gate_up").chunk(2, -1)
                x = x + wide(self.down_proj[i], layer.mlp.act_fn(gate) * up, name="down")
                if i + 1 in keep:
                    kept.append(x)
        finally:
            if serial:
                torch.set_num_threads(threads)
        return torch.cat([x, *kept], dim=-1) if keep else x
