"""Drive a workload against a running server over the public gRPC API (``grpc.aio``), and ``smcserve bench``.

Each request is sent at its scheduled time (and, with ``max_concurrency``, once a slot is free) on one
shared channel and streamed to the end; every token-bearing response is timestamped on arrival. A run
is bounded in count (``num_requests``) and time (``max_duration``: no request is sent after it, and
requests still in flight ``drain_s`` later are cancelled and counted as incomplete); Ctrl-C stops it the
same way and keeps what was measured. Only loopback addresses are accepted unless ``allow_remote``.

The progress bar counts every outcome as it happens: ``ok``, ``rej`` (RESOURCE_EXHAUSTED), ``err`` (any
other failure) and ``cut`` (incomplete: cancelled when the run stopped), plus ``run`` (in flight). The
result records the client machine (:func:`machine_info`: cores, CPU model, load average at the start and
at the end) — on loopback it is the server's machine too, shared with whatever else runs there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import ipaddress
import os
import platform
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

import aiohttp
import grpc

from smcserve.client.client import channel_credentials
from smcserve.loadtest.backends import BACKENDS, grpc_one, openai_one
from smcserve.loadtest.metrics import DEFAULT_PERCENTILES, RequestRecord, compute_metrics, parse_slo
from smcserve.loadtest.workloads import Workload
from smcserve.protos.messages import DEFAULT_ADDRESS
from smcserve.scheduler.auth import API_KEY_ENV, with_api_key

DECODE_COUNTERS = (
    "requests_served",
    "tokens_generated",
    "prompt_recomputes",
    "prompt_blocks_reused",
    "batch_steps",
    "batched_tokens",
    "particles_imported",
)


# --- target address -----------------------------------------------------------------------------------
def address_host(address: str) -> str | None:
    """The host part of a gRPC target (``None`` for a unix socket)."""
    a = address.strip()
    if "://" in a and not a.startswith("dns:"):  # an HTTP base URL
        return urllib.parse.urlsplit(a).hostname
    if a.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if a.startswith(scheme):
            a = a[len(scheme) :]
            break
    if a.startswith("["):
        return a[1 : a.index("]")] if "]" in a else a[1:]
    if a.count(":") == 1:
        return a.split(":", 1)[0]
    return a  # bare host, or a bare IPv6 address


def is_loopback(address: str) -> bool:
    host = address_host(address)
    if host is None:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def check_address(address: str, allow_remote: bool = False) -> None:
    if not allow_remote and not is_loopback(address):
        raise ValueError(
            f"refusing to load-test {address!r}: not a loopback address (pass --allow-remote "
            "to benchmark a server you are allowed to load)"
        )


# --- the machine ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, else ``platform``), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 min), or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    """The client machine: cores, CPU model, platform; ``loadavg_start`` now (``loadavg_end`` is added
    when the run ends)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": load_average(),
        "loadavg_end": None,
    }


# --- one run ------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    label: str
    records: list[RequestRecord]
    duration_s: float
    stopped_by: str  # "done", "num_requests", "max_duration" (no sends after it, or
    # requests cut off at max_duration + drain) or "interrupted"
    config: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    started_at: str = ""
    machine: dict = field(default_factory=dict)  # machine_info() with loadavg_start / loadavg_end

    def metrics(self, slo: dict | None = None, percentiles=DEFAULT_PERCENTILES) -> dict:
        m = compute_metrics(self.records, self.duration_s, slo, percentiles)
        return {
            "label": self.label,
            "date": self.started_at,
            "stopped_by": self.stopped_by,
            **m,
            "workload": self.config,
            "server": self.server,
            "machine": self.machine,
        }


def _server_summary(info) -> dict:
    out = {
        "model": info.model,
        "fingerprint": info.fingerprint,
        "dtype": info.dtype,
        "block_size": info.block_size,
        "max_context": info.max_context,
        "prefill_workers": len(info.prefill_workers),
        "decode_workers": len(info.decode_workers),
    }
    out["decode_counters"] = {k: sum(getattr(w, k) for w in info.decode_workers) for k in DECODE_COUNTERS}
    return out


