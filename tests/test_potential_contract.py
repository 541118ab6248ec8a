"""The potential contract (after genlm-control's ``PotentialTests``), one suite run against every
built-in kind and two plugin kinds, with the real SmolLM2 tokenizer (no model).

The contract is the one in ``smc/potentials/interface.py``. Each case is a spec with representative
parameters and scripted token paths that the potential accepts (some end mid-way through a UTF-8
character, leaving a partial character pending); the reachable states are the start, every prefix of
every path, and a seeded random walk over allowed tokens (biased towards partial-UTF-8 tokens).

1. The mask agrees with the potential's own check, ``advance`` on a clone, token by token: every
   token the mask forbids advances to −inf (the mask is a superset of G > 0), and every token it
   allows advances to a finite value (the mask is exact; so are both plugins here). The one
   documented exception: forbidden_chars' static mask lets through a continuation token that
   completes a forbidden non-ASCII character after a pending partial one — checked to happen only
   then, and to happen in the scripted state built for it. EOS is allowed exactly when ``finish()`` is finite, and
   ``finish()`` is the same whether or not ``advance(EOS)`` came first. Hard kinds return only 0 or
   −inf; nothing returns NaN or +inf. Over the whole vocabulary at several states per kind (the
   start and the end of every path; grammar kinds: a prefix and a full match), on a sample of a few
   hundred tokens (random, allowed, forbidden, continuation bytes, special tokens) at every other
   state. The whole module runs in ~12 s.
2. Clones are independent: after a clone (and a clone's clone) moved on along the path, into a
   violation and past EOS, the original's mask, advances and finish are those of a fresh build
   replayed to the same state, and the mask tensor it returned earlier is unchanged; after the
   original moved on, an earlier clone is likewise as if freshly built.
3. Finish agrees with advance: each scripted path followed by EOS scores finite (0 for hard kinds);
   after a non-EOS token a hard built-in rules out, its mask is EOS-only and every advance and
   finish is −inf (a plugin promises only no NaN/+inf); weight 0 disables (mask None, advance 0,
   finish 0, also after a violation); weight w > 0 scales log G (w · log G, same mask).
4. A vocabulary-wide factor (prompt_intersection) is weight · Σ_i log p_i over the potential's own
   companion prompts, and the masked proposal's increment with it is log Σ_x p0·Π_i p_i^w·mask,
   checked against a product computed by hand on a four-token vocabulary.
"""

from __future__ import annotations

import math
import random
import re
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from smcserve.smc.potentials import (
    BUILTIN_KINDS,
    Potential,
    build_potential,
    combined_log_factor,
    companion_prompts,
    register_potential,
    scaled,
    unregister_potential,
)
from smcserve.smc.proposal import propose
from smcserve.smc.vocab import get_vocab

NEG_INF = -math.inf
README = Path(__file__).resolve().parent.parent / "README.md"


