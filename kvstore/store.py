"""KVStore: batched put/get of encoded KV blocks in Redis (a cache: failures are misses)."""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import torch

from smcserve.kvstore import wire
from smcserve.kvstore.cluster import ShardedBatch, is_cluster_url
from smcserve.kvstore.codec import HEADER, BlockDecodeError, block_header, block_payload, decode_block
from smcserve.kvstore.embedded import connect_redis, ping_url, redacted

log = logging.getLogger(__name__)

_PIPELINE_FLUSH_BYTES = 64 << 20  # bound the server-side query buffer of one pipeline execute


class KVStore:
    """Content-addressed KV block cache. Caller keys are plain strings; ``key_prefix`` is added.

    ``url``: ``redis://``, ``rediss://``, ``unix://``, or ``redis+cluster://host:port[,host:port...]``
    (``rediss+cluster://``) for a Redis Cluster, whose masters each get their share of a batch in one
    pipeline (:class:`~smcserve.kvstore.cluster.ShardedBatch`); a master that is down makes only its own
    blocks misses.
    """

    def __init__(self, url: str, key_prefix: str = "smckv:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._shards = ShardedBatch(url) if is_cluster_url(url) else None
        self._r = connect_redis(url) if self._shards is None else None

    @property
    def redis(self) -> redis.Redis:
        """The underlying client (raw access, e.g. for tests/admin): a ``RedisCluster`` for a cluster URL,
        whose FLUSHDB/FLUSHALL go to every master."""
        return self._r if self._shards is None else self._shards.cluster

    @property
    def shards(self) -> ShardedBatch | None:
        """The per-master batcher of a cluster URL (None for a single server)."""
        return self._shards

    def full_key(self, key: str) -> str:
        return self.key_prefix + key

    def ping(self) -> None:
        """Raise ConnectionError naming the URL if Redis is unreachable (a cluster: no master answers;
        one that does not is logged when it goes down and when it is back)."""
        if self._shards is None:
            ping_url(self.url, self._r)
            return
        try:
            self._shards.ping()
        except ConnectionError as err:
            raise ConnectionError(f"cannot reach Redis at {redacted(self.url)}: {err}") from err

    def put_blocks(self, items: Sequence[tuple[str, torch.Tensor]]) -> int:
        """SET every (key, tensor), pipelined (one pipeline per master of a cluster, each block's bytes sent
        from the tensor without a joined copy); returns bytes written (0 on connection failure; a cluster:
        without the blocks of masters that are down)."""
        written = 0
        cmds: list[tuple] = []
        pending = 0
        for key, tensor in items:
            fk = self.full_key(key)
            cmds.append(("SET", fk, _value(fk, tensor.cpu())))
            pending += HEADER.size + cmds[-1][2][1].nbytes
            if pending >= _PIPELINE_FLUSH_BYTES:
                written += self._flush(cmds)
                cmds, pending = [], 0
        if cmds:
            written += self._flush(cmds)
        return written

    def _flush(self, cmds: list[tuple]) -> int:
        ok, failed, first = 0, 0, None
        for (_, _, (_, payload)), res in zip(cmds, self._batch(cmds, "put to")):
            if isinstance(res, Exception):
                failed += 1
                first = first or res
            else:
                ok += HEADER.size + payload.nbytes
        if failed and not _is_connection_error(first):  # connection failures are logged where they happen
            log.warning("KV put to %s: %d of %d blocks failed: %s", redacted(self.url), failed, len(cmds), first)
        return ok

    def _batch(self, cmds: Sequence[tuple], what: str) -> list[Any]:
        """Each command's reply, or its exception (a connection failure: every command of that server)."""
        if self._shards is not None:
            return self._shards.execute(cmds)
        pool = self._r.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            return wire.run(conn, cmds)
        except (redis.RedisError, OSError) as err:
            log.warning("KV %s %s failed (%d keys), treating as miss: %s", what, redacted(self.url), len(cmds), err)
            return [err] * len(cmds)
        finally:
            if conn is not None:
                pool.release(conn)

    def get_blocks(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """One MGET (a cluster: a pipeline of GETs per master), each value received straight into the
        buffer its tensor uses; missing, corrupt or mismatched values (and connection errors) read as None.

        On a cluster the replies of a batch sit in each master's output buffer, which counts toward its
        ``maxmemory``: a master right at its limit may evict blocks while it serves a large read."""
        if not keys:
            return []
        full = [self.full_key(k) for k in keys]
        if self._shards is not None:  # no MGET across slots
            values = self._shards.execute([("GET", k) for k in full])
        else:  # one MGET: evictions, if any, happen before it, never because of its own replies
            (values,) = self._batch([("MGET", *full)], "get from")
            if not isinstance(values, list):
                values = [None] * len(full)
        out: list[torch.Tensor | None] = []
        for fk, value in zip(full, values):
            if value is None or isinstance(value, Exception):
                out.append(None)
                continue
            try:
                out.append(decode_block(fk, value, take=isinstance(value, bytearray)))
            except BlockDecodeError as err:
                log.warning("corrupt KV block %s: %s", fk, err)
                out.append(None)
        return out

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Pipelined EXISTS per key (False for a key whose server can't be reached)."""
        if not keys:
            return []
        res = self._batch([("EXISTS", self.full_key(k)) for k in keys], "exists on")
        return [isinstance(r, int) and r > 0 for r in res]

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
        if self._shards is None:
            return int(self._r.delete(*(self.full_key(k) for k in keys)))
        res = self._shards.execute([("DEL", self.full_key(k)) for k in keys])
        return sum(r for r in res if isinstance(r, int))

    def info(self) -> dict[str, int]:
        """Server memory/eviction stats: used_memory, maxmemory, keys (dbsize), evicted_keys (a cluster:
        summed over the masters that answer, with ``shards`` and ``shards_down``)."""
        if self._shards is None:
            return _server_info(self._r)
        per = self._shards.each_primary(_server_info)
        up = [v for v in per.values() if not isinstance(v, Exception)]
        if not up:
            raise ConnectionError(f"no master of the Redis Cluster at {redacted(self.url)} answered")
        out = {k: sum(v[k] for v in up) for k in up[0]}
        return {**out, "shards": len(per), "shards_down": len(per) - len(up)}


def _value(key: str, tensor: torch.Tensor) -> tuple[wire.Deferred, memoryview]:
    """A block's value in two pieces: its header, made when the write reaches it from a crc32 computed
    meanwhile on the crc threads (overlapping the sending of the blocks before it), and its payload, a
    view of the tensor's bytes (sent without a copy)."""
    payload = block_payload(tensor)
    if payload.nbytes < _CRC_INLINE_BYTES:
        header = block_header(key, tensor, payload, zlib.crc32(payload))
        return wire.Deferred(HEADER.size, lambda: header), payload
    crc = _crc_pool().submit(zlib.crc32, payload)
    return wire.Deferred(HEADER.size, lambda: block_header(key, tensor, payload, crc.result())), payload


_CRC_INLINE_BYTES = 64 << 10  # smaller blocks: crc32 in the caller's thread
_CRC_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
_crc_executor: ThreadPoolExecutor | None = None
_crc_lock = threading.Lock()


def _crc_pool() -> ThreadPoolExecutor:
    """Threads for blocks' crc32 (zlib releases the GIL): started on first use, in every process."""
    global _crc_executor
    if _crc_executor is None:
        with _crc_lock:
            if _crc_executor is None:
                _crc_executor = ThreadPoolExecutor(_CRC_THREADS, thread_name_prefix="kv-crc")
    return _crc_executor


def _is_connection_error(err: BaseException | None) -> bool:
    return isinstance(err, (ConnectionError, redis.ConnectionError, redis.TimeoutError, TimeoutError))


def _server_info(r: redis.Redis) -> dict[str, int]:
    mem = r.info("memory")
    stats = r.info("stats")
    return {
        "used_memory": int(mem["used_memory"]),
        "maxmemory": int(mem["maxmemory"]),
        "keys": int(r.dbsize()),
        "evicted_keys": int(stats["evicted_keys"]),
    }
