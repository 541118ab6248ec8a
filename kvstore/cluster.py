"""Redis Cluster as the KV store: ``redis+cluster://[:password@]host:port[,host:port...]`` URLs.

Blocks spread over the masters by their own keys (no hash tags: a prompt's blocks land on every shard).
redis-py's :class:`~redis.cluster.RedisCluster` keeps the slot → master map; the batched reads and writes
of :class:`~smcserve.kvstore.store.KVStore` go through :class:`ShardedBatch`, which groups a batch's
commands by master and sends each master its whole share in one write before reading any reply (one round
trip per master, the masters working in parallel). A cluster can't run a multi-key ``MGET`` across slots, so
a batch is ``GET``/``SET``/``EXISTS`` per key, pipelined.

A master that cannot be reached fails only its own share: those keys read as misses and their writes are
dropped (the store is a cache), and the master is skipped for a back-off (1 s, doubling to 10 s) so that
requests do not each pay a connect attempt; a ``MOVED``/``ASK`` reply (slots moved) or a master still down
after its back-off refreshes the slot map. redis-py's ``ClusterPipeline`` would instead raise for the whole
batch on one dead master and retry with back-off first.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import RedisClusterException, ResponseError
from redis.retry import Retry

from smcserve.kvstore import wire

log = logging.getLogger(__name__)

SCHEMES = ("redis+cluster", "rediss+cluster")
DOWN_FIRST_S = 1.0  # a master that failed is skipped this long, doubling while it stays down
DOWN_MAX_S = 10.0
# Errors a cluster call may raise: redis-py's cluster errors are not RedisErrors.
CLUSTER_ERRORS = (redis.RedisError, RedisClusterException, OSError)


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].lower() in SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``(startup nodes, client options)`` of a ``redis+cluster://`` / ``rediss+cluster://`` URL.

    Options are those of a ``redis://`` URL (username, password, query arguments such as
    ``socket_timeout`` or ``ssl_ca_certs``); ``rediss+cluster`` turns TLS on. Hosts may be bracketed IPv6.
    """
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    tail = (f"/{path}" if path else "") + (f"?{query}" if query else "")
    auth, _, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        if item.startswith("["):
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = item.rpartition(":")
            if not host:
                host, port = item, ""
        nodes.append((urllib.parse.unquote(host), int(port) if port else 6379))
    if not nodes:
        raise ValueError("a redis+cluster:// URL needs at least one host:port")
    single = "rediss" if scheme.lower() == "rediss+cluster" else "redis"
    host, port = nodes[0]
    first = f"[{host}]" if ":" in host else host
    opts = parse_url(f"{single}://{auth + '@' if auth else ''}{first}:{port}{tail}")
    for k in ("host", "port"):
        opts.pop(k, None)
    if opts.pop("db", 0) not in (0, None):
        raise ValueError("a Redis Cluster has only database 0")
    if opts.pop("connection_class", None) is SSLConnection:
        opts["ssl"] = True
    return nodes, opts


def connect_cluster(url: str, connect_timeout: float = 1.0, socket_timeout: float | None = 10.0) -> RedisCluster:
    """A :class:`RedisCluster` client (binary responses) for a ``redis+cluster://`` URL.

    Reads the slot map from the first startup node that answers (``redis.RedisError``/
    ``RedisClusterException`` if none does). A node's own client never retries; the cluster client's
    commands (admin: FLUSHDB, INFO, ...) retry twice within about a second.
    """
    nodes, opts = parse_cluster_url(url)
    opts.setdefault("socket_connect_timeout", connect_timeout)
    opts.setdefault("socket_timeout", socket_timeout)
    opts.setdefault("protocol", 2)  # no server pushes between the replies of a batch (kvstore.wire)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes],
        require_full_coverage=False,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        **opts,
    )


