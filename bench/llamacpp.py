"""smcserve vs llama.cpp on the same weights, threads and prompts (issue 12 §2).

    python -m bench.llamacpp [--threads N] [--tokens 64] [--batch-tokens 64] [--quick]

llama.cpp is built from source, never downloaded as a binary: the sdist of ``llama-cpp-python``
(PyPI, pinned below) vendors llama.cpp's tree, and its ``llama-server`` and ``llama-bench`` targets
are built with cmake (Release, ``GGML_NATIVE=ON``, no curl/openssl). The same tree's
``convert_hf_to_gguf.py`` turns our converted HF directory into an fp32 GGUF; the wheel's original
Q4_1 GGUF is measured alongside. Everything is cached under ``~/.cache/smcserve/llamacpp/``, so only
the first run builds (10-20 min on 2 cores).

Measured, one side at a time (never two at once), with the same thread count everywhere:

* single stream, a 46-token prompt (the chat template of ``bench.timing.PROMPT``) and a
  1,024-token raw prompt, greedy, EOS ignored: TTFT (client side: request sent → first token) and
  decode tokens/s (first token → last). llama.cpp: ``llama-server -np 1`` streaming ``/completion``
  with the prompt as token ids (``cache_prompt: false``); smcserve in-process: ``ModelRunner``
  prefill + one decode step per token (as ``bench.engine``); smcserve gRPC: the full stack
  (``bench.overhead``'s way, ``--no-prefix-cache``).
* aggregate decode tokens/s of 16 and 64 sequences: ``llama-server -np N`` (continuous batching)
  driven by N concurrent streaming clients, counted over the window in which all N decode (last
  client's first token → first client's last token); our engine's batched decode step
  (``bench.engine.ours``: N sequences forked from the prompt); and one SMC request of 64 particles
  through gRPC (tokens of the steering steps / their time, from the progress stream).
* ``llama-bench`` pp/tg figures for both GGUFs, for reference.

Prints one JSON object with the ratios against the issue's targets: single-stream decode ≥ 1.0×
llama.cpp (fp32), 64 sequences ≥ 2× llama.cpp ``-np 64`` (fp32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp's source tree
SRC_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp"
TARGETS = ("llama-server", "llama-bench")
TARGET_SINGLE = 1.0  # smcserve single-stream decode / llama.cpp
TARGET_B64 = 2.0  # smcserve 64-sequence decode / llama.cpp -np 64
LONG_PROMPT_TOKENS = 1024
# Weight repacking is off on every llama.cpp run: with GGML_NATIVE on a CPU with AMX, the repacked
# (AMX) Q4_1 matmul dies with SIGSEGV in ggml_backend_amx_mul_mat on this VM; fp32 is not repacked.
LONG_TEXT = (
    "The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed the "
    "spiral stairs to light the lamp. Ships passed far out at sea; gulls circled the tower; the tide "
    "rose and fell against the stones. In winter the storms came from the north and the keeper wrote "
    "in his logbook about the wind, the rain, the waves and the boats that sheltered in the harbour. "
)


def log(msg: str) -> None:
    print(f"[bench.llamacpp] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Build, convert, locate


def llamacpp_cache() -> Path:
    from smcserve.engine.model import cache_dir

    return cache_dir() / "llamacpp"


def ensure_build(cache: Path, jobs: int = 2) -> dict:
    """``llama-server`` and ``llama-bench`` built from the sdist's vendored tree (once)."""
    bindir = cache / "build" / "bin"
    info_path = cache / "build.json"
    if all((bindir / t).exists() for t in TARGETS):
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return {**info, "bin": str(bindir), "cached": True}
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: needed to build llama.cpp (apt-get install cmake g++)")
    t0 = time.perf_counter()
    src = cache / SRC_DIR
    if not src.exists():
        sdist_dir = cache / "sdist"
        sdist_dir.mkdir(parents=True, exist_ok=True)
        if not list(sdist_dir.glob("*.tar.gz")):
            log(f"downloading the sdist of {LLAMA_CPP_PYTHON}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q"]
                + [LLAMA_CPP_PYTHON, "-d", str(sdist_dir)],
                check=True,
            )
        with tarfile.open(next(sdist_dir.glob("*.tar.gz"))) as tf:
            tf.extractall(cache, filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"building {', '.join(TARGETS)} from {src} (-j{jobs}; 10-20 min on 2 cores)")
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(cache / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release"]
        + ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
        + ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        check=True,
        stdout=sys.stderr,
    )
    subprocess.run(
        ["cmake", "--build", str(cache / "build"), f"-j{jobs}", "--target", *TARGETS], check=True, stdout=sys.stderr
    )
    info = {"source": LLAMA_CPP_PYTHON + " sdist, vendor/llama.cpp", "build_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return {**info, "bin": str(bindir), "cached": False}


def ensure_f32_gguf(cache: Path, hf_dir: Path) -> tuple[Path, float]:
    """Our converted HF directory as an fp32 GGUF, by llama.cpp's own converter (once)."""
    out = cache / f"{hf_dir.name}-f32.gguf"
    if out.exists():
        return out, 0.0
    t0 = time.perf_counter()
    pydeps = cache / "pydeps"  # the converter imports sentencepiece even for BPE vocabularies
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        if not (pydeps / "sentencepiece").exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pydeps), "sentencepiece"],
                check=True,
            )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pydeps), os.environ.get("PYTHONPATH")]))}
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [sys.executable, str(cache / SRC_DIR / "convert_hf_to_gguf.py"), str(hf_dir)]
        + ["--outtype", "f32", "--outfile", str(tmp)],
        check=True,
        env=env,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )
    os.replace(tmp, out)
    return out, time.perf_counter() - t0


