"""The fault suite's server: the real model, one prefill and two decode workers (so a killed decode
worker leaves one alive), embedded Redis."""

from __future__ import annotations

import pytest

from smcserve.client import Client
from smcserve.loadtest.server_process import ServeProcess


@pytest.fixture(scope="package")
def fault_server():
    srv = ServeProcess(
        "--dtype", "float32", "--prefill-workers", "1", "--decode-workers", "2", "--kv-cache", "256mb",
        "--redis-maxmemory", "256mb", "--max-inflight", "16", "--threads", "1",
    )  # fmt: skip
    yield srv
    srv.stop_cleanly()


@pytest.fixture()
def fclient(fault_server):
    with Client(fault_server.address) as c:
        yield c
