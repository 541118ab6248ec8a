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
    recorded: list[torch.Tensor] = field(default_factory=list)  # see SpeculativeDecoder's ``record``

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


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
        u = torch.tensor([[seeded_uniform(seed, index, RESAMPLE)]], dtype=torch.float64, device=p.device)
        out.append(int(inverse_cdf(residual[None], u)[0, 0]))
        return j, out
    u = torch.tensor(
        [[seeded_uniform(seed, first_index + len(drafts), RESAMPLE)]], dtype=torch.float64, device=p.device
    )
    out.append(int(inverse_cdf(p[len(drafts)][None], u)[0, 0]))
    return len(drafts), out


@dataclass
class Draft:
    """A sequence's drafted tokens and, when it samples, their distributions q [k, V] (float64)."""

    tokens: list[int]
    q: torch.Tensor | None = None


class Speculator:
    """Drafting from the heads and verifying against the trunk's logits, for :class:`SpeculativeDecoder`
    and the serving decode loop (``decode/loop.py``) alike; counts :class:`SpecStats`."""

    def __init__(self, heads: MTPHeads, k: int, vocab_size: int):
        if not 1 <= k <= heads.spec.depths:
            raise ValueError(f"num_speculative_tokens: 1 to the heads' {heads.spec.depths} depths, got {k}")
        self.heads, self.k, self.vocab_size = heads, k, vocab_size
        self.stats = SpecStats()

    @property
    def window(self) -> int:
        """Trunk hidden states a sequence keeps for drafting (the heads' attention window)."""
        return self.heads.spec.window

    def draft(self, seqs: list[tuple[torch.Tensor, list[int], SamplingParams, int]]) -> list[Draft]:
        """Drafts for each (hidden [n, d] of its last n positions with KV, its tokens, params, k ≤ self.k):
        the heads run batched over the sequences, left-padded to the longest window."""
        heads = self.heads
        W = max(h.shape[0] for h, *_ in seqs)
        d = seqs[0][0].shape[1]
        dev = seqs[0][0].device
        h0 = torch.zeros(len(seqs), W, d, dtype=seqs[0][0].dtype, device=dev)
        toks = torch.zeros(len(seqs), W, dtype=torch.long, device=dev)
        valid = torch.zeros(len(seqs), W, dtype=torch.bool, device=dev)
        for b, (hidden, tokens, _, _) in enumerate(seqs):
            n = hidden.shape[0]
            h0[b, W - n :] = hidden.to(h0.device)
            toks[b, W - n :] = torch.tensor(tokens[len(tokens) - n :], device=dev)  # x[p+1] for each position p
            valid[b, W - n :] = True
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]

        def pick(k: int, logits: torch.Tensor) -> torch.Tensor:
            idx = logits.argmax(-1)
            for b, (_, tokens, params, _) in enumerate(seqs):
                if params.temperature == 0.0:
                    continue
                q_sub = target_probs(logits[b], params)
                u = torch.tensor(
                    [[seeded_uniform(params.seed, len(tokens) + k, DRAFT)]], dtype=torch.float64, device=dev
                )
                idx[b] = inverse_cdf(q_sub[None], u)[0, 0]
                q = torch.zeros(self.vocab_size, dtype=torch.float64, device=dev)
                qs[b].append(q.index_copy_(0, heads.vocab, q_sub))
            return idx

        drafted = heads.draft(h0, toks, valid, pick, max(k for *_, k in seqs))
        return [Draft(drafted[b][:k], torch.stack(qs[b][:k]) if qs[b] else None) for b, (_, _, _, k) in enumerate(seqs)]

    def verify(self, logits: torch.Tensor, draft: Draft, params: SamplingParams, index: int) -> tuple[int, list[int]]:
        """The verdict on ``draft`` (its first token at token index ``index``) from the trunk's ``logits``
        [k+1, V] at [last token, d1..dk]: (drafts accepted, the tokens to append: those and one more)."""
        drafts = draft.tokens
        if params.temperature == 0.0:
            target = logits.argmax(-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == target[a]:
                a += 1
            accepted, tokens = a, drafts[:a] + [target[a]]
        else:
            p = torch.stack([target_probs(row, params) for row in logits])
            accepted, tokens = accept_drafts(p, draft.q, drafts, params.seed, index)
        self.stats.count(len(drafts), accepted)
        return accepted, tokens


class SpeculativeDecoder:
    """Decode a batch of :class:`SpecSeq` on ``runner``'s paged KV (blocks from ``bm``), drafting
    ``k`` tokens per step from ``heads`` (None or k = 0: plain decoding, the engine's decode path).
    ``record``: keep the trunk's last hidden state of every position a sequence writes KV for in its
    ``recorded`` (the MTP training corpus, without a second pass over the tokens)."""

    def __init__(
        self,
        runner: ModelRunner,
        bm: BlockManager,
        heads: MTPHeads | None,
        k: int,
        eos_token_ids: frozenset[int],
        max_batch: int = 16,
        record: bool = False,
    ):
        self.runner, self.bm, self.eos, self.record = runner, bm, eos_token_ids, record
        self.spec = Speculator(heads, k, runner.lm.config.vocab_size) if heads is not None and k > 0 else None
        if self.spec is not None:
            runner.features = heads.spec.features
        self.max_batch = max_batch

    @property
    def stats(self) -> SpecStats:
        return self.spec.stats if self.spec is not None else SpecStats()

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
            logits, hidden = self.runner.forward_all(items)
            end = 0
            for s, item in zip(group, items):
                start, end = end, end + len(item.tokens)
                s.hidden = hidden[max(start, end - self._window()) : end]
                if self.record:
                    s.recorded.append(hidden[start:end])
                if not s.output:
                    self._emit(s, [self._sample(logits[end - 1], s, len(s.prompt))])

    def generate(self, seqs: list[SpecSeq]) -> list[list[int]]:
        self.prefill_many([s for s in seqs if s.hidden is None and not s.done])
        while any(not s.done for s in seqs):
            self.step([s for s in seqs if not s.done])
        return [s.output for s in seqs]

    def step(self, seqs: list[SpecSeq]) -> None:
        """One verify step for ``seqs`` (each has its next token decided, its KV one token behind)."""
        speculate = self.spec is not None and len(seqs) <= self.max_batch
        spec = [s for s in seqs if speculate and s.speculate and s.hidden is not None]
        drafts: dict[int, Draft] = {}
        if spec:
            made = self.spec.draft([(s.hidden, s.tokens, s.params, self.spec.k) for s in spec])
            drafts = {id(s): d for s, d in zip(spec, made)}
        none = Draft([])
        items = [self._append(s.table, [s.output[-1], *drafts.get(id(s), none).tokens]) for s in seqs]
        if not speculate:  # plain decoding: the engine's decode forward; the windows start again after it
            logits, hidden = self.runner.forward_all(items) if self.record else (self.runner.forward(items), None)
            for s in seqs:
                s.hidden = None
        else:  # the heads need the trunk's hidden states for later steps
            logits, hidden = self.runner.forward_all(items)
        row = 0
        for s, item in zip(seqs, items):
            n = len(item.tokens)
            if id(s) in drafts:
                accepted, new = self.spec.verify(logits[row : row + n], drafts[id(s)], s.params, len(s.tokens))
            else:
                accepted, new = 0, [self._sample(logits[row], s, len(s.tokens))]
            self.bm.truncate(s.table, item.start + accepted + 1)  # roll back the rejected drafts' slots
            if hidden is not None:
                kept = hidden[row : row + accepted + 1]
                if self.record:
                    s.recorded.append(kept)
                if speculate:
                    s.hidden = (kept if s.hidden is None else torch.cat([s.hidden, kept]))[-self._window() :]
            self._emit(s, new)
            if s.done:  # drafts accepted past the end keep no slots
                self.bm.truncate(s.table, len(s.tokens) - 1)
            row += n

    def _window(self) -> int:
        return self.spec.window if self.spec is not None else 1

    def _sample(self, logits: torch.Tensor, s: SpecSeq, index: int) -> int:
        """One token from the trunk's ``logits`` (plain: no draft) at token index ``index``."""
        if s.params.temperature == 0.0:
            return int(logits.argmax())
        u = torch.tensor([[seeded_uniform(s.params.seed, index, RESAMPLE)]], dtype=torch.float64, device=logits.device)
        return int(inverse_cdf(target_probs(logits, s.params)[None], u)[0, 0])

    def _emit(self, s: SpecSeq, tokens: list[int]) -> None:
        for t in tokens:
            s.output.append(t)
            if (t in self.eos and not s.params.ignore_eos) or len(s.output) >= s.params.max_tokens:
                s.done = True
                return
