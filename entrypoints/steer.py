"""``smcserve steer``: SMC steering from the terminal. Its flags, the potentials they ask for (as dicts for
:func:`client.client.potential_message`), and the table of weighted particles it prints."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter

import grpc

from smcserve.client.client import add_connection_arguments, client_from_args
from smcserve.smc import SCHEMES
from smcserve.smc.step import WITHOUT_REPLACEMENT

# --- potentials from the command line --------------------------------------------------------
# the flag that makes each built-in kind (accepted as an alias of the kind in --weight)
KIND_FLAGS = {
    "regex": "regex",
    "cfg": "cfg",
    "json_schema": "json-schema",
    "max_word_length": "max-word-length",
    "forbidden_chars": "forbid",
    "banned_phrases": "ban",
    "required_phrases": "require",
    "prompt_intersection": "intersect",
    "max_tokens": "max-tokens-potential",
}
_FLAG_KINDS = {flag.replace("-", "_"): kind for kind, flag in KIND_FLAGS.items()}


def parse_option_value(text: str):
    """A plugin option's value: JSON when it parses (numbers, true/false/null, lists, objects, "quoted
    strings"), else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class _PotentialAction(argparse.Action):
    """``--potential NAME``: an operator-installed potential; the ``--option``s after it configure it."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append({"kind": value, "options": {}})
        setattr(namespace, self.dest, items)


class _OptionAction(argparse.Action):
    """``--option KEY=VALUE``: an option of the preceding ``--potential``."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = getattr(namespace, "potential", None) or []
        if not items:
            parser.error(f"{option_string} {value}: must follow the --potential NAME it configures")
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not key:
            parser.error(f"{option_string} {value!r}: use KEY=VALUE")
        items[-1]["options"][key] = parse_option_value(raw)