def ensure_q4_gguf(cache: Path) -> Path:
    """The wheel's original Q4_1 GGUF (the file our HF directory was dequantised from)."""
    from smcserve.engine.model import DEFAULT_GGUF, DEFAULT_WHEEL

    out = cache / DEFAULT_GGUF
    if out.exists():
        return out
    wheel_dir = cache / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if not list(wheel_dir.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEFAULT_WHEEL, "-d", str(wheel_dir)],
            check=True,
        )
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF))
        tmp = out.with_suffix(".tmp")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------
# Prompts


def prompts(tokenizer) -> dict[int, list[int]]:
    """{46: the chat template of PROMPT, 1024: raw text}; the long one round-trips through decode."""
    from bench.timing import PROMPT

    short = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    reps = LONG_PROMPT_TOKENS // len(tokenizer.encode(LONG_TEXT, add_special_tokens=False)) + 2
    ids = tokenizer.encode(LONG_TEXT * reps, add_special_tokens=False)[:LONG_PROMPT_TOKENS]
    # the gRPC side sends text: keep a prefix whose text encodes back to exactly these ids
    while tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) != ids:
        ids = ids[:-1]
    return {len(short): list(short), len(ids): ids}


# ---------------------------------------------------------------------------------------------------
# llama.cpp: llama-server driven by streaming clients, and llama-bench


