"""Declarative potentials for SMC steering (ARCHITECTURE.md §4).

A request names potentials declaratively (``PotentialSpec``; never code). ``build_potentials``
validates and compiles them when the request arrives — every error is a ``PotentialError`` whose
message starts with the field path, e.g. ``steering.potentials[2].pattern: invalid regex: ...`` —
and returns one ``Potential`` per spec for the first particle; ``clone()`` it for every other
particle and whenever resampling copies a particle.

Per particle and step the server calls, in this order::

    m = combined_mask(pots)          # None, or bool [vocab.size]: the allowed next tokens
    ...sample token from the LM distribution restricted to m (weight *= allowed mass)...
    logw += sum(p.advance(token) for p in pots)   # also for EOS
    ...and once at the end (EOS sampled or max tokens hit): logw += sum(p.finish() for p in pots)

Contract of every built-in potential:

* ``mask()`` is a superset of the tokens with G > 0 and allows EOS exactly when ending now is
  acceptable (regex/cfg/json_schema: a full match; required_phrases: every phrase seen). It is
  exact for every built-in except forbidden_chars, whose static mask cannot see a forbidden
  non-ASCII character assembled from partial-UTF-8 tokens (``advance`` catches it). Masks are CPU
  bool tensors, cached and shared: treat them as read-only (``combined_mask`` returns a fresh
  one). A particle that already violated a constraint gets an EOS-only mask.
* ``advance(token)`` returns ``weight · log G_t``: 0.0 or −inf for the hard built-ins; never NaN.
* ``finish()`` returns ``weight · log G`` of the end (−inf: unmatched regex, missing phrase); it may
  be called after ``advance(EOS)`` and does not count anything twice.
* ``weight`` is the exponent: 0 disables a potential (mask None, log G 0); any weight > 0 leaves a
  0/1 potential unchanged.

Text checks see exactly the text the user gets (``skip_special_tokens=True``, UTF-8 characters
split across tokens joined; see ``smc.vocab``). Words are maximal runs of ``str.isalpha``
characters. Per-vocab tables are computed once (``Vocab.derived``) so that masks and advances do
no per-vocabulary Python work at step time (masks by state are cached; ~1 µs).

Grammar kinds (regex, cfg, json_schema) use llguidance. Regexes are Rust ``regex`` syntax (no
look-around, no backreferences) and must match the whole output; ``\\d``/``\\w`` are Unicode-aware as
in Python's ``re`` but with newer Unicode tables (``\\d`` also admits e.g. U+1CCF0..9); write
``[0-9]`` for ASCII digits. A mask costs ~20-60 µs per step, but ~1 ms when every step reaches a
new lexer state (large counted repetitions such as ``.{1,2000}``); particles cloned from one build
share a memo of masks by token history, so identical particles compute a mask once. JSON schemas
follow llguidance's defaults (flexible whitespace; ``"x-guidance": {"whitespace_flexible": false}``
in the schema forces compact JSON) and keep the schema's property order.

Built-in kinds and their parameters: regex(pattern), cfg(grammar, format="lark"|"gbnf"),
json_schema(schema: JSON text), max_word_length(max_len), forbidden_chars(chars,
case_insensitive=True), banned_phrases(phrases, case_insensitive=False),
required_phrases(phrases, case_insensitive=False), max_tokens(n: EOS counts as one of the n).
Operators add kinds through the entry-point group ``smcserve.potentials``: each entry point is a
callable ``(spec, vocab) -> Potential`` (it reads its parameters from the spec, ``spec.options``
included — the request's ``Potential.options`` Struct as a plain dict, see ``options_from_struct`` —
and applies ``spec.weight`` itself); clients only name it (and pass options). Built-in names cannot be
overridden; a plugin that fails to load is logged and reported when a request names it.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .vocab import Vocab

log = logging.getLogger(__name__)

NEG_INF = -math.inf
ENTRY_POINT_GROUP = "smcserve.potentials"
DEFAULT_PATH = "steering.potentials"


class PotentialError(ValueError):
    """An invalid potential spec; the message starts with the offending field's path."""


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------
def scaled(weight: float, log_g: float) -> float:
    """``weight · log_g`` with G^0 = 1 (so 0·(−inf) = 0, never NaN)."""
    if log_g == 0.0 or weight == 0.0:
        return 0.0
    return log_g if weight == 1.0 else weight * log_g


