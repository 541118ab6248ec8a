"""``smcserve serve``: its flags, one per :class:`~scheduler.stack.ServeConfig` field, and the launcher (start the
:class:`~scheduler.stack.Stack`, print the listening line, stop on SIGINT/SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import typing
from dataclasses import MISSING, fields

from smcserve.kvstore.embedded import redacted
from smcserve.scheduler.stack import ServeConfig, Stack


def value_type(hint) -> type:
    """The type a flag parses its value as: ``int`` for ``int``, ``str`` for ``str | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) > 1:
        raise TypeError(f"{hint}: a flag takes one type")
    return args[0] if args else hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per ServeConfig field, named after it (``block_size`` → ``--block-size``), with its type, default,
    help and choices (the field's metadata). A boolean that defaults to on is turned off by ``--no-NAME``; one
    that defaults to off is turned on by ``--NAME``."""
    hints = typing.get_type_hints(ServeConfig)
    for f in fields(ServeConfig):
        if f.default is MISSING:
            raise TypeError(f"ServeConfig.{f.name}: a flag needs a plain default")
        name, help = f.name.replace("_", "-"), f.metadata["help"]
        kind = value_type(hints[f.name])
        if kind is bool and f.default:
            parser.add_argument(
                f"--no-{name}", dest=f.name, action="store_false", default=True, help=f"turn off {help} (default: on)"
            )
        elif kind is bool:
            parser.add_argument(f"--{name}", dest=f.name, action="store_true", help=help)
        else:
            parser.add_argument(
                f"--{name}", dest=f.name, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help
            )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    async def main() -> None:
        stack = Stack(config)
        stop = asyncio.Event()
        try:
            await stack.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
                loop.add_signal_handler(sig, stop.set)
            n = stack.speculative_max_batch
            limit = f"up to {n} sequence{'s' if n != 1 else ''} a step" if n else "plain requests decode plainly"
            mtp = config.speculative == "mtp"
            k = stack.num_speculative_tokens
            speculation = f"speculative mtp, k = {k}, {limit}: {stack.speculative_reason}\n" if mtp else ""
            print(
                f"smcserve listening on {stack.address} (model {config.model or 'smollm2-135m-instruct'}, "
                f"{config.prefill_workers} prefill + {config.decode_workers} decode workers, "
                f"redis {redacted(stack.redis_url)}, ray {config.ray_address or 'local'})\n"
                f"device {stack.device}, dtype {stack.dtype}: {stack.dtype_reason}\n"
                f"{speculation}"
                f"http {stack.http_address or 'off'} (OpenAI-compatible /v1, /metrics, /health)",
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
