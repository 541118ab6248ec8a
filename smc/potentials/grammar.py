"""Grammar-backed potentials (llguidance): regex, cfg and json_schema — ``GrammarPotential``, its
shared mask memo, the per-vocab compile cache, and the three builders.

Regexes are Rust ``regex`` syntax (no look-around, no backreferences) and must match the whole
output; ``\\d``/``\\w`` are Unicode-aware as in Python's ``re`` but with newer Unicode tables (``\\d``
also admits e.g. U+1CCF0..9); write ``[0-9]`` for ASCII digits. A mask costs ~20-60 µs per step, but
~1 ms when every step reaches a new lexer state (large counted repetitions such as ``.{1,2000}``);
particles cloned from one build share a memo of masks by token history, so identical particles
compute a mask once. JSON schemas follow llguidance's defaults (flexible whitespace;
``"x-guidance": {"whitespace_flexible": false}`` in the schema forces compact JSON) and keep the
schema's property order.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..vocab import Vocab
from .interface import NEG_INF, Potential, PotentialError
from .spec import PotentialSpec, _req_str


class _MaskMemo:
    """Packed grammar masks by token history, shared by every particle cloned from one build
    (a request's particles): identical particles — common after resampling — compute a mask once."""

    __slots__ = ("entries", "limit", "lock")

    def __init__(self, limit: int = 256):
        self.entries: OrderedDict[tuple[int, int, int], tuple[np.ndarray, bool]] = OrderedDict()
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

    def clone(self) -> GrammarPotential:
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


_COMPILED: OrderedDict[tuple, Any] = OrderedDict()
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
            msg = msg[len(prefix) :]
    return msg


def _build_regex(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    pattern = _req_str(spec, "pattern", where, allow_empty=False)
    return GrammarPotential(
        _compile(vocab, "regex", pattern, f"{where}.pattern", "regex").deep_copy(), vocab, spec.weight
    )


def _build_cfg(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    grammar = _req_str(spec, "grammar", where, allow_empty=False)
    fmt = spec.format if spec.format is not None else "lark"
    if not isinstance(fmt, str) or fmt.lower() not in ("lark", "gbnf"):
        raise PotentialError(f"{where}.format: must be 'lark' or 'gbnf', got {fmt!r}")
    fmt = fmt.lower()
    what = "Lark grammar" if fmt == "lark" else "GBNF grammar"
    return GrammarPotential(_compile(vocab, fmt, grammar, f"{where}.grammar", what).deep_copy(), vocab, spec.weight)


MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in a JSON schema; deeper is refused before parsing


def json_depth(text: str) -> int:
    """The deepest nesting of ``{``/``[`` in JSON text (strings skipped), found by one scan, with no
    recursion: ``json.loads`` of ``[`` × 100,000 raises RecursionError instead of a parse error."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _build_json_schema(spec: PotentialSpec, vocab: Vocab, where: str) -> Potential:
    schema = spec.schema
    if isinstance(schema, Mapping):
        try:
            schema = json.dumps(schema)
        except RecursionError:
            raise PotentialError(f"{where}.schema: nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    schema = _req_str(PotentialSpec(kind="json_schema", schema=schema), "schema", where, allow_empty=False)
    if json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise PotentialError(f"{where}.schema: nested deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as e:
        raise PotentialError(f"{where}.schema: invalid JSON: {e}") from None
    if not isinstance(parsed, (dict, bool)):
        raise PotentialError(f"{where}.schema: invalid JSON schema: must be an object or a boolean")
    m = _compile(vocab, "json_schema", schema, f"{where}.schema", "JSON schema")
    return GrammarPotential(m.deep_copy(), vocab, spec.weight)