class Potential(ABC):
    """One particle's potential: a next-token mask (hard part) and log G_t increments.

    Subclasses implement ``_mask``/``_advance``/``_finish`` (unweighted) and ``clone``; the public
    methods apply ``weight``. Plugins may instead override the public methods directly.
    """

    __slots__ = ()
    weight: float = 1.0

    @abstractmethod
    def clone(self) -> "Potential":
        """An independent copy for a forked particle (cheap)."""

    def mask(self) -> torch.Tensor | None:
        """bool [vocab.size] of allowed next tokens, or None (no hard constraint on the next token)."""
        if self.weight == 0.0:
            return None
        return self._mask()

    def advance(self, token: int) -> float:
        """Consume the sampled token; return weight · log G_t (0.0 neutral, −inf violated)."""
        return scaled(self.weight, self._advance(token))

    def finish(self) -> float:
        """weight · log G at the end (EOS sampled or max tokens hit)."""
        return scaled(self.weight, self._finish())

    def _mask(self) -> torch.Tensor | None:
        return None

    def _advance(self, token: int) -> float:
        return 0.0

    def _finish(self) -> float:
        return 0.0


_SLOT_NAMES: dict[type, tuple[str, ...]] = {}


def _shallow_copy(obj: Any) -> Any:
    """A shallow copy (all built-in potential state is immutable or shared read-only); ~1 µs."""
    cls = type(obj)
    names = _SLOT_NAMES.get(cls)
    if names is None:
        seen: list[str] = []
        for k in cls.__mro__:
            slots = getattr(k, "__slots__", ())
            for n in (slots,) if isinstance(slots, str) else slots:
                if n not in seen and n not in ("__dict__", "__weakref__"):
                    seen.append(n)
        names = _SLOT_NAMES[cls] = tuple(seen)
    c = object.__new__(cls)
    for n in names:
        try:
            object.__setattr__(c, n, getattr(obj, n))
        except AttributeError:
            pass
    d = getattr(obj, "__dict__", None)
    if d:
        c.__dict__.update(d)
    return c


def combined_mask(potentials: Iterable[Potential]) -> torch.Tensor | None:
    """AND of the potentials' masks (a fresh CPU tensor), or None when none constrains the next token.

    Done in numpy: torch's intra-op thread pool makes element-wise ops on a 50k-element tensor
    100-1000x slower when the CPU is oversubscribed (measured: 2 ms vs 3 µs per clone)."""
    masks = [m for m in (p.mask() for p in potentials) if m is not None]
    if not masks:
        return None
    if any(m.device.type != "cpu" for m in masks):  # plugin masks on an accelerator
        out = masks[0].to(torch.bool, copy=True)
        for m in masks[1:]:
            out &= m.to(out.device, torch.bool)
        return out
    out_np = masks[0].numpy().astype(np.bool_, copy=True)
    for m in masks[1:]:
        np.logical_and(out_np, m.numpy(), out=out_np)
    return torch.from_numpy(out_np)


def clone_all(potentials: Sequence[Potential]) -> list[Potential]:
    return [p.clone() for p in potentials]


def _checked(total: float, what: str) -> float:
    if math.isnan(total) or total == math.inf:
        raise ValueError(f"potential {what} returned {total}")
    return total


def advance_all(potentials: Iterable[Potential], token: int) -> float:
    """Σ advance(token): the particle's log-weight increment from its potentials."""
    return _checked(math.fsum(p.advance(token) for p in potentials), "advance")


def finish_all(potentials: Iterable[Potential]) -> float:
    """Σ finish(): the particle's final log-weight increment from its potentials."""
    return _checked(math.fsum(p.finish() for p in potentials), "finish")


