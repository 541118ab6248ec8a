"""Self-distillation of MTP heads (``smcserve mtp train``).

1. The served model decodes its own corpus from the instruction prompts shipped in
   ``engine/mtp_prompts.json`` (the ``train`` set; ``heldout`` is for measuring).
2. The trunk's last hidden state of every position, kept as the corpus is decoded, is cached with it
   (``corpus-*.safetensors`` in the work folder, named by the prompts and settings that made it, so a
   resumed run skips steps 1 and 2).
3. The heads train on random windows of the cache, one head at a time (:func:`train_step`), each
   depth towards the trunk's own next-token distribution at the position it drafts for (soft targets:
   the trunk's logits are its unembedding of the cached hidden states, recomputed per batch). Depth 1
   trains alone for the first ``depth1_share`` of the schedule (its steps cost ~0.4 of a step of three
   depths, and every later depth's acceptance is conditional on its own), then every depth; each depth's
   learning rate decays on a cosine from the step it starts (:func:`depth_lr`).

A checkpoint (heads and optimiser) is written every ``checkpoint_every`` steps; a run with the same
work folder resumes from it. ``minutes`` is a budget for the whole (corpus included, resumed runs
added up): the learning rate's cosine decay follows whichever of steps and wall time is further
along, so a slower CPU trains fewer steps but still ends annealed, within the budget.
4. With ``heldout`` prompts (``smcserve mtp train``: 8 of the ``heldout`` set), the trained heads draft
   on them greedily and each depth's acceptance is kept in the heads' file (its ``HELDOUT_MINUTES``
   are kept out of the training's share of the budget): ``smcserve serve --speculative-max-batch
   auto`` weighs a speculative step's measured cost against it (``engine/spec_pays.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smcserve.engine.model import LoadedModel
from smcserve.engine.mtp import MTPHeads, MTPSpec, block_forward, save_heads, weights_fingerprint, window_mask


def instruction_prompts(split: str = "train") -> list[str]:
    """The shipped instruction prompts: ``train`` (the corpus) or ``heldout`` (benchmarks)."""
    data = json.loads(resources.files("smcserve.engine").joinpath("mtp_prompts.json").read_text())
    return list(data[split])


def encode_prompt(tok, text: str) -> list[int]:
    """``text`` as the user's turn of the model's chat template (its plain tokens without one)."""
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tok.encode(text)


@dataclass
class TrainConfig:
    steps: int = 2500
    batch: int = 8  # windows per step
    seq_len: int = 64  # tokens per window
    lr: float = 2e-3
    completions: int = 2  # completions per training prompt (the first greedy)
    max_tokens: int = 160  # tokens per completion
    temperature: float = 0.7
    seed: int = 0
    checkpoint_every: int = 50
    draft_vocab: int = 8192  # the corpus's most frequent tokens the heads draft from (0: the whole vocabulary)
    depth1_share: float = 0.5  # of the schedule (steps or time) in which depth 1 trains alone (0: all from the start)
    minutes: float = 20.0  # > 0: wall-time budget of the whole training, corpus included (module docstring)


# --- corpus ----------------------------------------------------------------------------------------
def _capture_last_hidden(model: nn.Module) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Record the output of the trunk's last layer (the hidden state before the final norm)."""
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        seen.append(out[0] if isinstance(out, tuple) else out)

    handle = model.model.layers[-1].register_forward_hook(hook)
    return seen, handle.remove