class LlamaServer:
    def __init__(self, bindir: Path, gguf: Path, threads: int, parallel: int, ctx: int):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [str(bindir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        self.cmd += ["-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx), "--no-webui"]
        self.cmd += ["--no-repack"]  # the AMX repack path segfaults here (see above)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LlamaServer:
        import urllib.request

        self.log = open(llamacpp_cache() / "llama-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 120 s")
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _stream_one(session, url: str, ids: list[int], tokens: int) -> dict:
    """One streaming /completion: arrival time and token count of each chunk."""
    body = {
        "prompt": ids,
        "n_predict": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "return_tokens": True,
    }
    t0 = time.perf_counter()
    events: list[tuple[float, int]] = []
    timings = None
    async with session.post(url + "/completion", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            msg = json.loads(line[5:])
            n = len(msg.get("tokens") or [])
            if n:
                events.append((time.perf_counter(), n))
            if msg.get("stop"):
                timings = msg.get("timings")
    return {"t0": t0, "events": events, "timings": timings}


async def _stream_many(url: str, prompts_: list[list[int]], tokens: int) -> list[dict]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(_stream_one(session, url, p, tokens) for p in prompts_))


def single_stream_figures(r: dict) -> dict:
    ev = r["events"]
    n = sum(k for _, k in ev)
    first, last = ev[0][0], ev[-1][0]
    return {
        "ttft_ms": (first - r["t0"]) * 1e3,
        "decode_tok_s": (n - ev[0][1]) / (last - first),
        "tokens": n,
    }


def aggregate_decode(results: list[dict]) -> dict:
    """Tokens/s of N streams over the window in which all of them decode: from the last stream's
    first token to the first stream's last token (falls back to the whole span if that is empty)."""
    a = max(r["events"][0][0] for r in results)
    b = min(r["events"][-1][0] for r in results)
    whole = False
    if b <= a:
        whole = True
        a = min(r["events"][0][0] for r in results)
        b = max(r["events"][-1][0] for r in results)
    n = sum(k for r in results for t, k in r["events"] if a < t <= b)
    return {"tok_s": n / (b - a), "window_s": b - a, "window_tokens": n, "whole_span": whole}


def measure_llamacpp(bindir: Path, gguf: Path, threads: int, ps: dict[int, list[int]], tokens: int, bt: int, runs: int):
    out: dict = {}
    long_len = max(ps)
    with LlamaServer(bindir, gguf, threads, 1, long_len + tokens + 64) as srv:
        for plen, ids in ps.items():
            asyncio.run(_stream_many(srv.url, [ids], 8))  # warm-up
            figs = [single_stream_figures(asyncio.run(_stream_many(srv.url, [ids], tokens))[0]) for _ in range(runs)]
            out[f"ttft_ms_{plen}"] = statistics.median(f["ttft_ms"] for f in figs)
            out[f"decode_tok_s_b1_{plen}"] = statistics.median(f["decode_tok_s"] for f in figs)
    short = ps[min(ps)]
    for n in (16, 64):
        with LlamaServer(bindir, gguf, threads, n, n * (len(short) + bt + 16)) as srv:
            asyncio.run(_stream_many(srv.url, [short] * n, 4))  # warm-up
            agg = aggregate_decode(asyncio.run(_stream_many(srv.url, [short] * n, bt)))
            out[f"decode_tok_s_b{n}"] = agg["tok_s"]
            out[f"window_b{n}"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in agg.items()}
    return out


def llama_bench(bindir: Path, gguf: Path, threads: int, ps: dict[int, list[int]], tokens: int) -> dict:
    """llama-bench's own pp (prompt processing) and tg (generation) tokens/s."""
    cmd = [str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "2", "-o", "json", "--repack", "0"]
    cmd += ["-p", ",".join(str(k) for k in sorted(ps)), "-n", str(tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = {}
    for row in json.loads(r.stdout):
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key + "_tok_s"] = round(row["avg_ts"], 2)
    return out


# ---------------------------------------------------------------------------------------------------
# smcserve: the in-process engine and the gRPC stack


def engine_ttft(lm, ids: list[int]) -> float:
    """Seconds from nothing to the first token: prefill of ``ids`` over paged KV + one sample."""
    from smcserve.engine.block_manager import BlockManager, BlockTable
    from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
    from smcserve.engine.sampling import SamplingParams, sample_token

    num_blocks = -(-len(ids) // 16) + 4
    bm, runner = BlockManager(num_blocks, 16), ModelRunner(lm, num_blocks, 16)
    table = BlockTable()
    t0 = time.perf_counter()
    for _ in ids:
        bm.append_slot(table)
    logits = runner.forward([SeqBatchItem(ids, 0, table.blocks)])
    sample_token(logits[0], SamplingParams(temperature=0.0), len(ids))
    return time.perf_counter() - t0


def measure_engine(lm, ps: dict[int, list[int]], tokens: int, bt: int, runs: int) -> dict:
    from bench.engine import ours

    def blocks(ids, n, t):
        return n * (-(-(len(ids) + t) // 16) + 1) + 64

    out: dict = {}
    for plen, ids in ps.items():
        engine_ttft(lm, ids)  # warm-up
        out[f"ttft_ms_{plen}"] = statistics.median(engine_ttft(lm, ids) for _ in range(runs)) * 1e3
        ours(lm, ids, 4, 1, blocks(ids, 1, 4))
        out[f"decode_tok_s_b1_{plen}"] = statistics.median(
            ours(lm, ids, tokens, 1, blocks(ids, 1, tokens))["tps"] for _ in range(runs)
        )
    short = ps[min(ps)]
    for n in (16, 64):
        ours(lm, short, 3, n, blocks(short, n, 3))
        r = ours(lm, short, bt, n, blocks(short, n, bt))
        out[f"decode_tok_s_b{n}"] = r["tps"]
        out[f"step_ms_b{n}"] = r["step_s"] * 1e3
    return out


def measure_grpc(model: str | None, dtype: str, threads: int, ps: dict[int, list[int]], tok, tokens, bt, runs) -> dict:
    from bench.timing import PROMPT
    from smcserve.client import Client
    from smcserve.loadtest.server_process import ServeProcess

    args = ["--dtype", dtype, "--threads", str(threads), "--no-prefix-cache"] + (["--model", model] if model else [])
    out: dict = {}
    with ServeProcess(*args) as server, Client(server.address) as client:
        client.wait_ready()
        for plen, ids in ps.items():
            kw = {"messages": [{"role": "user", "content": PROMPT}]} if plen == min(ps) else {"prompt": tok.decode(ids)}
            figs = []
            for i in range(runs + 1):
                t0 = time.perf_counter()
                first = None
                n = n_first = 0
                usage = None
                for r in client.stream(temperature=0.0, max_tokens=tokens, ignore_eos=True, **kw):
                    if r.token_ids and first is None:
                        first, n_first = time.perf_counter(), len(r.token_ids)
                    n += len(r.token_ids)
                    if r.finish_reason:
                        usage = r.usage
                end = time.perf_counter()
                if usage is not None and usage.prompt_tokens != plen:
                    raise RuntimeError(f"gRPC prompt is {usage.prompt_tokens} tokens, expected {plen}")
                if i:
                    figs.append(((first - t0) * 1e3, (n - n_first) / (end - first)))
            out[f"ttft_ms_{plen}"] = statistics.median(f[0] for f in figs)
            out[f"decode_tok_s_b1_{plen}"] = statistics.median(f[1] for f in figs)
        # one SMC request, 64 particles, no potential: the decode rate of its steering steps
        kw = dict(messages=[{"role": "user", "content": PROMPT}], particles=64, max_tokens=bt, ignore_eos=True)
        client.steer(**{**kw, "max_tokens": 4}, seed=1)  # warm-up
        steps: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        res = client.steer(**kw, seed=0, on_progress=lambda p: steps.append((time.perf_counter(), p.step)))
        wall = time.perf_counter() - t0
        total = sum(len(p.token_ids) for p in res.particles)
        if len(steps) >= 3:
            (ta, sa), (tb, sb) = steps[0], steps[-1]
            out["smc64_tok_s"] = 64 * (sb - sa) / (tb - ta)
            out["smc64_how"] = "64 × steering steps / their time (progress stream, first → last step)"
        else:
            out["smc64_tok_s"] = total / wall
            out["smc64_how"] = "generated tokens of all particles / wall time of the call (prefill included)"
        out["smc64_wall_s"] = wall
        out["smc64_tokens"] = total
    return out


def profile_steps(lm, ids: list[int], batches=(1, 64), top: int = 5) -> dict:
    """Top ops by self CPU time of one decode step at each batch size (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from smcserve.decode.loop import append_tokens
    from smcserve.engine.block_manager import BlockManager, BlockTable
    from smcserve.engine.model_runner import ModelRunner, SeqBatchItem

    out = {}
    for n in batches:
        nb = n * (-(-(len(ids) + 8) // 16) + 1) + 16
        bm, runner = BlockManager(nb, 16), ModelRunner(lm, nb, 16)
        root = BlockTable()
        for _ in ids:
            bm.append_slot(root)
        runner.forward([SeqBatchItem(ids, 0, root.blocks)])
        tables = [bm.fork(root) for _ in range(n)]
        last = [ids[-1]] * n
        runner.forward(append_tokens(bm, runner, tables, last))  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.forward(append_tokens(bm, runner, tables, last))
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows) or 1
        out[f"b{n}"] = [
            {
                "op": e.key,
                "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                "share": round(e.self_cpu_time_total / total, 3),
            }
            for e in rows[:top]
        ]
    return out


# ---------------------------------------------------------------------------------------------------
# Report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _r(x):
    return round(x, 2) if isinstance(x, float) else x


def assemble(m: dict, meta: dict) -> dict:
    """The JSON report from raw figures: ``m`` has ``llamacpp_f32``, ``llamacpp_q4_1``, ``engine`` and
    ``grpc`` (dicts of ``ttft_ms_<len>``, ``decode_tok_s_b1_<len>``, ``decode_tok_s_b16``/``b64``;
    ``grpc`` also ``smc64_tok_s``); ``meta`` has ``threads``, ``cpu``, ``short``/``long`` prompt lengths
    and whatever else should be reported as is."""
    short, long_ = meta["short"], meta["long"]
    out: dict = {k: v for k, v in meta.items() if k not in ("short", "long")}
    out["prompt_tokens"] = [short, long_]
    sides = {"llamacpp_f32": "llamacpp_f32", "llamacpp_q4_1": "llamacpp_q4_1", "engine": "smcserve_engine"}
    sides["grpc"] = "smcserve_grpc"
    for src, name in sides.items():
        d = m.get(src) or {}
        if f"decode_tok_s_b1_{short}" in d:
            out[f"{name}_decode_tok_s_b1"] = _r(d[f"decode_tok_s_b1_{short}"])
        if f"decode_tok_s_b1_{long_}" in d:
            out[f"{name}_decode_tok_s_b1_after_{long_}"] = _r(d[f"decode_tok_s_b1_{long_}"])
        for plen, key in ((short, "ttft_ms_46"), (long_, "ttft_ms_1024")):
            if f"ttft_ms_{plen}" in d:
                out[f"{name}_{key}"] = _r(d[f"ttft_ms_{plen}"])
        for n in (16, 64):
            if f"decode_tok_s_b{n}" in d:
                out[f"{name}_decode_tok_s_b{n}"] = _r(d[f"decode_tok_s_b{n}"])
        for k, v in d.items():
            if k.startswith(("window_", "step_ms_", "smc64_")) and k != "smc64_tok_s":
                out[f"{name}_{k}"] = _r(v)
        if "smc64_tok_s" in d:
            out["smc64_tok_s"] = _r(d["smc64_tok_s"])

    def ratio(a: str, b: str):
        return round(out[a] / out[b], 3) if out.get(a) and out.get(b) else None

    out["ratio_single_stream"] = ratio("smcserve_engine_decode_tok_s_b1", "llamacpp_f32_decode_tok_s_b1")
    out["ratio_single_stream_grpc"] = ratio("smcserve_grpc_decode_tok_s_b1", "llamacpp_f32_decode_tok_s_b1")
    out["ratio_b16"] = ratio("smcserve_engine_decode_tok_s_b16", "llamacpp_f32_decode_tok_s_b16")
    out["ratio_b64"] = ratio("smcserve_engine_decode_tok_s_b64", "llamacpp_f32_decode_tok_s_b64")
    out["ratio_smc64_vs_b64"] = ratio("smc64_tok_s", "llamacpp_f32_decode_tok_s_b64")
    out["ratio_single_stream_vs_q4_1"] = ratio("smcserve_engine_decode_tok_s_b1", "llamacpp_q4_1_decode_tok_s_b1")
    out["ratio_b64_vs_q4_1"] = ratio("smcserve_engine_decode_tok_s_b64", "llamacpp_q4_1_decode_tok_s_b64")
    # llama-bench's tg (no HTTP, no server loop): the check on llama-server's single-stream figure
    tg = next((v for k, v in (out.get("llamacpp_f32_bench") or {}).items() if k.startswith("tg")), None)
    b1 = out.get("smcserve_engine_decode_tok_s_b1")
    out["ratio_single_stream_vs_llama_bench_tg"] = round(b1 / tg, 3) if b1 and tg else None
    out["targets"] = {
        "single_stream": {
            "target": TARGET_SINGLE,
            "ratio": out["ratio_single_stream"],
            "holds": None if out["ratio_single_stream"] is None else out["ratio_single_stream"] >= TARGET_SINGLE,
        },
        "b64": {
            "target": TARGET_B64,
            "ratio": out["ratio_b64"],
            "holds": None if out["ratio_b64"] is None else out["ratio_b64"] >= TARGET_B64,
        },
    }
    out["notes"] = [
        "llama.cpp figures: llama-server streaming /completion measured at the client (TTFT: request → "
        "first token; decode: first → last token), the prompt sent as token ids, greedy, ignore_eos, "
        "cache_prompt off; llama-bench's own pp/tg figures are under llamacpp_*_bench.",
        "llamacpp_f32 reads the fp32 GGUF made by llama.cpp's convert_hf_to_gguf.py from our HF directory "
        "(the same weights smcserve reads, in fp32); llamacpp_q4_1 reads the wheel's original Q4_1 GGUF "
        "(4-bit weights, ~7x fewer bytes per step) and is shown alongside, not used for the targets.",
        "b16/b64: llama-server -np N with N concurrent streaming clients (private copies of the same "
        "46-token prompt), counted over the window in which all N decode; smcserve_engine: one batched "
        "decode step per token of N sequences forked from that prompt (bench.engine), sampled at T=1; "
        "smc64: one steering request of 64 particles through gRPC, no potential.",
        "llama.cpp runs with weight repacking off (--no-repack / --repack 0): its AMX path for Q4_1 "
        "segfaults here (ggml_backend_amx_mul_mat); fp32 weights are not repacked either way.",
        "Check llama-server against llama-bench: where its single-stream decode is far below llama-bench's "
        "tg (seen on a loaded 2-core VM: the server's own timings agree with the client's), use "
        "ratio_single_stream_vs_llama_bench_tg rather than ratio_single_stream.",
        "Same thread count on every side (llama -t/-tb, torch threads, serve --threads); the sides run one "
        "after another, never at once; timings on a shared machine are noisy.",
    ]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory (default: the SmolLM2 wheel's, converted)")
    p.add_argument("--dtype", default="float32", help="smcserve's dtype (default float32, as the f32 GGUF)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on every side (default: all cores)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per single stream (default 64; --quick 16)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per sequence at b16/b64 (default 64)")
    p.add_argument("--runs", type=int, default=None, help="single-stream runs, median (default 3; --quick 1)")
    p.add_argument("--jobs", type=int, default=2, help="parallel jobs of the llama.cpp build")
    p.add_argument("--quick", action="store_true", help="a smoke run: few tokens, one run")
    p.add_argument("--skip", default="", help="comma list of sides to skip: q4_1,grpc,profile,bench")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 64)
    bt = args.batch_tokens or (12 if args.quick else 64)
    runs = args.runs or (1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    cache = llamacpp_cache()
    cache.mkdir(parents=True, exist_ok=True)
    build = ensure_build(cache, args.jobs)
    bindir = Path(build.pop("bin"))

    from smcserve.engine.model import load_model, resolve_model_path

    hf_dir = resolve_model_path(args.model)
    f32, convert_s = ensure_f32_gguf(cache, hf_dir)
    lm = load_model(args.model, args.dtype, threads=args.threads)
    ps = prompts(lm.tokenizer)
    short, long_ = min(ps), max(ps)
    m: dict = {}
    log(f"llama.cpp f32: {f32}")
    m["llamacpp_f32"] = measure_llamacpp(bindir, f32, args.threads, ps, tokens, bt, runs)
    if "q4_1" not in skip:
        q4 = ensure_q4_gguf(cache)
        log(f"llama.cpp Q4_1: {q4}")
        m["llamacpp_q4_1"] = measure_llamacpp(bindir, q4, args.threads, ps, tokens, bt, runs)
    log("smcserve in-process engine")
    m["engine"] = measure_engine(lm, ps, tokens, bt, runs)
    if "grpc" not in skip:
        log("smcserve through gRPC")
        m["grpc"] = measure_grpc(args.model, args.dtype, args.threads, ps, lm.tokenizer, tokens, bt, runs)
    meta = {
        "model": args.model or "smollm2-135m-instruct",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": args.threads,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "tokens": tokens,
        "batch_tokens": bt,
        "runs": runs,
        "quick": args.quick,
        "llamacpp_source": build.get("source", LLAMA_CPP_PYTHON + " sdist, vendor/llama.cpp"),
        "llamacpp_build_s": build.get("build_s"),
        "llamacpp_build_cached": build["cached"],
        "f32_convert_s": round(convert_s, 1),
        "short": short,
        "long": long_,
    }
    if "bench" not in skip:
        log("llama-bench")
        meta["llamacpp_f32_bench"] = llama_bench(bindir, f32, args.threads, ps, tokens)
        if "q4_1" not in skip:
            meta["llamacpp_q4_1_bench"] = llama_bench(bindir, ensure_q4_gguf(cache), args.threads, ps, tokens)
    if "profile" not in skip:
        log("torch.profiler of one decode step")
        meta["profile_top5_self_cpu"] = profile_steps(lm, ps[short])
    meta["run_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(assemble(m, meta), indent=2))


if __name__ == "__main__":
    main()
