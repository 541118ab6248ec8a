"""Workers die (kill -9 of the Ray actor's process): requests in flight survive, Ray restarts the
worker, the scheduler places around it meanwhile and takes it back, and health says SERVING while
each pool has a live worker."""

from __future__ import annotations

import threading
import time

import pytest
from faults import all_back, decode_pid, health, kill, report, wait_until, worker_processes
from grpc_health.v1 import health_pb2

from smcserve.client import Client

pytestmark = pytest.mark.e2e

PROMPT = "Write a long story about a lighthouse keeper and the sea."
SERVING = health_pb2.HealthCheckResponse.SERVING


def restarts(client: Client, role: str) -> int:
    info = client.info()
    return sum(w.restarts for w in (info.decode_workers if role == "decode" else info.prefill_workers))


def streaming_worker(client: Client) -> str:
    """The address of the decode worker running a sequence (there is one request in flight)."""
    busy = [w.address for w in client.info().decode_workers if w.active_sequences]
    return busy[0] if len(busy) == 1 else ""


def test_decode_worker_killed_mid_generation_resumes_as_one_stream(fault_server, fclient):
    kw = dict(max_tokens=48, seed=7, temperature=0.8, ignore_eos=True)
    reference = fclient.generate(PROMPT, **kw)
    before = restarts(fclient, "decode")

    text, tokens, final = "", [], None
    for i, r in enumerate(fclient.stream(PROMPT, **kw)):
        text += r.text
        tokens += r.token_ids
        if i == 4:  # a few tokens in: kill the worker streaming them
            t_kill = kill(decode_pid(fault_server, wait_until("a worker streams", lambda: streaming_worker(fclient))))
        if r.finish_reason:
            final = r
    assert final.finish_reason == "length" and final.usage.completion_tokens == 48
    assert tokens == reference.token_ids  # seeded draws by position: the resumed stream is the same stream
    assert text == reference.text
    wait_until("the killed decode worker is back", lambda: restarts(fclient, "decode") > before and all_back(fclient))
    report("decode worker killed mid-generation → back in placement", time.monotonic() - t_kill)


def test_decode_worker_killed_mid_steer_rebuilds_particles(fault_server, fclient):
    kw = dict(particles=16, potentials=[{"kind": "max_word_length", "max_len": 6}], max_tokens=12, seed=3)
    reference = fclient.steer(PROMPT, **kw)
    assert reference.steps >= 3
    before = restarts(fclient, "decode")
    killed, imported = [], []

    # Killed two steps before the end: the lost step reruns on the survivor, from KV recomputed or loaded
    # for the particles' tokens. Those KV and the survivor's larger batches differ from the reference's in
    # the last bits, which can flip a draw that lies that close to a boundary; the fewer steps after the
    # kill, the rarer (killed at step 3, one run in a loaded `make test` flipped a token at step 10).
    def on_progress(progress):
        if progress.step == reference.steps - 2 and not killed:
            workers = fclient.info().decode_workers
            imported.append((workers[1].address, workers[1].particles_imported))
            killed.append(kill(decode_pid(fault_server, workers[0].address)))

    result = fclient.steer(PROMPT, on_progress=on_progress, **kw)
    assert killed, "the run ended before the kill"
    ((address, count),) = imported
    survivor = next(w for w in fclient.info().decode_workers if w.address == address)
    assert survivor.particles_imported - count >= 16, "no rebuild: the kill landed after the last step"
    assert result.status == "ok" and len(result.particles) == 16
    # the lost step reruns with the same draws: the same particles and weights as without the fault
    assert [list(p.token_ids) for p in result.particles] == [list(p.token_ids) for p in reference.particles]
    assert result.log_z == pytest.approx(reference.log_z, rel=1e-4, abs=1e-4)
    wait_until("the killed decode worker is back", lambda: restarts(fclient, "decode") > before and all_back(fclient))
    report("decode worker killed mid-steer → back in placement", time.monotonic() - killed[0])


def test_idle_decode_worker_killed_leaves_placement_at_once(fault_server, fclient):
    wait_until("all workers alive", lambda: all_back(fclient))
    before = restarts(fclient, "decode")
    t_kill = kill(decode_pid(fault_server, fclient.info().decode_workers[1].address))
    first_ok = None
    for _ in range(10):  # the dead worker is never chosen: every request succeeds, restarted or not
        out = fclient.generate("Say hi.", max_tokens=4)
        assert out.finish_reason in ("length", "stop")
        first_ok = first_ok or time.monotonic()
        assert health(fault_server) == SERVING  # the other decode worker is alive
    report("idle decode worker killed → first success", first_ok - t_kill)
    wait_until("the killed decode worker is back", lambda: restarts(fclient, "decode") > before and all_back(fclient))
    report("idle decode worker killed → back in placement", time.monotonic() - t_kill)


def test_prefill_worker_killed_mid_prefill_retries(fault_server, fclient):
    wait_until("all workers alive", lambda: all_back(fclient))
    before = restarts(fclient, "prefill")
    long_prompt = " ".join(f"{PROMPT} Part {i}." for i in range(60))  # ≈ 1,000 tokens of prefill
    result = {}

    def run():
        result["out"] = fclient.generate(long_prompt, max_tokens=4)

    t = threading.Thread(target=run)
    t.start()
    wait_until("the prefill was sent", lambda: any(w.queue_length for w in fclient.info().prefill_workers), every=0.01)
    (proc,) = worker_processes(fault_server, "PrefillWorker")
    t_kill = kill(proc.pid)
    t.join()
    assert result["out"].finish_reason in ("length", "stop")  # retried on the restarted worker
    report("prefill worker killed mid-prefill → the request done", time.monotonic() - t_kill)
    wait_until("health SERVING again", lambda: health(fault_server) == SERVING)
    wait_until("the killed prefill worker is back", lambda: restarts(fclient, "prefill") > before and all_back(fclient))
