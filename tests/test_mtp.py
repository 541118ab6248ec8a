"""MTP heads (engine/mtp.py) and their self-distillation (engine/mtp_train.py), on the tiny random Llama."""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from smcserve.engine.model import load_model
from smcserve.engine.mtp import HeadsMismatch, MTPHeads, MTPSpec, load_heads, read_metadata, save_heads, window_mask
from smcserve.engine.mtp_train import (
    Corpus,
    TrainConfig,
    depth_losses,
    depth_lr,
    depth_parameters,
    generate_corpus,
    instruction_prompts,
    train,
    train_step,
    trunk_hidden,
    trunk_tail_fn,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32")


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """The 8-token tiny Llama (tests/tiny_vocab.py): small enough to learn a pattern in seconds."""
    from tiny_vocab import build_tiny_llama

    return load_model(str(build_tiny_llama(tmp_path_factory.mktemp("tiny8"), seed=3)), "float32")


def pattern_corpus(lm, n: int = 12, length: int = 40, seed: int = 0) -> Corpus:
    """Periodic sequences (period 3 over the 8 tokens): the tokens two and three ahead are learnable."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        period = torch.randint(1, 8, (3,), generator=g).tolist()
        seqs.append((period * length)[:length])
    return Corpus([torch.tensor(s) for s in seqs], [trunk_hidden(lm, s) for s in seqs])


def test_heads_roundtrip_and_refuse_other_weights(tiny, tiny_model_dir, tmp_path):
    for style in ("deepseek", "gloeckle"):
        heads = MTPHeads(tiny.model, MTPSpec(style, depths=3, window=8))
        assert not any(p is tiny.model.lm_head.weight for p in heads.parameters())  # shared, not owned
        path = save_heads(heads, tiny, tmp_path / f"{style}.safetensors")
        back = load_heads(tiny, path)
        assert back.spec == heads.spec
        for (name, a), b in zip(heads.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name
        h0 = torch.randn(2, 5, tiny.config.hidden_size)
        toks = torch.randint(0, 100, (2, 5))
        valid = torch.ones(2, 5, dtype=torch.bool)
        drafts = back.draft(h0, toks, valid, lambda k, logits: logits.argmax(-1))
        assert len(drafts) == 2 and all(len(d) == 3 for d in drafts)
    # other weights: a copy of the model with one weight changed
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    lm2 = load_model(str(other), "float32")
    with torch.no_grad():
        lm2.model.model.norm.weight.add_(1.0)
    lm2.model.save_pretrained(other)
    lm2 = load_model(str(other), "float32")
    with pytest.raises(HeadsMismatch, match="trained for other model weights"):
        load_heads(lm2, tmp_path / "deepseek.safetensors")
    with pytest.raises(FileNotFoundError, match="smcserve mtp train"):
        load_heads(lm2)


def test_drafting_fewer_depths_runs_only_those(tiny):
    heads = MTPHeads(tiny.model, MTPSpec("deepseek", depths=3, window=8))
    ran = []
    for k, block in enumerate(heads.blocks):
        block.mlp.register_forward_hook(lambda *_, k=k: ran.append(k))  # block_forward calls its parts
    h0 = torch.randn(2, 6, tiny.config.hidden_size)
    toks = torch.randint(0, 100, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    argmax = lambda k, logits: logits.argmax(-1)  # noqa: E731
    full = heads.draft(h0, toks, valid, argmax)
    assert ran == [0, 1, 2]
    ran.clear()
    assert heads.draft(h0, toks, valid, argmax, depths=2) == [d[:2] for d in full]
    assert ran == [0, 1]
    # a draft's last depth computes its last position only: the same hidden state as over the whole window
    mask = window_mask(6, 8, valid)
    whole = heads.depth_hidden(1, h0, toks, mask)
    torch.testing.assert_close(heads.depth_hidden(1, h0, toks, mask, last=1), whole[:, -1:])


def test_depth_k_is_distilled_from_the_trunk_at_p_plus_k_plus_1(tiny):
    """The alignment of self-distillation: depth k (0-based) at position p reads x[p+k+1] and is scored
    against the trunk's distribution at p+k+1 (that of x[p+k+2], the token it drafts). Heads whose logits
    are exactly that distribution have zero loss at every depth; heads one position early do not."""
    heads = MTPHeads(tiny.model, MTPSpec("deepseek", depths=3, window=16))
    hidden = torch.randn(2, 12, tiny.config.hidden_size)
    tokens = torch.randint(0, 100, (2, 12))

    def losses(shift: int) -> list[float]:
        def logits(k, h):  # the trunk's logits at p + k + 1 + shift (kept on the autograd graph of h)
            n = h.shape[1]
            return heads.trunk_logits(hidden[:, k + 1 + shift : k + 1 + shift + n]) + 0 * h[..., :1]

        heads.logits = logits
        return train_step(heads, hidden, tokens)

    assert max(losses(0)) < 1e-5, losses(0)
    assert min(losses(-1)) > 1e-2, losses(-1)


def test_generate_corpus_keeps_the_trunks_hidden_states(tiny):
    """The corpus is the model's own completions, and the hidden states the decoder kept as it went (a
    prompt's prefill, then one position per step, several sequences a batch) are those of the model run
    on each sequence alone."""
    cfg = TrainConfig(completions=2, max_tokens=6)
    corpus = generate_corpus(tiny, ["Say hi.", "Count to three please."], cfg)
    assert len(corpus.tokens) == 4  # a greedy and a sampled completion per prompt
    prompt = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    first = corpus.tokens[0].tolist()  # the last token, never run, is left out
    assert first[: len(prompt)] == list(prompt) and len(prompt) < len(first) < len(prompt) + 6
    for t, h in zip(corpus.tokens, corpus.hidden):
        assert h.shape == (len(t), tiny.config.hidden_size) and not h.is_inference()
        torch.testing.assert_close(h, trunk_hidden(tiny, t.tolist()), atol=1e-4, rtol=1e-4)


def test_generate_corpus_refills_a_finished_sequences_place(tiny):
    """Decoded 2 at a time (a finished sequence's place going to the next prompt), the corpus is the one
    decoded all at once: the same tokens, in the same order, with the trunk's hidden states."""
    cfg = TrainConfig(completions=2, max_tokens=5)
    prompts = ["Say hi.", "Count to three please.", "Name a colour."]
    together = generate_corpus(tiny, prompts, cfg)
    done: list[int] = []
    two = generate_corpus(tiny, prompts, cfg, done.append, batch=2)
    assert sum(done) == 6 and len(two.tokens) == 6
    for a, b, h in zip(together.tokens, two.tokens, two.hidden):
        assert a.tolist() == b.tolist()
        torch.testing.assert_close(h, trunk_hidden(tiny, b.tolist()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("style", ["deepseek", "gloeckle"])
def test_training_learns_and_resumes(tiny8, tmp_path, style):
    tiny = tiny8
    corpus = pattern_corpus(tiny)
    spec = MTPSpec(style, depths=2, window=8)
    cfg = TrainConfig(steps=30, batch=8, seq_len=24, lr=1e-2, checkpoint_every=10)
    heads0 = MTPHeads(tiny.model, spec)
    hidden, tokens = corpus.windows(__import__("random").Random(1), 8, 24)
    before = depth_losses(heads0, hidden, tokens)
    first = train(tiny, spec, cfg, tmp_path / "work", tmp_path / "h.safetensors", show_progress=False, corpus=corpus)
    assert first.steps == 30
    heads = load_heads(tiny, first.path)
    after = depth_losses(heads, hidden, tokens)
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    # resumable: a longer run with the same work folder starts from the checkpoint at step 30
    cfg.steps = 40
    second = train(tiny, spec, cfg, tmp_path / "work", tmp_path / "h.safetensors", show_progress=False, corpus=corpus)
    assert second.steps == 40 and second.train_minutes < first.train_minutes * 10


def test_training_anneals_within_its_time_budget(tiny8, tmp_path, monkeypatch):
    """``minutes`` budgets the corpus and the training together: on a clock that advances 6 s per reading
    (a slow CPU), a 1-minute budget with a 0.1-minute corpus ends after ~9 of 1,000 steps, the learning
    rate annealed to ~0 on the way (steps alone would have kept it near its peak)."""
    corpus = pattern_corpus(tiny8)
    corpus.minutes = 0.1
    readings = iter(range(10**6))
    lrs: list[float] = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda opt, *a: lrs.append(opt.param_groups[0]["lr"]) or step(opt))
    cfg = TrainConfig(steps=1000, batch=2, seq_len=12, lr=1e-2, checkpoint_every=1000, minutes=1.0)
    spec = MTPSpec("deepseek", depths=1, window=4)
    result = train(
        tiny8,
        spec,
        cfg,
        tmp_path / "w",
        tmp_path / "h.safetensors",
        show_progress=False,
        corpus=corpus,
        clock=lambda: 6.0 * next(readings),
    )
    assert 5 <= result.steps <= 12, result.steps
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.5 * cfg.lr and lrs[-1] < 0.05 * cfg.lr, lrs
    assert 1.0 <= result.train_minutes <= 1.3


class PeakLiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensors (distinct storages) produced by any op, backward included."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs.extend(weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        live: dict[int, int] = {}
        alive = []
        for r in self.refs:
            t = r()
            if t is not None:
                alive.append(r)
                s = t.untyped_storage()
                live[s.data_ptr()] = s.nbytes()
        self.refs = alive
        self.peak = max(self.peak, sum(live.values()))
        return out


def test_depth_one_trains_alone_first(tiny, tiny8, tmp_path, monkeypatch):
    """For the first ``depth1_share`` of the schedule only depth 1 trains (the later depths' weights stay as
    they were made); then every depth, each on a cosine from its own start, all annealed at the end."""
    from smcserve.engine import mtp_train

    with_features = MTPHeads(tiny.model, MTPSpec("deepseek", depths=2, window=8, features=(1,)))
    groups = depth_parameters(with_features)
    assert sum(len(g) for g in groups) == len(list(with_features.parameters()))
    assert any(p is with_features.f_proj.weight for p in groups[0])  # the features feed depth 1
    assert any(p is with_features.blocks[1].mlp.up_proj.weight for p in groups[1])

    cfg = TrainConfig(steps=10, batch=4, seq_len=16, lr=1e-2, checkpoint_every=1000, depth1_share=0.5)
    assert depth_lr(cfg, 0, 0.0) == cfg.lr and depth_lr(cfg, 1, 0.49) == 0.0 and depth_lr(cfg, 1, 0.5) == cfg.lr
    assert depth_lr(cfg, 0, 1.0) < 1e-9 and depth_lr(cfg, 1, 1.0) < 1e-9
    assert depth_lr(cfg, 0, 0.75) < depth_lr(cfg, 1, 0.75)  # depth 2 started later: less far along its decay

    trained: list[int] = []
    step = mtp_train.train_step

    def counted(*args, depths=None, **kw):
        trained.append(depths)
        return step(*args, depths=depths, **kw)

    monkeypatch.setattr(mtp_train, "train_step", counted)
    spec = MTPSpec("deepseek", depths=2, window=8)
    result = train(
        tiny8, spec, cfg, tmp_path / "w", tmp_path / "h.safetensors", show_progress=False, corpus=pattern_corpus(tiny8)
    )
    assert trained == [1] * 4 + [2] * 6, trained
    assert len(result.losses) == 2
    with pytest.raises(ValueError, match="depth1_share"):
        train(
            tiny8,
            spec,
            TrainConfig(depth1_share=1.0),
            tmp_path / "w2",
            show_progress=False,
            corpus=pattern_corpus(tiny8),
        )


def test_training_step_memory_is_one_heads_logits(tiny):
    """Fine-tuning the last trunk layer with 1, 2, 4 heads: head by head, the peak grows by much less
    than one head's logits per head (O(V + d)); the naive order (all heads' logits alive) grows by at
    least one logits tensor per head (O(nV + d)) and fails the same bound."""
    B, T = 2, 48
    V = tiny.config.vocab_size
    logits_bytes = B * T * V * 4
    hidden = torch.randn(B, T, tiny.config.hidden_size)
    tokens = torch.randint(0, V, (B, T))

    def peak(n: int, head_by_head: bool) -> int:
        heads = MTPHeads(tiny.model, MTPSpec("gloeckle", depths=n, window=T))
        tail = trunk_tail_fn(tiny.model, 1)
        with PeakLiveBytes() as m:
            train_step(heads, hidden, tokens, tail, head_by_head=head_by_head)
        assert tiny.model.model.layers[-1].mlp.down_proj.weight.grad is not None  # the trunk got its gradient
        tiny.model.zero_grad(set_to_none=True)
        return m.peak

    ours = [peak(n, True) for n in (1, 2, 4)]
    naive = [peak(n, False) for n in (1, 2, 4)]
    assert ours[0] > logits_bytes  # the measurement sees the logits
    assert ours[2] - ours[0] < 0.5 * logits_bytes, [p / logits_bytes for p in ours]
    print(
        "peak in logits tensors, head by head:",
        [round(p / logits_bytes, 2) for p in ours],
        "naive:",
        [round(p / logits_bytes, 2) for p in naive],
    )
    assert naive[2] - naive[0] > 2 * logits_bytes, [p / logits_bytes for p in naive]  # negative control


def test_cli_trains_and_resumes(tiny, tiny_model_dir, tmp_path, capsys):
    """``smcserve mtp train`` on the tiny model: the shipped prompts, a corpus, a checkpoint, heads that load."""
    import json

    from smcserve.entrypoints.cli import main

    argv = ["mtp", "train", "--model", str(tiny_model_dir), "--steps", "2", "--batch", "2", "--seq-len", "16"]
    argv += ["--max-tokens", "4", "--work", str(tmp_path / "w"), "--output", str(tmp_path / "h.safetensors")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and len(report["loss_per_depth"]) == 3
    assert report["features"] == [1]  # by default the output after half of the tiny model's 2 layers
    assert report["corpus_tokens"] > len(instruction_prompts("train")) * 4
    assert load_heads(tiny, tmp_path / "h.safetensors").spec.depths == 3
    # the trained heads' acceptance on held-out prompts, per depth, in the report and in the heads' file
    acceptance = report["heldout_acceptance_per_depth"]
    assert len(acceptance) == 3 and all(0.0 <= a <= 1.0 for a in acceptance)
    assert acceptance == sorted(acceptance, reverse=True)  # a depth counts only after the ones before it
    assert read_metadata(tmp_path / "h.safetensors")["info"]["acceptance_per_depth"] == acceptance
    assert main([*argv[:5], "3", *argv[6:]]) == 0  # resumes at step 2 from the checkpoint, corpus reused
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3


def test_features_heads_read_the_trunks_mid_layer_outputs(tiny, tmp_path):
    """``features``: depth 1 also reads the outputs after those trunk layers (rows [h0, mid, ...]); its
    projection of them starts at zero (the plain head's drafts), saved and loaded with the spec."""
    d = tiny.config.hidden_size
    plain = MTPHeads(tiny.model, MTPSpec("deepseek", depths=2, window=8))
    fused = MTPHeads(tiny.model, MTPSpec("deepseek", depths=2, window=8, features=(1,)))
    fused.load_state_dict(plain.state_dict(), strict=False)
    rows = torch.randn(2, 6, 2 * d)  # [h0, the output after layer 1]
    toks = torch.randint(0, 100, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    argmax = lambda k, logits: logits.argmax(-1)  # noqa: E731
    assert fused.draft(rows, toks, valid, argmax) == plain.draft(rows[..., :d], toks, valid, argmax)
    with torch.no_grad():
        fused.f_proj.weight.normal_(0, 1.0)
    mask = window_mask(6, 8, valid)
    with torch.no_grad():
        moved = fused.depth_hidden(0, rows, toks, mask) - plain.depth_hidden(0, rows[..., :d], toks, mask)
        assert moved.abs().max() > 1e-3  # the mid-layer outputs count
        torch.testing.assert_close(fused.trunk_logits(rows), plain.trunk_logits(rows[..., :d]))
    back = load_heads(tiny, save_heads(fused, tiny, tmp_path / "f.safetensors"))
    assert back.spec.features == (1,) and torch.equal(back.f_proj.weight, fused.f_proj.weight)
    with pytest.raises(ValueError, match="only deepseek"):
        MTPSpec("gloeckle", features=(1,))
    with pytest.raises(ValueError, match="below the trunk's 2"):
        MTPHeads(tiny.model, MTPSpec("deepseek", features=(2,)))


def test_generate_corpus_keeps_the_mid_layer_outputs_too(tiny):
    cfg = TrainConfig(completions=1, max_tokens=5)
    corpus = generate_corpus(tiny, ["Say hi."], cfg, features=(1,))
    (t,), (rows,) = corpus.tokens, corpus.hidden
    d = tiny.config.hidden_size
    assert rows.shape == (len(t), 2 * d)
    torch.testing.assert_close(rows[:, :d], trunk_hidden(tiny, t.tolist()), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        mid = tiny.model(t[None], output_hidden_states=True).hidden_states[1][0]  # the output after layer 1
    torch.testing.assert_close(rows[:, d:], mid, atol=1e-4, rtol=1e-4)


def test_cli_trains_heads_with_mid_layer_features(tiny, tiny_model_dir, tmp_path, capsys):
    import json

    from smcserve.entrypoints.cli import main

    argv = ["mtp", "train", "--model", str(tiny_model_dir), "--steps", "2", "--batch", "2", "--seq-len", "16"]
    argv += ["--max-tokens", "4", "--work", str(tmp_path / "w"), "--output", str(tmp_path / "h.safetensors")]
    assert main([*argv, "--depths", "2", "--features", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["features"] == [1] and len(report["heldout_acceptance_per_depth"]) == 2
    assert [p.name.endswith("-f1.safetensors") for p in (tmp_path / "w").glob("corpus-*")] == [True]
    heads = load_heads(tiny, tmp_path / "h.safetensors")
    assert heads.spec.features == (1,) and heads.f_proj.weight.abs().max() > 0  # trained from zero
    with pytest.raises(SystemExit):
        main([*argv, "--features", "one"])