def _text_or_file(value: str, what: str, extensions: tuple[str, ...]) -> str:
    """The contents of ``value`` when it names an existing file, else ``value`` itself (inline text).
    A single word ending in one of ``extensions`` that names no file is an error (a mistyped path)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if value.lower().endswith(extensions) and not any(c.isspace() for c in value):
        raise ValueError(f"{what}: no such file: {value}")
    return value


def parse_weights(items: list[str]) -> dict[str, float]:
    """``["cfg=0.5", "forbid=0"]`` → {"cfg": 0.5, "forbidden_chars": 0.0}: KIND (a potential kind, a plugin's
    name, or the flag that makes it) → weight ≥ 0."""
    out: dict[str, float] = {}
    for item in items:
        kind, sep, w = item.partition("=")
        kind = kind.strip().lstrip("-")
        if not sep or not kind:
            raise ValueError(f"--weight {item!r}: use KIND=W, e.g. --weight regex=0.5")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--weight {item!r}: {w!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--weight {item!r}: the weight must be a finite number >= 0")
        key = kind.replace("-", "_")
        out[_FLAG_KINDS.get(key, key)] = weight
    return out


def steer_potentials(args) -> list[dict]:
    """The potentials (dicts for :func:`client.client.potential_message`) that ``smcserve steer``'s
    arguments ask for. Raises ValueError on a bad combination."""
    pots = [{"kind": "regex", "pattern": r} for r in args.regex]
    for g in args.cfg:
        fmt = args.cfg_format or ("gbnf" if g.lower().endswith(".gbnf") and os.path.isfile(g) else "lark")
        pots.append({"kind": "cfg", "grammar": _text_or_file(g, "--cfg", (".lark", ".gbnf", ".ebnf")), "format": fmt})
    pots += [{"kind": "json_schema", "schema": _text_or_file(j, "--json-schema", (".json",))} for j in args.json_schema]
    if args.max_word_length:
        pots.append({"kind": "max_word_length", "max_len": args.max_word_length})
    if args.forbid:
        pots.append({"kind": "forbidden_chars", "chars": args.forbid, "case_sensitive": args.forbid_case_sensitive})
    elif args.forbid_case_sensitive:
        raise ValueError("--forbid-case-sensitive: needs --forbid CHARS")
    if args.ban:
        pots.append({"kind": "banned_phrases", "phrases": args.ban})
    if args.require:
        pots.append({"kind": "required_phrases", "phrases": args.require})
    if args.intersect:
        pots.append({"kind": "prompt_intersection", "prompts": args.intersect})
    if args.max_tokens_potential:
        pots.append({"kind": "max_tokens", "n": args.max_tokens_potential})
    for item in args.potential:
        pot = {"kind": item["kind"]}
        if item["options"]:
            pot["options"] = dict(item["options"])
        pots.append(pot)
    weights = parse_weights(args.weight)
    kinds = {p["kind"] for p in pots}
    for kind, w in weights.items():
        if kind not in kinds:
            raise ValueError(
                f"--weight {kind}={w:g}: no {kind} potential was given (have: {', '.join(sorted(kinds)) or 'none'})"
            )
    for p in pots:
        if p["kind"] in weights:
            p["weight"] = weights[p["kind"]]
    return pots


def format_weight(w: float) -> str:
    """A normalised weight: 4 decimals, scientific notation below 1e-3 (never a misleading 0.0000)."""
    if w == 0:
        return "0"
    if not math.isfinite(w) or abs(w) >= 1e-3:
        return f"{w:.4f}"
    return f"{w:.1e}"


def particle_end(p) -> str:
    """Why a particle ended: stop (EOS), length (max tokens), violated (ruled out by a potential); a server
    that does not report it (finish_reason "") gives done / - from ``finished``."""
    return p.finish_reason or ("done" if p.finished else "-")


def format_particles(res) -> str:
    """The result table of ``smcserve steer``, heaviest particle first."""
    lines = [
        f"log Z = {res.log_z:.4f}   steps {res.steps}   resamples {res.resamples}   status {res.status}   "
        f"round trips/token {res.roundtrips_per_token:.3f}   tokens/patch {res.tokens_per_patch:.2f}   "
        f"compute {res.compute_s:.3f} s   sync {res.sync_s:.3f} s",
        f"{'weight':>9}  {'log w':>9}  {'end':8}  text",
    ]
    for p in sorted(res.particles, key=lambda p: -p.weight):
        lines.append(f"{format_weight(p.weight):>9}  {p.log_weight:9.3f}  {particle_end(p):8}  {p.text!r}")
    ends = Counter(particle_end(p) for p in res.particles)
    lines.append(f"{len(res.particles)} particles: " + ", ".join(f"{n} {e}" for e, n in sorted(ends.items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        pots = steer_potentials(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompt, messages = (args.prompt, None) if args.raw else (None, [{"role": "user", "content": args.prompt}])
    kw = dict(
        particles=args.particles,
        potentials=pots,
        scheme=args.scheme,
        ess_threshold=args.ess_threshold,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        disable_speculation=args.no_speculation,
    )
    if args.extensions is not None:
        kw["extensions"] = args.extensions
    for key in ("patch_max_tokens", "entropy_threshold", "weight_drop"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)

    def progress(p):
        print(
            f"step {p.step:3d}  ess {p.ess:6.2f}  {'resampled' if p.resampled else '         '}  "
            f"finished {p.finished:3d}  best: {p.best_text[-60:]!r}",
            file=sys.stderr,
        )

    with client_from_args(args) as client:
        try:
            res = client.steer(prompt, messages, on_progress=progress, **kw)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except ValueError as err:  # a potential the client cannot encode (e.g. options that are not JSON-like)
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(format_particles(res))
    return 0


def _entropy(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of nats or 'auto', got {value!r}") from None


# --- the flags -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (or, with --raw, the raw prompt text)")
    add_connection_arguments(parser)
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    parser.add_argument("--particles", type=int, default=16, help="N, the number of particles")
    parser.add_argument(
        "--extensions",
        type=int,
        default=None,
        help="K children per particle (without_replacement; default: the server's)",
    )
    parser.add_argument(
        "--scheme",
        default=WITHOUT_REPLACEMENT,
        choices=(WITHOUT_REPLACEMENT, *SCHEMES),
        help="resampling scheme",
    )
    parser.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < threshold·N")
    parser.add_argument(
        "--patch-max-tokens",
        type=int,
        default=None,
        help="patches: each particle runs up to this many tokens on its worker between synchronisations (default 1)",
    )
    parser.add_argument(
        "--entropy-threshold",
        type=_entropy,
        default=None,
        help="patches end before a token whose proposal entropy (nats) is above this; 'auto': calibrated on the prompt",
    )
    parser.add_argument(
        "--weight-drop",
        type=float,
        default=None,
        help="patches end after a token whose log-weight increment is below -this",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="sampling: most tokens per particle")
    parser.add_argument("--temperature", type=float, default=1.0, help="the LM proposal's temperature (> 0)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed; the same seed gives the same particles (default: random)"
    )
    parser.add_argument(
        "--no-speculation",
        action="store_true",
        help="on a server with --speculative mtp: patches draw every token from the proposal (no MTP drafts)",
    )
    pg = parser.add_argument_group("potentials")
    pg.add_argument(
        "--regex",
        action="append",
        default=[],
        metavar="PATTERN",
        help="the whole text must match this regex (Rust regex syntax; repeatable)",
    )
    pg.add_argument(
        "--cfg",
        action="append",
        default=[],
        metavar="GRAMMAR",
        help="the text must match this grammar: a file path (read when it exists) or the grammar "
        "text itself (repeatable)",
    )
    pg.add_argument(
        "--cfg-format",
        choices=["lark", "gbnf"],
        default=None,
        help="syntax of every --cfg grammar (default: lark; gbnf for a .gbnf file)",
    )
    pg.add_argument(
        "--json-schema",
        action="append",
        default=[],
        metavar="SCHEMA",
        help="the text must be JSON valid under this schema: a file path (read when it exists) or "
        "the schema text (repeatable)",
    )
    pg.add_argument("--max-word-length", type=int, default=0, metavar="N", help="no word longer than N letters; 0: off")
    pg.add_argument(
        "--forbid",
        default="",
        metavar="CHARS",
        help="characters the text must not contain (case-insensitive unless --forbid-case-sensitive)",
    )
    pg.add_argument(
        "--forbid-case-sensitive",
        action="store_true",
        help="--forbid only rules out the characters as given (default: both cases)",
    )
    pg.add_argument(
        "--ban", action="append", default=[], metavar="PHRASE", help="a phrase the text must not contain (repeatable)"
    )
    pg.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="PHRASE",
        help="a phrase the text must contain by the end (repeatable)",
    )
    pg.add_argument(
        "--intersect",
        action="append",
        default=[],
        metavar="PROMPT",
        help="another prompt whose next-token distribution multiplies the LM's (prompt intersection)",
    )
    pg.add_argument(
        "--max-tokens-potential",
        type=int,
        default=0,
        metavar="N",
        help="the max_tokens potential: a particle must end (EOS) within N tokens, EOS included, or "
        "it is ruled out (unlike --max-tokens, which cuts particles off: end = length); 0: off",
    )
    pg.add_argument(
        "--potential",
        action=_PotentialAction,
        default=[],
        metavar="NAME",
        help="an operator-installed potential (entry-point group smcserve.potentials), by name (repeatable)",
    )
    pg.add_argument(
        "--option",
        action=_OptionAction,
        metavar="KEY=VALUE",
        help="an option of the preceding --potential (repeatable); VALUE is JSON when it parses "
        '(3, 0.5, true, [1,2], "3"), else a string',
    )
    pg.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="KIND=W",
        help="weight (exponent) of the potentials of KIND, e.g. regex=0.5, forbid=0 (repeatable; default 1)",
    )