# ---------------------------------------------------------------------------------------------
# plugins: the README's max_bytes (hard, with a mask) and a soft one
# ---------------------------------------------------------------------------------------------
def _readme_module(name: str, path: str) -> types.ModuleType:
    """The README code block whose first line is ``# <path>``, as a module."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        if block.startswith(f"# {path}\n"):
            mod = types.ModuleType(name)
            exec(compile(block, f"README.md:{path}", "exec"), mod.__dict__)
            return mod
    raise AssertionError(f"no README code block for {path}")


class DigitPenalty(Potential):
    """Soft: log G_t = −1 per token containing a digit; at the end, −0.5 if no digit was seen."""

    def __init__(self, vocab, weight):
        self.vocab, self.weight, self.count = vocab, weight, 0

    def clone(self):
        c = DigitPenalty(self.vocab, self.weight)
        c.count = self.count
        return c

    def _advance(self, token):
        if any(ch.isdigit() for ch in self.vocab.strings[token]):
            self.count += 1
            return -1.0
        return 0.0

    def _finish(self):
        return 0.0 if self.count else -0.5


PLUGINS = {"max_bytes": None, "digit_penalty": lambda spec, vocab: DigitPenalty(vocab, spec.weight)}


@pytest.fixture(scope="module", autouse=True)
def plugins():
    mod = _readme_module("contract_max_bytes", "smcserve-max-bytes/smcserve_max_bytes.py")
    PLUGINS["max_bytes"] = mod.max_bytes
    for kind, factory in PLUGINS.items():
        register_potential(kind, factory)
    yield
    for kind in PLUGINS:
        unregister_potential(kind)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    spec: dict
    paths: tuple  # accepted token paths: pieces of text (tokenised) or bytes (one single-byte token each)
    hard: bool = True  # log G is 0 or −inf
    builtin: bool = True
    grammar: bool = False  # full-vocabulary check at two states only (a failing advance costs ~15 µs)


CASES = {
    "regex": Case(
        {"kind": "regex", "pattern": r"(Yes|No), [a-z ]{1,30} [0-9]{1,4}\."}, (("Yes, the cat sat 42.",),), grammar=True
    ),
    "cfg": Case(
        {"kind": "cfg", "grammar": 'start: item (", " item)*\nitem: "cat" | "dog" | NUM\nNUM: /[0-9]{1,3}/\n'},
        (("cat, 12, dog",),),
        grammar=True,
    ),
    "cfg_gbnf": Case(
        {"kind": "cfg", "format": "gbnf", "grammar": 'root ::= ("yes" | "no") (", " [a-z]+)* "."'},
        (("yes, maybe, so.",),),
        grammar=True,
    ),
    "json_schema": Case(
        {
            "kind": "json_schema",
            "schema": '{"type": "object", "properties": {"name": {"type": "string", '
            '"maxLength": 10}, "age": {"type": "integer"}}, "required": ["name", "age"], '
            '"additionalProperties": false}',
        },
        (('{"name": "Ann", "age": 31}',),),
        grammar=True,
    ),
    "max_word_length": Case(
        {"kind": "max_word_length", "max_len": 5},
        (("The cat sat; naïve café ok",), ("abcde", b"\xc3"), ("abcd", b"\xc3")),
    ),
    "forbidden_chars": Case(
        {"kind": "forbidden_chars", "chars": "zé"}, (("The cat sat. Ω 日本 ok",), ("caf", b"\xc3"))
    ),
    "banned_phrases": Case(
        {"kind": "banned_phrases", "phrases": ["hello world", "日本"]},
        (("hello there, world; hello",), ("日", b"\xe6", b"\x9c")),
    ),
    "banned_phrases_ci": Case(
        {"kind": "banned_phrases", "phrases": ["Hello World", "Straße"], "case_insensitive": True},
        (("HELLO there, world; STRASS hello",), ("Stra", b"\xc3")),
    ),
    "required_phrases": Case({"kind": "required_phrases", "phrases": ["cat", "dog"]}, (("a cat and a dog",),)),
    "max_tokens": Case({"kind": "max_tokens", "n": 6}, (("one two",), ("a b c d e",))),
    # a factor over the whole vocabulary (the LM under another prompt), no mask, log G 0
    "prompt_intersection": Case(
        {"kind": "prompt_intersection", "prompts": ["Name a dog."], "prompt_ids": [[5820, 253, 2767, 30]]},
        (("Rex, a good dog",),),
        hard=False,
    ),
    "max_bytes": Case(
        {"kind": "max_bytes", "options": {"limit": 20}},
        (("Hello world, how",), ("Hello world, how are",)),
        builtin=False,
    ),
    "digit_penalty": Case(
        {"kind": "digit_penalty"}, (("Room 101, floor 3",), ("no digits",)), hard=False, builtin=False
    ),
}


def test_every_builtin_kind_has_a_case():
    assert set(BUILTIN_KINDS) <= {c.spec["kind"] for c in CASES.values()}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from smcserve.engine.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


@pytest.fixture(scope="module")
def vocab(tok):
    return get_vocab(tok)


@pytest.fixture(scope="module")
def partial(vocab):
    """Tokens that start or end in the middle of a UTF-8 character (the random walk favours them)."""
    out = []
    for i, b in enumerate(vocab.token_bytes):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return out


def path_ids(tok, vocab, pieces) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            ids += [vocab.token_bytes.index(bytes([b])) for b in piece]
        else:
            ids += tok.encode(piece)
    return ids


def build(case: Case, vocab, weight: float = 1.0) -> Potential:
    return build_potential({**case.spec, "weight": weight}, vocab)


def at(case: Case, vocab, ids, weight: float = 1.0, check: bool = True) -> Potential:
    """A fresh potential advanced along ``ids`` (each token allowed and finite at weight 1)."""
    p = build(case, vocab, weight)
    for t in ids:
        if check and weight == 1.0:
            m = p.mask()
            assert m is None or bool(m[t]), ("path token not allowed", ids, t)
        lg = p.advance(t)
        assert lg > NEG_INF, ("path token ruled out", ids, t)
    return p


def random_walk(case: Case, vocab, partial, steps: int = 8) -> list[int]:
    rng = random.Random(zlib.crc32(case.spec["kind"].encode()))
    p = build(case, vocab)
    ids: list[int] = []
    for _ in range(steps):
        m = p.mask()
        allowed = np.arange(vocab.size) if m is None else np.flatnonzero(m.numpy())
        allowed = allowed[~np.isin(allowed, vocab.eos_ids)]
        if not len(allowed):
            break
        pool = allowed[np.isin(allowed, partial)]
        for _ in range(50):
            src = pool if len(pool) and rng.random() < 0.5 else allowed
            t = int(src[rng.randrange(len(src))])
            if p.clone().advance(t) > NEG_INF:
                break
        else:
            break
        p.advance(t)
        ids.append(t)
    return ids


def states(case: Case, tok, vocab, partial) -> list[tuple[list[int], bool]]:
    """(ids, full vocabulary?) for every reachable state the contract is checked from."""
    paths = [path_ids(tok, vocab, pieces) for pieces in case.paths] + [random_walk(case, vocab, partial)]
    seen: dict[tuple, bool] = {}
    for path in paths:
        for k in range(len(path) + 1):
            seen.setdefault(tuple(path[:k]), False)
    if case.grammar:  # two: a prefix and a full match
        seen[tuple(paths[0][:2])] = seen[tuple(paths[0])] = True
    else:  # the start and the end of every path
        seen[()] = True
        for path in paths:
            seen[tuple(path)] = True
    return [(list(ids), full) for ids, full in seen.items()]


def sample(vocab, mask, rng: random.Random, n: int = 250) -> np.ndarray:
    """A few hundred tokens: random, allowed and forbidden ones, continuation-byte tokens, special
    tokens, EOS."""
    toks = set(rng.sample(range(vocab.size), n))
    if mask is not None:
        for ids in (np.flatnonzero(mask.numpy()).tolist(), np.flatnonzero(~mask.numpy()).tolist()):
            toks |= set(rng.sample(ids, min(n, len(ids))))
    toks |= set(vocab.cont_start_ids.tolist()) | set(vocab.special_ids) | set(vocab.eos_ids)
    return np.array(sorted(toks), dtype=np.int64)


def advance_each(p: Potential, tokens) -> np.ndarray:
    """``p.clone().advance(t)`` for every token (``p`` itself is not advanced)."""
    return np.array([p.clone().advance(int(t)) for t in tokens], dtype=np.float64)


def mask_np(p: Potential, vocab) -> np.ndarray:
    m = p.mask()
    if m is None:
        return np.ones(vocab.size, dtype=np.bool_)
    assert m.shape == (vocab.size,) and m.dtype == torch.bool and m.device.type == "cpu"
    return m.numpy()


def _has_forbidden(text: str, chars: str) -> bool:
    return any(f(c) in f(text) for c in chars for f in (str.lower, str.upper, str.casefold))


def forbidden_chars_exception(tok, case: Case, ids, t) -> bool:
    """The documented forbidden_chars exception: after a pending partial character, the token (a
    continuation byte sequence, harmless on its own) completes a forbidden non-ASCII character."""
    chars = case.spec["chars"]
    before, own, after = tok.decode(ids), tok.decode([t]), tok.decode(ids + [t])
    new = [c for c in after[len(before) - 1 :] if _has_forbidden(c, chars)]
    return (
        before.endswith("\ufffd")
        and own.startswith("\ufffd")
        and not _has_forbidden(own, chars)
        and bool(new)
        and all(not c.isascii() for c in new)
    )


# ---------------------------------------------------------------------------------------------
# 1. the mask agrees with advance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_mask_agrees_with_advance(name, tok, vocab, partial):
    case = CASES[name]
    rng = random.Random(zlib.crc32(name.encode()) + 1)
    eos = vocab.eos_ids[0]
    n_full = n_exceptions = 0
    for ids, full in states(case, tok, vocab, partial):
        p = at(case, vocab, ids)
        m = p.mask()
        allowed = mask_np(p, vocab)
        tokens = np.arange(vocab.size) if full else sample(vocab, m, rng)
        n_full += full
        adv = advance_each(p, tokens)
        where = (name, tok.decode(ids), ids)
        assert not np.isnan(adv).any() and not (adv == math.inf).any(), where
        if case.hard:
            assert np.isin(adv, (0.0, NEG_INF)).all(), where
        ok = adv > NEG_INF
        # the mask is a superset of G > 0: a forbidden token is ruled out
        wrong = tokens[~allowed[tokens] & ok]
        assert not len(wrong), (
            "mask forbids tokens that advance finitely",
            where,
            [vocab.token_bytes[t] for t in wrong[:10]],
        )
        # ... and exact: an allowed token is not ruled out (forbidden_chars: except the documented case)
        wrong = tokens[allowed[tokens] & ~ok]
        if case.spec["kind"] == "forbidden_chars":
            for t in wrong.tolist():
                assert forbidden_chars_exception(tok, case, ids, t), (
                    "mask allows a ruled-out token",
                    where,
                    vocab.token_bytes[t],
                )
            n_exceptions += len(wrong)
        else:
            assert not len(wrong), ("mask allows tokens ruled out", where, [vocab.token_bytes[t] for t in wrong[:10]])
        # EOS is allowed exactly when ending now is acceptable; finish does not count advance(EOS) again
        f = p.clone().finish()
        assert not math.isnan(f) and f != math.inf, where
        assert bool(allowed[eos]) == (f > NEG_INF), where
        c = p.clone()
        c.advance(eos)
        assert c.finish() == f, where
    assert n_full >= 1
    if case.spec["kind"] == "forbidden_chars":
        assert n_exceptions, "the scripted state caf + 0xC3 should show the documented exception (0xA9 completes é)"


# ---------------------------------------------------------------------------------------------
# 2. clones are independent
# ---------------------------------------------------------------------------------------------
def _fresh(case: Case, vocab, ids, probe):
    """What a potential at ``ids`` must say, from fresh builds that never saw a clone."""
    m = at(case, vocab, ids).mask()
    adv = np.array([at(case, vocab, ids, check=False).advance(int(t)) for t in probe])
    return (None if m is None else m.clone()), adv, at(case, vocab, ids, check=False).finish()


def _assert_as_fresh(p: Potential, want, probe, where):
    m0, a0, f0 = want
    m = p.mask()
    assert (m is None) == (m0 is None) and (m0 is None or torch.equal(m, m0)), where
    assert np.array_equal(advance_each(p, probe), a0), where
    assert p.clone().finish() == f0, where
    assert p.finish() == f0, where


def _move_on(q: Potential, vocab, rest, probe):
    """Advance ``q`` along ``rest``, then into a token ruled out (if any), then past EOS."""
    for t in rest:
        q.advance(t)
    q.mask()
    adv = advance_each(q, probe)
    bad = probe[(adv == NEG_INF) & ~np.isin(probe, vocab.eos_ids)]
    if len(bad):
        q.advance(int(bad[0]))
        q.mask()
    q.clone().advance(vocab.eos_ids[0])
    q.advance(vocab.eos_ids[0])
    q.finish()


@pytest.mark.parametrize("name", list(CASES))
def test_clones_are_independent(name, tok, vocab):
    case = CASES[name]
    rng = random.Random(zlib.crc32(name.encode()) + 2)
    path = path_ids(tok, vocab, case.paths[-1])
    for k in (0, len(path) // 2, len(path)):
        where = (name, tok.decode(path[:k]))
        p = at(case, vocab, path[:k])
        m_ref = p.mask()
        m_copy = None if m_ref is None else m_ref.clone()
        probe = sample(vocab, m_ref, rng, n=40)
        want = _fresh(case, vocab, path[:k], probe)
        # clones (and a clone's clone) move on: the original is as if freshly built
        _move_on(p.clone(), vocab, path[k:], probe)
        _move_on(p.clone().clone(), vocab, path[k:], probe)
        _assert_as_fresh(p, want, probe, where)
        assert m_ref is None or torch.equal(m_ref, m_copy), ("a mask returned earlier was modified in place", where)
        # the original moves on: an earlier clone is as if freshly built
        c = p.clone()
        c.mask()
        _move_on(p, vocab, path[k:], probe)
        _assert_as_fresh(c, want, probe, where)


# ---------------------------------------------------------------------------------------------
# 3. finish agrees with advance; weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_accepted_paths_end_finite(name, tok, vocab):
    case = CASES[name]
    eos = vocab.eos_ids[0]
    for pieces in case.paths:
        ids = path_ids(tok, vocab, pieces)
        p = build(case, vocab)
        logw = 0.0
        for t in ids + [eos]:
            m = p.mask()
            assert m is None or bool(m[t]), (name, pieces, t)
            logw += p.advance(t)
        logw += p.finish()
        assert logw > NEG_INF, (name, pieces)
        if case.hard:
            assert logw == 0.0, (name, pieces)


@pytest.mark.parametrize("name", list(CASES))
def test_violations_are_final(name, tok, vocab, partial):
    """After a token a hard built-in rules out: EOS-only mask, −inf for every advance and for finish."""
    case = CASES[name]
    rng = random.Random(zlib.crc32(name.encode()) + 3)
    eos = vocab.eos_ids[0]
    n_checked = 0
    for ids, _ in states(case, tok, vocab, partial):
        p = at(case, vocab, ids)
        probe = sample(vocab, p.mask(), rng, n=30)
        adv = advance_each(p, probe)
        if case.builtin and adv[probe == eos][0] == NEG_INF:
            c = p.clone()
            c.advance(eos)
            assert c.finish() == NEG_INF, (name, ids)
        bad = probe[(adv == NEG_INF) & (probe != eos)]
        for t in bad[:2].tolist():
            c = p.clone()
            assert c.advance(t) == NEG_INF
            f = c.finish()
            assert not math.isnan(f) and f != math.inf
            if not case.builtin:
                continue  # a plugin promises no more (its −inf is already in the weight)
            n_checked += 1
            assert torch.equal(c.mask(), vocab.eos_mask), (name, ids, t)
            assert f == NEG_INF, (name, ids, t)
            assert (advance_each(c, probe) == NEG_INF).all(), (name, ids, t)
    if case.hard and case.builtin and case.spec["kind"] != "required_phrases":  # it rules out only EOS
        assert n_checked, name


@pytest.mark.parametrize("name", list(CASES))
def test_weights(name, tok, vocab):
    """Weight 0 disables (mask None, log G 0 even for tokens ruled out); weight w scales log G."""
    case = CASES[name]
    rng = random.Random(zlib.crc32(name.encode()) + 4)
    path = path_ids(tok, vocab, case.paths[-1])
    for k in (0, len(path) // 2, len(path)):
        p1 = at(case, vocab, path[:k])
        m1 = p1.mask()
        probe = sample(vocab, m1, rng, n=30)
        a1 = advance_each(p1, probe)
        f1 = p1.clone().finish()
        where = (name, tok.decode(path[:k]))
        for w in (0.0, 0.5, 2.5):
            pw = at(case, vocab, path[:k], weight=w)
            assert pw.weight == w, where
            mw = pw.mask()
            if w == 0.0:
                assert mw is None, where
                assert (advance_each(pw, probe) == 0.0).all(), where
                assert pw.clone().finish() == 0.0, where
                for t in probe[a1 == NEG_INF][:3].tolist():  # ruled out at weight 1: still neutral
                    c = pw.clone()
                    assert c.advance(t) == 0.0 and c.mask() is None and c.finish() == 0.0, where
                continue
            assert (mw is None) == (m1 is None) and (m1 is None or torch.equal(mw, m1)), where
            want = np.array([scaled(w, x) for x in a1])
            np.testing.assert_allclose(advance_each(pw, probe), want, rtol=1e-12, err_msg=str(where))
            assert math.isclose(pw.clone().finish(), scaled(w, f1), rel_tol=1e-12), where
            if case.hard:
                assert np.array_equal(advance_each(pw, probe), a1), where  # a 0/1 potential is unchanged


# ---------------------------------------------------------------------------------------------
# 4. vocabulary-wide factors
# ---------------------------------------------------------------------------------------------
def test_prompt_intersection_factor_is_the_weighted_product():
    vocab = types.SimpleNamespace(size=4)
    p0, p1, p2, p3 = (
        torch.tensor(p, dtype=torch.float64)
        for p in ([0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.2, 0.2])
    )
    a = build_potential({"kind": "prompt_intersection", "prompt_ids": [[1], [2, 3]], "weight": 0.5}, vocab)
    off = build_potential({"kind": "prompt_intersection", "prompt_ids": [[3]], "weight": 0.0}, vocab)
    b = build_potential({"kind": "prompt_intersection", "prompt_ids": [[0]], "weight": 2.0}, vocab)
    pots = [a, off, b]
    assert companion_prompts(pots) == [[1], [2, 3], [0]]  # weight 0 runs no companion sequence
    assert off.log_factor([]) is None and combined_log_factor([off], []) is None
    f = combined_log_factor(pots, [p1.log(), p2.log(), p3.log()])
    by_hand = [0.5 * math.log(p1[x] * p2[x]) + 2.0 * math.log(p3[x]) for x in range(4)]
    np.testing.assert_allclose(f.numpy(), by_hand, rtol=1e-12)
    with pytest.raises(ValueError):
        combined_log_factor(pots, [p1.log(), p2.log()])
    # the masked proposal draws from p0·φ on the allowed tokens; the increment is the allowed mass
    allowed = torch.tensor([[True, True, False, True]])
    prop = propose((p0.log() + f)[None], allowed, torch.tensor([[0.0, 0.999]], dtype=torch.float64))
    mass = sum(p0[x] * (p1[x] * p2[x]) ** 0.5 * p3[x] ** 2 for x in (0, 1, 3))
    assert prop.increment(0, 0.0) == pytest.approx(math.log(mass), rel=1e-12)
    assert prop.tokens[0].tolist() == [0, 3]
    # no mask, no advance: its share of G is paid through the proposal
    c = a.clone()
    assert c.mask() is None and c.advance(2) == 0.0 and c.finish() == 0.0 and c.prompts() == a.prompts()
