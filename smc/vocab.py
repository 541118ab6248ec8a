"""Per-tokenizer vocabulary tables for potentials: token bytes/text, EOS ids, the llguidance tokenizer.

A ``Vocab`` is built once per (tokenizer, model vocab size) — ``get_vocab`` caches it — and every
table on it is computed lazily on first use and then shared by every request and particle:

* ``token_bytes[i]``: the bytes token ``i`` adds to the output (byte-level BPE decoded exactly;
  ``b""`` for special tokens, which the server's detokeniser skips, and for ids past the tokenizer's
  vocabulary, which the model's logits may have).
* ``strings[i]``: best-effort text of token ``i`` on its own (invalid/partial UTF-8 → U+FFFD).
* Exact text across tokens: a token may end (or start) in the middle of a multi-byte UTF-8
  character. ``completed[i]`` / ``leftover[i]`` split a token's bytes, decoded from a clean state,
  into the text it completes and the incomplete tail it leaves pending; ``decode_step(pending, i)``
  continues from any pending tail. Text potentials track ``pending`` so that their checks see
  exactly the characters the user will see. Only the few tokens in ``cont_start_ids`` (bytes
  starting with a UTF-8 continuation byte) can join a pending tail; any other token flushes it as
  one U+FFFD.
* ``ll_tokenizer``: the ``llguidance.LLTokenizer`` (≈1 s to build, hence lazy).
* ``derived(key, factory)``: a per-vocab cache for potentials' precomputed arrays.

Masks are torch bool tensors of length ``size`` (the model's vocab size, which may exceed the
tokenizer's: ids past the tokenizer are never allowed by a mask except as listed EOS ids).
"""

from __future__ import annotations

import codecs
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

_UTF8 = codecs.getincrementaldecoder("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE symbol → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_type(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    return type(dec).__name__ if dec is not None else None


class Vocab:
    """Vocabulary tables of one tokenizer for a model with ``size`` logit rows."""

    def __init__(self, tokenizer: Any, size: int | None = None, eos_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.n_tokenizer = len(tokenizer)
        self.size = int(size) if size is not None else self.n_tokenizer
        if self.size <= 0:
            raise ValueError(f"vocab size must be positive, got {self.size}")
        if eos_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_ids: tuple[int, ...] = tuple(sorted({int(e) for e in eos_ids}))
        bad = [e for e in self.eos_ids if not 0 <= e < self.size]
        if bad:
            raise ValueError(f"EOS ids {bad} outside the vocabulary of size {self.size}")
        self.eos_set = frozenset(self.eos_ids)
        self.name = str(getattr(tokenizer, "name_or_path", "") or "")
        self._derived: OrderedDict[Any, Any] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Vocab({self.name!r}, size={self.size}, eos_ids={self.eos_ids})"

    # ---- token text -------------------------------------------------------------------------
    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids the output detokeniser skips (skip_special_tokens=True)."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for i, tok in (getattr(self.tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(tok, "special", False):
                ids.add(int(i))
        return frozenset(ids)

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        n = min(self.n_tokenizer, self.size)
        special = self.special_ids
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        out: list[bytes] = [b""] * self.size
        if _decoder_type(self.tokenizer) == "ByteLevel":
            bd = _byte_decoder()
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(n)))
            for i, piece in enumerate(pieces):
                if i in special or piece is None:
                    continue
                if i in added:
                    out[i] = str(getattr(added[i], "content", piece)).encode("utf-8")
                    continue
                try:
                    out[i] = bytes(bd[c] for c in piece)
                except KeyError:  # not a byte-level symbol: take the text as is
                    out[i] = piece.encode("utf-8")
        else:  # SentencePiece-style and others: llguidance knows every tokenizer's byte mapping
            llt = self.ll_tokenizer
            for i in range(min(n, llt.vocab_size)):
                if i not in special:
                    out[i] = llt.decode_bytes([i])
        return out

    @functools.cached_property
    def strings(self) -> list[str]:
        """Best-effort text of each token on its own (partial UTF-8 → U+FFFD)."""
        return [b.decode("utf-8", errors="replace") for b in self.token_bytes]

    @functools.cached_property
    def _split(self) -> tuple[list[str], list[bytes]]:
        completed: list[str] = []
        leftover: list[bytes] = []
        for b in self.token_bytes:
            if b.isascii():
                completed.append(b.decode("ascii"))
                leftover.append(b"")
                continue
            d = _UTF8("replace")
            completed.append(d.decode(b))
            leftover.append(d.getstate()[0])
        return completed, leftover

    @property
    def completed(self) -> list[str]:
        """Text each token completes when no partial character is pending."""
        return self._split[0]

    @property
    def leftover(self) -> list[bytes]:
        """Incomplete UTF-8 tail each token leaves pending (usually b"")."""
        return self._split[1]

    @functools.cached_property
    def cont_start_ids(self) -> np.ndarray:
        """Ids whose bytes start with a UTF-8 continuation byte (the only ones that can complete a pending tail)."""
        return np.array([i for i, b in enumerate(self.token_bytes) if b and 0x80 <= b[0] <= 0xBF], dtype=np.int64)

    def decode_step(self, pending: bytes, token: int) -> tuple[str, bytes]:
        """(text completed, new pending tail) after ``token`` given the pending partial character."""
        if not pending:
            return self._split[0][token], self._split[1][token]
        b = self.token_bytes[token]
        if not b:
            return "", pending
        d = _UTF8("replace")
        s = d.decode(pending + b)
        return s, d.getstate()[0]

    @staticmethod
    def flush(pending: bytes) -> str:
        """Text a pending tail becomes at the end of generation."""
        return pending.decode("utf-8", errors="replace") if pending else ""

    # ---- masks ------------------------------------------------------------------------------
    @functools.cached_property
    def eos_mask(self) -> torch.Tensor:
        """Only EOS allowed (read-only; shared)."""
        m = np.zeros(self.size, dtype=np.bool_)
        m[list(self.eos_ids)] = True
        return torch.from_numpy(m)

    @functools.cached_property
    def not_eos_mask(self) -> torch.Tensor:
        """Anything but EOS (read-only; shared)."""
        return torch.from_numpy(~self.eos_mask.numpy())

    @functools.cached_property
    def empty_mask(self) -> torch.Tensor:
        """Tokens that add no text (special tokens, ids past the tokenizer)."""
        return torch.from_numpy(np.array([not b for b in self.token_bytes], dtype=np.bool_))

    # ---- llguidance ---------------------------------------------------------------------------
    @functools.cached_property
    def ll_tokenizer(self):
        """The llguidance tokenizer (shared by every Vocab of the same tokenizer and EOS ids)."""
        return _ll_tokenizer(self.tokenizer, tuple(e for e in self.eos_ids if e < self.n_tokenizer))

    # ---- per-vocab caches for potentials ------------------------------------------------------
    def derived(self, key: Any, factory: Callable[[], Any]) -> Any:
        """``factory()`` computed once per (vocab, key) and shared; at most ``MAX_DERIVED`` kept, least
        recently used evicted (keys come from client input, e.g. forbidden_chars' characters: an
        unbounded cache grew by every distinct request). Built under the key's own lock, so one request's
        big table does not hold up another's."""
        with self._lock:
            entry = self._derived.get(key)
            if entry is None:
                entry = self._derived[key] = _Derived()
                while len(self._derived) > MAX_DERIVED:
                    self._derived.popitem(last=False)
            else:
                self._derived.move_to_end(key)
        return entry.get(factory)


