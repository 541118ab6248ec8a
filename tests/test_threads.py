"""``engine/threads.py``: an engine built on a passing thread leaves no OpenMP pool behind (the reason a
worker builds its engine so; the speed itself is the engine's figure, not a test). In a fresh process, so
that no other test's threads come and go while it counts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from smcserve.engine.threads import on_passing_thread

SCRIPT = textwrap.dedent(
    """
    import os, threading, time
    import torch
    from smcserve.engine.threads import on_passing_thread

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def parallel_work():  # a parallel region on two OpenMP threads (far above ATen's grain size)
        torch.set_num_threads(2)
        return float(torch.ones(4_000_000).exp_().sum())

    def settles_at(count, deadline_s=60.0):  # exiting threads end asynchronously; the deadline bounds a failure
        end = time.monotonic() + deadline_s
        while os_threads() != count and time.monotonic() < end:
            time.sleep(0.01)
        return os_threads() == count

    parallel_work()  # this thread's own pool and torch's one-time threads, before counting
    base = os_threads()
    # control: a thread that lives on keeps its pool (itself and at least one OpenMP worker)
    done, release = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (parallel_work(), done.set(), release.wait()))
    t.start()
    done.wait()
    alive = os_threads()
    release.set()
    t.join()
    if alive < base + 2:
        print("ONE-THREAD")  # torch ran the region on one thread here: no pool to leave behind
        raise SystemExit(0)
    assert settles_at(base), ("a thread's pool outlived it", base, os_threads())
    assert on_passing_thread(parallel_work) > 0
    assert settles_at(base), ("the passing thread left threads behind", base, os_threads())
    print("OK", base, alive)
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_a_passing_threads_openmp_pool_ends_with_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    if "ONE-THREAD" in out.stdout:
        pytest.skip("torch ran the region on one thread here (no OpenMP pool to leave behind)")
    assert out.stdout.startswith("OK"), out.stdout


def test_a_passing_threads_exception_is_raised_to_the_caller():
    def fails():
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        on_passing_thread(fails)