# ---------------------------------------------------------------------------------------------
# The declarative spec
# ---------------------------------------------------------------------------------------------
@dataclass
class PotentialSpec:
    """A declarative potential. Unset parameters are None; a kind rejects parameters it does not use."""

    kind: str
    weight: float = 1.0
    pattern: str | None = None          # regex
    grammar: str | None = None          # cfg
    format: str | None = None           # cfg: "lark" (default) or "gbnf"
    schema: str | None = None           # json_schema: JSON text
    max_len: int | None = None          # max_word_length
    chars: str | None = None            # forbidden_chars
    case_insensitive: bool | None = None  # forbidden_chars (default True), *_phrases (default False)
    phrases: Sequence[str] | None = None  # banned_phrases, required_phrases
    n: int | None = None                # max_tokens
    options: Mapping[str, Any] = field(default_factory=dict)  # free-form parameters for plugin kinds

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str = f"{DEFAULT_PATH}[0]") -> "PotentialSpec":
        """From a JSON-like mapping; unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise PotentialError(f"{path}: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        for k in d:
            if k not in names:
                raise PotentialError(f"{path}.{k}: unknown field")
        if "kind" not in d:
            raise PotentialError(f"{path}.kind: required")
        kw = dict(d)
        if kw.get("weight") is None:
            kw.pop("weight", None)
        if kw.get("options") is None:
            kw.pop("options", None)
        return cls(**kw)

    @classmethod
    def from_proto(cls, msg: Any) -> "PotentialSpec":
        """From a ``smcserve.v1.Potential`` message (proto3: "" / 0 mean unset, except for the
        parameters the named built-in kind requires, which are kept so that a 0 or "" is reported
        as invalid). ``case_sensitive`` maps to ``case_insensitive`` for forbidden_chars only.
        ``options`` (a ``google.protobuf.Struct``) becomes a plain dict (:func:`options_from_struct`)."""
        kind = msg.kind
        has = getattr(msg, "HasField", None)
        weight = msg.weight if (has is None or has("weight")) else 1.0
        own = _KIND_PARAMS.get(kind)
        kw: dict[str, Any] = {}
        for name in ("pattern", "grammar", "format", "schema", "chars", "max_len", "n"):
            v = getattr(msg, name, None)
            if v is None:
                continue
            if (own is not None and name in own) or v not in ("", 0):
                kw[name] = v
        if own is not None and "format" in own and kw.get("format") == "":
            kw.pop("format")
        phrases = list(getattr(msg, "phrases", []) or [])
        if phrases or (own is not None and "phrases" in own):
            kw["phrases"] = phrases
        if kind == "forbidden_chars":
            kw["case_insensitive"] = not bool(getattr(msg, "case_sensitive", False))
        elif own is None and getattr(msg, "case_sensitive", False):
            kw["case_insensitive"] = False
        options = getattr(msg, "options", None)
        if options is not None and (has is None or has("options")):
            kw["options"] = options_from_struct(options)
        return cls(kind=kind, weight=weight, **kw)


def _plain(v: Any) -> Any:
    """A Struct value as plain Python: integral numbers as int (Struct numbers are doubles)."""
    if isinstance(v, float):
        return int(v) if v.is_integer() and abs(v) <= 2 ** 53 else v
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def options_from_struct(struct: Any) -> dict[str, Any]:
    """``Potential.options`` (a ``google.protobuf.Struct`` or a mapping) as a JSON-like dict for
    ``PotentialSpec.options``: objects → dict, lists → list, strings, bools, None, and numbers — int
    when integral (a Struct stores every number as a double, so 3 and 3.0 both arrive as 3), else float."""
    if hasattr(struct, "DESCRIPTOR"):  # a Struct (registered as a Mapping, but its lists are ListValues)
        from google.protobuf.json_format import MessageToDict

        return _plain(MessageToDict(struct))
    return _plain(dict(struct))


_SPEC_PARAMS = ("pattern", "grammar", "format", "schema", "max_len", "chars", "case_insensitive", "phrases", "n")
_KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "regex": ("pattern",),
    "cfg": ("grammar", "format"),
    "json_schema": ("schema",),
    "max_word_length": ("max_len",),
    "forbidden_chars": ("chars", "case_insensitive"),
    "banned_phrases": ("phrases", "case_insensitive"),
    "required_phrases": ("phrases", "case_insensitive"),
    "max_tokens": ("n",),
}


# ---------------------------------------------------------------------------------------------
# Grammar potentials (llguidance): regex, cfg, json_schema
# ---------------------------------------------------------------------------------------------
class _MaskMemo:
    """Packed grammar masks by token history, shared by every particle cloned from one build
    (a request's particles): identical particles — common after resampling — compute a mask once."""

    __slots__ = ("entries", "limit", "lock")

    def __init__(self, limit: int = 256):
        self.entries: "OrderedDict[tuple[int, int, int], tuple[np.ndarray, bool]]" = OrderedDict()
        self.limit = limit
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
            return hit

    def put(self, key, value) -> None:
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)


