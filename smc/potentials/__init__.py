"""Declarative potentials for SMC steering.

A request names potentials declaratively (``PotentialSpec``; never code). ``build_potentials``
validates and compiles them when the request arrives — every error is a ``PotentialError`` whose
message starts with the field path, e.g. ``steering.potentials[2].pattern: invalid regex: ...`` —
and returns one ``Potential`` per spec for the first particle; ``clone()`` it for every other
particle and whenever resampling copies a particle.

One module per concept; this package re-exports the public names:

* ``interface``: the ``Potential`` ABC and its contract, ``scaled``, ``combined_mask``,
  ``combined_log_factor``, ``companion_prompts``, ``clone_all``, ``advance_all``, ``finish_all``,
  ``PotentialError``.
* ``spec``: ``PotentialSpec`` (from_dict / from_proto), ``options_from_struct``, the built-in
  kinds' parameter tables and the field validation the builders share.
* ``grammar``: llguidance-backed kinds (regex, cfg, json_schema) and the compile cache.
* ``text``: max_word_length, forbidden_chars, banned_phrases, required_phrases, max_tokens.
* ``intersection``: prompt_intersection (a factor from the LM under other prompts).
* ``registry``: ``BUILTIN_KINDS``, entry-point plugins, ``register_potential``,
  ``potential_kinds``, ``build_potential`` / ``build_potentials``.
"""

from .grammar import GrammarPotential
from .interface import (
    NEG_INF,
    Potential,
    PotentialError,
    advance_all,
    clone_all,
    combined_log_factor,
    combined_mask,
    companion_prompts,
    finish_all,
    scaled,
)
from .intersection import PromptIntersection
from .registry import (
    BUILTIN_KINDS,
    ENTRY_POINT_GROUP,
    Factory,
    build_potential,
    build_potentials,
    load_plugins,
    potential_kinds,
    register_potential,
    unregister_potential,
)
from .spec import DEFAULT_PATH, PotentialSpec, options_from_struct
from .text import BannedPhrases, ForbiddenChars, MaxTokens, MaxWordLength, RequiredPhrases

__all__ = [
    "NEG_INF",
    "Potential",
    "PotentialError",
    "advance_all",
    "clone_all",
    "combined_log_factor",
    "combined_mask",
    "companion_prompts",
    "finish_all",
    "scaled",
    "DEFAULT_PATH",
    "PotentialSpec",
    "options_from_struct",
    "GrammarPotential",
    "BannedPhrases",
    "ForbiddenChars",
    "MaxTokens",
    "MaxWordLength",
    "RequiredPhrases",
    "PromptIntersection",
    "BUILTIN_KINDS",
    "ENTRY_POINT_GROUP",
    "Factory",
    "build_potential",
    "build_potentials",
    "load_plugins",
    "potential_kinds",
    "register_potential",
    "unregister_potential",
]
