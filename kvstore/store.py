"""KVStore: batched put/get of encoded KV blocks in Redis (a cache: failures are misses)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
import torch

from smcserve.kvstore.codec import BlockDecodeError, decode_block, encode_block
from smcserve.kvstore.embedded import connect_redis, ping_url, redacted

log = logging.getLogger(__name__)

_PIPELINE_FLUSH_BYTES = 64 << 20  # bound the server-side query buffer of one pipeline execute


class KVStore:
    """Content-addressed KV block cache. Caller keys are plain strings; ``key_prefix`` is added."""

    def __init__(self, url: str, key_prefix: str = "smckv:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._r = connect_redis(url)

    @property
    def redis(self) -> redis.Redis:
        """The underlying client (raw access, e.g. for tests/admin)."""
        return self._r

    def full_key(self, key: str) -> str:
        return self.key_prefix + key

    def ping(self) -> None:
        """Raise ConnectionError naming the URL if Redis is unreachable."""
        ping_url(self.url, self._r)

    def put_blocks(self, items: Sequence[tuple[str, torch.Tensor]]) -> int:
        """SET every (key, tensor) via a pipeline; returns bytes written (0 on connection failure)."""
        written = 0
        try:
            pipe = self._r.pipeline(transaction=False)
            sizes: list[int] = []
            pending = 0
            for key, tensor in items:
                fk = self.full_key(key)
                value = encode_block(fk, tensor.cpu())
                pipe.set(fk, value)
                sizes.append(len(value))
                pending += len(value)
                if pending >= _PIPELINE_FLUSH_BYTES:
                    written += self._flush(pipe, sizes)
                    sizes, pending = [], 0
            if sizes:
                written += self._flush(pipe, sizes)
        except redis.RedisError as err:
            log.warning("KV put to %s failed (%d blocks): %s", redacted(self.url), len(items), err)
            return 0
        return written

    @staticmethod
    def _flush(pipe: Any, sizes: list[int]) -> int:
        results = pipe.execute(raise_on_error=False)
        ok = 0
        for size, res in zip(sizes, results):
            if isinstance(res, Exception):
                log.warning("KV block SET failed: %s", res)
            else:
                ok += size
        return ok

    def get_blocks(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """One MGET; missing, corrupt or mismatched values (and connection errors) read as None."""
        if not keys:
            return []
        full = [self.full_key(k) for k in keys]
        try:
            values = self._r.mget(full)
        except redis.RedisError as err:
            log.warning("KV get from %s failed (%d keys), treating as miss: %s", redacted(self.url), len(keys), err)
            return [None] * len(keys)
        out: list[torch.Tensor | None] = []
        for fk, value in zip(full, values):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(decode_block(fk, value))
            except BlockDecodeError as err:
                log.warning("corrupt KV block %s: %s", fk, err)
                out.append(None)
        return out

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Pipelined EXISTS per key (all False on connection failure)."""
        if not keys:
            return []
        try:
            pipe = self._r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self.full_key(k))
            return [bool(n) for n in pipe.execute()]
        except redis.RedisError as err:
            log.warning("KV exists on %s failed, treating as miss: %s", redacted(self.url), err)
            return [False] * len(keys)

    def cached_prefix_len(self, keys: Sequence[str]) -> int:
        """Number of leading keys present (stops at the first missing one)."""
        n = 0
        for present in self.contains(keys):
            if not present:
                break
            n += 1
        return n

    def delete(self, keys: Sequence[str]) -> int:
        """Delete keys; returns how many existed."""
        if not keys:
            return 0
        return int(self._r.delete(*(self.full_key(k) for k in keys)))

    def info(self) -> dict[str, int]:
        """Server memory/eviction stats: used_memory, maxmemory, keys (dbsize), evicted_keys."""
        mem = self._r.info("memory")
        stats = self._r.info("stats")
        return {
            "used_memory": int(mem["used_memory"]),
            "maxmemory": int(mem["maxmemory"]),
            "keys": int(self._r.dbsize()),
            "evicted_keys": int(stats["evicted_keys"]),
        }
