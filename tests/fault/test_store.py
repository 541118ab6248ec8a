"""Redis is killed: requests keep working (the store is a cache: misses), the scheduler restarts the
embedded server, says so in ``info`` and ``/metrics``, and the prefix cache works again."""

from __future__ import annotations

import time
import urllib.request

import pytest
from faults import kill, redis_client, redis_pid, report, wait_until

pytestmark = pytest.mark.e2e

PROMPT = "Tell me about the history of lighthouses along the northern coast, in some detail. " * 4


def test_redis_killed_is_restarted_and_caching_resumes(fault_server, fclient):
    assert fclient.info().kv_store == "ok"
    before = fclient.info().kv_store_restarts
    old = redis_pid(fault_server)
    t_kill = kill(old)
    # requests go on meanwhile: every store read is a miss, every write is dropped
    assert fclient.generate("Say hi.", max_tokens=4).finish_reason in ("length", "stop")
    wait_until("the store is back", lambda: fclient.info().kv_store_restarts > before)
    report("redis killed → store back", time.monotonic() - t_kill)
    assert fclient.info().kv_store == "ok" and redis_pid(fault_server) != old
    assert fault_server.output().count("KV store unreachable") == 1  # one warning, not one per request
    store = redis_client(fault_server)
    before_keys = store.dbsize()  # a fresh server: only what was written since it came back
    fclient.generate(PROMPT, max_tokens=2)  # a prompt not seen before: its blocks are new
    assert store.dbsize() > before_keys  # the workers write to it again: the prefix cache works
    metrics = urllib.request.urlopen(fault_server.http_address + "/metrics").read().decode().splitlines()
    assert "smcserve:kv_store_up 1.0" in metrics
    assert float(next(m for m in metrics if m.startswith("smcserve:kv_store_restarts_total")).split()[-1]) > before