class GrammarPotential(Potential):
    """The text must stay a prefix of the grammar's language; EOS only when it is a full match."""

    __slots__ = ("weight", "vocab", "matcher", "ended", "dead", "_cached", "key", "memo")

    def __init__(self, matcher: Any, vocab: Vocab, weight: float = 1.0):
        self.weight = weight
        self.vocab = vocab
        self.matcher = matcher
        self.ended = False  # EOS consumed
        self.dead = False
        self._cached: torch.Tensor | None = None
        # the token history as (length, two independent 64-bit hash chains): the memo key
        self.key = (0, 0, 1)
        self.memo = _MaskMemo()

    def clone(self) -> "GrammarPotential":
        c = object.__new__(GrammarPotential)
        c.weight, c.vocab, c.ended, c.dead, c._cached = self.weight, self.vocab, self.ended, self.dead, self._cached
        c.key, c.memo = self.key, self.memo
        c.matcher = self.matcher.deep_copy()
        return c

    def _mask(self) -> torch.Tensor:
        if self._cached is not None:
            return self._cached
        if self.dead or self.ended or self.matcher.is_error():
            self._cached = self.vocab.eos_mask
            return self._cached
        v = self.vocab
        hit = self.memo.get(self.key)
        if hit is None:
            words = np.empty((v.ll_tokenizer.vocab_size + 31) // 32, dtype=np.int32)
            # torch's data_ptr is ~50x cheaper than numpy's ctypes.data
            buf = torch.from_numpy(words)
            self.matcher.unsafe_compute_mask_ptr(buf.data_ptr(), words.nbytes)
            hit = (words, bool(self.matcher.is_accepting()))
            self.memo.put(self.key, hit)
        words, accepting = hit
        n_ll = v.ll_tokenizer.vocab_size
        k = min(n_ll, v.size)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=k)  # little-endian int32 words
        # EOS exactly when the text so far is a full match; ids past the tokenizer: never
        if k == v.size:
            for e in v.eos_ids:
                bits[e] = accepting
            m = torch.from_numpy(bits.view(np.bool_))
        else:
            full = np.zeros(v.size, dtype=np.bool_)
            full[:k] = bits.view(np.bool_)
            full[list(v.eos_ids)] = accepting
            m = torch.from_numpy(full)
        self._cached = m
        return m

    def _advance(self, token: int) -> float:
        self._cached = None
        if self.dead:
            return NEG_INF
        if self.ended:  # nothing may follow EOS
            self.dead = True
            return NEG_INF
        if token in self.vocab.eos_set:
            if not self.matcher.is_accepting():
                self.dead = True
                return NEG_INF
            self.ended = True
            return 0.0
        if not self.matcher.consume_token(int(token)):
            self.dead = True
            return NEG_INF
        n, h1, h2 = self.key
        self.key = (n + 1, hash((h1, token)), hash((token, h2, 0x5BD1E995)))
        return 0.0

    def _finish(self) -> float:
        if self.dead:
            return NEG_INF
        if self.ended or self.matcher.is_accepting():
            return 0.0
        return NEG_INF


_COMPILED: "OrderedDict[tuple, Any]" = OrderedDict()
_COMPILED_LOCK = threading.Lock()
_COMPILED_MAX = 256


def _compile(vocab: Vocab, fmt: str, text: str, where: str, what: str) -> Any:
    """A pristine llguidance matcher for the grammar (cached per vocab); the caller deep-copies it."""
    import llguidance

    llt = vocab.ll_tokenizer
    key = (id(llt), fmt, text)
    with _COMPILED_LOCK:
        hit = _COMPILED.get(key)
        if hit is not None and hit[0] is llt:
            _COMPILED.move_to_end(key)
            return hit[1]
    try:
        grammar = llguidance.grammar_from(fmt, text)
    except Exception as e:  # GBNF conversion and JSON parsing errors
        raise PotentialError(f"{where}: invalid {what}: {_clean(str(e))}") from None
    m = llguidance.LLMatcher(llt, grammar, log_level=0)
    if not m.is_error():
        probe = m.deep_copy()  # errors that only show when the first mask is computed (limits)
        probe.compute_bitmask()
        if probe.is_error():
            m = probe
    if m.is_error():
        raise PotentialError(f"{where}: invalid {what}: {_clean(m.get_error())}")
    with _COMPILED_LOCK:
        _COMPILED[key] = (llt, m)
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return m


