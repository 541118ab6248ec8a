"""The declarative potential spec and its validation: ``PotentialSpec`` (from a dict or a
``smcserve.v1.Potential`` message), ``options_from_struct`` (a plugin's options), the table of each
built-in kind's parameters, and the field checks the builders share (every error a
``PotentialError`` whose message starts with the field path, e.g.
``steering.potentials[2].pattern: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .interface import PotentialError

DEFAULT_PATH = "steering.potentials"
# Sizes a request may ask for, checked before any work is done for it (a table built, a grammar compiled)
MAX_TEXT_BYTES = 64 << 10  # a pattern, grammar, schema, chars, or one phrase or prompt
MAX_STRINGS = 1000  # phrases (or prompts) in one potential
MAX_STRINGS_BYTES = 256 << 10  # all of one potential's phrases (or prompts) together
MAX_PHRASE_CHARS = 1024  # one banned or required phrase
MAX_POTENTIALS = 16  # potentials in one steering request


@dataclass
class PotentialSpec:
    """A declarative potential. Unset parameters are None; a kind rejects parameters it does not use."""

    kind: str
    weight: float = 1.0
    pattern: str | None = None  # regex
    grammar: str | None = None  # cfg
    format: str | None = None  # cfg: "lark" (default) or "gbnf"
    schema: str | None = None  # json_schema: JSON text
    max_len: int | None = None  # max_word_length
    chars: str | None = None  # forbidden_chars
    case_insensitive: bool | None = None  # forbidden_chars (default True), *_phrases (default False)
    phrases: Sequence[str] | None = None  # banned_phrases, required_phrases
    n: int | None = None  # max_tokens
    prompts: Sequence[str] | None = None  # prompt_intersection: the other prompts, in the request's form
    prompt_ids: Sequence[Sequence[int]] | None = None  # prompt_intersection: prompts tokenised by the scheduler
    options: Mapping[str, Any] = field(default_factory=dict)  # free-form parameters for plugin kinds

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str = f"{DEFAULT_PATH}[0]") -> PotentialSpec:
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
    def from_proto(cls, msg: Any, path: str = f"{DEFAULT_PATH}[0]") -> PotentialSpec:
        """From a ``smcserve.v1.Potential`` message: its ``kind`` oneof names the kind, and the message
        set there carries the kind's parameters. Every parameter of a built-in kind is kept, proto3's
        "" and 0 included, so that they are reported as invalid (``path.max_len: must be > 0``) — except
        cfg's empty ``format``, which is the default (lark). forbidden_chars' ``case_sensitive`` becomes
        ``case_insensitive = not case_sensitive`` (default: case-insensitive); the phrase kinds'
        ``case_insensitive`` is taken as is (default: case-sensitive). A ``plugin`` gives its ``name`` as
        the kind and its ``options`` (a ``google.protobuf.Struct``) as a plain dict
        (:func:`options_from_struct`). prompt_intersection's ``prompts`` are texts; its ``prompt_ids``
        are left unset for the scheduler to fill in (it tokenises them like the request's input). No
        kind set gives kind "" (``build_potential``: ``path.kind: required``). Raises
        ``PotentialError`` for a plugin without a name or named after a built-in kind."""
        weight = msg.weight if msg.HasField("weight") else 1.0
        which = msg.WhichOneof("kind")
        if which is None:
            return cls(kind="", weight=weight)
        sub = getattr(msg, which)
        if which == "plugin":
            if not sub.name:
                raise PotentialError(f"{path}.plugin.name: required")
            if sub.name in {f.name for f in msg.DESCRIPTOR.oneofs_by_name["kind"].fields}:
                raise PotentialError(f"{path}.plugin.name: '{sub.name}' is a built-in kind; set Potential.{sub.name}")
            options = options_from_struct(sub.options) if sub.HasField("options") else {}
            return cls(kind=sub.name, weight=weight, options=options)
        kw: dict[str, Any] = {}
        for name in _KIND_PARAMS[which]:
            if name == "case_insensitive" and which == "forbidden_chars":
                kw[name] = not sub.case_sensitive
            elif name == "prompt_ids":
                continue
            elif name in ("phrases", "prompts"):
                kw[name] = list(getattr(sub, name))
            else:
                kw[name] = getattr(sub, name)
        if which == "cfg" and not kw["format"]:
            del kw["format"]
        return cls(kind=which, weight=weight, **kw)


def _plain(v: Any) -> Any:
    """A Struct value as plain Python: integral numbers as int (Struct numbers are doubles)."""
    if isinstance(v, float):
        return int(v) if v.is_integer() and abs(v) <= 2**53 else v
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def options_from_struct(struct: Any) -> dict[str, Any]:
    """``Potential.plugin.options`` (a ``google.protobuf.Struct`` or a mapping) as a JSON-like dict for
    ``PotentialSpec.options``: objects → dict, lists → list, strings, bools, None, and numbers — int
    when integral (a Struct stores every number as a double, so 3 and 3.0 both arrive as 3), else float."""
    if hasattr(struct, "DESCRIPTOR"):  # a Struct (registered as a Mapping, but its lists are ListValues)
        from google.protobuf.json_format import MessageToDict

        return _plain(MessageToDict(struct))
    return _plain(dict(struct))


_SPEC_PARAMS = (
    "pattern",
    "grammar",
    "format",
    "schema",
    "max_len",
    "chars",
    "case_insensitive",
    "phrases",
    "n",
    "prompts",
    "prompt_ids",
)
_KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "regex": ("pattern",),
    "cfg": ("grammar", "format"),
    "json_schema": ("schema",),
    "max_word_length": ("max_len",),
    "forbidden_chars": ("chars", "case_insensitive"),
    "banned_phrases": ("phrases", "case_insensitive"),
    "required_phrases": ("phrases", "case_insensitive"),
    "max_tokens": ("n",),
    "prompt_intersection": ("prompts", "prompt_ids"),
}


def _req_str(spec: PotentialSpec, name: str, where: str, allow_empty: bool = True) -> str:
    v = getattr(spec, name)
    if v is None:
        raise PotentialError(f"{where}.{name}: required for '{spec.kind}'")
    if not isinstance(v, str):
        raise PotentialError(f"{where}.{name}: must be a string, got {type(v).__name__}")
    if not allow_empty and not v:
        raise PotentialError(f"{where}.{name}: must not be empty")
    _size(v, f"{where}.{name}")
    return v


def _size(text: str, where: str) -> None:
    if len(text) > MAX_TEXT_BYTES or len(text.encode()) > MAX_TEXT_BYTES:
        raise PotentialError(f"{where}: longer than this server's limit of {MAX_TEXT_BYTES} bytes")


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


def _strings(spec: PotentialSpec, name: str, where: str) -> list[str]:
    """A required, non-empty list of non-empty strings (``phrases``, ``prompts``)."""
    v = getattr(spec, name)
    if v is None:
        raise PotentialError(f"{where}.{name}: required for '{spec.kind}'")
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise PotentialError(f"{where}.{name}: must be a list of strings")
    v = list(v)
    if not v:
        raise PotentialError(f"{where}.{name}: must not be empty")
    if len(v) > MAX_STRINGS:
        raise PotentialError(f"{where}.{name}: {len(v)} of them; this server's limit is {MAX_STRINGS}")
    total = 0
    for j, p in enumerate(v):
        if not isinstance(p, str):
            raise PotentialError(f"{where}.{name}[{j}]: must be a string, got {type(p).__name__}")
        if not p:
            raise PotentialError(f"{where}.{name}[{j}]: empty {name[:-1]}")
        _size(p, f"{where}.{name}[{j}]")
        total += len(p.encode())
    if total > MAX_STRINGS_BYTES:
        raise PotentialError(f"{where}.{name}: {total} bytes in all; this server's limit is {MAX_STRINGS_BYTES}")
    return v


def _phrases(spec: PotentialSpec, where: str) -> list[str]:
    phrases = _strings(spec, "phrases", where)
    for j, p in enumerate(phrases):  # the text a phrase is looked for in, at every token, is this long
        if len(p) > MAX_PHRASE_CHARS:
            limit = MAX_PHRASE_CHARS
            raise PotentialError(f"{where}.phrases[{j}]: longer than this server's limit of {limit} characters")
    return phrases


def _check_weight(w: Any, where: str) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
        raise PotentialError(f"{where}.weight: must be a number, got {w!r}")
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise PotentialError(f"{where}.weight: must be a finite number >= 0, got {w}")
    return w
