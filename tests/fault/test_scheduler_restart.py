"""The scheduler dies (kill -9) on a Ray cluster started as ``deploy/`` starts one: streams in flight
end with UNAVAILABLE, the workers (detached actors) drop its orphaned sequences and steering
particles and free their KV, and a scheduler started again takes the workers over and serves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from faults import kill, report, wait_until

from smcserve.client import Client
from smcserve.client.client import build_request
from smcserve.loadtest.server_process import ServeProcess, free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Tell me a long story about a fox who learns to sail."


@pytest.fixture()
def cluster():
    """deploy/local-cluster.sh: a standalone Redis and a Ray head, on loopback ports of their own."""
    run_dir = tempfile.mkdtemp(prefix="smc-")  # short: Ray's socket paths under it must fit in 107 bytes
    env = dict(
        os.environ,
        SMCSERVE_RUN_DIR=run_dir,
        EXTRA_NODES="0",
        RAY_NODE_IP="127.0.0.2",
        RAY_PORT=str(free_port()),
        REDIS_PORT=str(free_port()),
        RAY_AUTH_MODE="token",  # as deploy/_common.sh sets for its scripts and deploy/serve.sh
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    script = str(REPO / "deploy" / "local-cluster.sh")
    try:  # (down also stops what a failed up started)
        out = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        ray_address, redis_url = re.search(r"RAY_ADDRESS=(\S+) REDIS_URL=(\S+)", out.stdout).groups()
        yield env, ray_address, redis_url
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(run_dir, ignore_errors=True)


def idle(client: Client) -> bool:
    info = client.info()
    return all(w.alive and not w.kv_blocks_in_use and not w.active_sequences for w in info.decode_workers)


def test_scheduler_killed_workers_free_its_requests_and_a_new_one_takes_over(cluster):
    env, ray_address, redis_url = cluster
    args = ("--ray-address", ray_address, "--redis-url", redis_url, "--dtype", "float32", "--threads", "1",
            "--kv-cache", "64mb", "--prefill-workers", "1", "--decode-workers", "1")  # fmt: skip
    first = ServeProcess(*args, env=env)
    assert "taking over" not in first.output()
    errors: dict[str, grpc.StatusCode] = {}
    try:
        with Client(first.address) as c:
            streams = {
                "steer": c.stub.Generate(
                    build_request(PROMPT, max_tokens=200, steering={"particles": 4, "potentials": []})
                ),
                "generate": c.stub.Generate(build_request(PROMPT, max_tokens=200, ignore_eos=True)),
            }
            for call in streams.values():
                next(call)  # running: particles and a sequence hold KV on the decode worker
            assert not idle(c)

            def drain(name, call):
                try:
                    for _ in call:
                        pass
                except grpc.RpcError as err:
                    errors[name] = err.code()

            threads = [threading.Thread(target=drain, args=item) for item in streams.items()]
            for t in threads:
                t.start()
            t_kill = kill(first.proc.pid)
            for t in threads:
                t.join()
    finally:
        first.stop()
    assert errors == {"steer": grpc.StatusCode.UNAVAILABLE, "generate": grpc.StatusCode.UNAVAILABLE}

    second = ServeProcess(*args, env=env)
    try:
        report("scheduler killed → a new one serving (workers taken over)", time.monotonic() - t_kill)
        assert second.output().count("taking over the one already running") == 2  # no model reloaded
        with Client(second.address) as c:
            assert c.generate("Say hi.", max_tokens=4).finish_reason in ("length", "stop")
            wait_until("the orphaned requests' KV freed", lambda: idle(c))
            report("scheduler killed → orphans freed", time.monotonic() - t_kill)
    finally:
        assert second.stop() == 0


NICE_OF_A_WORKER = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("nice", ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()))
"""


def test_the_clusters_deploy_starts_run_workers_at_normal_priority(cluster):
    """`ray start` runs a node's workers at nice 15 unless told otherwise: deploy/_common.sh tells it, so the
    model's actors do not yield their cores to every other busy process of the node."""
    env, ray_address, _ = cluster
    out = subprocess.run(
        [sys.executable, "-c", NICE_OF_A_WORKER, ray_address], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert f"nice {os.nice(0)}" in out.stdout.splitlines()  # the raylet's (started from here): Ray adds nothing
