"""Real multi-host on one machine: three network namespaces on a bridge stand in for three hosts
(deploy/netns-cluster.sh). Node 1 runs Redis, the Ray head and the scheduler (deploy/serve.sh); nodes
2 and 3 are Ray worker nodes. Each node offers one Ray CPU and each worker takes one, so the prefill
worker and the two decode workers land on three different nodes (which kind goes where is Ray's
SPREAD choice: smcserve places by CPU only). This test process, in the root namespace, reaches them
through the bridge's own address: nothing goes over loopback."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from smcserve.client import Client

pytestmark = pytest.mark.multihost

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "netns-cluster.sh"
PREFIX = "smcmh"  # the test's own namespaces (smcmh1..3), apart from the script's default smcnet
SUBNET = "10.77.0"
NODE_IPS = [f"{SUBNET}.{i}" for i in (1, 2, 3)]
HEAD = NODE_IPS[0]
PORT = 50051
ADDRESS = f"{HEAD}:{PORT}"
LOCK = "/tmp/smcserve-multihost.lock"  # two runs at once would tear down each other's namespaces


def _run(cmd: list[str], env: dict, timeout: float) -> str:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def _lock(deadline_s: float = 600):
    f = open(LOCK, "w")
    deadline = time.time() + deadline_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() > deadline:
                raise TimeoutError(f"another multi-host run holds {LOCK}") from None
            time.sleep(1)


class Cluster:
    """The running scheduler (in node 1's namespace) and its log."""

    def __init__(self, serve: subprocess.Popen, log: Path):
        self.serve, self.log = serve, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs Linux, root and iproute2 (ip netns, veth, bridge)")
    lock = _lock()
    run_dir = tempfile.mkdtemp(prefix="smn", dir="/tmp")  # short: Ray's unix sockets live under it
    env = dict(
        os.environ,
        NETNS_PREFIX=PREFIX,
        NETNS_SUBNET=SUBNET,
        NETNS_NODES="3",
        SMCSERVE_RUN_DIR=run_dir,
        RAY_NUM_CPUS="1",
        REDIS_MAXMEMORY="256mb",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    serve = None
    started = False
    log = Path(run_dir) / "serve.log"
    try:
        _run([str(SCRIPT), "up"], env, timeout=240)  # also removes a crashed run's namespaces first
        serve_env = dict(
            env,
            RAY_ADDRESS=f"{HEAD}:6380",
            REDIS_URL=f"redis://{HEAD}:6379",
            PREFILL_WORKERS="1",
            DECODE_WORKERS="2",
        )
        with open(log, "w") as f:
            serve = subprocess.Popen(
                [str(SCRIPT), "exec", "1", str(REPO / "deploy" / "serve.sh"), "--host", HEAD, "--port", str(PORT)]
                + ["--worker-cpus", "1", "--threads", "1", "--dtype", "float32", "--kv-cache", "64mb"],
                env=serve_env,
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        c = Cluster(serve, log)
        deadline = time.time() + 300
        while "smcserve listening on" not in c.output():
            assert serve.poll() is None, f"serve exited {serve.returncode}:\n{c.output()[-4000:]}"
            assert time.time() < deadline, f"serve did not start in 300 s:\n{c.output()[-4000:]}"
            time.sleep(0.5)
        started = True
        yield c
    finally:
        code = serve.poll() if serve is not None else None
        if serve is not None and code is None:
            serve.send_signal(signal.SIGTERM)
            try:
                code = serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        try:
            _run([str(SCRIPT), "down"], env, timeout=120)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            lock.close()
        assert not started or code == 0, f"serve did not stop cleanly ({code}):\n{tail}"


def test_workers_on_separate_namespace_nodes(cluster):
    with Client(ADDRESS) as c:
        info = c.info()
    prefill, decode = info.prefill_workers, info.decode_workers
    assert len(prefill) == 1 and len(decode) == 2, cluster.output()[-3000:]
    nodes = [w.node_id for w in [*prefill, *decode]]
    assert len(set(nodes)) == 3, f"workers share a node: {nodes}"  # one Ray CPU per node, one per worker
    hosts = [w.address.rsplit(":", 1)[0] for w in decode]
    # decode workers listen on their own node's bridge address (the scheduler dials them there)
    assert set(hosts) <= set(NODE_IPS) and len(set(hosts)) == 2, hosts
    assert all(w.alive for w in [*prefill, *decode])
    assert info.kv_store == "ok"


def test_generate_across_hosts(cluster):
    with Client(ADDRESS) as c:
        out = c.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0.0, max_tokens=16
        )
    assert "Paris" in out.text
    # the OpenAI-compatible front listens on the scheduler's address too
    with urllib.request.urlopen(f"http://{HEAD}:8000/v1/models", timeout=30) as r:
        assert r.status == 200 and json.load(r)["data"]


def test_steering_particles_on_two_decode_nodes(cluster):
    with Client(ADDRESS) as c:
        before = {w.worker_id: w for w in c.info().decode_workers}
        res = c.steer(
            messages=[{"role": "user", "content": "Describe a storm at sea."}],
            particles=6,
            max_tokens=10,
            seed=21,
            potentials=[{"kind": "max_word_length", "max_len": 6}],
            scheme="multinomial",
            ess_threshold=1.0,  # resample every step: particles move between the nodes
        )
        after = c.info().decode_workers
    assert len(res.particles) == 6 and all(p.token_ids for p in res.particles)
    steps = {w.worker_id: w.batch_steps - before[w.worker_id].batch_steps for w in after}
    assert all(n > 0 for n in steps.values()), f"a decode node held no particles: {steps}"
    imported = sum(w.particles_imported - before[w.worker_id].particles_imported for w in after)
    assert imported > 0, "resampling moved no particle between the nodes"


def test_bench_cli_against_remote_address(cluster, tmp_path):
    out = tmp_path / "bench.json"
    smcserve = Path(sys.executable).with_name("smcserve")  # the console script, as a user runs it
    cli = [str(smcserve)] if smcserve.exists() else [sys.executable, "-m", "smcserve.entrypoints.cli"]
    cmd = [*cli, "bench", "--address", ADDRESS, "--allow-remote", "--num-requests", "4", "--rate", "inf"]
    cmd += ["--input-len", "16", "--max-tokens", "8", "--no-progress", "--out", str(out)]
    _run(cmd, dict(os.environ), timeout=180)
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0, result
