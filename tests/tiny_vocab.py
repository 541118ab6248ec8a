"""A tiny Llama over an 8-token byte-level vocabulary, saved as a local Hugging Face model directory.

Small enough that every continuation of a few tokens can be enumerated exactly (the exact Z of an
SMC target), real enough that the whole stack serves it: ``smcserve serve --model DIR --dtype
float32`` loads it with AutoTokenizer / AutoModelForCausalLM, the raw-prompt path tokenises with it,
and ``smc.vocab`` reads each token's bytes through its ByteLevel decoder (GPT-2 byte symbols, so " "
is stored as "Ġ", exactly like SmolLM2's tokenizer).

    id  text
    0   <|endoftext|>   EOS (special; adds no text)
    1   a
    2   b
    3   c
    4   x
    5   " "
    6   .
    7   e
"""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"
# byte-level symbols: "Ġ" is the GPT-2 symbol of the space byte
PIECES = [EOS, "a", "b", "c", "x", "Ġ", ".", "e"]
TEXTS = ["", "a", "b", "c", "x", " ", ".", "e"]
EOS_ID = 0


def build_tokenizer():
    """A byte-level BPE with no merges over the 7 characters above, plus EOS (``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        unk_token=None,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(path: str | Path, seed: int = 0, logit_scale: float = 4.0) -> Path:
    """Save a random 1-layer Llama (hidden 32, fp32) with the tokenizer above at ``path``.

    The lm_head is scaled by ``logit_scale`` so next-token distributions are far from uniform (and
    depend on the context); ``seed`` is chosen by the caller so that EOS is fairly likely.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(PIECES),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        model.model.embed_tokens.weight.mul_(3.0)
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config = GenerationConfig(eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The exact target, by enumeration (independent of the stack: HF forward passes on full sequences)
# ---------------------------------------------------------------------------------------------
def hard_ok(token_ids, forbidden: str = "", max_word: int | None = None) -> bool:
    """G_hard of a generated sequence: none of ``forbidden`` (case-insensitively) in its text, and no
    word (maximal run of ``str.isalpha`` characters) longer than ``max_word``. EOS adds no text."""
    import re

    text = "".join(TEXTS[t] for t in token_ids)
    if any(c.lower() in text.lower() for c in forbidden):
        return False
    if max_word is not None:
        words = re.findall(r"[^\W\d_]+", text)
        if any(len(w) > max_word for w in words):
            return False
    return True


def next_token_logprobs(model, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0) -> dict:
    """log softmax(logits / T) of the next token after ``prompt + y`` for every EOS-free y shorter
    than ``max_tokens`` (each one a fresh full forward pass in HF transformers, fp32)."""
    import itertools

    vocab = len(PIECES)
    prefixes = [y for n in range(max_tokens) for y in itertools.product(range(vocab), repeat=n) if EOS_ID not in y]
    out = {}
    with torch.inference_mode():
        for y in prefixes:
            logits = model(torch.tensor([list(prompt_ids) + list(y)])).logits[0, -1].double()
            out[tuple(y)] = torch.log_softmax(logits / temperature, -1).tolist()
    return out


def complete_sequences(max_tokens: int):
    """Every complete output of at most ``max_tokens`` tokens: ends at EOS, or has max_tokens tokens."""
    import itertools

    vocab = len(PIECES)
    for n in range(1, max_tokens + 1):
        for y in itertools.product(range(vocab), repeat=n):
            if EOS_ID in y[:-1]:
                continue
            if y[-1] == EOS_ID or n == max_tokens:
                yield y


def exact_z(
    lp1: dict, lp2: dict | None, weight: float, max_tokens: int, forbidden: str = "", max_word: int | None = None
) -> tuple[float, dict]:
    """Z = Σ_y Π_t p1(y_t|y<t) · p2(y_t|y<t)^weight · G_hard(y) over complete y; also the posterior."""
    import math

    terms = {}
    for y in complete_sequences(max_tokens):
        if not hard_ok(y, forbidden, max_word):
            continue
        s = 0.0
        for t, tok in enumerate(y):
            s += lp1[y[:t]][tok] + (weight * lp2[y[:t]][tok] if lp2 is not None else 0.0)
        terms[y] = math.exp(s)
    z = math.fsum(terms.values())
    return z, {y: v / z for y, v in terms.items()}
