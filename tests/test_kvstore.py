"""Tests for kvstore against a real (embedded) redis-server."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smcserve.kvstore import BlockDecodeError, EmbeddedRedis, KVStore, decode_block, encode_block
from smcserve.kvstore.codec import HEADER
from smcserve.kvstore.embedded import start_or_connect

REPO = Path(__file__).resolve().parents[1]
FULL = (30, 2, 3, 16, 64)
PARTIAL = (30, 2, 3, 5, 64)


def _key(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis(maxmemory="64mb") as srv:
        yield srv


@pytest.fixture()
def store(server, request):
    s = KVStore(server.url, key_prefix=f"t:{request.node.name}:")
    s.redis.flushdb()
    return s


# ---- codec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [FULL, PARTIAL, (7,), (1, 2, 3, 4, 5, 6)])
def test_codec_roundtrip_bit_exact(dtype, shape):
    t = torch.randn(shape).to(dtype)
    data = encode_block("k", t)
    assert len(data) == HEADER.size + t.numel() * t.element_size()
    out = decode_block("k", data)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    out.add_(1)  # writable, owns its memory
    assert torch.equal(decode_block("k", data), t.contiguous())


def test_codec_non_contiguous_input():
    base = torch.randn(30, 2, 3, 16, 64, dtype=torch.bfloat16)
    t = base[:, :, :, :5]  # not contiguous
    assert not t.is_contiguous()
    assert torch.equal(decode_block("k", encode_block("k", t)), t)


def test_codec_rejects_bad_values():
    t = torch.randn(PARTIAL, dtype=torch.bfloat16)
    good = encode_block("k", t)

    def patch(offset: int, raw: bytes) -> bytes:
        b = bytearray(good)
        b[offset : offset + len(raw)] = raw
        return bytes(b)

    bad = {
        "short": good[:10],
        "truncated": good[:-1],
        "extra": good + b"\0",
        "magic": patch(0, b"XXXX"),
        "version": patch(4, struct.pack("<H", 2)),
        "dtype": patch(6, bytes([9])),
        "ndim0": patch(7, bytes([0])),
        "ndim7": patch(7, bytes([7])),
        "shape": patch(8, struct.pack("<I", 31)),
        "payload": patch(len(good) - 5, bytes([good[-5] ^ 0xFF])),
    }
    for name, data in bad.items():
        with pytest.raises(BlockDecodeError):
            decode_block("k", data)
            pytest.fail(name)
    with pytest.raises(BlockDecodeError, match="digest"):
        decode_block("other", good)
    assert issubclass(BlockDecodeError, ValueError)


# ---- store ---------------------------------------------------------------------------------


def test_put_get_roundtrip_fp32_bf16(store):
    items = [
        (_key("a"), torch.randn(FULL, dtype=torch.float32)),
        (_key("b"), torch.randn(FULL).to(torch.bfloat16)),
        (_key("c"), torch.randn(PARTIAL).to(torch.bfloat16)),
    ]
    written = store.put_blocks(items)
    assert written == sum(HEADER.size + t.numel() * t.element_size() for _, t in items)
    got = store.get_blocks([k for k, _ in items])
    for (_, t), g in zip(items, got):
        assert g is not None and g.dtype == t.dtype and g.shape == t.shape
        assert torch.equal(g, t)


def test_batched_many_keys_and_missing(store):
    items = [(_key(i), torch.full((30, 2, 3, 16, 8), float(i), dtype=torch.bfloat16)) for i in range(64)]
    assert store.put_blocks(items) > 0
    keys = [k for k, _ in items]
    query = keys[:10] + [_key("missing")] + keys[10:]
    got = store.get_blocks(query)
    assert len(got) == len(query)
    assert got[10] is None
    for (_, t), g in zip(items, got[:10] + got[11:]):
        assert g is not None and torch.equal(g, t)
    assert store.get_blocks([]) == []
    assert store.info()["keys"] == 64
    assert store.delete(keys[:4]) == 4
    assert store.get_blocks(keys[:5])[:4] == [None] * 4


def test_corrupt_values_read_as_miss(store, caplog):
    t = torch.randn(PARTIAL).to(torch.bfloat16)
    ka, kb = _key("A"), _key("B")
    store.put_blocks([(ka, t)])
    raw = store.redis.get(store.full_key(ka))
    assert raw is not None

    cases = {
        _key("trunc"): raw[: len(raw) // 2],
        _key("payload"): raw[:-100] + bytes([raw[-100] ^ 0x01]) + raw[-99:],
        _key("magic"): b"XMKV" + raw[4:],
        _key("tiny"): b"SMKV",
    }
    for k, v in cases.items():
        store.redis.set(store.full_key(k), v)
    store.redis.set(store.full_key(kb), raw)  # A's bytes under key B

    keys = [ka, *cases, kb]
    got = store.get_blocks(keys)
    assert got[0] is not None and torch.equal(got[0], t)
    assert got[1:] == [None] * (len(keys) - 1)
    assert "corrupt KV block" in caplog.text
    # present-but-corrupt keys still "exist"; get is the authority
    assert store.contains(keys) == [True] * len(keys)


def test_cached_prefix_len(store):
    keys = [_key(f"p{i}") for i in range(6)]
    t = torch.zeros(4, 4)
    assert store.cached_prefix_len(keys) == 0
    store.put_blocks([(k, t) for k in keys[:3]] + [(keys[4], t)])
    assert store.contains(keys) == [True, True, True, False, True, False]
    assert store.cached_prefix_len(keys) == 3
    assert store.cached_prefix_len([]) == 0
    store.put_blocks([(keys[3], t)])
    assert store.cached_prefix_len(keys) == 5


def test_eviction_under_tiny_maxmemory():
    # LRU clock has 1 s resolution: write the earliest batch, let the clock tick, then overflow.
    # maxmemory-samples 64 >= key count makes the approximate LRU exact here.
    with EmbeddedRedis(maxmemory="8mb", extra_config={"maxmemory-samples": "64"}) as small:
        s = KVStore(small.url)
        block = (30, 2, 3, 16, 32)  # ~360 KB bf16
        n = 60  # ~21 MB total, well over 8 MB
        tensors = [torch.randn(block).to(torch.bfloat16) for _ in range(4)]
        keys = [_key(f"ev{i}") for i in range(n)]
        assert s.put_blocks([(keys[j], tensors[j % 4]) for j in range(4)]) > 0
        time.sleep(1.2)
        for i in range(4, n, 4):
            s.put_blocks([(keys[j], tensors[j % 4]) for j in range(i, min(i + 4, n))])
        info = s.info()
        assert info["evicted_keys"] > 0
        assert info["maxmemory"] == 8 * 1024 * 1024
        assert 0 < info["keys"] < n
        got = s.get_blocks(keys)
        assert got[:4] == [None] * 4  # earliest evicted, read as misses
        assert sum(g is None for g in got) == n - info["keys"]
        assert got[-1] is not None and torch.equal(got[-1], tensors[(n - 1) % 4])
        assert s.cached_prefix_len(keys) == 0


def test_unreachable_url_raises_clear_error():
    url = "redis://127.0.0.1:1"
    s = KVStore(url)
    with pytest.raises(ConnectionError, match="127.0.0.1:1") as ei:
        s.ping()
    assert url in str(ei.value)
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        start_or_connect(url, "8mb")
    # cache semantics: errors are misses, not exceptions
    assert s.get_blocks([_key(1)]) == [None]
    assert s.put_blocks([(_key(1), torch.zeros(2))]) == 0
    assert s.contains([_key(1)]) == [False]


def test_start_or_connect_and_shared_server(server):
    url, emb = start_or_connect(server.url, "8mb")
    assert url == server.url and emb is None
    url2, emb2 = start_or_connect(None, "8mb")
    try:
        assert emb2 is not None and url2.startswith("unix://")
        # a separate client object being collected must not stop the server
        c = emb2.client()
        c.set("x", b"1")
        del c
        import gc

        gc.collect()
        KVStore(url2).ping()
        assert emb2.client().get("x") == b"1"
        assert emb2.client().config_get("save")["save"] == ""
        assert emb2.client().config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    finally:
        assert emb2 is not None
        emb2.close()
    with pytest.raises(ConnectionError, match=url2):
        KVStore(url2).ping()
    emb2.close()  # idempotent


def test_no_pickle_in_packages():
    bad = ("import pickle", "cloudpickle", "pickle.loads", "from pickle")
    dirs = ["engine", "kvstore", "prefill", "decode", "scheduler", "client", "smc", "loadtest", "protos", "bench"]
    scanned = 0
    offenders = []
    for d in dirs:
        root = REPO / d
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            if any(part.startswith(".") for part in path.relative_to(REPO).parts):
                continue  # virtual environments and caches are not our code
            text = path.read_text(encoding="utf-8", errors="replace")
            scanned += 1
            offenders += [f"{path.relative_to(REPO)}: {b}" for b in bad if b in text]
    assert scanned > 0
    assert not offenders, offenders


def test_server_stops_when_owner_process_is_killed():
    code = "from kvstore import EmbeddedRedis; e = EmbeddedRedis('8mb'); print(e.url, flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        KVStore(url).ping()  # usable from another process
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 120  # returns as soon as the watchdog stopped the server
    while time.time() < deadline and os.path.exists(url[len("unix://") :]):
        time.sleep(0.1)
    with pytest.raises(ConnectionError, match=url):
        KVStore(url).ping()