@torch.no_grad()
def trunk_hidden(lm: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """The trunk's last hidden states [T, d] (fp32) over ``tokens``."""
    seen, remove = _capture_last_hidden(lm.model)
    try:
        lm.model(torch.tensor([tokens]), use_cache=False)
    finally:
        remove()
    return seen[-1][0].float()


def generate_corpus(
    lm: LoadedModel,
    prompts: list[str],
    cfg: TrainConfig,
    progress: Callable[[int], None] = lambda n: None,
    features: tuple[int, ...] = (),
    batch: int = 256,
) -> Corpus:
    """Prompt + completion, ``cfg.completions`` per prompt (the first greedy, as the drafts are mostly
    verified greedily, the others sampled at ``cfg.temperature`` for variety), decoded by the paged engine
    up to ``batch`` at a time, continuously (a finished sequence's place goes to the next prompt; seeded:
    the same config gives the same corpus). The decoder keeps the trunk's last hidden state of every
    position as it goes (a sequence's last token, never run, is left out): no second pass. With
    ``features``, each position's row also holds the outputs after those layers (``MTPSpec.features``).
    (On 2 AVX2 cores the default corpus took 9.0 min against 9.6 in static batches of 64: the gathers
    of the longer KV over the wider batch eat most of what the larger products gain.)"""
    from smcserve.engine.block_manager import BlockManager
    from smcserve.engine.model_runner import ModelRunner
    from smcserve.engine.sampling import SamplingParams
    from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder

    ids = [encode_prompt(lm.tokenizer, p) for p in prompts]
    seqs = []
    for n, (p, c) in enumerate((p, c) for c in range(cfg.completions) for p in ids):
        temperature = 0.0 if c == 0 else cfg.temperature
        seqs.append(
            SpecSeq(p, SamplingParams(temperature=temperature, max_tokens=cfg.max_tokens, seed=cfg.seed + 7919 * c + n))
        )
    block = 16
    batch = min(batch, len(seqs))
    num_blocks = batch * (-(-(max(len(p) for p in ids) + cfg.max_tokens) // block) + 1)
    runner = ModelRunner(lm, num_blocks, block)
    runner.features = features
    bm = BlockManager(num_blocks, block)
    dec = SpeculativeDecoder(runner, bm, None, 0, lm.eos_token_ids, record=True)
    waiting, running = list(reversed(seqs)), []
    while waiting or running:
        if len(running) <= batch * 7 // 8 and waiting:  # refill in groups: a prefill forward is worth batching
            new = [waiting.pop() for _ in range(min(batch - len(running), len(waiting)))]
            dec.prefill_many(new)
            running += new
        live = [s for s in running if not s.done]
        if live:
            dec.step(live)
        for s in [s for s in running if s.done]:
            bm.free_table(s.table)
            progress(1)
        running = [s for s in running if not s.done]
    tokens, hidden = [], []
    for s in seqs:
        h = torch.cat(s.recorded).float()  # a plain tensor, out of inference mode (autograd may save it)
        tokens.append(torch.tensor(s.tokens[: len(h)]))
        hidden.append(h)
    return Corpus(tokens, hidden)


@dataclass
class Corpus:
    tokens: list[torch.Tensor]  # [T] per sequence
    hidden: list[torch.Tensor]  # [T, d] trunk last hidden states per sequence ([T, d × (1 + features)] with them)
    minutes: float = 0.0  # the wall time it took to make (counted in the training's budget)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {}
        for i, (t, h) in enumerate(zip(self.tokens, self.hidden)):
            state[f"t{i}"], state[f"h{i}"] = t.contiguous(), h.contiguous()
        save_file(state, path, metadata={"minutes": str(self.minutes)})

    @classmethod
    def load(cls, path: Path) -> Corpus:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            minutes = float((f.metadata() or {}).get("minutes", 0.0))
        state = load_file(path)
        n = len(state) // 2
        return cls([state[f"t{i}"] for i in range(n)], [state[f"h{i}"] for i in range(n)], minutes)

    def frequent_tokens(self, n: int) -> torch.Tensor:
        """The ``n`` most frequent token ids of the corpus."""
        ids, counts = torch.cat(self.tokens).unique(return_counts=True)
        return ids[counts.argsort(descending=True, stable=True)[:n]]

    def windows(self, rng: random.Random, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` random windows: (hidden [B, T, d], tokens [B, T]) from sequences at least T long."""
        long = [i for i, t in enumerate(self.tokens) if len(t) >= seq_len]
        hs, ts = [], []
        for _ in range(batch):
            i = rng.choice(long)
            s = rng.randrange(len(self.tokens[i]) - seq_len + 1)
            hs.append(self.hidden[i][s : s + seq_len])
            ts.append(self.tokens[i][s : s + seq_len])
        return torch.stack(hs), torch.stack(ts)


# --- one training step -------------------------------------------------------------------------------
def distill_targets(heads: MTPHeads, hidden: torch.Tensor) -> torch.Tensor:
    """The trunk's next-token log-probabilities at every position of the windows [B, T, V'], restricted to
    the draft vocabulary and renormalised: depth k (0-based) at position p reads ``x[p+k+1]`` and learns
    the trunk's distribution of ``x[p+k+2]``, its row at position p+k+1."""
    with torch.no_grad():
        return F.log_softmax(heads.trunk_logits(hidden), dim=-1)


def distill_loss(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(trunk ‖ head) per position, mean: the soft cross-entropy less the trunk's entropy (0: a perfect
    draft distribution)."""
    V = logits.shape[-1]
    return F.kl_div(
        F.log_softmax(logits.reshape(-1, V), -1), target_logp.reshape(-1, V), log_target=True, reduction="batchmean"
    )


def train_step(
    heads: MTPHeads,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    trunk_tail: Callable[[torch.Tensor], torch.Tensor] | None = None,
    head_by_head: bool = True,
    depths: int | None = None,
) -> list[float]:
    """Accumulate the gradients of one step of the first ``depths`` depths (default: all); return each
    one's mean KL to the trunk.

    ``hidden`` [B, T, d] are the cached trunk hidden states, or, with ``trunk_tail`` (fine-tuning the
    last trunk layers), that tail's inputs. The order follows Gloeckle et al.: the trunk output z is
    detached into d, each head runs forward and backward alone (only one head's logits and their
    gradient exist at a time), then one backward through the trunk with the gradient gathered in d.
    Between deepseek depths the hidden state is detached too. ``head_by_head=False`` is the naive
    order (every head's logits alive, one backward), kept as the memory test's negative control.
    """
    z = trunk_tail(hidden) if trunk_tail is not None else hidden
    d = z.detach().requires_grad_(trunk_tail is not None)
    target = distill_targets(heads, d.detach())
    mask = window_mask(tokens.shape[1], heads.spec.window)
    prev, losses, total = d, [], []
    for k in range(heads.spec.depths if depths is None else depths):
        n = tokens.shape[1] - k - 1
        h = heads.depth_hidden(k, prev[:, :n], tokens[:, k + 1 :], mask[..., :n, :n])
        loss = distill_loss(heads.logits(k, h), target[:, k + 1 :])
        losses.append(loss.item())
        if head_by_head:
            loss.backward()
        else:
            total.append(loss)
        del loss
        if heads.spec.style == "deepseek":
            prev = h.detach()
    if not head_by_head:
        sum(total).backward()
    if trunk_tail is not None:
        z.backward(d.grad)
    return losses


@torch.no_grad()
def depth_losses(heads: MTPHeads, hidden: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    """Each depth's mean KL to the trunk on a batch of windows (no gradients)."""
    target = distill_targets(heads, hidden)
    mask = window_mask(tokens.shape[1], heads.spec.window)
    prev, losses = hidden, []
    for k in range(heads.spec.depths):
        n = tokens.shape[1] - k - 1
        h = heads.depth_hidden(k, prev[:, :n], tokens[:, k + 1 :], mask[..., :n, :n])
        losses.append(distill_loss(heads.logits(k, h), target[:, k + 1 :]).item())
        if heads.spec.style == "deepseek":
            prev = h
    return losses


def trunk_tail_fn(model: nn.Module, layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trunk's last ``layers`` layers as a function of their input hidden states (causal, for fine-tuning)."""
    inner = model.model

    def tail(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        cos, sin = inner.rotary_emb(x, torch.arange(T)[None])
        mask = window_mask(T, T)
        for layer in inner.layers[-layers:]:
            x = block_forward(layer, x, cos[:, :, None], sin[:, :, None], mask)
        return x

    return tail


# --- the training run --------------------------------------------------------------------------------
def depth_parameters(heads: MTPHeads) -> list[list[nn.Parameter]]:
    """Each depth's parameters (the mid-layer feature projection belongs to depth 1)."""
    groups: list[list[nn.Parameter]] = [[] for _ in range(heads.spec.depths)]
    for name, p in heads.named_parameters():
        first, _, rest = name.partition(".")
        groups[0 if first.startswith("f_") else int(rest.split(".")[0])].append(p)
    return groups


def depth_start(cfg: TrainConfig, k: int) -> float:
    """Where in the schedule depth ``k`` (0-based) starts training: depth 1 at once, the others after
    ``cfg.depth1_share``."""
    return cfg.depth1_share if k > 0 else 0.0


def depth_lr(cfg: TrainConfig, k: int, done: float) -> float:
    """Depth ``k``'s (0-based) learning rate when ``done`` of the schedule is: 0 before it starts
    (:func:`depth_start`), then a cosine decay to 0 at the schedule's end."""
    start = depth_start(cfg, k)
    if done < start:
        return 0.0
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min((done - start) / (1 - start), 1.0)))


def _save_checkpoint(
    path: Path, heads: MTPHeads, opt: torch.optim.Optimizer, step: int, meta: dict, minutes: float
) -> None:
    """Heads and AdamW moments as safetensors (never a pickle); step, training minutes so far and identity
    in the metadata."""
    from safetensors.torch import save_file

    state = {f"heads.{k}": v.detach().float().contiguous() for k, v in heads.state_dict().items()}
    names = dict(heads.named_parameters())
    by_id = {id(p): n for n, p in names.items()}
    for p, s in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"opt.{by_id[id(p)]}.{key}"] = s[key].contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata={"step": str(step), "minutes": str(minutes), **meta})
    tmp.replace(path)


def _load_checkpoint(path: Path, heads: MTPHeads, opt: torch.optim.Optimizer, meta: dict) -> tuple[int, float]:
    """The step the checkpoint at ``path`` reached and the training minutes it took ((0, 0) when absent or
    made for another model/spec)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return 0, 0.0
    with safe_open(path, framework="pt") as f:
        saved = f.metadata() or {}
    if any(saved.get(k) != v for k, v in meta.items()):
        return 0, 0.0
    state = load_file(path)
    heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
    heads.set_vocab(heads.vocab)
    step = int(saved["step"])
    for name, p in heads.named_parameters():
        if f"opt.{name}.exp_avg" in state:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": state[f"opt.{name}.exp_avg"],
                "exp_avg_sq": state[f"opt.{name}.exp_avg_sq"],
            }
    return step, float(saved.get("minutes", 0.0))


@dataclass
class TrainResult:
    path: Path
    steps: int
    losses: list[float]  # per depth, mean over the last steps
    train_minutes: float  # wall time of the heads: corpus, cache and training, over every resumed run
    corpus_tokens: int
    acceptance_per_depth: list[float] = field(default_factory=list)  # on held-out prompts (empty: not measured)


HELDOUT_MINUTES = 0.5  # kept out of the training's time budget for the held-out measurement (~25 s here)


def heldout_acceptance(lm: LoadedModel, heads: MTPHeads, prompts: list[str], max_tokens: int = 32) -> list[float]:
    """Each depth's acceptance on ``prompts`` (never trained on), every depth drafting, greedy, the prompts
    decoded together: what ``--speculative-max-batch auto`` weighs a speculative step's cost against."""
    from smcserve.engine.block_manager import BlockManager
    from smcserve.engine.model_runner import ModelRunner
    from smcserve.engine.sampling import SamplingParams
    from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder

    ids = [encode_prompt(lm.tokenizer, p) for p in prompts]
    longest = max(len(p) for p in ids) + max_tokens + heads.spec.depths + 8
    blocks = len(ids) * (-(-longest // 16) + 1)
    runner = ModelRunner(lm, blocks, 16)
    dec = SpeculativeDecoder(runner, BlockManager(blocks, 16), heads, heads.spec.depths, lm.eos_token_ids, len(ids))
    dec.generate([SpecSeq(p, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for p in ids])
    return [round(a, 4) for a in dec.stats.acceptance_per_depth]


def train(
    lm: LoadedModel,
    spec: MTPSpec,
    cfg: TrainConfig,
    work: Path,
    output: Path | None = None,
    prompts: list[str] | None = None,
    show_progress: bool = True,
    corpus: Corpus | None = None,
    clock: Callable[[], float] = time.monotonic,
    heldout: list[str] | None = None,
) -> TrainResult:
    """Self-distil ``spec``'s heads for ``lm`` (resumable through ``work``) and save them (``output``
    or the model's ``mtp/<style>.safetensors``). ``corpus``: train on this one instead of sampling one;
    ``clock``: seconds (the budget's); ``heldout``: prompts to measure the trained heads' acceptance on
    (kept in the heads' file, see :func:`heldout_acceptance`)."""
    from tqdm import tqdm

    t0 = clock()
    work.mkdir(parents=True, exist_ok=True)
    prompts = instruction_prompts("train") if prompts is None else prompts
    fp = weights_fingerprint(lm)
    made_of = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12]  # the prompts it was decoded from
    layers = "".join(f"-f{n}" for n in spec.features)  # rows with mid-layer features: a corpus of its own
    name = f"corpus-{fp}-{made_of}-{cfg.completions}x{cfg.max_tokens}-t{cfg.temperature}-{cfg.seed}{layers}.safetensors"
    corpus_path = work / name
    if corpus is not None:
        pass
    elif corpus_path.is_file():
        corpus = Corpus.load(corpus_path)
    else:
        with tqdm(total=len(prompts) * cfg.completions, desc="corpus", unit="seq", disable=not show_progress) as bar:
            corpus = generate_corpus(lm, prompts, cfg, bar.update, spec.features)
        corpus.minutes = (clock() - t0) / 60
        corpus.save(corpus_path)
    lm.model.requires_grad_(False)  # the trunk (and the shared embedding and unembedding) stays frozen
    heads = MTPHeads(lm.model, spec).float()
    heads.requires_grad_(True)
    if cfg.draft_vocab:
        heads.set_vocab(corpus.frequent_tokens(cfg.draft_vocab))
    heads.train()
    if not 0.0 <= cfg.depth1_share < 1.0:
        raise ValueError(f"depth1_share: from 0 up to (not including) 1, got {cfg.depth1_share}")
    opt = torch.optim.AdamW([{"params": ps} for ps in depth_parameters(heads)], lr=cfg.lr, weight_decay=0.0)
    meta = {
        "fingerprint": fp,
        "spec": json.dumps(spec.__dict__),
        "seed": str(cfg.seed),
        "corpus": corpus_path.name,
        "depth1_share": str(cfg.depth1_share),
    }
    ckpt = work / f"checkpoint-{spec.style}.safetensors"
    start, trained = _load_checkpoint(ckpt, heads, opt, meta)
    rng = random.Random(cfg.seed * 1_000_003 + start)
    seq_len = min(cfg.seq_len, max(len(t) for t in corpus.tokens))
    ema: list[float] = []  # per depth trained so far (depth 1 first)
    step = start
    t1 = clock()

    # the held-out measurement after training comes out of the budget too
    budget = max(cfg.minutes - (HELDOUT_MINUTES if heldout else 0.0), cfg.minutes / 2) if cfg.minutes > 0 else 0.0

    def progress(step: int) -> float:
        """How far along the schedule is: steps, or the training's minutes (earlier runs' and this one's) of
        what the corpus left of the budget, whichever is further."""
        if budget <= 0:
            return step / cfg.steps
        left = budget - corpus.minutes
        by_time = (trained + (clock() - t1) / 60) / left if left > 0 else 1.0
        return max(step / cfg.steps, by_time)

    with tqdm(total=cfg.steps, initial=start, desc=f"mtp {spec.style}", disable=not show_progress) as bar:
        for step in range(start + 1, cfg.steps + 1):
            done = progress(step)
            for k, g in enumerate(opt.param_groups):
                g["lr"] = depth_lr(cfg, k, done)
            hidden, tokens = corpus.windows(rng, cfg.batch, seq_len)
            opt.zero_grad(set_to_none=True)
            depths = sum(done >= depth_start(cfg, k) for k in range(heads.spec.depths))  # those started
            losses = train_step(heads, hidden, tokens, depths=depths)
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            ema = [v if k >= len(ema) else 0.9 * ema[k] + 0.1 * v for k, v in enumerate(losses)]
            bar.set_postfix({f"loss{k + 1}": f"{v:.2f}" for k, v in enumerate(ema)})
            bar.update(1)
            stop = done >= 1.0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                _save_checkpoint(ckpt, heads, opt, step, meta, trained + (clock() - t1) / 60)
            if stop:
                break
    minutes = corpus.minutes + trained + (clock() - t1) / 60
    heads.eval()
    t2 = clock()
    acceptance = heldout_acceptance(lm, heads, heldout) if heldout else []
    minutes += (clock() - t2) / 60 if heldout else 0.0
    info = dict(steps=step, losses=ema, train_minutes=minutes, corpus_tokens=corpus.num_tokens)
    path = save_heads(heads, lm, output, **info, acceptance_per_depth=acceptance)
    return TrainResult(path, step, ema, minutes, corpus.num_tokens, acceptance)