def _clean(msg: str) -> str:
    msg = msg.strip()
    for prefix in ("Failed to convert the grammar from GBNF to Lark: ",):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _build_regex(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    pattern = _req_str(spec, "pattern", where, allow_empty=False)
    return GrammarPotential(_compile(vocab, "regex", pattern, f"{where}.pattern", "regex").deep_copy(), vocab, spec.weight)


def _build_cfg(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    grammar = _req_str(spec, "grammar", where, allow_empty=False)
    fmt = spec.format if spec.format is not None else "lark"
    if not isinstance(fmt, str) or fmt.lower() not in ("lark", "gbnf"):
        raise PotentialError(f"{where}.format: must be 'lark' or 'gbnf', got {fmt!r}")
    fmt = fmt.lower()
    what = "Lark grammar" if fmt == "lark" else "GBNF grammar"
    return GrammarPotential(_compile(vocab, fmt, grammar, f"{where}.grammar", what).deep_copy(), vocab, spec.weight)


def _build_json_schema(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    schema = spec.schema
    if isinstance(schema, Mapping):
        schema = json.dumps(schema)
    schema = _req_str(PotentialSpec(kind="json_schema", schema=schema), "schema", where, allow_empty=False)
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as e:
        raise PotentialError(f"{where}.schema: invalid JSON: {e}") from None
    if not isinstance(parsed, (dict, bool)):
        raise PotentialError(f"{where}.schema: invalid JSON schema: must be an object or a boolean")
    m = _compile(vocab, "json_schema", schema, f"{where}.schema", "JSON schema")
    return GrammarPotential(m.deep_copy(), vocab, spec.weight)


# ---------------------------------------------------------------------------------------------
# Text potentials
# ---------------------------------------------------------------------------------------------
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
        self.by_run: dict[int, torch.Tensor] = {}
        self.by_pending: "OrderedDict[tuple[bytes, int], torch.Tensor]" = OrderedDict()
        self.lock = threading.Lock()

    def mask(self, run: int, pending: bytes) -> torch.Tensor:
        if not pending:
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

    def clone(self) -> "MaxWordLength":
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


def _char_matches(x: str, forbidden: str, case_insensitive: bool) -> bool:
    if x in forbidden:
        return True
    if not case_insensitive:
        return False
    for c in forbidden:
        if c.lower() in x.lower() or c.upper() in x.upper() or c.casefold() in x.casefold():
            return True
    return False


class _CharTable:
    def __init__(self, vocab: Vocab, chars: str, case_insensitive: bool):
        alphabet = set().union(*vocab.completed)
        self.bad_chars = frozenset(x for x in alphabet if _char_matches(x, chars, case_insensitive))
        self.chars = chars
        self.ci = case_insensitive
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
        self.table: _CharTable = vocab.derived(("forbidden_chars", chars, case_insensitive), lambda: _CharTable(vocab, chars, case_insensitive))
        self.pending = b""
        self.dead = False

    def clone(self) -> "ForbiddenChars":
        return _shallow_copy(self)

    def _mask(self) -> torch.Tensor:
        # static; a character completed across tokens (non-ASCII only) is checked by advance
        return self.vocab.eos_mask if self.dead else self.table.allowed

    def _bad(self, s: str) -> bool:
        t = self.table
        if not t.bad_chars.isdisjoint(s):
            return True
        # characters outside the vocabulary's alphabet can only arise across tokens
        return any(not x.isascii() and _char_matches(x, t.chars, t.ci) for x in s)

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


class _PhraseTable:
    """Per (vocab, phrases, case) tables for banned_phrases masks."""

    def __init__(self, vocab: Vocab, phrases: tuple[str, ...], ci: bool):
        self.vocab = vocab
        self.phrases = phrases
        self.ci = ci
        self.strings = vocab.derived(("folded", ci), lambda: [_fold(s, ci) for s in vocab.completed]) if ci else vocab.completed
        base = ~np.array([any(p in s for p in phrases) for s in self.strings], dtype=np.bool_)
        base[list(vocab.eos_ids)] = True
        self.base = torch.from_numpy(base)
        self.starts: dict[str, np.ndarray] = {}
        self.masks: "OrderedDict[frozenset, torch.Tensor]" = OrderedDict()
        self.lock = threading.Lock()
        # (phrase, k) such that a tail ending in phrase[:k] needs tokens starting with phrase[k:] banned
        self.splits = [(p, k) for p in phrases for k in range(1, len(p))]

    def _starting_with(self, suffix: str) -> np.ndarray:
        m = self.starts.get(suffix)
        if m is None:
            m = self.starts[suffix] = np.array([s.startswith(suffix) for s in self.strings], dtype=np.bool_)
        return m

    def mask(self, tail: str) -> torch.Tensor:
        active = frozenset(p[k:] for p, k in self.splits if tail.endswith(p[:k]))
        if not active:
            return self.base
        with self.lock:
            m = self.masks.get(active)
            if m is not None:
                return m
            a = self.base.numpy().copy()
            for suffix in active:
                a &= ~self._starting_with(suffix)
            a[list(self.vocab.eos_ids)] = True
            m = self.masks[active] = torch.from_numpy(a)
            while len(self.masks) > 4096:
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
        self.tail = window[-self.keep:] if self.keep else ""
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

    def clone(self) -> "MaxTokens":
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


# ---------------------------------------------------------------------------------------------
# Validation helpers and builders
# ---------------------------------------------------------------------------------------------
def _req_str(spec: PotentialSpec, name: str, where: str, allow_empty: bool = True) -> str:
    v = getattr(spec, name)
    if v is None:
        raise PotentialError(f"{where}.{name}: required for '{spec.kind}'")
    if not isinstance(v, str):
        raise PotentialError(f"{where}.{name}: must be a string, got {type(v).__name__}")
    if not allow_empty and not v:
        raise PotentialError(f"{where}.{name}: must not be empty")
    return v


def _req_pos_int(spec: PotentialSpec, name: str, where: str) -> int:
    v = getattr(spec, name)
    if v is None:
        raise PotentialError(f"{where}.{name}: required for '{spec.kind}'")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise PotentialError(f"{where}.{name}: must be an integer, got {v!r}")
    if v <= 0:
        raise PotentialError(f"{where}.{name}: must be > 0, got {v}")
    return int(v)


def _bool(spec: PotentialSpec, name: str, where: str, default: bool) -> bool:
    v = getattr(spec, name)
    if v is None:
        return default
    if not isinstance(v, (bool, np.bool_)):
        raise PotentialError(f"{where}.{name}: must be a boolean, got {v!r}")
    return bool(v)


def _phrases(spec: PotentialSpec, where: str) -> list[str]:
    v = spec.phrases
    if v is None:
        raise PotentialError(f"{where}.phrases: required for '{spec.kind}'")
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise PotentialError(f"{where}.phrases: must be a list of strings")
    v = list(v)
    if not v:
        raise PotentialError(f"{where}.phrases: must not be empty")
    for j, p in enumerate(v):
        if not isinstance(p, str):
            raise PotentialError(f"{where}.phrases[{j}]: must be a string, got {type(p).__name__}")
        if not p:
            raise PotentialError(f"{where}.phrases[{j}]: empty phrase")
    return v


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


Factory = Callable[[PotentialSpec, Vocab], Potential]

# built-in kinds: (spec, vocab, field path prefix) -> Potential
BUILTIN_KINDS: dict[str, Callable[[PotentialSpec, Vocab, str], Potential]] = {
    "regex": _build_regex,
    "cfg": _build_cfg,
    "json_schema": _build_json_schema,
    "max_word_length": _build_max_word_length,
    "forbidden_chars": _build_forbidden_chars,
    "banned_phrases": _build_banned_phrases,
    "required_phrases": _build_required_phrases,
    "max_tokens": _build_max_tokens,
}

# ---------------------------------------------------------------------------------------------
# Operator plugins (entry points) and programmatic registration
# ---------------------------------------------------------------------------------------------
_REGISTERED: dict[str, Factory] = {}
_PLUGINS: dict[str, Factory] | None = None
_PLUGIN_ERRORS: dict[str, str] = {}
_PLUGINS_LOCK = threading.Lock()


def register_potential(kind: str, factory: Factory) -> None:
    """Register a kind programmatically (same signature as an entry point: ``(spec, vocab) -> Potential``)."""
    if kind in BUILTIN_KINDS:
        raise ValueError(f"'{kind}' is a built-in potential")
    _REGISTERED[kind] = factory


def unregister_potential(kind: str) -> None:
    _REGISTERED.pop(kind, None)


def load_plugins(reload: bool = False) -> dict[str, Factory]:
    """Kinds from the ``smcserve.potentials`` entry-point group (loaded once; broken ones are logged
    and reported when a request names them). Built-in names cannot be overridden."""
    global _PLUGINS
    with _PLUGINS_LOCK:
        if _PLUGINS is not None and not reload:
            return _PLUGINS
        plugins: dict[str, Factory] = {}
        errors: dict[str, str] = {}
        try:
            eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception as e:  # pragma: no cover - broken metadata
            log.warning("cannot list %s entry points: %s", ENTRY_POINT_GROUP, e)
            eps = []
        for ep in eps:
            if ep.name in BUILTIN_KINDS:
                log.warning("potential plugin %r (%s) ignored: a built-in has that name", ep.name, ep.value)
                continue
            try:
                obj = ep.load()
            except Exception as e:
                errors[ep.name] = f"{type(e).__name__}: {e}"
                log.warning("potential plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
                continue
            if not callable(obj):
                errors[ep.name] = f"{ep.value} is not callable"
                continue
            plugins[ep.name] = obj
        _PLUGINS = plugins
        _PLUGIN_ERRORS.clear()
        _PLUGIN_ERRORS.update(errors)
        return plugins


def potential_kinds() -> list[str]:
    """Every kind a request may name."""
    return sorted(set(BUILTIN_KINDS) | set(_REGISTERED) | set(load_plugins()))


_POTENTIAL_METHODS = ("clone", "mask", "advance", "finish")


def _build_plugin(factory: Factory, spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    try:
        pot = factory(spec, vocab)
    except PotentialError as e:
        msg = str(e)
        raise PotentialError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise PotentialError(f"{where}: {e}") from None
    missing = [m for m in _POTENTIAL_METHODS if not callable(getattr(pot, m, None))]
    if missing:
        raise PotentialError(f"{where}.kind: potential '{spec.kind}' returned {type(pot).__name__}, not a Potential (no {', '.join(missing)})")
    if not hasattr(pot, "weight"):
        try:
            pot.weight = spec.weight
        except Exception:
            pass
    return pot


def _check_weight(w: Any, where: str) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
        raise PotentialError(f"{where}.weight: must be a number, got {w!r}")
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise PotentialError(f"{where}.weight: must be a finite number >= 0, got {w}")
    return w


def build_potential(spec: PotentialSpec | Mapping[str, Any], vocab: Vocab, where: str = f"{DEFAULT_PATH}[0]") -> Potential:
    """Validate and compile one spec (``where`` is its field path)."""
    if isinstance(spec, Mapping):
        spec = PotentialSpec.from_dict(spec, where)
    if not isinstance(spec, PotentialSpec):
        raise PotentialError(f"{where}: expected a potential, got {type(spec).__name__}")
    kind = spec.kind
    if not isinstance(kind, str):
        raise PotentialError(f"{where}.kind: must be a string, got {type(kind).__name__}")
    if not kind:
        raise PotentialError(f"{where}.kind: required")
    weight = _check_weight(spec.weight, where)
    if weight != spec.weight:
        spec = dataclasses.replace(spec, weight=weight)
    builtin = BUILTIN_KINDS.get(kind)
    if builtin is not None:
        own = _KIND_PARAMS[kind]
        for name in _SPEC_PARAMS:
            if name not in own and getattr(spec, name) is not None:
                raise PotentialError(f"{where}.{name}: not a parameter of '{kind}'")
        if spec.options:
            raise PotentialError(f"{where}.options: '{kind}' takes no options")
        return builtin(spec, vocab, where)
    factory = _REGISTERED.get(kind) or load_plugins().get(kind)
    if factory is None:
        if kind in _PLUGIN_ERRORS:
            raise PotentialError(f"{where}.kind: potential '{kind}' failed to load: {_PLUGIN_ERRORS[kind]}")
        raise PotentialError(f"{where}.kind: unknown potential {kind!r}")
    return _build_plugin(factory, spec, vocab, where)


def build_potentials(specs: Sequence[PotentialSpec | Mapping[str, Any]], vocab: Vocab, path: str = DEFAULT_PATH) -> list[Potential]:
    """Validate and compile every spec (all errors surface here, at request time); one potential per
    spec, for the first particle — clone them for the others."""
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Iterable):
        raise PotentialError(f"{path}: must be a list of potentials")
    return [build_potential(s, vocab, f"{path}[{i}]") for i, s in enumerate(specs)]
