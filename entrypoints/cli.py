"""The ``smcserve`` command: ``serve`` the local stack, ``generate`` text, ``steer`` with SMC, show ``info``,
``bench`` a server. Each command's flags are added only when that command runs (or for ``--help``), so a client
command does not import what the server needs (torch, Ray)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc


# --- generate and info ------------------------------------------------------------------------------
def _generate(args) -> int:
    from smcserve.client.client import client_from_args

    kw = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stop=args.stop,
        seed=args.seed,
        disable_speculation=args.no_speculation,
    )
    prompt, messages = (args.prompt, None) if args.raw else (None, [{"role": "user", "content": args.prompt}])
    if args.system and messages is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    with client_from_args(args) as client:
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


def _generate_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompt", help="the user message (or, with --raw, the raw prompt text)")
    from smcserve.client.client import add_connection_arguments

    add_connection_arguments(g)
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
    g.add_argument(
        "--no-speculation", action="store_true", help="decode plainly on a server with --speculative mtp (no drafts)"
    )
    g.set_defaults(func=_generate)


def _info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from smcserve.client.client import client_from_args

    with client_from_args(args) as client:
        try:
            print(json.dumps(MessageToDict(client.info()), indent=2))
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


def _info_arguments(i: argparse.ArgumentParser) -> None:
    from smcserve.client.client import add_connection_arguments

    add_connection_arguments(i)
    i.set_defaults(func=_info)


# --- the commands that live in their own modules -------------------------------------------------------
def _serve_arguments(s: argparse.ArgumentParser) -> None:
    from smcserve.entrypoints import serve

    serve.add_arguments(s)
    s.set_defaults(func=serve.run)


def _steer_arguments(t: argparse.ArgumentParser) -> None:
    from smcserve.entrypoints import steer

    steer.add_arguments(t)
    t.set_defaults(func=steer.run)


def _mtp_arguments(m: argparse.ArgumentParser) -> None:
    from smcserve.entrypoints import mtp

    mtp.add_arguments(m)


def _bench_arguments(b: argparse.ArgumentParser) -> None:
    from smcserve.loadtest.runner import add_arguments, bench_main

    add_arguments(b)
    b.set_defaults(func=bench_main)


# --- the parser ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # adds the flags and sets ``func``, what runs
    description: str | None = None
    epilog: str | None = None


COMMANDS = {
    "serve": Command("start the local stack (Ray, Redis, prefill and decode pools, gRPC)", _serve_arguments),
    "generate": Command(
        "stream a completion to the terminal",
        _generate_arguments,
        "Stream a completion to the terminal. Decoding is greedy by default (--temperature 0): the same "
        "prompt gives the same answer; pass e.g. --temperature 0.8 --seed 1 to sample.",
    ),
    "steer": Command(
        "SMC steering: weighted particles under declarative constraints",
        _steer_arguments,
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
    ),
    "info": Command("show the served model and the workers' state", _info_arguments),
    "mtp": Command("train multi-token-prediction heads for self-speculative decoding", _mtp_arguments),
    "bench": Command("load-test a running server (vLLM-style metrics, JSON, plots)", _bench_arguments),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to show
    (None, off flags, empty lists: the help says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text.lower() or d is None or d is False or d == [] or d == "" or d is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``smcserve`` parser; ``only``: the commands whose flags are added (None: every command's)."""
    p = argparse.ArgumentParser(
        prog="smcserve", description="Disaggregated LLM serving with SMC steering.", formatter_class=HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        parser = sub.add_parser(
            name,
            help=cmd.help,
            description=cmd.description or cmd.help,
            epilog=cmd.epilog,
            formatter_class=HelpFormatter,
        )
        if only is None or name in only:
            cmd.add_arguments(parser)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the parser has no options of its own but -h
    args = build_parser(only=[command] if command else []).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
