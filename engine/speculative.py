"""Self-speculative decoding with MTP heads (engine/mtp.py) over the paged KV, lossless.

Each step, every speculating sequence drafts k tokens from the heads (from its last trunk hidden
states) and the trunk verifies them in one batched forward over k+1 positions per sequence
(``[last token, d1..dk]``), writing their KV through the block manager (a forked particle's shared
block is copied on write). The verdict per position j, where the trunk's distribution is p_j:

- greedy: d_{j+1} is accepted iff it is argmax p_j, so the output is the plain greedy output;
- sampling (Leviathan et al. 2023; Chen et al. 2023): d_{j+1} ~ q_j (the head's distribution under
  the same temperature/top-k/top-p) is accepted with probability min(1, p_j(d)/q_j(d)); at the first
  rejection the token is drawn from norm(max(p_j - q_j, 0)); with every draft accepted, a bonus token
  from p_k. Each token is then distributed exactly as under p.

The uniforms are keyed by (seed, token index, use), so a seeded request is reproducible (its tokens
differ from plain decoding's with the same seed, which draws once per index). Rejected slots are
rolled back (:meth:`BlockManager.truncate`). Above ``max_batch`` running sequences (or for a request
that opts out) a step decodes one token per sequence, as without MTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from smcserve.engine.block_manager import BlockManager, BlockTable
from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
from smcserve.engine.mtp import MTPHeads
from smcserve.engine.sampling import SamplingParams, _filter, inverse_cdf, seeded_uniform

DRAFT, ACCEPT, RESAMPLE = 1, 2, 3  # what a uniform is for (the last part of its key)


@dataclass
class SpecStats:
    """vLLM's speculative metrics: per depth, drafts made and accepted; mean accepted length = 1 +
    accepted / drafting steps (tokens a sequence gains per verify step)."""

    steps: int = 0  # sequence-steps that verified drafts
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def count(self, k: int, accepted: int) -> None:
        if len(self.drafted) < k:
            self.drafted += [0] * (k - len(self.drafted))
            self.accepted += [0] * (k - len(self.accepted))
        self.steps += 1
        for j in range(k):
            self.drafted[j] += 1
            self.accepted[j] += j < accepted

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + sum(self.accepted) / self.steps if self.steps else 1.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]


@dataclass
class SpecSeq:
    """One sequence: ``table`` holds the KV of every token but the last; ``hidden`` the trunk's last
    hidden states of (up to a window of) the positions with KV, the newest last."""

    prompt: list[int]
    params: SamplingParams
    speculate: bool = True  # False: this request opts out
    output: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)
    hidden: torch.Tensor | None = None
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@torch.inference_mode()
def forward_all(runner: ModelRunner, items: list[SeqBatchItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every new token of every item (causal over its cached prefix, writing KV): logits [T, V]
    and last hidden states [T, d], item after item. Attention is one call per layer over the items'
    slots, padded to the longest (as in the engine's decode step)."""
    bs = runner.block_size
    B = len(items)
    ends = [it.start + len(it.tokens) for it in items]
    S, N = max(ends), max(len(it.tokens) for it in items)
    gather = torch.zeros(B, S, dtype=torch.long)
    qpos = torch.full((B, N), -1, dtype=torch.long)  # each query row's position (-1: padding)
    for b, it in enumerate(items):
        table = torch.tensor(it.blocks, dtype=torch.long)
        pos = torch.arange(ends[b])
        gather[b, : ends[b]] = table[pos // bs] * bs + pos % bs
        qpos[b, : len(it.tokens)] = torch.arange(it.start, ends[b])
    real = qpos >= 0
    rows = real.view(-1).nonzero().squeeze(1)  # flat [B * N] index of each new token, item after item
    mask = torch.arange(S)[None, None, :] <= qpos[:, :, None]
    mask[:, :, 0] |= ~real  # a padding row attends to slot 0 (no NaN; discarded)
    mask = mask[:, None]  # [B, 1, N, S]
    positions = qpos[real]
    slots = gather.gather(1, qpos.clamp(min=0))[real]
    H, D = runner.layout.num_kv_heads, runner.layout.head_dim
    flat = gather.view(-1)

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q [T, Hq, D]
        k = runner.k_cache[layer].view(-1, H * D)[flat].view(B, S, H, D).transpose(1, 2)
        v = runner.v_cache[layer].view(-1, H * D)[flat].view(B, S, H, D).transpose(1, 2)
        qp = q.new_zeros(B * N, *q.shape[1:])
        qp[rows] = q
        qp = qp.view(B, N, *q.shape[1:]).transpose(1, 2)  # [B, Hq, N, D]
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(B * N, -1)[rows]

    tokens = torch.tensor([t for it in items for t in it.tokens])
    x = runner.trunk(tokens, positions, slots, attend)
    return runner.head(runner.norm(x)).float(), x


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from under ``params`` (temperature > 0), float64 [V]."""
    return torch.softmax(_filter(logits.float(), params).double(), dim=-1)


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], seed: int, first_index: int
) -> tuple[int, list[int]]:
    """Speculative rejection sampling. ``p`` [k+1, V]: the target distributions at the k+1 verified
    positions; ``q`` [k, V]: the drafts' distributions; ``drafts`` the k drafted tokens, the first at
    token index ``first_index``. Returns (accepted drafts, the tokens to append)."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        index = first_index + j
        u = seeded_uniform(seed, index, ACCEPT)
        if q[j, d] > 0 and u * float(q[j, d]) < float(p[j, d]):  # u < p/q
            out.append(d)
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: no rejection is possible, but numerically guard
            residual = p[j]
        u = torch.tensor([[seeded_uniform(seed, index, RESAMPLE)]], dtype=torch.float64)
        out.append(int(inverse_cdf(residual[None], u)[0, 0]))
        return j, out
    u = torch.tensor([[seeded_uniform(seed, first_index + len(drafts), RESAMPLE)]], dtype=torch.float64)
    out.append(int(inverse_cdf(p[len(drafts)][None], u)[0, 0]))
    return len(drafts), out


class SpeculativeDecoder:
    """Decode a batch of :class:`SpecSeq` on ``runner``'s paged KV (blocks from ``bm``), drafting
    ``k`` tokens per step from ``heads`` (None or k = 0: plain decoding, the engine's decode path)."""

    def __init__(
        self,
        runner: ModelRunner,
        bm: BlockManager,
        heads: MTPHeads | None,
        k: int,
        eos_token_ids: frozenset[int],
        max_batch: int = 16,
    ):
        if heads is not None and k > heads.spec.depths:
            raise ValueError(f"num_speculative_tokens: at most the heads' {heads.spec.depths} depths, got {k}")
        self.runner, self.bm, self.heads, self.eos = runner, bm, heads, eos_token_ids
        self.k = k if heads is not None else 0
        self.max_batch = max_batch
        self.stats = SpecStats()

    # --- slots --------------------------------------------------------------------------------
    def _append(self, table: BlockTable, tokens: list[int]) -> SeqBatchItem:
        start = table.num_tokens
        for _ in tokens:
            _, copy = self.bm.append_slot(table)
            if copy is not None:  # a shared (forked) block: copy on write
                self.runner.copy_block(*copy)
        return SeqBatchItem(list(tokens), start, list(table.blocks))

    # --- sequences ------------------------------------------------------------------------------
    def prefill(self, seq: SpecSeq) -> None:
        self.prefill_many([seq])

    def prefill_many(self, seqs: list[SpecSeq], chunk: int = 4096) -> None:
        """Write the KV of each sequence's tokens but the last (after whatever its table holds) and keep
        its hidden states; without output yet, run the whole prompt and decide the first token. One
        forward per ``chunk`` tokens."""
        i = 0
        while i < len(seqs):
            group, items, n = [], [], 0
            while i < len(seqs) and (not group or n + len(seqs[i].tokens) <= chunk):
                s = seqs[i]
                tokens = s.tokens if not s.output else s.tokens[:-1]
                items.append(self._append(s.table, tokens[s.table.num_tokens :]))
                group.append(s)
                n += len(items[-1].tokens)
                i += 1
            logits, hidden = forward_all(self.runner, items)
            end = 0
            for s, item in zip(group, items):
                start, end = end, end + len(item.tokens)
                s.hidden = hidden[max(start, end - self._window()) : end]
                if not s.output:
                    self._emit(s, [self._sample(logits[end - 1], s, len(s.prompt))])

    def generate(self, seqs: list[SpecSeq]) -> list[list[int]]:
        self.prefill_many([s for s in seqs if s.hidden is None and not s.done])
        while any(not s.done for s in seqs):
            self.step([s for s in seqs if not s.done])
        return [s.output for s in seqs]

    def step(self, seqs: list[SpecSeq]) -> None:
        """One verify step for ``seqs`` (each has its next token decided, its KV one token behind)."""
        speculate = self.k > 0 and len(seqs) <= self.max_batch
        spec = [s for s in seqs if speculate and s.speculate]
        drafts, qs = self._draft(spec) if spec else ({}, {})
        items = [self._append(s.table, [s.output[-1], *drafts.get(id(s), [])]) for s in seqs]
        if not speculate:  # one token per sequence: the engine's decode forward
            if self.heads is None:
                logits, hidden = self.runner.forward(items), None
            else:  # the heads need the trunk's hidden states for later steps
                logits, hidden = forward_all(self.runner, items)
            for i, s in enumerate(seqs):
                if hidden is not None:
                    s.hidden = torch.cat([s.hidden, hidden[i : i + 1]])[-self._window() :]
                self._emit(s, [self._sample(logits[i], s, len(s.tokens))])
            return
        logits, hidden = forward_all(self.runner, items)
        row = 0
        for s, item in zip(seqs, items):
            n = len(item.tokens)
            d = drafts.get(id(s), [])
            if d:
                accepted, new = self._verify(logits[row : row + n], d, qs.get(id(s)), s)
                self.stats.count(len(d), accepted)
            else:
                accepted, new = 0, [self._sample(logits[row], s, len(s.tokens))]
            self.bm.truncate(s.table, item.start + accepted + 1)  # roll back the rejected drafts' slots
            s.hidden = torch.cat([s.hidden, hidden[row : row + accepted + 1]])[-self._window() :]
            self._emit(s, new)
            if s.done:  # drafts accepted past the end keep no slots
                self.bm.truncate(s.table, len(s.tokens) - 1)
            row += n

    # --- drafting and verifying ------------------------------------------------------------------
    def _window(self) -> int:
        return self.heads.spec.window if self.heads is not None else 1

    def _draft(self, seqs: list[SpecSeq]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Drafts (k tokens) per sequence and, for sampled ones, their distributions q [k, V]."""
        heads = self.heads
        W = max(s.hidden.shape[0] for s in seqs)
        d = seqs[0].hidden.shape[1]
        h0 = torch.zeros(len(seqs), W, d, dtype=seqs[0].hidden.dtype)
        toks = torch.zeros(len(seqs), W, dtype=torch.long)
        valid = torch.zeros(len(seqs), W, dtype=torch.bool)
        for b, s in enumerate(seqs):
            n = s.hidden.shape[0]
            h0[b, W - n :] = s.hidden
            toks[b, W - n :] = torch.tensor(s.tokens[len(s.tokens) - n :])  # x[p+1] for each position p
            valid[b, W - n :] = True
        V = self.runner.lm.config.vocab_size
        qs: dict[int, list[torch.Tensor]] = {id(s): [] for s in seqs if s.params.temperature != 0.0}

        def pick(k: int, logits: torch.Tensor) -> torch.Tensor:
            idx = logits.argmax(-1)
            for b, s in enumerate(seqs):
                if s.params.temperature == 0.0:
                    continue
                q_sub = target_probs(logits[b], s.params)
                u = torch.tensor([[seeded_uniform(s.params.seed, len(s.tokens) + k, DRAFT)]], dtype=torch.float64)
                idx[b] = inverse_cdf(q_sub[None], u)[0, 0]
                qs[id(s)].append(torch.zeros(V, dtype=torch.float64).index_copy_(0, heads.vocab, q_sub))
            return idx

        drafted = heads.draft(h0, toks, valid, pick)
        out = {id(s): drafted[b][: self.k] for b, s in enumerate(seqs)}
        return out, {key: torch.stack(v[: self.k]) for key, v in qs.items()}

    def _verify(
        self, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, s: SpecSeq
    ) -> tuple[int, list[int]]:
        if s.params.temperature == 0.0:
            target = logits.argmax(-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == target[a]:
                a += 1
            return a, drafts[:a] + [target[a]]
        p = torch.stack([target_probs(row, s.params) for row in logits])
        return accept_drafts(p, q, drafts, s.params.seed, len(s.tokens))

    def _sample(self, logits: torch.Tensor, s: SpecSeq, index: int) -> int:
        """One token from the trunk's ``logits`` (plain: no draft) at token index ``index``."""
        if s.params.temperature == 0.0:
            return int(logits.argmax())
        u = torch.tensor([[seeded_uniform(s.params.seed, index, RESAMPLE)]], dtype=torch.float64)
        return int(inverse_cdf(target_probs(logits, s.params)[None], u)[0, 0])

    def _emit(self, s: SpecSeq, tokens: list[int]) -> None:
        for t in tokens:
            s.output.append(t)
            if (t in self.eos and not s.params.ignore_eos) or len(s.output) >= s.params.max_tokens:
                s.done = True
                return
