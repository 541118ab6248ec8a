"""The fault suite's tools: find a worker's (or Redis's) process and kill -9 it, wait for states.

Every wait is for a state (a worker back, health SERVING), polled up to a generous bound that only
a broken server reaches; the times measured (kill → first success) are printed for the closing
notes, never asserted.
"""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smcserve.client import Client
from smcserve.loadtest.server_process import ServeProcess

RECOVERY_BOUND_S = 300  # only a server that never recovers gets here (a restart loads the model: seconds)


def worker_processes(server: ServeProcess, kind: str) -> list[psutil.Process]:
    """The server's Ray actor processes of ``kind`` ("DecodeWorker" or "PrefillWorker")."""
    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if any(kind in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def decode_pid(server: ServeProcess, address: str) -> int:
    """The decode worker process listening at ``address`` (host:port)."""
    port = int(address.rsplit(":", 1)[1])
    for p in worker_processes(server, "DecodeWorker"):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")):
                return p.pid
        except psutil.Error:
            pass
    raise LookupError(f"no decode worker process listens on {address}")


def kill(pid: int) -> float:
    """kill -9; returns when it happened (time.monotonic())."""
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def redis_client(server: ServeProcess):
    """A client of the server's embedded Redis (its URL is in the listening line)."""
    import redis

    return redis.Redis.from_url(re.search(r"redis (unix://\S+)", server.output()).group(1).rstrip(","))


def redis_pid(server: ServeProcess) -> int:
    return int(redis_client(server).info("server")["process_id"])


def health(server: ServeProcess) -> int:
    with grpc.insecure_channel(server.address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status


def wait_until(what: str, cond, bound: float = RECOVERY_BOUND_S, every: float = 0.2):
    """Poll ``cond()`` until truthy (returned); fail naming ``what`` past ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {bound} s"
        time.sleep(every)


def all_back(client: Client) -> bool:
    info = client.info()
    return all(w.alive for w in [*info.prefill_workers, *info.decode_workers])


def report(name: str, seconds: float) -> None:
    """A recovery time for the closing notes (``pytest -s`` shows it; never asserted)."""
    print(f"\n[fault] {name}: {seconds:.2f} s")