async def _model_info(stub, timeout: float = 10.0) -> dict:
    from smcserve.protos import smcserve_pb2 as pb

    try:
        return _server_summary(await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout))
    except grpc.aio.AioRpcError as err:
        return {"error": f"{err.code().name}: {err.details()}"}


async def _http_info(session, timeout: float = 10.0, bar=None) -> dict:
    """The served model, from ``/v1/models`` (ConnectionError when nothing answers)."""
    try:
        async with session.get("/v1/models", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        if bar is not None:
            bar.close()
        raise ConnectionError(f"no HTTP API at {session._base_url} ({err})") from None
    if resp.status != 200:
        return {"error": f"HTTP {resp.status}: {body.get('error', {}).get('message', '')}"}
    return {"model": body["data"][0]["id"], "backend": "openai"}


def ssl_context(tls: bool | str):
    """An SSL context trusting the CA certificate in ``tls`` (a path); None for the system's roots or no TLS."""
    if isinstance(tls, str) and tls:
        import ssl

        return ssl.create_default_context(cafile=tls)
    return None


async def run_workload_async(
    address: str,
    workload: Workload,
    *,
    num_requests: int | None = None,
    max_duration: float | None = None,
    drain_s: float = 30.0,
    request_timeout: float | None = None,
    progress: bool = True,
    label: str = "",
    allow_remote: bool = False,
    connect_timeout: float = 15.0,
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
    tls: bool | str = False,
    backend: str = "grpc",
) -> RunResult:
    """``api_key``: sent as a bearer token on every call (default: ``$SMCSERVE_API_KEY``, if set). ``tls``:
    connect with TLS, trusting the system's roots (True) or the CA certificate in that file. ``backend``:
    ``grpc`` (``address`` HOST:PORT) or ``openai`` (``address`` the HTTP API's base URL)."""
    from smcserve.protos import smcserve_pb2_grpc

    check_address(address, allow_remote)
    stop = stop or asyncio.Event()
    run_id = uuid.uuid4().hex[:8]
    machine = machine_info()
    started_at = _dt.datetime.now().isoformat(timespec="seconds")
    records: list[RequestRecord] = []
    total = workload.num_requests
    if num_requests is not None:
        total = num_requests if total is None else min(total, num_requests)
    bar = _progress_bar(total, label or workload.name, progress)
    counts = {"ok": 0, "rejected": 0, "error": 0, "incomplete": 0}
    in_flight = 0
    sem = asyncio.Semaphore(workload.max_concurrency) if workload.max_concurrency else None

    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    async with contextlib.AsyncExitStack() as exits:
        if backend == "openai":  # the HTTP API at a base URL (http://HOST:PORT)
            ssl = ssl_context(tls)
            session = await exits.enter_async_context(
                aiohttp.ClientSession(
                    address.rstrip("/"),
                    headers={"Authorization": f"Bearer {key}"} if key else None,
                    connector=aiohttp.TCPConnector(limit=0, ssl=ssl if ssl is not None else True),
                )
            )
            server_before = await _http_info(session, connect_timeout, bar)

            def send(spec, rec, request_id):
                return openai_one(session, spec, rec, request_timeout)

        else:
            credentials = channel_credentials(tls)
            if credentials is None:
                opened = grpc.aio.insecure_channel(address, interceptors=with_api_key(key))
            else:
                opened = grpc.aio.secure_channel(address, credentials, interceptors=with_api_key(key))
            channel = await exits.enter_async_context(opened)
            try:
                await asyncio.wait_for(channel.channel_ready(), connect_timeout)
            except asyncio.TimeoutError:
                bar.close()
                raise ConnectionError(f"no server at {address} (waited {connect_timeout:.0f} s)") from None
            stub = smcserve_pb2_grpc.SmcServeStub(channel)
            server_before = await _model_info(stub)

            def send(spec, rec, request_id):
                return grpc_one(stub, spec, rec, request_id, request_timeout)

        async def one(index: int, sched: float, spec) -> None:
            nonlocal in_flight
            rec = RequestRecord(
                index=index,
                kind=spec.kind,
                run=label,
                scheduled_s=sched,
                intended_prompt_tokens=spec.prompt_len,
                max_tokens=spec.max_tokens,
            )
            records.append(rec)
            rec.send_s = time.perf_counter() - start
            in_flight += 1
            try:
                await send(spec, rec, f"bench-{run_id}-{index}")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # anything else still ends the request as a counted error
                rec.end_s = time.perf_counter() - start - rec.send_s
                rec.status, rec.code, rec.message = "error", type(err).__name__, str(err)
            finally:
                in_flight -= 1
                if sem is not None:
                    sem.release()
                counts[rec.status] = counts.get(rec.status, 0) + 1
                bar.update(1)
                bar.set_postfix(progress_postfix(counts, in_flight), refresh=False)

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        send_deadline = start + max_duration if max_duration is not None else None
        hard_deadline = send_deadline + drain_s if send_deadline is not None else None
        stopped_by = "done"
        tasks: set[asyncio.Task] = set()

        async def wait_until(deadline: float | None) -> bool:
            """Sleep until ``deadline`` (perf_counter); False when stopped first."""
            if stop.is_set():
                return False
            if deadline is None:
                return True
            delay = deadline - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            return not stop.is_set()

        for index, (sched, spec) in enumerate(workload):
            if num_requests is not None and index >= num_requests:
                stopped_by = "num_requests"
                break
            if send_deadline is not None and start + sched >= send_deadline:
                stopped_by = "max_duration"
                break
            if not await wait_until(start + sched):
                stopped_by = "interrupted"
                break
            if sem is not None:
                acquired = False
                waiter = loop.create_task(sem.acquire())
                stopper = loop.create_task(stop.wait())
                timeout = None if send_deadline is None else max(0.0, send_deadline - time.perf_counter())
                done, _ = await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if waiter in done:
                    acquired = True
                else:
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
                    if waiter.done() and not waiter.cancelled():
                        sem.release()  # acquired while being cancelled
                if not acquired:
                    stopped_by = "interrupted" if stop.is_set() else "max_duration"
                    break
            task = loop.create_task(one(index, sched, spec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        pending = set(tasks)
        while pending and not stop.is_set():
            timeout = None if hard_deadline is None else hard_deadline - time.perf_counter()
            if timeout is not None and timeout <= 0:
                break
            stopper = loop.create_task(stop.wait())
            done, _ = await asyncio.wait(pending | {stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            pending -= done
        if stop.is_set() and stopped_by != "interrupted":
            stopped_by = "interrupted"
        elif pending and stopped_by != "interrupted":
            stopped_by = "max_duration"  # still running at max_duration + drain: cut off
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        bar.close()
        server_after = await (_http_info(session, connect_timeout) if backend == "openai" else _model_info(stub))

    records.sort(key=lambda r: r.index)
    server = dict(server_after)
    if "decode_counters" in server_before and "decode_counters" in server_after:
        server["decode_counters"] = {
            k: server_after["decode_counters"][k] - server_before["decode_counters"][k] for k in DECODE_COUNTERS
        }
    machine["loadavg_end"] = load_average()
    return RunResult(
        label or workload.name, records, duration, stopped_by, dict(workload.config), server, started_at, machine
    )


def run_workload(address: str, workload: Workload, **kw) -> RunResult:
    """Synchronous :func:`run_workload_async` (its own event loop; Ctrl-C ends the run early, results kept)."""

    async def main() -> RunResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
            installed = True
        try:
            return await run_workload_async(address, workload, stop=stop, **kw)
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())


def progress_postfix(counts: dict, in_flight: int = 0) -> dict:
    """The progress bar's counters: ok, rejected, failed, cut off (cancelled when the run stopped), in flight."""
    return {
        "ok": counts.get("ok", 0),
        "rej": counts.get("rejected", 0),
        "err": counts.get("error", 0),
        "cut": counts.get("incomplete", 0),
        "run": in_flight,
    }


def _progress_bar(total: int | None, desc: str, enabled: bool):
    """tqdm on stderr; when not ``enabled``, the same object with every call a no-op."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True, leave=True, disable=not enabled
    )


# --- smcserve bench -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help=f"server address (loopback only unless --allow-remote); default {DEFAULT_ADDRESS}, "
        "with --backend openai http://127.0.0.1:8000",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="grpc",
        help="the gRPC API, or the OpenAI-compatible HTTP API (/v1/completions, streamed)",
    )
    p.add_argument("--api-key", default=None, help="API key of a server that wants one (default: $SMCSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    p.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA certificate (PEM)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback address")
    p.add_argument(
        "--workload",
        choices=["poisson", "gamma", "concurrency", "sweep", "trace"],
        default=None,
        help="default: trace with --trace, sweep with --rates, else poisson",
    )
    p.add_argument("--rate", type=float, default=1.0, help="requests/s (poisson, gamma); inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape k (1 = Poisson; < 1 burstier)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="concurrency workload: requests kept in flight; other workloads: a cap on those in flight",
    )
    p.add_argument("--rates", default=None, help="sweep: comma-separated rates, one run each (e.g. 0.5,1,2)")
    p.add_argument("--input-len", type=int, default=64, help="synthetic prompts: words (= tokens on SmolLM2)")
    p.add_argument("--trace", default=None, help="Mooncake JSONL trace to replay")
    p.add_argument("--block-tokens", type=int, default=16, help="trace: words per 512-token hash block")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply inter-arrival times")
    p.add_argument("--output-scale", type=float, default=1.0, help="trace: multiply output lengths (min 1)")
    p.add_argument("--slice", default=None, help="trace rows: N (first N), START:STOP, or t=T0:T1 (trace seconds)")
    p.add_argument(
        "--max-blocks",
        type=int,
        default=None,
        help="trace: skip rows of more hash blocks than this (prompts too long for the server)",
    )
    p.add_argument("--salt", default=None, help="trace: block-text salt (default: the seed); a new salt = cold cache")
    p.add_argument("--num-requests", type=int, default=None, help="at most this many (default: 100; trace: all rows)")
    p.add_argument("--max-duration", type=float, default=600.0, help="send nothing after this many seconds")
    p.add_argument("--drain", type=float, default=30.0, help="then wait this long for requests in flight")
    p.add_argument("--request-timeout", type=float, default=None, help="per-request deadline in s (default: none)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="output tokens per request (synthetic: default 16; trace: a cap on the scaled lengths)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's, 1)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (lengths vary)")
    p.add_argument("--smc-ratio", type=float, default=0.0, help="fraction of requests sent as SMC steering (0: none)")
    p.add_argument("--smc-particles", type=int, default=8, help="SMC requests' particles")
    p.add_argument("--smc-max-word-length", type=int, default=8, help="SMC requests' potential: max_word_length")
    p.add_argument("--smc-max-tokens", type=int, default=16, help="cap on SMC requests' output length")
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft=2000,tpot=200 (also e2el=)")
    p.add_argument(
        "--percentiles",
        default=",".join(str(p) for p in DEFAULT_PERCENTILES),
        help="latency percentiles to report (default 90,99)",
    )
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--records", default=None, help="write per-request records (JSONL) here")
    p.add_argument("--plots", default=None, help="write PNG plots into this directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals, prompts and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def workload_kind(args) -> str:
    return args.workload or ("trace" if args.trace else "sweep" if args.rates else "poisson")


def build_workloads(args) -> list[Workload]:
    from smcserve.loadtest import trace as tr
    from smcserve.loadtest.workloads import SmcMix, concurrency_workload, rate_workload, sweep_workloads

    kind = workload_kind(args)
    smc = SmcMix(args.smc_ratio, args.smc_particles, args.smc_max_word_length, args.smc_max_tokens)
    common = dict(seed=args.seed, smc=smc, temperature=args.temperature, ignore_eos=not args.no_ignore_eos)
    num = args.num_requests
    if kind == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace PATH")
        rows = tr.load_trace(args.trace)
        if args.slice or args.max_blocks is not None:
            sel = tr.parse_slice(args.slice) if args.slice else {}
            rows = tr.select_rows(rows, max_blocks=args.max_blocks, **sel)
        if num is not None:
            rows = rows[:num]
        scaling = tr.TraceScaling(
            block_tokens=args.block_tokens,
            time_scale=args.time_scale,
            output_scale=args.output_scale,
            max_output=args.max_tokens,
        )
        salt = args.salt if args.salt is not None else args.seed
        wl = tr.trace_workload(rows, scaling, salt=salt, max_concurrency=args.concurrency, source=args.trace, **common)
        wl.config.update(slice=args.slice, max_blocks=args.max_blocks)
        return [wl]
    synth = dict(
        common, input_len=args.input_len, max_tokens=args.max_tokens or 16, num_requests=num if num is not None else 100
    )
    if kind == "concurrency":
        if not args.concurrency:
            raise ValueError("--workload concurrency needs --concurrency N")
        return [concurrency_workload(args.concurrency, **synth)]
    if kind == "sweep":
        if not args.rates:
            raise ValueError("--workload sweep needs --rates R1,R2,...")
        return sweep_workloads(
            _floats(args.rates), burstiness=args.burstiness, max_concurrency=args.concurrency, **synth
        )
    burstiness = 1.0 if kind == "poisson" else args.burstiness
    return [rate_workload(args.rate, burstiness=burstiness, max_concurrency=args.concurrency, **synth)]


def overload_hint(m: dict) -> str:
    """A warning when requests were cut off or failed (empty when every request completed)."""
    if not m.get("failed"):
        return ""
    parts = []
    if m.get("num_incomplete"):
        parts.append(
            f"{m['num_incomplete']} of {m['num_requests']} requests were still running when the run "
            f"stopped ({m.get('stopped_by', '')}) and were cancelled: the server could not keep up with "
            "the offered load. Offer less: fewer requests (--num-requests, --slice), more time between "
            "them (lower --rate, larger --time-scale), shorter prompts (--block-tokens, --max-blocks, "
            "--input-len), or allow more time (--drain)."
        )
    if m.get("num_rejected"):
        parts.append(f"{m['num_rejected']} requests were rejected (RESOURCE_EXHAUSTED): see 'Rejected' above.")
    if m.get("num_errors"):
        parts.append(f"{m['num_errors']} requests failed: see 'Errors' above.")
    return "warning: " + " ".join(parts)


def bench_main(args) -> int:
    """``smcserve bench``: run, print the summary, write JSON / records / plots as asked."""
    from smcserve.loadtest import report

    try:
        slo = parse_slo(args.slo)
        percentiles = _floats(args.percentiles)
        if args.address is None:
            args.address = "http://127.0.0.1:8000" if args.backend == "openai" else DEFAULT_ADDRESS
        check_address(args.address, args.allow_remote)
        workloads = build_workloads(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep = workload_kind(args) == "sweep"
    results: list[RunResult] = []
    for wl in workloads:
        label = f"rate={wl.config.get('request_rate'):g}" if sweep else wl.name
        try:
            res = run_workload(
                args.address,
                wl,
                num_requests=args.num_requests if wl.name == "trace" else None,
                max_duration=args.max_duration,
                drain_s=args.drain,
                request_timeout=args.request_timeout,
                api_key=args.api_key,
                tls=args.tls_ca or args.tls,
                backend=args.backend,
                progress=not args.no_progress,
                label=label,
                allow_remote=args.allow_remote,
            )
        except ConnectionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        results.append(res)
        m = res.metrics(slo, percentiles)
        print(report.format_summary(m, title=label))
        hint = overload_hint(m)
        if hint:
            print(hint, file=sys.stderr)
        if res.stopped_by == "interrupted":
            break
    runs = [r.metrics(slo, percentiles) for r in results]
    if sweep:
        print(report.format_sweep_table(runs))
    if args.out:
        doc = report.sweep_document(runs) if sweep else runs[0]
        report.write_json(args.out, doc)
        print(f"results: {args.out}", file=sys.stderr)
    if args.records:
        report.write_records(args.records, [rec for r in results for rec in r.records])
        print(f"records: {args.records}", file=sys.stderr)
    if args.plots:
        paths = report.write_plots(args.plots, results, runs, sweep=sweep)
        print("plots: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.runner", description="Load-test a running smcserve server.")
    add_arguments(p)
    return bench_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
