"""The registry: which kind names a request may use and how a spec becomes a ``Potential`` —
``BUILTIN_KINDS``, operator plugins (entry points), programmatic registration,
``potential_kinds``, ``build_potential`` and ``build_potentials``.

Built-in kinds and their parameters: regex(pattern), cfg(grammar, format="lark"|"gbnf"),
json_schema(schema: JSON text), max_word_length(max_len), forbidden_chars(chars,
case_insensitive=True), banned_phrases(phrases, case_insensitive=False),
required_phrases(phrases, case_insensitive=False), max_tokens(n: EOS counts as one of the n),
prompt_intersection(prompts, prompt_ids: the prompts as token ids, which the scheduler fills in).
Operators add kinds through the entry-point group ``smcserve.potentials``: each entry point is a
callable ``(spec, vocab) -> Potential`` (it reads its parameters from the spec, ``spec.options``
included — the request's ``Potential.plugin.options`` Struct as a plain dict, see ``options_from_struct`` —
and applies ``spec.weight`` itself); clients only name it (and pass options). Built-in names cannot be
overridden; a plugin that fails to load is logged and reported when a request names it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..vocab import Vocab
from .grammar import _build_cfg, _build_json_schema, _build_regex
from .interface import Potential, PotentialError
from .intersection import _build_prompt_intersection
from .spec import _KIND_PARAMS, _SPEC_PARAMS, DEFAULT_PATH, PotentialSpec, _check_weight
from .text import (
    _build_banned_phrases,
    _build_forbidden_chars,
    _build_max_tokens,
    _build_max_word_length,
    _build_required_phrases,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "smcserve.potentials"


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
    "prompt_intersection": _build_prompt_intersection,
}

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
        raise PotentialError(
            f"{where}.kind: potential '{spec.kind}' returned {type(pot).__name__}, "
            f"not a Potential (no {', '.join(missing)})"
        )
    if not hasattr(pot, "weight"):
        try:
            pot.weight = spec.weight
        except Exception:
            pass
    return pot


def build_potential(
    spec: PotentialSpec | Mapping[str, Any], vocab: Vocab, where: str = f"{DEFAULT_PATH}[0]"
) -> Potential:
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


def build_potentials(
    specs: Sequence[PotentialSpec | Mapping[str, Any]], vocab: Vocab, path: str = DEFAULT_PATH
) -> list[Potential]:
    """Validate and compile every spec (all errors surface here, at request time); one potential per
    spec, for the first particle — clone them for the others."""
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Iterable):
        raise PotentialError(f"{path}: must be a list of potentials")
    return [build_potential(s, vocab, f"{path}[{i}]") for i, s in enumerate(specs)]