class _Derived:
    """One ``Vocab.derived`` value: built once, by the first caller; the others wait for it."""

    __slots__ = ("lock", "value", "built")

    def __init__(self):
        self.lock = threading.Lock()
        self.value: Any = None
        self.built = False

    def get(self, factory: Callable[[], Any]) -> Any:
        with self.lock:
            if not self.built:  # a factory that raised leaves it unbuilt: the next caller tries again
                self.value = factory()
                self.built = True
            return self.value


MAX_DERIVED = 64

_LLTOKS: dict[tuple, Any] = {}
_LLTOKS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, eos_ids: tuple[int, ...]) -> Any:
    import llguidance.hf

    key = (str(getattr(tokenizer, "name_or_path", "") or id(tokenizer)), len(tokenizer), eos_ids)
    with _LLTOKS_LOCK:
        llt = _LLTOKS.get(key)
        if llt is None:
            llt = _LLTOKS[key] = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids) or None)
        return llt


_VOCABS: dict[tuple, Vocab] = {}
_VOCABS_LOCK = threading.Lock()


def get_vocab(tokenizer: Any, size: int | None = None, eos_ids: Sequence[int] | None = None) -> Vocab:
    """The shared ``Vocab`` for a tokenizer (keyed on its name_or_path, length, ``size`` and EOS ids)."""
    key = (
        str(getattr(tokenizer, "name_or_path", "") or id(tokenizer)),
        len(tokenizer),
        size,
        tuple(sorted(eos_ids)) if eos_ids is not None else None,
    )
    with _VOCABS_LOCK:
        v = _VOCABS.get(key)
        if v is None:
            v = _VOCABS[key] = Vocab(tokenizer, size=size, eos_ids=eos_ids)
        return v
