"""A worker builds its engine on a thread that then ends, so that only its compute thread keeps torch's
OpenMP threads.

libgomp (torch's OpenMP on Linux) gives every thread that runs a parallel region a pool of worker
threads, kept for as long as that thread lives; once the pools' threads outnumber the CPUs, every pool
stops spinning between regions (libgomp's throttled spin count, 100) and each region wakes sleeping
threads instead. A Ray actor's ``__init__`` runs on its main thread, which lives on, and the worker
computes on a thread of its own (the decode loop, the prefill queue): loading the model on the main
thread left two pools, and every small product of a decode step paid a wake-up. On the 2-vCPU EPYC a
one-token step of SmolLM2-135M took 43 ms on the loop thread after loading on the main one, 28 ms after
loading on a thread that had ended (the engine's own figure).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def on_passing_thread(build: Callable[[], T]) -> T:
    """``build()`` on a new thread that ends when it returns (its OpenMP pool ends with it): its result,
    or its exception raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix="build") as pool:
        return pool.submit(build).result()
