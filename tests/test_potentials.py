"""Declarative potentials (smc/potentials/, smc/vocab.py) with the real SmolLM2 tokenizer (no model).

Each kind is driven through mask/advance/finish with scripted or random token sequences, and the
results are checked independently of the implementation: the text is the tokenizer's own
``decode(ids, skip_special_tokens=True)`` and the checks are plain Python (``re.fullmatch``,
``json.loads``, letter runs, substring tests). Random sequences sample uniformly from ``mask()``,
biased towards "interesting" tokens (partial UTF-8 characters, letters, phrase pieces) so that
words, phrases and characters straddling token boundaries are exercised. For the text kinds each
step also checks, on a sample of candidate tokens, that ``mask()`` and ``advance()`` agree with the
independent check of the extended text.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import random
import re
import threading
import unicodedata
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from smcserve.smc.potentials import (
    BUILTIN_KINDS,
    Potential,
    PotentialError,
    PotentialSpec,
    advance_all,
    build_potential,
    build_potentials,
    combined_mask,
    finish_all,
    load_plugins,
    potential_kinds,
    register_potential,
    unregister_potential,
)
from smcserve.smc.vocab import Vocab, get_vocab

NEG_INF = -math.inf
DATE = r"\d{4}-\d{2}-\d{2}"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from smcserve.engine.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


@pytest.fixture(scope="module")
def vocab(tok) -> Vocab:
    return get_vocab(tok)


@pytest.fixture(scope="module")
def pools(tok, vocab):
    """Token pools the random sampler favours."""
    partial = [i for i, b in enumerate(vocab.token_bytes) if b and (0x80 <= b[0] <= 0xBF or _incomplete(b))]
    letters = [i for i, s in enumerate(vocab.strings) if s.strip().isalpha()]
    return {"partial": partial, "letters": letters}


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def tid(tok, piece: str) -> int:
    """The id of a vocabulary entry (byte-level spelling, Ġ = space); it must exist."""
    i = tok.convert_tokens_to_ids(piece)
    assert tok.convert_ids_to_tokens(i) == piece, piece
    return i


def dec(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def allowed_ids(mask: torch.Tensor) -> list[int]:
    return np.flatnonzero(mask.numpy()).tolist()


def pick(rng: random.Random, mask: torch.Tensor | None, size: int, pools: list[list[int]]) -> int:
    """Uniform over the mask, or (60%) uniform over a random pool ∩ mask when that is non-empty."""
    if pools and rng.random() < 0.6:
        pool = np.asarray(rng.choice(pools), dtype=np.int64)
        ok = pool if mask is None else pool[mask.numpy()[pool]]
        if len(ok):
            return int(ok[rng.randrange(len(ok))])
    if mask is None:
        return rng.randrange(size)
    allowed = np.flatnonzero(mask.numpy())
    return int(allowed[rng.randrange(len(allowed))])


@dataclass
class Run:
    ids: list[int]
    eos: bool
    logw: float


def drive(pots, vocab, rng, cap, pools=(), check=None) -> Run:
    """Sample from combined_mask until EOS or ``cap`` tokens; ``check(ids, mask)`` runs before each step."""
    ids: list[int] = []
    logw = 0.0
    eos = False
    for _ in range(cap):
        m = combined_mask(pots)
        if check is not None:
            check(ids, m)
        t = pick(rng, m, vocab.size, list(pools))
        logw += advance_all(pots, t)
        if t in vocab.eos_set:
            eos = True
            break
        ids.append(t)
    logw += finish_all(pots)
    return Run(ids, eos, logw)


def exactness_check(tok, vocab, pots_ref, oracle, rng, extra=(), n=40, exact_mask=True):
    """Per-step check: for sampled candidate tokens, advance() on a clone agrees with ``oracle`` on the
    extended text, and the mask never excludes a token the oracle allows (equal to it when exact)."""

    def check(ids, m):
        p = pots_ref[0]
        mm = p.mask()
        cands = set(rng.sample(range(vocab.size), n))
        if mm is not None:
            allowed = allowed_ids(mm)
            cands |= set(rng.sample(allowed, min(n, len(allowed))))
        for pool in extra:
            cands |= set(rng.sample(pool, min(n, len(pool))))
        cands |= set(vocab.cont_start_ids.tolist())
        for t in cands:
            if t in vocab.eos_set:
                continue
            ok = oracle(dec(tok, ids + [t]))
            got = p.clone().advance(t)
            assert (got == 0.0) == ok, (dec(tok, ids), vocab.token_bytes[t], got, ok)
            if mm is not None:
                if ok:
                    assert bool(mm[t]), ("mask excludes an allowed token", dec(tok, ids), vocab.token_bytes[t])
                elif exact_mask:
                    assert not bool(mm[t]), ("mask allows a violating token", dec(tok, ids), vocab.token_bytes[t])

    return check


# ---------------------------------------------------------------------------------------------
# Vocab
# ---------------------------------------------------------------------------------------------
def test_vocab_tables(tok, vocab):
    assert vocab.size == len(tok) == 49152
    assert vocab.eos_ids == (2,)
    assert get_vocab(tok) is vocab  # cached
    llt = vocab.ll_tokenizer
    assert llt.vocab_size == vocab.size
    for i in range(vocab.size):
        if i in vocab.special_ids:
            assert vocab.token_bytes[i] == b"" and vocab.strings[i] == ""
        else:
            assert vocab.token_bytes[i] == llt.decode_bytes([i]), i
    assert vocab.strings[tid(tok, "Ġhello")] == " hello"
    # exact text across partial UTF-8 tokens: decode_step over random sequences == tokenizer decode
    rng = random.Random(1)
    partial = [i for i, b in enumerate(vocab.token_bytes) if b and _incomplete(b)]
    texts = ["héllo wörld 日本語 🙂 ok", "Ωμέγα — ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "naïve café"]
    seqs = [tok.encode(t) for t in texts]
    seqs += [[rng.choice(partial if rng.random() < 0.5 else range(vocab.size)) for _ in range(12)] for _ in range(200)]
    for ids in seqs:
        text, pending = "", b""
        for t in ids:
            s, pending = vocab.decode_step(pending, t)
            text += s
        assert text + Vocab.flush(pending) == dec(tok, ids)


def test_vocab_larger_model_vocab(tok):
    v = Vocab(tok, size=len(tok) + 64)
    assert len(v.token_bytes) == v.size and v.token_bytes[-1] == b""
    for spec in (
        PotentialSpec("regex", pattern="[a-z]+"),
        PotentialSpec("max_word_length", max_len=3),
        PotentialSpec("forbidden_chars", chars="x"),
        PotentialSpec("max_tokens", n=1),
    ):
        [p] = build_potentials([spec], v)
        m = p.mask()
        assert m.shape == (v.size,) and m.dtype == torch.bool
    [p] = build_potentials([PotentialSpec("regex", pattern="[a-z]+")], v)
    assert not p.mask()[len(tok) :].any()
    with pytest.raises(ValueError):
        Vocab(tok, size=10, eos_ids=[20])


# ---------------------------------------------------------------------------------------------
# regex / cfg / json_schema (llguidance)
# ---------------------------------------------------------------------------------------------
def test_date_regex_scripted(tok, vocab):
    [p] = build_potentials([PotentialSpec("regex", pattern=DATE)], vocab)
    first = p.mask()
    assert not first[2] and all(first[tid(tok, d)] for d in "0123456789")
    assert not first[tid(tok, "a")] and not first[tid(tok, "-")]
    ids = tok.encode("2024-01-15")
    for i, t in enumerate(ids):
        m = p.mask()
        assert m[t] and not m[2], i  # EOS only after a full match
        assert p.advance(t) == 0.0
    m = p.mask()
    assert allowed_ids(m) == [2]  # nothing can follow a complete date
    assert p.finish() == 0.0
    assert p.advance(2) == 0.0 and p.finish() == 0.0  # EOS then finish: nothing counted twice

    [q] = build_potentials([PotentialSpec("regex", pattern=DATE)], vocab)
    for t in tok.encode("2024-1"):
        q.advance(t)
    assert q.finish() == NEG_INF  # not a full match at the end (max tokens hit)
    assert q.advance(tid(tok, "a")) == NEG_INF  # outside the mask: violated
    assert allowed_ids(q.mask()) == [2] and q.finish() == NEG_INF


def _py_unicode(text: str) -> str:
    """Map characters unassigned in this Python's Unicode tables to "0": llguidance's Rust regex uses
    a newer Unicode version whose \\d knows more digits (e.g. U+1CCF0..9, Unicode 16)."""
    return "".join("0" if unicodedata.category(ch) == "Cn" else ch for ch in text)


@pytest.mark.parametrize("pattern", [DATE, r"[0-9]{4}-[0-9]{2}-[0-9]{2}"])
def test_date_regex_sampled(tok, vocab, pools, pattern):
    rng = random.Random(2)
    rx = re.compile(pattern)
    for _ in range(20):
        [p] = build_potentials([PotentialSpec("regex", pattern=pattern)], vocab)

        def check(ids, m):  # EOS allowed exactly when the text so far is a full match
            assert bool(m[2]) == bool(rx.fullmatch(_py_unicode(dec(tok, ids)))), dec(tok, ids)

        r = drive([p], vocab, rng, cap=60, pools=[pools["partial"]], check=check)
        text = dec(tok, r.ids)
        assert r.eos, text  # the pattern forces a short output
        assert rx.fullmatch(_py_unicode(text)), text
        assert r.logw == 0.0


def test_regex_sampled_with_max_word_length(tok, vocab, pools):
    rng = random.Random(3)
    pat = r"[a-z]{1,9}( [a-z]{1,9}){0,3}"
    for _ in range(20):
        pots = build_potentials(
            [PotentialSpec("regex", pattern=pat), PotentialSpec("max_word_length", max_len=4)], vocab
        )
        r = drive(pots, vocab, rng, cap=50, pools=[pools["letters"]])
        text = dec(tok, r.ids)
        assert all(len(w) <= 4 for w in re.findall(r"[^\W\d_]+", text)), text
        if r.eos:
            assert re.fullmatch(pat, text), text
            assert r.logw == 0.0


def test_json_schema_sampled(tok, vocab):
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
        "required": ["ok", "color"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    rng = random.Random(4)
    done = 0
    for _ in range(10):
        [p] = build_potentials([PotentialSpec("json_schema", schema=json.dumps(schema))], vocab)
        r = drive([p], vocab, rng, cap=40)
        if not r.eos:
            continue
        done += 1
        obj = json.loads(dec(tok, r.ids))
        assert list(obj) == ["color", "ok"]  # the schema's property order
        assert obj["color"] in ("red", "green") and isinstance(obj["ok"], bool)
        assert r.logw == 0.0
    assert done >= 8


def test_cfg_lark_and_gbnf_sampled(tok, vocab):
    rng = random.Random(5)
    lark = 'start: NUM ("+" NUM)*\nNUM: /[0-9]{1,2}/\n'
    for _ in range(15):
        [p] = build_potentials([PotentialSpec("cfg", grammar=lark)], vocab)
        r = drive([p], vocab, rng, cap=40)
        if r.eos:
            assert re.fullmatch(r"[0-9]{1,2}(\+[0-9]{1,2})*", dec(tok, r.ids)), dec(tok, r.ids)
    seen = set()
    for _ in range(10):
        [p] = build_potentials([PotentialSpec("cfg", grammar='root ::= "yes" | "no" | "maybe"', format="gbnf")], vocab)
        r = drive([p], vocab, rng, cap=10)
        assert r.eos and dec(tok, r.ids) in ("yes", "no", "maybe")
        seen.add(dec(tok, r.ids))
    assert len(seen) >= 2


# ---------------------------------------------------------------------------------------------
# text kinds
# ---------------------------------------------------------------------------------------------
def _max_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch.isalpha() else 0
        best = max(best, run)
    return best


def test_max_word_length_scripted(tok, vocab):
    [p] = build_potentials([PotentialSpec("max_word_length", max_len=5)], vocab)
    for t in tok.encode("hello big world"):
        assert p.mask()[t]
        assert p.advance(t) == 0.0
    # the current word "world" has 5 letters: no letter may follow, a space may
    m = p.mask()
    assert not m[tid(tok, "s")] and m[tid(tok, "Ġs")] and m[2]
    assert p.clone().advance(tid(tok, "s")) == NEG_INF
    assert p.finish() == 0.0
    # a word split into letter tokens, and a non-ASCII letter split into partial UTF-8 tokens
    [q] = build_potentials([PotentialSpec("max_word_length", max_len=3)], vocab)
    ids = tok.encode(" ab")
    for t in ids:
        q.advance(t)
    e_acute = "é".encode()
    lead = vocab.token_bytes.index(e_acute[:1])
    cont = vocab.token_bytes.index(e_acute[1:])
    assert q.mask()[lead] and q.advance(lead) == 0.0  # "ab" + pending 0xC3
    m = q.mask()
    assert m[cont]  # completes "abé" (3 letters): fine
    assert q.advance(cont) == 0.0
    assert dec(tok, ids + [lead, cont]) == " abé"
    assert not q.mask()[tid(tok, "a")]


@pytest.mark.parametrize("max_len", [1, 4])
def test_max_word_length_sampled(tok, vocab, pools, max_len):
    rng = random.Random(6 + max_len)
    oracle = lambda text: _max_run(text) <= max_len  # noqa: E731
    for _ in range(6):
        [p] = build_potentials([PotentialSpec("max_word_length", max_len=max_len)], vocab)
        ref = [p]
        r = drive(
            ref,
            vocab,
            rng,
            cap=25,
            pools=[pools["partial"], pools["letters"]],
            check=exactness_check(tok, vocab, ref, oracle, rng, extra=[pools["partial"], pools["letters"]], n=25),
        )
        text = dec(tok, r.ids)
        assert r.logw == 0.0 and _max_run(text) <= max_len, text


def _has_forbidden(text: str, chars: str) -> bool:
    return any(f(c) in f(text) for c in chars for f in (str.lower, str.upper, str.casefold))


def test_forbidden_chars(tok, vocab, pools):
    chars = "eZ"
    [p] = build_potentials([PotentialSpec("forbidden_chars", chars=chars)], vocab)
    m = p.mask()
    for s, ok in (("Ġthe", False), ("E", False), ("z", False), ("ĠZoo", False), ("Ġthat", True), ("K", True)):
        assert bool(m[tid(tok, s)]) == ok, s
    assert m[2]
    # every token the mask allows has no forbidden character (case-insensitive), every other one has
    bad = torch.tensor([_has_forbidden(s, chars) for s in vocab.completed])
    bad[2] = False
    assert torch.equal(m, ~bad)
    [cs] = build_potentials([PotentialSpec("forbidden_chars", chars=chars, case_insensitive=False)], vocab)
    cm = cs.mask()
    assert cm[tid(tok, "E")] and not cm[tid(tok, "e")]
    rng = random.Random(8)
    oracle = lambda text: not _has_forbidden(text, chars)  # noqa: E731
    for _ in range(6):
        [p] = build_potentials([PotentialSpec("forbidden_chars", chars=chars)], vocab)
        ref = [p]
        r = drive(
            ref,
            vocab,
            rng,
            cap=25,
            pools=[pools["partial"]],
            check=exactness_check(tok, vocab, ref, oracle, rng, extra=[pools["partial"]], n=25, exact_mask=False),
        )
        text = dec(tok, r.ids)
        if r.logw == 0.0:
            assert not _has_forbidden(text, chars), text


def test_banned_phrases_scripted(tok, vocab):
    [p] = build_potentials([PotentialSpec("banned_phrases", phrases=["hello world", "日本"])], vocab)
    ids = tok.encode("say hello wor")
    for t in ids:
        assert p.mask()[t] and p.advance(t) == 0.0
    m = p.mask()
    ld, m_ = tid(tok, "ld"), tid(tok, "m")
    assert not m[ld] and m[m_] and m[2]
    assert p.clone().advance(ld) == NEG_INF
    assert p.advance(m_) == 0.0 and p.finish() == 0.0
    # a phrase completed inside a partial UTF-8 sequence
    [q] = build_potentials([PotentialSpec("banned_phrases", phrases=["日本"])], vocab)
    ids = tok.encode("日本")
    assert dec(tok, ids) == "日本"
    for t in ids[:-1]:
        assert q.advance(t) == 0.0
    assert not q.mask()[ids[-1]]
    assert q.advance(ids[-1]) == NEG_INF and q.finish() == NEG_INF
    assert allowed_ids(q.mask()) == [2]
    # case-insensitive
    [c] = build_potentials([PotentialSpec("banned_phrases", phrases=["Hello"], case_insensitive=True)], vocab)
    assert not c.mask()[tid(tok, "ĠHello")] and not c.mask()[tid(tok, "hello")]


def test_banned_phrases_sampled(tok, vocab, pools):
    phrases = ["hello world", "ab", "日本"]
    pieces = sorted(
        {
            t
            for s in ("hello world", " hello", "hel", "lo wor", "ld", "world", "a", "b", "ab", "日本", "本", "日")
            for t in tok.encode(s)
        }
    )
    rng = random.Random(9)
    oracle = lambda text: not any(ph in text for ph in phrases)  # noqa: E731
    for _ in range(8):
        [p] = build_potentials([PotentialSpec("banned_phrases", phrases=phrases)], vocab)
        ref = [p]
        r = drive(
            ref,
            vocab,
            rng,
            cap=20,
            pools=[pieces, pools["partial"]],
            check=exactness_check(tok, vocab, ref, oracle, rng, extra=[pieces], n=20),
        )
        text = dec(tok, r.ids)
        assert r.logw == 0.0 and oracle(text), text


def test_required_phrases(tok, vocab):
    spec = PotentialSpec("required_phrases", phrases=["quick", "ick bro", "日本"])
    [p] = build_potentials([spec], vocab)
    assert torch.equal(p.mask(), ~vocab.eos_mask)  # no ending before every phrase appeared
    ids = tok.encode("the quick brown fox 日本")
    assert any(vocab.leftover[t] for t in ids)  # 日本 is split into partial UTF-8 tokens
    q = None
    for i, t in enumerate(ids):
        assert p.advance(t) == 0.0
        if i == 4:
            q = p.clone()
    assert p.mask() is None and p.finish() == 0.0
    assert q.finish() == NEG_INF  # the clone stopped before 日本
    assert q.mask()[5] and not q.mask()[2] and q.clone().advance(2) == NEG_INF
    assert p.advance(2) == 0.0 and p.finish() == 0.0
    [c] = build_potentials([PotentialSpec("required_phrases", phrases=["QUICK"], case_insensitive=True)], vocab)
    [s] = build_potentials([PotentialSpec("required_phrases", phrases=["QUICK"])], vocab)
    for t in tok.encode("so quick"):
        c.advance(t)
        s.advance(t)
    assert c.finish() == 0.0 and s.finish() == NEG_INF


def test_max_tokens(tok, vocab):
    rng = random.Random(10)
    for n in (1, 3):
        for _ in range(5):
            [p] = build_potentials([PotentialSpec("max_tokens", n=n)], vocab)
            ids = []
            for step in range(n + 2):
                m = p.mask()
                if step < n - 1:
                    assert m is None
                else:
                    assert allowed_ids(m) == [2]
                t = pick(rng, m, vocab.size, [])
                assert p.advance(t) == 0.0
                if t == 2:
                    break
                ids.append(t)
            assert len(ids) + 1 <= n and p.finish() == 0.0
    [p] = build_potentials([PotentialSpec("max_tokens", n=2)], vocab)
    assert p.advance(5) == 0.0 and p.advance(6) == NEG_INF and p.finish() == NEG_INF


# ---------------------------------------------------------------------------------------------
# cloning, weights, combined masks
# ---------------------------------------------------------------------------------------------
def test_clone_independence(tok, vocab):
    specs = [
        (PotentialSpec("regex", pattern=DATE), "2024-", "01"),
        (
            PotentialSpec(
                "json_schema", schema='{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
            ),
            '{"a": ',
            "12}",
        ),
        (PotentialSpec("cfg", grammar='start: "ab" | "abc" | "x"'), "a", "b"),
        (PotentialSpec("max_word_length", max_len=6), "hi wor", "ld"),
        (PotentialSpec("banned_phrases", phrases=["hello world"]), "hello", " wor"),
        (PotentialSpec("forbidden_chars", chars="q"), "abc", "q"),
        (PotentialSpec("max_tokens", n=4), "a", " b c"),
    ]
    for spec, prefix, more in specs:
        [p] = build_potentials([spec], vocab)
        for t in tok.encode(prefix):
            p.advance(t)
        m0 = p.mask().clone() if p.mask() is not None else None
        f0 = p.finish()
        q = p.clone()
        for t in tok.encode(more):
            q.advance(t)
        m1 = p.mask()
        assert (m0 is None and m1 is None) or torch.equal(m0, m1), spec.kind
        assert p.finish() == f0, spec.kind
        qm = q.mask()
        assert qm is None or m0 is None or not torch.equal(qm, m0), spec.kind  # the clone did move on


def test_grammar_mask_memo(tok, vocab):
    """Clones share a memo of masks by token history: equal histories, equal masks; others differ."""
    [p] = build_potentials([PotentialSpec("regex", pattern=DATE)], vocab)
    a, b, c = p.clone(), p.clone(), p.clone()
    [fresh] = build_potentials([PotentialSpec("regex", pattern=DATE)], vocab)
    for t in tok.encode("2024-"):
        a.advance(t)
        b.advance(t)
        fresh.advance(t)
    for t in tok.encode("2024"):
        c.advance(t)
    ma = a.mask().clone()
    assert torch.equal(b.mask(), ma) and torch.equal(fresh.mask(), ma)
    assert not torch.equal(c.mask(), ma) and c.mask()[tid(tok, "-")] and not ma[tid(tok, "-")]
    assert allowed_ids(p.mask()) == allowed_ids(
        build_potentials([PotentialSpec("regex", pattern=DATE)], vocab)[0].mask()
    )


def test_weights_and_combined_mask(tok, vocab):
    z = tid(tok, "z")
    [w0] = build_potentials([PotentialSpec("forbidden_chars", chars="z", weight=0.0)], vocab)
    assert w0.mask() is None and w0.advance(z) == 0.0 and w0.finish() == 0.0
    [w2] = build_potentials([PotentialSpec("forbidden_chars", chars="z", weight=2.5)], vocab)
    assert not w2.mask()[z] and w2.advance(z) == NEG_INF
    assert combined_mask([]) is None
    assert (
        combined_mask(
            build_potentials(
                [PotentialSpec("max_tokens", n=9), PotentialSpec("banned_phrases", phrases=["x"], weight=0)], vocab
            )
        )
        is None
    )
    pots = build_potentials(
        [
            PotentialSpec("regex", pattern="[a-z]+"),
            PotentialSpec("forbidden_chars", chars="aeiou"),
            PotentialSpec("required_phrases", phrases=["x"]),
            PotentialSpec("max_tokens", n=9),
        ],
        vocab,
    )
    m = combined_mask(pots)
    assert torch.equal(m, pots[0].mask() & pots[1].mask() & ~vocab.eos_mask)
    m[:] = False  # a fresh tensor: the potentials' cached masks are untouched
    assert pots[0].mask().any() and pots[1].mask().any()
    for s in ("b", "xyz", "rst"):
        assert combined_mask(pots)[tid(tok, s)]
    for s in ("a", "Ġb", "one", "2"):
        assert not combined_mask(pots)[tid(tok, s)]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
OK_SPEC = PotentialSpec("max_tokens", n=5)


@pytest.mark.parametrize(
    "bad, prefix",
    [
        (PotentialSpec("foo"), "steering.potentials[2].kind: unknown potential 'foo'"),
        (PotentialSpec(""), "steering.potentials[2].kind: required"),
        (PotentialSpec("regex", pattern="("), "steering.potentials[2].pattern: invalid regex: "),
        (PotentialSpec("regex", pattern="(?=a)b"), "steering.potentials[2].pattern: invalid regex: "),
        (PotentialSpec("regex", pattern=r"(a)\1"), "steering.potentials[2].pattern: invalid regex: "),
        (PotentialSpec("regex"), "steering.potentials[2].pattern: required for 'regex'"),
        (PotentialSpec("regex", pattern=""), "steering.potentials[2].pattern: must not be empty"),
        (PotentialSpec("regex", pattern=5), "steering.potentials[2].pattern: must be a string"),
        (
            PotentialSpec("regex", pattern="a", phrases=["x"]),
            "steering.potentials[2].phrases: not a parameter of 'regex'",
        ),
        (PotentialSpec("cfg", grammar='start: "a" b'), "steering.potentials[2].grammar: invalid Lark grammar: "),
        (
            PotentialSpec("cfg", grammar="root ::= foo", format="gbnf"),
            "steering.potentials[2].grammar: invalid GBNF grammar: ",
        ),
        (
            PotentialSpec("cfg", grammar='start: "a"', format="yacc"),
            "steering.potentials[2].format: must be 'lark' or 'gbnf'",
        ),
        (PotentialSpec("json_schema", schema="{not json"), "steering.potentials[2].schema: invalid JSON: "),
        (
            PotentialSpec("json_schema", schema='{"type": "objec"}'),
            "steering.potentials[2].schema: invalid JSON schema: ",
        ),
        (PotentialSpec("json_schema", schema="[1, 2]"), "steering.potentials[2].schema: invalid JSON schema: "),
        (PotentialSpec("json_schema", schema="[" * 60_000), "steering.potentials[2].schema: nested deeper than 64"),
        # sizes are bounded before any work: a long text, too many phrases, too many bytes of them
        (
            PotentialSpec("json_schema", schema="[" * 100_000),
            "steering.potentials[2].schema: longer than this server's",
        ),
        (PotentialSpec("regex", pattern="a" * 70_000), "steering.potentials[2].pattern: longer than this server's"),
        (
            PotentialSpec("banned_phrases", phrases=[f"p{i}" for i in range(20_000)]),
            "steering.potentials[2].phrases: 20000 of them; this server's limit is 1000",
        ),
        (
            PotentialSpec("banned_phrases", phrases=["x" * 1000] * 300),
            "steering.potentials[2].phrases: 300000 bytes in all",
        ),
        (
            PotentialSpec("required_phrases", phrases=["ok", "x" * 1025]),
            "steering.potentials[2].phrases[1]: longer than this server's limit of 1024 characters",
        ),
        (
            PotentialSpec("json_schema", schema='{"items": ' * 1000 + "{}" + "}" * 1000),
            "steering.potentials[2].schema: nested deeper than 64",
        ),
        (
            PotentialSpec("json_schema", schema='{"$ref": "#/defs/x"}'),
            "steering.potentials[2].schema: invalid JSON schema: ",
        ),
        (PotentialSpec("max_word_length", max_len=0), "steering.potentials[2].max_len: must be > 0"),
        (PotentialSpec("max_word_length", max_len=-3), "steering.potentials[2].max_len: must be > 0"),
        (PotentialSpec("max_word_length", max_len=2.5), "steering.potentials[2].max_len: must be an integer"),
        (PotentialSpec("max_word_length"), "steering.potentials[2].max_len: required"),
        (PotentialSpec("max_tokens", n=0), "steering.potentials[2].n: must be > 0"),
        (PotentialSpec("forbidden_chars", chars=""), "steering.potentials[2].chars: must not be empty"),
        (
            PotentialSpec("forbidden_chars", chars="a", case_insensitive="yes"),
            "steering.potentials[2].case_insensitive: must be a boolean",
        ),
        (PotentialSpec("banned_phrases", phrases=["ok", ""]), "steering.potentials[2].phrases[1]: empty phrase"),
        (PotentialSpec("banned_phrases", phrases=[]), "steering.potentials[2].phrases: must not be empty"),
        (PotentialSpec("required_phrases", phrases="abc"), "steering.potentials[2].phrases: must be a list of strings"),
        (PotentialSpec("max_tokens", n=3, weight=-1.0), "steering.potentials[2].weight: must be a finite number >= 0"),
        (
            PotentialSpec("max_tokens", n=3, weight=math.nan),
            "steering.potentials[2].weight: must be a finite number >= 0",
        ),
        (
            PotentialSpec("max_tokens", n=3, weight=math.inf),
            "steering.potentials[2].weight: must be a finite number >= 0",
        ),
        (
            PotentialSpec("max_tokens", n=3, options={"x": 1}),
            "steering.potentials[2].options: 'max_tokens' takes no options",
        ),
        ({"kind": "regex", "pattern": "a", "colour": 1}, "steering.potentials[2].colour: unknown field"),
    ],
)
def test_bad_specs(vocab, bad, prefix):
    with pytest.raises(PotentialError) as e:
        build_potentials([OK_SPEC, OK_SPEC, bad], vocab)
    assert str(e.value).startswith(prefix), str(e.value)
    assert isinstance(e.value, ValueError)


def test_specs_from_dict_and_proto(tok, vocab):
    from smcserve.protos import smcserve_pb2 as pb

    pots = build_potentials(
        [{"kind": "regex", "pattern": "[0-9]+"}, {"kind": "max_tokens", "n": 4, "weight": 2}], vocab
    )
    assert pots[1].weight == 2.0 and pots[0].mask()[tid(tok, "7")]
    msg = pb.Potential(forbidden_chars=pb.ForbiddenCharsPotential(chars="xy"))
    spec = PotentialSpec.from_proto(msg)
    assert spec.kind == "forbidden_chars" and spec.weight == 1.0
    assert spec.chars == "xy" and spec.case_insensitive is True and spec.pattern is None and spec.phrases is None
    build_potential(spec, vocab)
    assert (
        PotentialSpec.from_proto(
            pb.Potential(forbidden_chars=pb.ForbiddenCharsPotential(chars="x", case_sensitive=True))
        ).case_insensitive
        is False
    )
    # phrases: case-sensitive unless asked; the oneof's field is the kind
    for kind in ("banned_phrases", "required_phrases"):
        spec = PotentialSpec.from_proto(pb.Potential(weight=0.5, **{kind: pb.PhrasesPotential(phrases=["Hi"])}))
        assert (spec.kind, spec.phrases, spec.case_insensitive, spec.weight) == (kind, ["Hi"], False, 0.5)
        spec = PotentialSpec.from_proto(
            pb.Potential(**{kind: pb.PhrasesPotential(phrases=["Hi"], case_insensitive=True)})
        )
        assert spec.case_insensitive is True
        build_potential(spec, vocab)
    # cfg: an empty format is the default (lark); a built-in's "" / 0 parameters are kept and refused
    spec = PotentialSpec.from_proto(pb.Potential(cfg=pb.CfgPotential(grammar='start: "a"')))
    assert spec.grammar == 'start: "a"' and spec.format is None
    assert PotentialSpec.from_proto(pb.Potential(cfg=pb.CfgPotential(grammar="g", format="gbnf"))).format == "gbnf"
    for msg, error in (
        (pb.Potential(max_word_length=pb.MaxWordLengthPotential()), "max_len: must be > 0"),
        (pb.Potential(regex=pb.RegexPotential()), "pattern: must not be empty"),
        (pb.Potential(max_tokens=pb.MaxTokensPotential()), "n: must be > 0"),
        (pb.Potential(json_schema=pb.JsonSchemaPotential()), "schema: "),
        (pb.Potential(banned_phrases=pb.PhrasesPotential()), "phrases: must not be empty"),
        (pb.Potential(weight=1.0), "kind: required"),
    ):
        with pytest.raises(PotentialError, match=r"^steering\.potentials\[0\]\." + re.escape(error)):
            build_potential(PotentialSpec.from_proto(msg), vocab)
    # a plugin: its name is the kind, its options a plain dict; it may not take a built-in's name
    msg = pb.Potential(plugin=pb.PluginPotential(name="mine"))
    assert PotentialSpec.from_proto(msg) == PotentialSpec("mine")
    for name, error in (
        ("", "plugin.name: required"),
        ("regex", "plugin.name: 'regex' is a built-in kind"),
        ("prompt_intersection", "plugin.name: 'prompt_intersection' is a built-in kind"),
    ):
        with pytest.raises(PotentialError, match=r"^steering\.potentials\[3\]\." + re.escape(error)):
            PotentialSpec.from_proto(pb.Potential(plugin=pb.PluginPotential(name=name)), "steering.potentials[3]")
    # prompt_intersection: the prompts are texts; their token ids are the scheduler's to fill in
    msg = pb.Potential(weight=0.5, prompt_intersection=pb.PromptIntersectionPotential(prompts=["q", "r"]))
    spec = PotentialSpec.from_proto(msg)
    assert spec == PotentialSpec("prompt_intersection", weight=0.5, prompts=["q", "r"])
    with pytest.raises(PotentialError, match=r"^steering\.potentials\[0\]\.prompt_ids: required"):
        build_potential(spec, vocab)
    pot = build_potential(dataclasses.replace(spec, prompt_ids=[[1, 2], [3]]), vocab)
    assert pot.prompts() == ((1, 2), (3,)) and pot.weight == 0.5
    for msg, error in (
        (pb.PromptIntersectionPotential(), "prompts: must not be empty"),
        (pb.PromptIntersectionPotential(prompts=["q", ""]), "prompts[1]: empty prompt"),
    ):
        with pytest.raises(PotentialError, match=r"^steering\.potentials\[0\]\." + re.escape(error)):
            build_potential(PotentialSpec.from_proto(pb.Potential(prompt_intersection=msg)), vocab)


def test_every_builtin_kind_is_in_the_proto():
    """Potential's kind oneof has one field per built-in kind (plus plugin), and each kind's message
    carries exactly the kind's parameters (case_sensitive standing for forbidden_chars'
    case_insensitive; prompt_intersection's prompt_ids are filled in by the scheduler)."""
    from smcserve.protos import smcserve_pb2 as pb
    from smcserve.smc.potentials.spec import _KIND_PARAMS

    oneof = {f.name: f.message_type for f in pb.Potential.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert set(oneof) == set(BUILTIN_KINDS) | {"plugin"}
    for kind in BUILTIN_KINDS:
        fields = [f.name for f in oneof[kind].fields]
        want = [
            "case_sensitive" if (kind, p) == ("forbidden_chars", "case_insensitive") else p
            for p in _KIND_PARAMS[kind]
            if p != "prompt_ids"
        ]
        assert fields == want, kind


# ---------------------------------------------------------------------------------------------
# operator plugins
# ---------------------------------------------------------------------------------------------
class NoDigits(Potential):
    """A soft potential: log G = -1 per token containing a digit (times the weight)."""

    def __init__(self, vocab, weight):
        self.vocab, self.weight, self.count = vocab, weight, 0

    def clone(self):
        c = NoDigits(self.vocab, self.weight)
        c.count = self.count
        return c

    def _advance(self, token):
        if any(ch.isdigit() for ch in self.vocab.strings[token]):
            self.count += 1
            return -1.0
        return 0.0


def _no_digits(spec, vocab):
    if "strict" in spec.options:
        raise ValueError("options.strict: not supported")
    return NoDigits(vocab, spec.weight)


class FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"plugin:{name}", obj, error

    def load(self):
        if self._error:
            raise ImportError(self._error)
        return self._obj


@pytest.fixture()
def fake_plugins(monkeypatch):
    eps = [
        FakeEntryPoint("no_digits", _no_digits),
        FakeEntryPoint("broken", error="no module named 'x'"),
        FakeEntryPoint("regex", lambda spec, vocab: None),
        FakeEntryPoint("not_a_potential", lambda spec, vocab: object()),
    ]

    def entry_points(**kw):
        assert kw.get("group") == "smcserve.potentials"
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    load_plugins(reload=True)
    yield
    monkeypatch.undo()
    load_plugins(reload=True)


def test_plugins_from_entry_points(tok, vocab, fake_plugins):
    kinds = potential_kinds()
    assert "no_digits" in kinds and set(BUILTIN_KINDS) <= set(kinds)
    [p] = build_potentials([PotentialSpec("no_digits", weight=0.5)], vocab)
    assert p.mask() is None
    assert p.advance(tid(tok, "7")) == -0.5 and p.advance(tid(tok, "a")) == 0.0
    q = p.clone()
    q.advance(tid(tok, "7"))
    assert p.count == 1 and q.count == 2
    # the built-in regex is not overridden by a plugin of the same name
    [r] = build_potentials([PotentialSpec("regex", pattern="a")], vocab)
    assert r.mask() is not None
    with pytest.raises(
        PotentialError, match=r"^steering\.potentials\[1\]\.kind: potential 'broken' failed to load: ImportError"
    ):
        build_potentials([OK_SPEC, PotentialSpec("broken")], vocab)
    with pytest.raises(PotentialError, match=r"^steering\.potentials\[0\]: options\.strict: not supported"):
        build_potentials([PotentialSpec("no_digits", options={"strict": True})], vocab)
    with pytest.raises(
        PotentialError, match=r"^steering\.potentials\[0\]\.kind: potential 'not_a_potential' returned object"
    ):
        build_potentials([PotentialSpec("not_a_potential")], vocab)


def test_register_potential(vocab):
    register_potential("no_digits_reg", _no_digits)
    try:
        [p] = build_potentials([PotentialSpec("no_digits_reg")], vocab)
        assert isinstance(p, NoDigits)
    finally:
        unregister_potential("no_digits_reg")
    with pytest.raises(PotentialError, match="unknown potential 'no_digits_reg'"):
        build_potentials([PotentialSpec("no_digits_reg")], vocab)
    with pytest.raises(ValueError):
        register_potential("regex", _no_digits)


def test_tables_built_from_client_input_are_bounded(vocab):
    """Each distinct forbidden_chars set builds a vocab-wide table; the vocab keeps at most MAX_DERIVED of
    them (least recently used out), so distinct requests cannot grow a server's memory without end."""
    from smcserve.smc.vocab import MAX_DERIVED

    chars = [chr(0x4E00 + i) for i in range(MAX_DERIVED + 8)]
    masks = [build_potentials([PotentialSpec("forbidden_chars", chars=c)], vocab)[0].mask() for c in chars]
    assert len(vocab._derived) <= MAX_DERIVED
    again = build_potentials([PotentialSpec("forbidden_chars", chars=chars[0])], vocab)[0].mask()  # rebuilt
    assert torch.equal(again, masks[0])


def test_one_big_table_does_not_hold_up_another(vocab):
    """A table is built under its own key's lock: while one is being built (held here until released),
    another key's table is built and returned; a second caller of the building key gets the same value."""
    started, release, calls = threading.Event(), threading.Event(), []

    def slow():
        calls.append(1)
        started.set()
        release.wait()
        return "slow table"

    slow_results = []
    builders = [threading.Thread(target=lambda: slow_results.append(vocab.derived(("test", "slow"), slow)))]
    builders[0].start()
    started.wait()
    fast = []
    other = threading.Thread(target=lambda: fast.append(vocab.derived(("test", "fast"), lambda: "fast table")))
    other.start()
    other.join(timeout=60)  # a hang guard only: the call does no work
    done_while_slow_built = list(fast)
    builders.append(threading.Thread(target=lambda: slow_results.append(vocab.derived(("test", "slow"), slow))))
    builders[1].start()
    release.set()
    for t in builders:
        t.join()
    other.join()
    assert done_while_slow_built == ["fast table"]
    assert slow_results == ["slow table", "slow table"] and len(calls) == 1


@pytest.mark.parametrize("case_insensitive", [False, True])
def test_phrase_tables_match_a_direct_search(vocab, case_insensitive):
    """The banned_phrases tables (many phrases looked up by substrings, endings kept by prefix, tokens by
    sorted runs) ban exactly what a direct search does: after a tail, every token whose text completes a
    phrase (an occurrence in tail + token that ends in the token)."""
    from smcserve.smc.potentials.text import FEW_PHRASES, _fold, _PhraseTable

    rng = random.Random(5)
    strings = [s for s in vocab.completed if 2 <= len(s) <= 6]
    phrases = {rng.choice(strings) for _ in range(FEW_PHRASES + 8)}  # the lookup path
    phrases |= {" the wor", "ing th", "Hello", "日本", "x" * 100 + "yz"}  # across tokens; longer than any token
    phrases = tuple(sorted(_fold(p, case_insensitive) for p in phrases))
    table = _PhraseTable(vocab, phrases, case_insensitive)
    texts = [_fold(s, case_insensitive) for s in vocab.completed]
    eos = set(vocab.eos_ids)
    for tail in ("", "say the", "going", "x" * 100 + "y", "日"):
        tail = _fold(tail, case_insensitive)
        expected = [
            t in eos or not any(p in (tail + s)[max(0, len(tail) - len(p) + 1) :] for p in phrases)
            for t, s in enumerate(texts)
        ]
        got = table.mask(tail).tolist()
        assert got == expected, [(t, texts[t]) for t in range(len(texts)) if got[t] != expected[t]][:10]


def test_word_length_masks_kept_are_bounded(vocab):
    """max_word_length keeps a mask per current word length only near max_len (far below it every token
    is allowed: one mask), so a huge max_len and long words cannot grow a worker's memory."""
    [p] = build_potentials([PotentialSpec("max_word_length", max_len=10_000)], vocab)
    table = p.table
    for run in range(0, 10_001, 7):
        table.mask(run, b"")
    assert len(table.by_run) <= table.longest_need + 1
    for run in (0, 5_000, 10_000 - table.longest_need, 9_990, 10_000):
        expected = table.static_ok & (table.t.need_a <= 10_000 - run)
        expected[list(vocab.eos_ids)] = True
        assert np.array_equal(table.mask(run, b"").numpy(), expected)
