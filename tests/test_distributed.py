"""Several real Ray nodes on this machine: decode workers on separate nodes, particles migrating
through the KV store, and the same result as the same workers on one node for the same seed."""

from __future__ import annotations

import pytest

from smcserve.client import Client
from smcserve.loadtest.server_process import ServeProcess

pytestmark = pytest.mark.e2e


def start_cluster():
    """A two-CPU head node. Ray waits a fixed 30 s for a new node's raylet to register, and on a
    loaded two-core machine it has missed that (a raylet that never logged a line): one more try."""
    from ray.cluster_utils import Cluster

    from smcserve.scheduler.stack import RAY_SYSTEM_CONFIG

    head = {"num_cpus": 2, "include_dashboard": False, "_system_config": RAY_SYSTEM_CONFIG}

    for attempt in range(2):
        try:
            return Cluster(initialize_head=True, head_node_args=head)
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt:
                raise


@pytest.fixture(scope="module")
def cluster_server():
    cluster = start_cluster()
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    srv = ServeProcess(
        "--ray-address",
        cluster.address,
        "--worker-host",
        "127.0.0.1",
        "--decode-workers",
        "2",
        "--dtype",
        "float32",
        "--redis-maxmemory",
        "256mb",
        "--kv-cache",
        "128mb",
    )
    try:
        yield srv
    finally:
        srv.stop()
        cluster.shutdown()


@pytest.fixture(scope="module")
def one_node_pair():
    """The same two decode workers on one node (a local Ray cluster): each worker's batches have the shapes
    they have on two nodes, so fp32 results are the same to the bit. Against one worker holding all the
    particles they are not: a batch of 6 rounds differently from two of 3 (logits differ by ~3e-5), and
    for some seeds a draw sits that close to a token boundary (seen in CI: every weight 0.149 lower).
    Seeds 21-60 here: 2 of 80 runs parted against one worker, 0 of 80 against this pair, and the same
    2 parted between two one-worker servers differing only in --threads: rounding, not migration."""
    args = ("--decode-workers", "2", "--dtype", "float32", "--redis-maxmemory", "256mb", "--kv-cache", "128mb")
    srv = ServeProcess(*args)
    try:
        yield srv
    finally:
        srv.stop()


def diagnosis(server: ServeProcess, remote: Client, spread_steps: list, single_steps: list) -> str:
    steps = [
        f"step {a.step}: ess {a.ess:.6f} vs {b.ess:.6f}, best {a.best_text!r} vs {b.best_text!r}"
        for a, b in zip(spread_steps, single_steps)
        if abs(a.ess - b.ess) > 1e-6 or a.best_text != b.best_text
    ]
    workers = [
        f"{w.worker_id}: imported {w.particles_imported}, recomputes {w.prompt_recomputes}, "
        f"loaded {w.kv_blocks_loaded}, alive {w.alive}, restarts {w.restarts}"
        for w in remote.info().decode_workers
    ]
    log = [line for line in server.output().splitlines() if "WARNING" in line or "ERROR" in line or "lost" in line]
    return "\n".join(["steps that differ:", *steps[:5], "workers:", *workers, "server warnings:", *log[-20:]])


def test_decode_workers_on_separate_nodes_match_one_node(cluster_server, one_node_pair):
    with Client(cluster_server.address) as remote, Client(one_node_pair.address) as local:
        workers = remote.info().decode_workers
        assert len(workers) == 2 and workers[0].node_id != workers[1].node_id
        kw = dict(
            messages=[{"role": "user", "content": "Describe a storm at sea."}],
            particles=6,
            max_tokens=10,
            seed=21,
            potentials=[{"kind": "max_word_length", "max_len": 6}],
        )
        for scheme in ("without_replacement", "multinomial"):
            spread_steps, single_steps = [], []
            spread = remote.steer(scheme=scheme, ess_threshold=1.0, on_progress=spread_steps.append, **kw)
            single = local.steer(scheme=scheme, ess_threshold=1.0, on_progress=single_steps.append, **kw)
            # on a mismatch, say where the runs parted and what the workers did
            why = diagnosis(cluster_server, remote, spread_steps, single_steps)
            assert [list(p.token_ids) for p in spread.particles] == [list(p.token_ids) for p in single.particles], why
            assert [p.log_weight for p in spread.particles] == pytest.approx(
                [p.log_weight for p in single.particles], abs=1e-3
            ), why
            assert spread.log_z == pytest.approx(single.log_z, abs=1e-3), why
        # the two workers both held particles, and plain generation works across nodes too
        after = remote.info().decode_workers
        assert all(w.batch_steps > 0 for w in after)
        assert sum(w.particles_imported for w in after) > 0  # resampling moved particles between the nodes
        assert (
            "Paris"
            in remote.generate(
                messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0.0, max_tokens=16
            ).text
        )
