"""Shared fixtures: a tiny random Llama for fast unit tests, the real model, real Redis, the real stack."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from smcserve.loadtest.server_process import ServeProcess

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SECRET = "tests-cluster-secret"  # the session server's decode workers' secret (SMCSERVE_CLUSTER_SECRET)

# llguidance reports a token it rejects as a Rust error; with RUST_BACKTRACE=1 in the environment each
# one captures a backtrace (~100-300 µs: the whole cost of full-vocabulary grammar checks). Error
# backtraces only (panics keep RUST_BACKTRACE); read at the first capture, so set before any test runs.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the real tokenizer (fast; for unit tests only)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from smcserve.engine.model import resolve_model_path

    real = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(real)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    from smcserve.engine.model import load_model

    return load_model(None, "float32")


@pytest.fixture(scope="session")
def redis_url():
    from smcserve.kvstore import EmbeddedRedis

    server = EmbeddedRedis(maxmemory="512mb")
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def server():
    # a small KV pool (91 blocks of 16 tokens) so that running out of blocks is testable
    env = dict(os.environ, SMCSERVE_CLUSTER_SECRET=CLUSTER_SECRET)  # tests call the decode workers directly too
    srv = ServeProcess(
        "--dtype", "float32", "--max-inflight", "8", "--redis-maxmemory", "256mb", "--kv-cache", "64mb", env=env
    )  # fmt: skip
    yield srv
    srv.stop_cleanly()


@pytest.fixture()
def client(server):
    from smcserve.client import Client

    with Client(server.address) as c:
        yield c


@contextlib.contextmanager
def _in_process_stack(config, num_cpus: int = 2, start_timeout: float = 300, **ray_kw):
    """The real stack (Ray workers, embedded Redis, gRPC) with its scheduler on an event loop in a thread of
    this process, so that a test can reach the scheduler's objects. Starts a local Ray cluster unless one is
    initialised (never one left running on this machine), and shuts down only its own."""
    import asyncio
    import threading

    import ray

    from smcserve.scheduler.stack import RAY_SYSTEM_CONFIG, Stack

    ray_kw.setdefault("_system_config", RAY_SYSTEM_CONFIG)  # workers at nice 0, as a served local cluster's
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="scheduler-loop", daemon=True)
    thread.start()
    own_ray = not ray.is_initialized()
    if own_ray:  # from the main thread
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_kw)
    st = Stack(config)
    try:
        asyncio.run_coroutine_threadsafe(st.start(), loop).result(timeout=start_timeout)
        yield st
    finally:
        asyncio.run_coroutine_threadsafe(st.stop(), loop).result(timeout=120)
        if own_ray:
            ray.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def in_process_stack():
    """``in_process_stack(config, num_cpus=2, start_timeout=300, **ray_init_kwargs)``: a context manager
    giving a started :class:`~smcserve.scheduler.stack.Stack` (see ``_in_process_stack``)."""
    return _in_process_stack
