"""Which workers (and KV store) the scheduler can reach, and getting back the ones it lost.

Workers are Ray actors started with ``max_restarts=-1``: when one dies (its process killed, the node
lost) Ray starts it again, running its constructor anew (a decode worker then listens at a new
address). A worker is *lost* when a call to it fails as unreachable (a request's call, or the watch
loop's ping every ``interval_s``): it leaves placement at once (``alive`` False) and a rejoin task
asks the actor for its address (decode) or readiness (prefill), backing off, until the restarted
actor answers; then it is placed again. Health is ``SERVING`` while each pool has a live worker.

Each ping carries the scheduler's ``session``; a decode worker drops the steering requests of a
session that stopped pinging (the scheduler died: a new one starts a new session).

The KV store is a cache: while Redis is down every read is a miss and every write is dropped. The
watch loop pings it; when it stops answering the scheduler logs one warning, restarts the embedded
server (``restart_store``; an external one is pinged again, backing off, until it is back) and
reports the state in ``GetModelInfo`` (``kv_store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import ray

from smcserve.kvstore import KVStore
from smcserve.protos import worker_pb2, worker_pb2_grpc
from smcserve.scheduler.handles import DecodeHandle, PrefillHandle

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0


class NoWorker(Exception):
    """No worker of a pool came back within ``rejoin_wait_s``."""


@dataclass
class Liveness:
    prefill: list[PrefillHandle]
    decode: list[DecodeHandle]
    connect: Callable[[str], worker_pb2_grpc.DecodeWorkerStub]  # a decode worker's stub at an address
    store: KVStore | None = None
    restart_store: Callable[[], None] | None = None  # start the embedded Redis again (None: external)
    set_health: Callable[[bool], Awaitable[None]] | None = None
    interval_s: float = 1.0
    rejoin_wait_s: float = 60.0  # how long a request waits for a pool with no live worker
    store_state: str = "ok"  # "ok", "down" or "off" (no store)
    store_restarts: int = 0
    # this scheduler's session: decode workers keep its steering requests while it calls (see ``_watch``)
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) when a worker rejoins
    _rejoining: dict = field(default_factory=dict)  # handle → its rejoin task
    _serving: bool | None = None
    _task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        if self.store is None:
            self.store_state = "off"

    # --- who is alive --------------------------------------------------------------------------
    def alive_decode(self) -> list[DecodeHandle]:
        return [w for w in self.decode if w.alive]

    def alive_prefill(self) -> list[PrefillHandle]:
        return [w for w in self.prefill if w.alive]

    def serving(self) -> bool:
        return bool(self.alive_prefill() and self.alive_decode())

    async def wait_for(self, pool: Callable[[], list]) -> list:
        """The live workers of ``pool`` (``alive_decode``/``alive_prefill``), waiting up to
        ``rejoin_wait_s`` for one to come back when none is; :class:`NoWorker` if none does."""
        deadline = asyncio.get_running_loop().time() + self.rejoin_wait_s
        while not (live := pool()):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise NoWorker()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return live

    # --- losing and getting back ------------------------------------------------------------------
    def lost(self, w: PrefillHandle | DecodeHandle, why: object = "") -> None:
        """``w`` did not answer: out of placement now, back when Ray has restarted it."""
        if not w.alive:
            return
        w.alive = False
        log.warning("worker %s lost (%s); waiting for Ray to restart it", w.worker_id, why or "unreachable")
        self._health_changed()
        if w not in self._rejoining:
            self._rejoining[w] = asyncio.get_running_loop().create_task(self._rejoin(w))

    async def _rejoin(self, w: PrefillHandle | DecodeHandle) -> None:
        delay = 0.1
        try:
            while True:
                try:
                    if isinstance(w, DecodeHandle):
                        address = await w.actor.address_of.remote()
                        stub = self.connect(address)
                        await stub.Stats(worker_pb2.StatsRequest(), timeout=30)
                        w.address, w.stub = address, stub
                        w.kv_blocks_total = w.kv_blocks_in_use = 0  # no report from the new process yet
                        w.active = 0
                    else:
                        await w.actor.ready.remote()
                        w.queued, w.queue_ms, w.local_blocks, w.local_version = 0, 0.0, set(), 0
                    break
                except ray.exceptions.ActorDiedError:
                    log.error("worker %s died for good (Ray will not restart it)", w.worker_id)
                    return
                except (ray.exceptions.RayError, grpc.aio.AioRpcError) as err:
                    log.debug("worker %s not back yet: %s", w.worker_id, err)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, MAX_BACKOFF_S)
            w.alive = True
            w.restarts += 1
            log.warning("worker %s is back", w.worker_id)
            self._health_changed()
            self._changed.set()
            self._changed = asyncio.Event()
        finally:
            self._rejoining.pop(w, None)

    def _health_changed(self) -> None:
        serving = self.serving()
        if serving != self._serving and self.set_health is not None:
            self._serving = serving
            asyncio.get_running_loop().create_task(self.set_health(serving))

    # --- the watch loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._serving = True
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._rejoining.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        store_delay = 0.0
        next_store_check = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.gather(
                *(self._ping_decode(w) for w in self.alive_decode()),
                *(self._ping_prefill(w) for w in self.alive_prefill()),
            )
            if self.store is not None and loop.time() >= next_store_check:
                ok = await asyncio.to_thread(self._check_store)
                store_delay = 0.0 if ok else min(max(2 * store_delay, self.interval_s), 8 * MAX_BACKOFF_S)
                next_store_check = loop.time() + store_delay
            await asyncio.sleep(self.interval_s)

    async def _ping_decode(self, w: DecodeHandle) -> None:
        try:
            await w.stub.Stats(worker_pb2.StatsRequest(session=self.session), timeout=max(5.0, 5 * self.interval_s))
        except grpc.aio.AioRpcError as err:
            # refused or reset: the process is gone (a busy one would time out instead)
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self.lost(w, err.code().name)

    async def _ping_prefill(self, w: PrefillHandle) -> None:
        try:  # ``ping`` runs in its own concurrency group: a worker busy with a long prefill still answers
            await asyncio.wait_for(w.actor.ping.remote(), max(5.0, 5 * self.interval_s))
        except ray.exceptions.RayActorError as err:
            self.lost(w, type(err).__name__)
        except TimeoutError:
            pass

    def _check_store(self) -> bool:
        """Ping the store (in a thread); on a failure restart the embedded one. True when it answers."""
        try:
            self.store.ping()
        except ConnectionError as err:
            if self.store_state == "ok":
                log.warning("KV store unreachable (%s): prefix cache off until it is back", err)
                self.store_state = "down"
            if self.restart_store is not None:
                try:
                    self.restart_store()
                except Exception:
                    log.exception("restarting the embedded Redis failed")
            return False
        if self.store_state == "down":
            self.store_state = "ok"
            self.store_restarts += 1
            log.warning("KV store is back: prefix cache on")
        return True