class ShardedBatch:
    """One round trip per master for a batch of single-key commands (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parse_cluster_url(url)  # a malformed URL fails here, not at the first batch
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._client_retry_at = 0.0  # while the cluster can't be reached: when to try building the client again
        self._down: dict[str, tuple[float, float]] = {}  # node name → (retry after (monotonic), back-off)
        self._refresh = False
        self._pool: ThreadPoolExecutor | None = None  # sends to several masters at once

    @property
    def cluster(self) -> RedisCluster:
        """The cluster client, built on first use (it reads the slot map); ConnectionError while no startup
        node answers (tried again after ``DOWN_FIRST_S``)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                if time.monotonic() < self._client_retry_at:
                    raise ConnectionError("no node of the Redis Cluster answered (retrying shortly)")
                try:
                    self._client = connect_cluster(self.url)
                except CLUSTER_ERRORS as err:
                    self._client_retry_at = time.monotonic() + DOWN_FIRST_S
                    raise ConnectionError(f"no node of the Redis Cluster answered: {err}") from err
            return self._client

    # --- node health ----------------------------------------------------------------------------
    def _skip(self, name: str) -> bool:
        with self._lock:
            entry = self._down.get(name)
            if entry is None:
                return False
            if time.monotonic() < entry[0]:
                return True
            self._refresh = True  # back-off over: maybe the slots moved (a failover) meanwhile
            return False

    def _failed(self, name: str, err: BaseException) -> None:
        with self._lock:
            _, backoff = self._down.get(name, (0.0, 0.0))
            backoff = min(DOWN_MAX_S, 2 * backoff) if backoff else DOWN_FIRST_S
            self._down[name] = (time.monotonic() + backoff, backoff)
        if backoff == DOWN_FIRST_S:
            log.warning("KV store shard %s unreachable (%s): its blocks are misses until it is back", name, err)

    def _ok(self, name: str) -> None:
        if name in self._down:
            with self._lock:
                if self._down.pop(name, None) is not None:
                    log.warning("KV store shard %s is back", name)

    def down_nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._down)

    def _maybe_refresh(self) -> None:
        with self._lock:
            refresh, self._refresh = self._refresh, False
        if refresh:
            try:
                self.cluster.nodes_manager.initialize()
            except CLUSTER_ERRORS as err:
                log.warning("KV store: refreshing the cluster's slot map failed: %s", err)

    # --- batches --------------------------------------------------------------------------------
    def group(self, commands: Sequence[tuple]) -> dict[str, tuple[ClusterNode, list[int]]]:
        """Command indexes by master (each command's key is its second element)."""
        nm = self.cluster.nodes_manager
        keyslot = self.cluster.keyslot
        by_slot: dict[int, list[int]] = {}
        for i, cmd in enumerate(commands):
            by_slot.setdefault(keyslot(cmd[1]), []).append(i)
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for slot, idx in by_slot.items():
            try:
                node = nm.get_node_from_slot(slot)
            except RedisClusterException:  # slot not covered (a master lost for good)
                continue
            entry = groups.get(node.name)
            if entry is None:
                groups[node.name] = (node, idx)
            else:
                entry[1].extend(idx)
        return groups

    def execute(self, commands: Sequence[tuple]) -> list[Any]:
        """Run single-key commands (``("GET", key)``, ``("SET", key, value)``...); each result is the raw
        reply or an exception (never raised: a master's failure is its commands' exception). Each master's
        share goes out in one write, then its replies are read; the masters are served at once (a thread
        each), so one master's processing does not wait for another's transfer."""
        results: list[Any] = [None] * len(commands)
        try:
            cluster = self.cluster
        except ConnectionError as err:
            return [err] * len(commands)
        self._maybe_refresh()
        unrouted = ConnectionError("slot not covered by any master")
        routed = [False] * len(commands)
        work = []
        for name, (node, idx) in self.group(commands).items():
            idx.sort()
            for i in idx:
                routed[i] = True
            if self._skip(name):
                err = ConnectionError(f"shard {name} is down")
                for i in idx:
                    results[i] = err
                continue
            work.append((name, cluster.get_redis_connection(node).connection_pool, idx))
        for i, done in enumerate(routed):
            if not done:
                results[i] = unrouted
        if len(work) == 1:
            self._round_trip(*work[0], commands, results)
        elif work:
            for f in [self._senders().submit(self._round_trip, *w, commands, results) for w in work]:
                f.result()
        return results

    def _senders(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(16, thread_name_prefix="kv-shard")
            return self._pool

    def _round_trip(self, name: str, pool: Any, idx: list[int], commands: Sequence[tuple], results: list) -> None:
        """One master's commands out and its replies in (into ``results`` at ``idx``)."""
        conn = None
        try:
            conn = pool.get_connection()
            wire.send(conn, [commands[i] for i in idx])
        except CLUSTER_ERRORS as err:
            if conn is not None:
                conn.disconnect()
                pool.release(conn)
            self._failed(name, err)
            for i in idx:
                results[i] = err
            return
        try:
            self._read(name, conn, idx, results)
        except BaseException:  # replies unread (KeyboardInterrupt...): the connection is out of step
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _read(self, name: str, conn: Any, idx: list[int], results: list[Any]) -> None:
        try:
            replies = wire.receive(conn, len(idx))
        except CLUSTER_ERRORS as err:  # the connection broke (and was closed): its replies are lost
            self._failed(name, err)
            for i in idx:
                results[i] = err
            return
        moved = False
        for i, reply in zip(idx, replies):
            results[i] = reply
            # an error reply (the connection is still in step); MOVED/ASK: the slots moved
            moved = moved or (isinstance(reply, ResponseError) and reply.args[0].startswith(("MOVED", "ASK")))
        self._ok(name)
        if moved:
            with self._lock:
                self._refresh = True

    # --- whole-cluster calls --------------------------------------------------------------------
    def each_primary(self, fn: Callable[[redis.Redis], Any]) -> dict[str, Any]:
        """``fn(a master's plain redis.Redis)`` on every master; a failure is that master's exception.
        ConnectionError when the cluster can't be reached at all."""
        cluster = self.cluster
        self._maybe_refresh()
        out: dict[str, Any] = {}
        for node in cluster.get_primaries():
            try:
                out[node.name] = fn(cluster.get_redis_connection(node))
                self._ok(node.name)
            except CLUSTER_ERRORS as err:
                out[node.name] = err
                self._failed(node.name, err)
        return out

    def ping(self) -> list[str]:
        """PING every master; the names of those that did not answer. ConnectionError if none did (the
        store is usable, with fewer blocks, while any master answers)."""
        replies = self.each_primary(lambda r: r.ping())
        down = sorted(name for name, res in replies.items() if isinstance(res, BaseException))
        if len(down) == len(replies):
            first = next(iter(replies.values()), None)
            raise ConnectionError(f"no master of the Redis Cluster answered: {first}")
        return down

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._client is not None:
            self._client.close()
