"""The KV store on a real three-master Redis Cluster (``redis+cluster://``): blocks spread over the shards,
one batch per shard, a served model on top, and a master killed mid-way (its blocks become misses)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from redis.crc import key_slot

from smcserve.kvstore import KVStore, start_or_connect
from smcserve.kvstore.cluster import parse_cluster_url
from smcserve.kvstore.cluster_local import LocalCluster, free_port_base
from smcserve.kvstore.codec import HEADER

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SHAPE = (4, 2, 3, 16, 64)  # 98 KB float32 blocks


def _key(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture(scope="module")
def cluster():
    # 2 s on an idle machine; the deadline is only for a cluster that never forms
    c = LocalCluster(masters=3, maxmemory="256mb").start(deadline_s=120)
    try:
        yield c
    finally:
        c.stop()
    assert not c.dir.exists()


_admin: dict[int, object] = {}


def _node_stats(cluster: LocalCluster) -> dict[int, dict]:
    """Each master's INFO stats and commandstats, in one read event there (a kept connection, one pipeline)."""
    out = {}
    for port in cluster.ports:
        r = _admin.setdefault(port, cluster.client(port))
        stats, cmds = r.pipeline(transaction=False).info("stats").info("commandstats").execute()
        out[port] = {**stats, **cmds}
    return out


def _slot_owner(cluster: LocalCluster) -> dict[int, int]:
    """Slot → port of its master, as the servers say (CLUSTER SLOTS)."""
    out = {}
    for lo, hi, master, *_ in cluster.client(cluster.ports[0]).execute_command("CLUSTER SLOTS"):
        out.update(dict.fromkeys(range(lo, hi + 1), int(master[1])))
    return out


def _calls(stats: dict, cmd: str) -> int:
    return int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0))


# --- URLs -------------------------------------------------------------------------------------------


