"""Text potentials: max_word_length, forbidden_chars, banned_phrases, required_phrases and
max_tokens, their per-vocab tables, and their builders.

Text checks see exactly the text the user gets (``skip_special_tokens=True``, UTF-8 characters
split across tokens joined; see ``smc.vocab``). Words are maximal runs of ``str.isalpha``
characters. Per-vocab tables are computed once (``Vocab.derived``) so that masks and advances do
no per-vocabulary Python work at step time (masks by state are cached; ~1 µs).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ..vocab import Vocab
from .interface import NEG_INF, Potential, _shallow_copy
from .spec import _bool, _phrases, _req_pos_int, _req_str


def _word_stats(s: str) -> tuple[bool, int, int, int]:
    """(all letters, need, rest_max, trail) for max_word_length.

    all letters (empty included): the token extends the current word by need = len(s).
    Otherwise need = its leading letter run (joins the current word), rest_max = its longest
    other letter run, trail = its trailing run (the new current word).
    """
    if not s or s.isalpha():
        return True, len(s), 0, len(s)
    n = len(s)
    i = 0
    while i < n and s[i].isalpha():
        i += 1
    lead, run, rest = i, 0, 0
    for ch in s[i:]:
        if ch.isalpha():
            run += 1
            if run > rest:
                rest = run
        else:
            run = 0
    return False, lead, rest, run


class _WordTable:
    """Per-vocab stats (shared by every max_len) and per-(max_len, run) cached masks."""

    def __init__(self, vocab: Vocab):
        stats = [_word_stats(s) for s in vocab.completed]
        self.all_letters = [a for a, _, _, _ in stats]
        self.need = [n for _, n, _, _ in stats]
        self.rest = [r for _, _, r, _ in stats]
        self.trail = [t for _, _, _, t in stats]
        self.need_a = np.array(self.need, dtype=np.int64)
        self.rest_a = np.array(self.rest, dtype=np.int64)


class _WordMasks:
    def __init__(self, vocab: Vocab, max_len: int):
        self.vocab = vocab
        self.L = max_len
        self.t = vocab.derived(("word_stats",), lambda: _WordTable(vocab))
        self.static_ok = self.t.rest_a <= max_len
        self.longest_need = int(self.t.need_a.max(initial=0))
        self.by_run: dict[int, torch.Tensor] = {}
        self.by_pending: OrderedDict[tuple[bytes, int], torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    def mask(self, run: int, pending: bytes) -> torch.Tensor:
        if not pending:
            # every run this far below max_len allows every token: one mask for them all (at most
            # longest-token + 1 masks kept, however large max_len and however long the words)
            run = max(run, self.L - self.longest_need)
            m = self.by_run.get(run)
            if m is None:
                a = self.static_ok & (self.t.need_a <= self.L - run)
                a[list(self.vocab.eos_ids)] = True
                m = self.by_run[run] = torch.from_numpy(a)
            return m
        key = (pending, run)
        with self.lock:
            m = self.by_pending.get(key)
            if m is not None:
                return m
        # any token that does not continue the pending character flushes it as U+FFFD (a word
        # break), so it is judged as from run 0; only the few continuation-byte tokens differ
        a = self.mask(0, b"").numpy().copy()
        for t in self.vocab.cont_start_ids.tolist():
            s, _ = self.vocab.decode_step(pending, t)
            a[t] = _word_ok(run, s, self.L)[0]
        m = torch.from_numpy(a)
        with self.lock:
            self.by_pending[key] = m
            while len(self.by_pending) > 1024:
                self.by_pending.popitem(last=False)
        return m


def _word_ok(run: int, s: str, max_len: int) -> tuple[bool, int]:
    a, need, rest, trail = _word_stats(s)
    if a:
        return run + need <= max_len, run + need
    return run + need <= max_len and rest <= max_len, trail


class MaxWordLength(Potential):
    """Words (maximal runs of str.isalpha letters) never exceed max_len letters."""

    __slots__ = ("weight", "vocab", "table", "run", "pending", "dead")

    def __init__(self, vocab: Vocab, max_len: int, weight: float = 1.0):
        self.weight = weight
        self.vocab = vocab
        self.table: _WordMasks = vocab.derived(("max_word_length", max_len), lambda: _WordMasks(vocab, max_len))
        self.run = 0
        self.pending = b""
        self.dead = False

    def clone(self) -> MaxWordLength:
        return _shallow_copy(self)

    def _mask(self) -> torch.Tensor:
        if self.dead:
            return self.vocab.eos_mask
        return self.table.mask(self.run, self.pending)

    def _advance(self, token: int) -> float:
        if self.dead:
            return NEG_INF
        L = self.table.L
        if not self.pending:
            t = self.table.t
            self.pending = self.vocab.leftover[token]
            if t.all_letters[token]:
                self.run += t.need[token]
                ok = self.run <= L
            else:
                ok = self.run + t.need[token] <= L and t.rest[token] <= L
                self.run = t.trail[token]
        else:
            s, self.pending = self.vocab.decode_step(self.pending, token)
            ok, self.run = _word_ok(self.run, s, L)
        if not ok:
            self.dead = True
            return NEG_INF
        return 0.0

    def _finish(self) -> float:
        return NEG_INF if self.dead else 0.0


def _substrings(s: str) -> set[str]:
    return {s[i:j] for i in range(len(s)) for j in range(i + 1, len(s) + 1)}


class _CharMatcher:
    """Whether a character is forbidden: it is one of ``chars`` or, case-insensitively, its lower/upper/
    casefolded form contains a forbidden character's. Each form of a character is a few characters long:
    its substrings are looked up in sets, so a check costs the same for 10 forbidden characters or 20,000."""

    def __init__(self, chars: str, case_insensitive: bool):
        self.chars = frozenset(chars)
        self.ci = case_insensitive
        self.forms = [frozenset(f(c) for c in self.chars) for f in (str.lower, str.upper, str.casefold)]

    def __call__(self, x: str) -> bool:
        if x in self.chars:
            return True
        if not self.ci:
            return False
        return any(
            not forms.isdisjoint(_substrings(f(x)))
            for forms, f in zip(self.forms, (str.lower, str.upper, str.casefold))
        )


class _CharTable:
    def __init__(self, vocab: Vocab, chars: str, case_insensitive: bool):
        alphabet = set().union(*vocab.completed)
        self.matches = _CharMatcher(chars, case_insensitive)
        self.bad_chars = frozenset(x for x in alphabet if self.matches(x))
        bad = self.bad_chars
        allowed = np.array([bad.isdisjoint(s) for s in vocab.completed], dtype=np.bool_)
        allowed[list(vocab.eos_ids)] = True
        self.allowed = torch.from_numpy(allowed)
        self.allowed_list = allowed.tolist()


class ForbiddenChars(Potential):
    """No generated character is one of ``chars`` (case-insensitively by default: a character is
    forbidden when its lower/upper/casefolded form contains a forbidden character's)."""

    __slots__ = ("weight", "vocab", "table", "pending", "dead")

    def __init__(self, vocab: Vocab, chars: str, case_insensitive: bool = True, weight: float = 1.0):
        self.weight = weight
        self.vocab = vocab
        self.table: _CharTable = vocab.derived(
            ("forbidden_chars", chars, case_insensitive), lambda: _CharTable(vocab, chars, case_insensitive)
        )
        self.pending = b""
        self.dead = False

    def clone(self) -> ForbiddenChars:
        return _shallow_copy(self)

    def _mask(self) -> torch.Tensor:
        # static; a character completed across tokens (non-ASCII only) is checked by advance
        return self.vocab.eos_mask if self.dead else self.table.allowed

    def _bad(self, s: str) -> bool:
        t = self.table
        if not t.bad_chars.isdisjoint(s):
            return True
        # characters outside the vocabulary's alphabet can only arise across tokens
        return any(not x.isascii() and t.matches(x) for x in s)

    def _advance(self, token: int) -> float:
        if self.dead:
            return NEG_INF
        if not self.pending:
            self.pending = self.vocab.leftover[token]
            if self.table.allowed_list[token]:
                return 0.0
            self.dead = True
            return NEG_INF
        s, self.pending = self.vocab.decode_step(self.pending, token)
        if self._bad(s):
            self.dead = True
            return NEG_INF
        return 0.0

    def _finish(self) -> float:
        return NEG_INF if self.dead else 0.0


def _fold(s: str, ci: bool) -> str:
    return s.casefold() if ci else s


FEW_PHRASES = 16  # up to this many short phrases are searched for in each token; more, looked up
PHRASE_MASKS_KEPT = 256  # masks cached per phrase table (one per set of phrase endings after a tail)


def _containing_any(strings: list[str], phrases: Sequence[str]) -> np.ndarray:
    """bool per string: it contains one of ``phrases``. A phrase longer than a string is not in it; a
    few phrases are searched for in each string, many are looked up by each string's substrings of
    their lengths (the cost of a table does not grow with the number of phrases)."""
    longest = max(map(len, strings), default=0)
    short = {p for p in phrases if len(p) <= longest}
    if len(short) <= FEW_PHRASES:
        return np.array([any(p in s for p in short) for s in strings], dtype=np.bool_)
    lengths = sorted({len(p) for p in short})
    upto = [lengths[: bisect.bisect_right(lengths, n)] for n in range(longest + 1)]  # lengths that fit
    found = [any(s[i : i + n] in short for n in upto[len(s)] for i in range(len(s) - n + 1)) for s in strings]
    return np.array(found, dtype=np.bool_)


def _sorted(strings: list[str]) -> tuple[np.ndarray, list[str]]:
    """Token ids by their text, and the texts in that order."""
    order = np.array(sorted(range(len(strings)), key=strings.__getitem__), dtype=np.int64)
    return order, [strings[i] for i in order]


class _PhraseTable:
    """Per (vocab, phrases, case) tables for banned_phrases masks.

    After a tail ending in ``p[:k]``, a token starting with ``p[k:]`` completes the phrase ``p``. Only
    endings ``p[k:]`` no longer than the longest token can start one, so a phrase contributes at most that
    many splits, kept by prefix: a tail's splits are found by looking up its own suffixes, and the tokens
    starting with an ending are one run of the tokens sorted by text (bisect), not a scan of the vocab."""

    def __init__(self, vocab: Vocab, phrases: tuple[str, ...], ci: bool):
        self.vocab = vocab
        self.phrases = phrases
        self.ci = ci
        self.strings = (
            vocab.derived(("folded", ci), lambda: [_fold(s, ci) for s in vocab.completed]) if ci else vocab.completed
        )
        base = ~_containing_any(self.strings, phrases)
        base[list(vocab.eos_ids)] = True
        self.base = torch.from_numpy(base)
        self.order, self.sorted_strings = vocab.derived(("sorted", ci), lambda: _sorted(self.strings))
        longest = max(map(len, self.strings), default=0)
        # prefix → its ending, or a tuple of them: a container per split would be up to 81,000 objects
        # for the garbage collector, whose full passes (~100 ms, holding the GIL) would stall the server
        self.endings: dict[str, str | tuple[str, ...]] = {}
        for p in phrases:
            for k in range(max(1, len(p) - longest), len(p)):
                prefix, ending = p[:k], p[k:]
                had = self.endings.setdefault(prefix, ending)
                if had is not ending:
                    self.endings[prefix] = (*had, ending) if isinstance(had, tuple) else (had, ending)
        self.prefix_lengths = sorted({len(prefix) for prefix in self.endings})
        self.masks: OrderedDict[frozenset, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    def _starting_with(self, ending: str) -> np.ndarray:
        """Ids of the tokens whose text starts with ``ending``."""
        n = len(ending)
        lo = bisect.bisect_left(self.sorted_strings, ending)
        hi = bisect.bisect_right(self.sorted_strings, ending, lo=lo, key=lambda s: s[:n])
        return self.order[lo:hi]

    def mask(self, tail: str) -> torch.Tensor:
        active: list[str] = []
        for k in self.prefix_lengths:
            if k > len(tail):
                break
            ends = self.endings.get(tail[-k:])
            if ends is not None:
                active += (ends,) if isinstance(ends, str) else ends
        if not active:
            return self.base
        key = frozenset(active)
        with self.lock:
            m = self.masks.get(key)
            if m is not None:
                self.masks.move_to_end(key)
                return m
            a = self.base.numpy().copy()
            for ending in key:
                a[self._starting_with(ending)] = False
            a[list(self.vocab.eos_ids)] = True
            m = self.masks[key] = torch.from_numpy(a)
            while len(self.masks) > PHRASE_MASKS_KEPT:
                self.masks.popitem(last=False)
            return m


class _PhraseState(Potential):
    __slots__ = ("weight", "vocab", "phrases", "ci", "keep", "tail", "pending")

    def __init__(self, vocab: Vocab, phrases: Sequence[str], case_insensitive: bool, weight: float):
        self.weight = weight
        self.vocab = vocab
        self.ci = case_insensitive
        self.phrases = tuple(dict.fromkeys(_fold(p, case_insensitive) for p in phrases))
        self.keep = max(len(p) for p in self.phrases) - 1
        self.tail = ""
        self.pending = b""

    def clone(self):
        return _shallow_copy(self)

    def _text(self, token: int) -> str:
        """The (folded) window tail + the text this token completes; updates tail and pending."""
        s, self.pending = self.vocab.decode_step(self.pending, token)
        window = self.tail + (_fold(s, self.ci) if self.ci else s)
        self.tail = window[-self.keep :] if self.keep else ""
        return window


class BannedPhrases(_PhraseState):
    """The generated text never contains any of ``phrases`` (also across token boundaries)."""

    __slots__ = ("table", "dead", "_cached")

    def __init__(self, vocab: Vocab, phrases: Sequence[str], case_insensitive: bool = False, weight: float = 1.0):
        super().__init__(vocab, phrases, case_insensitive, weight)
        key = ("banned_phrases", self.phrases, case_insensitive)
        self.table: _PhraseTable = vocab.derived(key, lambda: _PhraseTable(vocab, self.phrases, case_insensitive))
        self.dead = False
        self._cached: torch.Tensor | None = None

    def _mask(self) -> torch.Tensor:
        if self.dead:
            return self.vocab.eos_mask
        if self._cached is None:
            if not self.pending:
                self._cached = self.table.mask(self.tail)
            else:  # a pending partial character breaks phrases, except for the continuation tokens
                a = self.table.base.numpy().copy()
                for t in self.vocab.cont_start_ids.tolist():
                    s, _ = self.vocab.decode_step(self.pending, t)
                    w = self.tail + _fold(s, self.ci)
                    if any(p in w for p in self.phrases):
                        a[t] = False
                self._cached = torch.from_numpy(a)
        return self._cached

    def _advance(self, token: int) -> float:
        self._cached = None
        if self.dead:
            return NEG_INF
        window = self._text(token)
        if any(p in window for p in self.phrases):
            self.dead = True
            return NEG_INF
        return 0.0

    def _finish(self) -> float:
        return NEG_INF if self.dead else 0.0


class RequiredPhrases(_PhraseState):
    """Each of ``phrases`` must appear in the text by the end (the mask forbids EOS until then)."""

    __slots__ = ("missing",)

    def __init__(self, vocab: Vocab, phrases: Sequence[str], case_insensitive: bool = False, weight: float = 1.0):
        super().__init__(vocab, phrases, case_insensitive, weight)
        self.missing: tuple[str, ...] = self.phrases

    def _mask(self) -> torch.Tensor | None:
        # ending now is acceptable only once every phrase appeared: until then, anything but EOS
        return self.vocab.not_eos_mask if self.missing else None

    def _advance(self, token: int) -> float:
        if token in self.vocab.eos_set:
            return NEG_INF if self.missing else 0.0
        if self.missing:
            window = self._text(token)
            found = [p for p in self.missing if p in window]
            if found:
                self.missing = tuple(p for p in self.missing if p not in found)
        return 0.0

    def _finish(self) -> float:
        return NEG_INF if self.missing else 0.0


class MaxTokens(Potential):
    """At most n tokens, EOS included: only EOS once n−1 tokens have been generated."""

    __slots__ = ("weight", "vocab", "n", "count", "dead")

    def __init__(self, vocab: Vocab, n: int, weight: float = 1.0):
        self.weight = weight
        self.vocab = vocab
        self.n = n
        self.count = 0
        self.dead = False

    def clone(self) -> MaxTokens:
        return _shallow_copy(self)

    def _mask(self) -> torch.Tensor | None:
        if self.dead or self.count >= self.n - 1:
            return self.vocab.eos_mask
        return None

    def _advance(self, token: int) -> float:
        if self.dead:
            return NEG_INF
        self.count += 1
        if self.count > self.n or (self.count == self.n and token not in self.vocab.eos_set):
            self.dead = True
            return NEG_INF
        return 0.0

    def _finish(self) -> float:
        return NEG_INF if self.dead else 0.0


def _build_max_word_length(spec, vocab, where):
    return MaxWordLength(vocab, _req_pos_int(spec, "max_len", where), spec.weight)


def _build_forbidden_chars(spec, vocab, where):
    chars = _req_str(spec, "chars", where, allow_empty=False)
    ci = _bool(spec, "case_insensitive", where, True)
    return ForbiddenChars(vocab, "".join(sorted(set(chars))), ci, spec.weight)


def _build_banned_phrases(spec, vocab, where):
    return BannedPhrases(vocab, _phrases(spec, where), _bool(spec, "case_insensitive", where, False), spec.weight)


def _build_required_phrases(spec, vocab, where):
    return RequiredPhrases(vocab, _phrases(spec, where), _bool(spec, "case_insensitive", where, False), spec.weight)


def _build_max_tokens(spec, vocab, where):
    return MaxTokens(vocab, _req_pos_int(spec, "n", where), spec.weight)