def test_cluster_urls_parse():
    nodes, opts = parse_cluster_url("redis+cluster://:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002?socket_timeout=3")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    assert opts["password"] == "p@ss" and opts["socket_timeout"] == 3.0 and "ssl" not in opts
    nodes, opts = parse_cluster_url("rediss+cluster://user:pw@h:6380?ssl_ca_certs=/ca.pem")
    assert nodes == [("h", 6380)] and opts["ssl"] is True and opts["username"] == "user"
    assert opts["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ValueError):
        parse_cluster_url("redis+cluster://h:1/2")  # a cluster has only db 0


def test_unreachable_cluster_is_a_clear_error_and_then_misses():
    base = free_port_base(2)
    url = f"redis+cluster://:secret@127.0.0.1:{base},127.0.0.1:{base + 1}"
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{base}") as ei:
        start_or_connect(url)
    assert "secret" not in str(ei.value)
    s = KVStore(url)  # the client is built lazily: a worker starts even while the store is down
    t0 = time.monotonic()
    assert s.get_blocks(["a", "b"]) == [None, None]
    assert s.contains(["a"]) == [False]
    assert s.put_blocks([("a", torch.zeros(4))]) == 0
    assert time.monotonic() - t0 < 5


# --- the store on the cluster ----------------------------------------------------------------------


def test_blocks_round_trip_and_land_on_every_master(cluster):
    url, emb = start_or_connect(cluster.url)
    assert (url, emb) == (cluster.url, None)
    s = KVStore(cluster.url, key_prefix="t:roundtrip:")
    s.redis.flushall()  # FLUSHALL goes to every master
    keys = [_key(i) for i in range(300)]
    tensors = [torch.randn(SHAPE).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(300)]
    assert s.put_blocks(list(zip(keys, tensors))) > 0
    got = s.get_blocks(keys)
    assert all(g is not None and g.dtype == t.dtype and torch.equal(g, t) for g, t in zip(got, tensors))
    got[0].add_(1)  # writable
    assert s.contains(keys + ["absent"]) == [True] * 300 + [False]
    assert s.cached_prefix_len(keys[:5] + ["absent"] + keys[5:]) == 5
    per_master = [cluster.client(p).dbsize() for p in cluster.ports]
    assert sum(per_master) == 300 and min(per_master) > 50, per_master  # ~100 each
    info = s.info()
    assert info["keys"] == 300 and info["shards"] == 3 and info["shards_down"] == 0
    assert s.delete(keys[:10] + ["absent"]) == 10
    assert s.get_blocks(keys[:11])[:10] == [None] * 10
    s.ping()


def test_batches_are_one_round_trip_per_master(cluster):
    s = KVStore(cluster.url, key_prefix="t:batch:")
    keys = [_key(f"b{i}") for i in range(300)]
    s.put_blocks([(k, torch.randn(2, 64)) for k in keys])
    owner = _slot_owner(cluster)
    owned = {p: sum(owner[key_slot(s.full_key(k).encode())] == p for k in keys) for p in cluster.ports}
    for op, cmd in (("contains", "exists"), ("get_blocks", "get")):
        before = _node_stats(cluster)
        out = getattr(s, op)(keys)
        after = _node_stats(cluster)
        assert all(x is not None and x is not False for x in out)
        for port in cluster.ports:
            n = _calls(after[port], cmd) - _calls(before[port], cmd)
            reads = after[port]["total_reads_processed"] - before[port]["total_reads_processed"]
            # every key went straight to its own master (no MOVED), ~100 commands in one read event
            # there (the second snapshot adds its own)
            assert n == owned[port] > 50 and reads <= 3, (op, port, n, reads)
    # the writes too: each master's share of a put is one write (a few socket reads of its bytes)
    before = _node_stats(cluster)
    s.put_blocks([(k, torch.randn(2, 64)) for k in keys])
    after = _node_stats(cluster)
    for port in cluster.ports:
        assert _calls(after[port], "set") - _calls(before[port], "set") == owned[port]
        assert after[port]["total_reads_processed"] - before[port]["total_reads_processed"] <= 12


def test_a_killed_master_costs_only_its_own_blocks_and_no_waiting():
    with LocalCluster(masters=3, maxmemory="64mb").start(deadline_s=120) as c:
        s = KVStore(c.url, key_prefix="t:kill:")
        keys = [_key(f"k{i}") for i in range(90)]
        tensors = [torch.randn(SHAPE) for _ in keys]
        s.put_blocks(list(zip(keys, tensors)))
        victim = c.ports[1]
        owner = _slot_owner(c)
        on_victim = {k for k in keys if owner[key_slot(s.full_key(k).encode())] == victim}
        assert 10 < len(on_victim) < 60
        c.kill(victim)
        for _ in range(3):  # the first call finds it dead, later ones skip it (back-off) or find it again
            t0 = time.monotonic()
            got = s.get_blocks(keys)
            present = s.contains(keys)
            written = s.put_blocks(list(zip(keys, tensors)))
            assert time.monotonic() - t0 < 2.0
            assert [g is None for g in got] == [k in on_victim for k in keys]
            assert all(torch.equal(g, t) for g, t in zip(got, tensors) if g is not None)
            assert present == [k not in on_victim for k in keys]
            assert 0 < written < sum(_value_bytes(t) for t in tensors)
        s.ping()  # the store answers while any master does
        assert s.info()["shards_down"] == 1
        fresh = KVStore(c.url, key_prefix="t:kill:").get_blocks(keys)  # a new client reads the slot map too
        assert [g is None for g in fresh] == [k in on_victim for k in keys]
        for port in c.ports:
            if port != victim:
                c.kill(port)
        with pytest.raises(ConnectionError):
            s.ping()
        assert s.get_blocks(keys[:3]) == [None] * 3


def _value_bytes(t: torch.Tensor) -> int:
    return HEADER.size + t.numel() * t.element_size()


def test_deploy_script_starts_and_stops_a_cluster(tmp_path):
    env = dict(
        os.environ,
        SMCSERVE_RUN_DIR=str(tmp_path),
        REDIS_CLUSTER_PORT=str(free_port_base(3)),
        REDIS_MAXMEMORY="32mb",
    )
    script = str(REPO / "deploy" / "redis-cluster.sh")
    start = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr
        url = start.stdout.strip()
        assert url.startswith("redis+cluster://127.0.0.1:") and url.count(",") == 2
        s = KVStore(url)
        assert s.put_blocks([("x", torch.ones(8))]) > 0 and torch.equal(s.get_blocks(["x"])[0], torch.ones(8))
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and url in status.stdout
    finally:
        stop = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 3


# --- a served model on the cluster ------------------------------------------------------------------


def _decode_totals(client) -> dict[str, int]:
    workers = client.info().decode_workers
    return {
        f: sum(getattr(w, f) for w in workers)
        for f in ("particles_imported", "kv_blocks_loaded", "prompt_recomputes", "batch_steps")
    }


def _steer(client, content: str):
    res = client.steer(
        messages=[{"role": "user", "content": content}],
        particles=6,
        max_tokens=8,
        seed=21,
        scheme="multinomial",
        ess_threshold=1.0,
        potentials=[{"kind": "max_word_length", "max_len": 6}],
    )
    return [list(p.token_ids) for p in res.particles], [round(p.log_weight, 3) for p in res.particles]


def _generate(client, content: str) -> list[int]:
    out = client.generate(messages=[{"role": "user", "content": content}], temperature=0.0, max_tokens=8)
    assert out.finish_reason in ("stop", "length")
    return list(out.token_ids)


LONG = "Here are the notes of the harbour master for the week, kept in the order they were written down. "


def test_served_on_the_cluster_and_a_master_killed_mid_way(cluster):
    from smcserve.client import Client
    from smcserve.loadtest.server_process import ServeProcess

    cluster.client(cluster.ports[0])  # the fixture's cluster is up
    args = ("--redis-url", cluster.url, "--decode-workers", "2", "--dtype", "float32", "--kv-cache", "64mb")
    with ServeProcess(*args) as srv, Client(srv.address) as client:
        assert client.info().kv_store == "ok"
        # (c) plain generation and steering whose particles move between the two workers, twice each
        before = _decode_totals(client)
        g1, s1 = _generate(client, "What is the capital of France?"), _steer(client, "Describe a storm at sea.")
        g2, s2 = _generate(client, "What is the capital of France?"), _steer(client, "Describe a storm at sea.")
        assert g1 == g2 and s1 == s2
        mid = _decode_totals(client)
        assert mid["particles_imported"] > before["particles_imported"]  # resampling moved particles
        assert mid["kv_blocks_loaded"] > before["kv_blocks_loaded"]  # through the store
        assert all(cluster.client(p).dbsize() > 0 for p in cluster.ports)  # blocks on every master
        # a fresh long prompt: the decode worker loads all its blocks from the store, recomputes nothing
        _generate(client, LONG * 4 + "Day zero: what happened?")
        mid, was = _decode_totals(client), mid
        assert mid["prompt_recomputes"] == was["prompt_recomputes"]
        assert mid["kv_blocks_loaded"] >= was["kv_blocks_loaded"] + 4

        # (d) kill one master: fresh prompts (several full blocks each, spread over the shards) find
        # the blocks the prefill wrote to the dead master missing, recompute them, and still answer
        victim = max(cluster.ports, key=lambda p: cluster.client(p).dbsize())
        cluster.kill(victim)
        prompts = [LONG * 4 + f"Day {d}: what happened?" for d in ("one", "two", "three")]
        t0 = time.monotonic()
        first = [(_generate(client, p), _steer(client, p)) for p in prompts]
        elapsed = time.monotonic() - t0
        after = _decode_totals(client)
        again = [(_generate(client, p), _steer(client, p)) for p in prompts]
        assert first == again
        assert after["prompt_recomputes"] > mid["prompt_recomputes"]
        assert client.info().kv_store == "ok"  # the store still answers (two masters)
        assert elapsed < 150, elapsed  # no request waited on socket timeouts
        assert srv.stop() == 0
