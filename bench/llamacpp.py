"""smcserve vs llama.cpp on the same weights, threads and prompts (issue 12 §2).

    python -m bench.llamacpp [--threads N] [--tokens 64] [--batch-tokens 64] [--quick]
                             [--omp-wait-policy passive|active|unset]

llama.cpp is built from source, never downloaded as a binary: the sdist of ``llama-cpp-python``
(PyPI, pinned below) vendors llama.cpp's tree, and its ``llama-server`` and ``llama-bench`` targets
are built with cmake (Release, ``GGML_NATIVE=ON``, no curl/openssl). The same tree's
``convert_hf_to_gguf.py`` turns our converted HF directory into an fp32 GGUF; the wheel's original
Q4_1 GGUF is measured alongside. Everything is cached under ``~/.cache/smcserve/llamacpp/``, so only
the first run builds (10-20 min on 2 cores).

Measured, one side at a time (never two at once), with the same thread count everywhere, and the
same ``OMP_WAIT_POLICY`` (default ``passive``): llama.cpp and torch both run on libgomp, whose
default lets a thread waiting at a barrier spin; on a machine with more runnable threads than
cores (a shared 2-vCPU VM) a spinning thread holds the core its partner needs, and llama.cpp's
barrier after every graph node (hundreds per token) then costs ~a scheduler slice each: llama-bench
and llama-server alike ran 10-100x slower than with ``passive``, by an amount that followed the
load, which is why llama-server once measured far below an earlier llama-bench.

* single stream, a 46-token prompt (the chat template of ``bench.timing.PROMPT``) and a
  1,024-token raw prompt, greedy, EOS ignored: TTFT (client side: request sent → first token) and
  decode tokens/s (first token → last). llama.cpp: ``llama-server -np 1`` streaming ``/completion``
  with the prompt as token ids (``cache_prompt: false``); smcserve in-process: ``ModelRunner``
  prefill + one greedy decode step per token (as ``bench.engine``); these sides interleaved run by
  run (a server idles while the other side runs). smcserve gRPC: the full stack, after
  (``bench.overhead``'s way, ``--no-prefix-cache``).
* aggregate decode tokens/s of 16 and 64 sequences: ``llama-server -np N`` (continuous batching)
  driven by N concurrent streaming clients, counted over the window in which all N decode (last
  client's first token → first client's last token); our engine's batched decode step
  (``bench.engine.ours``: N sequences forked from the prompt); and one SMC request of 64 particles
  through gRPC (tokens of the steering steps / their time, from the progress stream).
* ``llama-bench`` pp/tg figures for both GGUFs (``llamacpp_server_vs_llama_bench_tg`` checks the
  server's single stream against them).
* a profile of our decode step at batch 1 and 64 (torch.profiler): the share of linear, attention,
  KV write, other ops, Python overhead and sampling, and the step against its GEMMs alone.

Prints one JSON object, the issue's summary first (``llamacpp_decode_tok_s``,
``smcserve_decode_tok_s``, ``single_stream_ratio``, ``llamacpp_np64_tok_s``, ``smcserve_b64_tok_s``,
``batch64_ratio``, ``dtype_chosen``: what ``--dtype auto`` picks here; the figures are in ``--dtype``,
float32 by default, as the GGUF), then every side's figures and the targets: single-stream decode
≥ 1.0× llama.cpp (fp32), 64 sequences ≥ 2× llama.cpp ``-np 64`` (fp32).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
WAIT_POLICIES = ("passive", "active", "unset")
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


def _blocks(ids: list[int], n: int, tokens: int) -> int:
    return n * (-(-(len(ids) + tokens) // 16) + 1) + 64


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_single(servers: dict[str, LlamaServer], lm, ps: dict[int, list[int]], tokens: int, runs: int) -> dict:
    """Single stream, the sides interleaved run by run: each llama-server (started beforehand) streams
    one completion, then our engine decodes the same prompt greedily, then the next prompt. An idle
    server or engine costs no CPU (OMP_WAIT_POLICY=passive), so a change in the machine's load falls
    on every side alike. Also the CPU time each side spends per generated token (its process's, the
    prompt's prefill included): unlike tokens/s, it hardly depends on what else the machine runs.
    Run 0 (8 tokens) is a warm-up."""
    from bench.engine import ours

    sides = [*servers, "engine"]
    figs: dict[str, dict[int, list[tuple[float, float, float]]]] = {k: {p: [] for p in ps} for k in sides}
    for run in range(runs + 1):
        n_tok = tokens if run else 8
        for plen, ids in ps.items():
            for side, srv in servers.items():
                c0 = proc_cpu_s(srv.proc.pid)
                r = asyncio.run(_stream_many(srv.url, [ids], n_tok))[0]
                f = single_stream_figures(r)
                cpu = (proc_cpu_s(srv.proc.pid) - c0) / f["tokens"]
                figs[side][plen].append((f["ttft_ms"], f["decode_tok_s"], cpu))
            ttft_ms = engine_ttft(lm, ids) * 1e3
            c0 = time.process_time()
            tps = ours(lm, ids, n_tok, 1, _blocks(ids, 1, n_tok), temperature=0.0)["tps"]
            figs["engine"][plen].append((ttft_ms, tps, (time.process_time() - c0) / n_tok))
    out: dict[str, dict] = {}
    for side, by_len in figs.items():
        out[side] = {}
        for plen, fs in by_len.items():
            out[side][f"ttft_ms_{plen}"] = statistics.median(f[0] for f in fs[1:])
            out[side][f"decode_tok_s_b1_{plen}"] = statistics.median(f[1] for f in fs[1:])
        out[side]["cpu_ms_per_token_b1"] = statistics.median(f[2] for f in by_len[min(ps)][1:]) * 1e3
    return out


def measure_batch(bindir: Path, ggufs: dict[str, Path], threads: int, lm, ids: list[int], bt: int) -> dict[str, dict]:
    """Aggregate decode of 16 and 64 sequences: ``llama-server -np N`` (continuous batching) per GGUF,
    then our engine's batched step (N sequences forked from the prompt, sampled at T=1), one after
    the other for each N."""
    from bench.engine import ours

    out: dict[str, dict] = {k: {} for k in [*ggufs, "engine"]}
    for n in (16, 64):
        for side, gguf in ggufs.items():
            with LlamaServer(bindir, gguf, threads, n, n * (len(ids) + bt + 16)) as srv:
                asyncio.run(_stream_many(srv.url, [ids] * n, 4))  # warm-up
                agg = aggregate_decode(asyncio.run(_stream_many(srv.url, [ids] * n, bt)))
            out[side][f"decode_tok_s_b{n}"] = agg["tok_s"]
            out[side][f"window_b{n}"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in agg.items()}
        ours(lm, ids, 3, n, _blocks(ids, n, 3))
        r = ours(lm, ids, bt, n, _blocks(ids, n, bt))
        out["engine"][f"decode_tok_s_b{n}"] = r["tps"]
        out["engine"][f"step_ms_b{n}"] = r["step_s"] * 1e3
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


# ops by what they do in a decode step (self CPU time; sampling is timed on its own)
OP_KINDS = {
    "linear": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_weight_int8pack_mm"),
    "attention": (
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::index_select",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_softmax",
    ),
    "kv_write": ("aten::index_put_", "aten::_index_put_impl_"),
}


def _median_s(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_step(lm, ids: list[int], n: int, top: int = 5) -> dict:
    """Where a decode step's time goes at batch ``n``: the ops of one profiled forward (torch.profiler)
    by self time, grouped into linear / attention (KV gather + SDPA) / KV write / other ops; Python
    overhead = that forward's wall time − all its ops' self time (which also holds the profiler's
    own cost per op, and any time the process waited for a core); sampling timed on its own (greedy
    at batch 1, T=1 at batch > 1, as measured above). Shares are of profiled forward + sampling.
    ``step_vs_gemm_bound``: the unprofiled step (median of 3) / its GEMMs alone, as ``bench.engine``."""
    from torch.profiler import ProfilerActivity, profile

    from bench.engine import gemm_bound
    from smcserve.decode.loop import append_tokens
    from smcserve.engine.block_manager import BlockManager, BlockTable
    from smcserve.engine.model_runner import ModelRunner, SeqBatchItem
    from smcserve.engine.sampling import SamplingParams, sample_tokens

    nb = n * (-(-(len(ids) + 16) // 16) + 1) + 16
    bm, runner = BlockManager(nb, 16), ModelRunner(lm, nb, 16)
    root = BlockTable()
    for _ in ids:
        bm.append_slot(root)
    runner.forward([SeqBatchItem(ids, 0, root.blocks)])
    tables = [bm.fork(root) for _ in range(n)]
    last = [ids[-1]] * n

    def step():
        return runner.forward(append_tokens(bm, runner, tables, last))

    logits = step()  # warm-up
    forward_s = _median_s(step)
    params = [SamplingParams(temperature=0.0 if n == 1 else 1.0, seed=i) for i in range(n)]
    positions = [len(ids) + 8] * n
    sample_tokens(logits, params, positions)
    sampling_s = _median_s(lambda: sample_tokens(logits, params, positions))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        profiled_s = time.perf_counter() - t0
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops_s = sum(e.self_cpu_time_total for e in rows) / 1e6
    kinds = {k: 0.0 for k in OP_KINDS} | {"other_ops": 0.0}
    for e in rows:
        kind = next((k for k, names in OP_KINDS.items() if e.key in names), "other_ops")
        kinds[kind] += e.self_cpu_time_total / 1e6
    kinds["python_overhead"] = max(0.0, profiled_s - ops_s)
    kinds["sampling"] = sampling_s
    step_s = profiled_s + sampling_s
    gemm_s = gemm_bound(lm, n)
    out = {
        "step_ms": round(step_s * 1e3, 2),
        "forward_ms": round(forward_s * 1e3, 2),
        "forward_profiled_ms": round(profiled_s * 1e3, 2),
        "op_calls": sum(e.count for e in rows),
        "ms": {k: round(v * 1e3, 2) for k, v in kinds.items()},
        "share": {k: round(v / step_s, 3) for k, v in kinds.items()},
        "gemm_bound_ms": round(gemm_s * 1e3, 2),
        "step_vs_gemm_bound": round((forward_s + sampling_s) / gemm_s, 3),
        "top_ops": [
            {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in rows[:top]
        ],
    }
    for t in tables:
        bm.free_table(t)
    return out


def profile_steps(lm, ids: list[int], batches=(1, 64)) -> dict:
    return {f"b{n}": profile_step(lm, ids, n) for n in batches}


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
    ``grpc`` also ``smc64_tok_s``); ``meta`` has ``threads``, ``cpu``, ``short``/``long`` prompt lengths,
    ``dtype_chosen`` and whatever else should be reported as is. The issue's summary keys come first."""
    short, long_ = meta["short"], meta["long"]
    d: dict = {}
    sides = {"llamacpp_f32": "llamacpp_f32", "llamacpp_q4_1": "llamacpp_q4_1", "engine": "smcserve_engine"}
    sides["grpc"] = "smcserve_grpc"
    for src, name in sides.items():
        side = m.get(src) or {}
        if f"decode_tok_s_b1_{short}" in side:
            d[f"{name}_decode_tok_s_b1"] = _r(side[f"decode_tok_s_b1_{short}"])
        if f"decode_tok_s_b1_{long_}" in side:
            d[f"{name}_decode_tok_s_b1_after_{long_}"] = _r(side[f"decode_tok_s_b1_{long_}"])
        for plen, key in ((short, "ttft_ms_46"), (long_, "ttft_ms_1024")):
            if f"ttft_ms_{plen}" in side:
                d[f"{name}_{key}"] = _r(side[f"ttft_ms_{plen}"])
        for n in (16, 64):
            if f"decode_tok_s_b{n}" in side:
                d[f"{name}_decode_tok_s_b{n}"] = _r(side[f"decode_tok_s_b{n}"])
        for k, v in side.items():
            if k.startswith(("window_", "step_ms_", "smc64_", "cpu_ms_")) and k != "smc64_tok_s":
                d[f"{name}_{k}"] = _r(v)
        if "smc64_tok_s" in side:
            d["smc64_tok_s"] = _r(side["smc64_tok_s"])

    def ratio(a: str, b: str):
        return round(d[a] / d[b], 3) if d.get(a) and d.get(b) else None

    out: dict = {
        "llamacpp_decode_tok_s": d.get("llamacpp_f32_decode_tok_s_b1"),
        "smcserve_decode_tok_s": d.get("smcserve_engine_decode_tok_s_b1"),
        "single_stream_ratio": ratio("smcserve_engine_decode_tok_s_b1", "llamacpp_f32_decode_tok_s_b1"),
        "llamacpp_np64_tok_s": d.get("llamacpp_f32_decode_tok_s_b64"),
        "smcserve_b64_tok_s": d.get("smcserve_engine_decode_tok_s_b64"),
        "batch64_ratio": ratio("smcserve_engine_decode_tok_s_b64", "llamacpp_f32_decode_tok_s_b64"),
        "dtype_chosen": meta.get("dtype_chosen"),
    }
    out |= {k: v for k, v in meta.items() if k not in ("short", "long", "dtype_chosen")}
    out["prompt_tokens"] = [short, long_]
    out |= d
    # CPU time per token, llama.cpp's / ours (> 1: we spend less CPU per token); robust to load
    out["single_stream_cpu_ratio"] = ratio("llamacpp_f32_cpu_ms_per_token_b1", "smcserve_engine_cpu_ms_per_token_b1")
    out["ratio_single_stream_grpc"] = ratio("smcserve_grpc_decode_tok_s_b1", "llamacpp_f32_decode_tok_s_b1")
    out["ratio_b16"] = ratio("smcserve_engine_decode_tok_s_b16", "llamacpp_f32_decode_tok_s_b16")
    out["ratio_smc64_vs_b64"] = ratio("smc64_tok_s", "llamacpp_f32_decode_tok_s_b64")
    out["ratio_single_stream_vs_q4_1"] = ratio("smcserve_engine_decode_tok_s_b1", "llamacpp_q4_1_decode_tok_s_b1")
    out["ratio_b64_vs_q4_1"] = ratio("smcserve_engine_decode_tok_s_b64", "llamacpp_q4_1_decode_tok_s_b64")
    # llama-bench's tg (no HTTP, no server loop): the check on llama-server's single-stream figure
    tg = next((v for k, v in (meta.get("llamacpp_f32_bench") or {}).items() if k.startswith("tg")), None)
    b1, srv = out["smcserve_decode_tok_s"], out["llamacpp_decode_tok_s"]
    out["ratio_single_stream_vs_llama_bench_tg"] = round(b1 / tg, 3) if b1 and tg else None
    out["llamacpp_server_vs_llama_bench_tg"] = round(srv / tg, 3) if srv and tg else None
    targets = (("single_stream", TARGET_SINGLE, "single_stream_ratio"), ("b64", TARGET_B64, "batch64_ratio"))
    out["targets"] = {
        name: {"target": t, "ratio": out[key], "holds": None if out[key] is None else out[key] >= t}
        for name, t, key in targets
    }
    out["notes"] = NOTES
    return out


NOTES = [
    "llama.cpp figures: llama-server streaming /completion measured at the client (TTFT: request → "
    "first token; decode: first → last token), the prompt sent as token ids, greedy, ignore_eos, "
    "cache_prompt off; llama-bench's own pp/tg figures are under llamacpp_*_bench and "
    "llamacpp_server_vs_llama_bench_tg checks the server against them.",
    "llamacpp_f32 reads the fp32 GGUF made by llama.cpp's convert_hf_to_gguf.py from our HF directory "
    "(the same weights smcserve reads, in fp32); llamacpp_q4_1 reads the wheel's original Q4_1 GGUF "
    "(4-bit weights, ~7x fewer bytes per step) and is shown alongside, not used for the targets.",
    "Single stream: llama.cpp (f32, Q4_1) and our engine (ModelRunner prefill + greedy decode steps, "
    "as bench.engine) interleaved run by run, medians of the runs; smcserve_grpc: the full stack after. "
    "*_cpu_ms_per_token_b1: the side's process CPU time per generated token (46-token prompt, its "
    "prefill included); single_stream_cpu_ratio = llama.cpp's / ours, the figure least moved by load.",
    "b16/b64: llama-server -np N with N concurrent streaming clients (private copies of the same "
    "46-token prompt), counted over the window in which all N decode; smcserve_engine: one batched "
    "decode step per token of N sequences forked from that prompt (bench.engine), sampled at T=1; "
    "smc64: one steering request of 64 particles through gRPC, no potential.",
    "OMP_WAIT_POLICY (omp_wait_policy) is set for every side (llama.cpp and torch both use libgomp): "
    "under the default, a thread waiting at a barrier spins, and on a machine with more runnable "
    "threads than cores each of llama.cpp's ~hundreds of barriers per token (torch's parallel "
    "regions likewise) can cost a scheduler slice: 10-100x slower, varying with the load.",
    "llama.cpp runs with weight repacking off (--no-repack / --repack 0): its AMX path for Q4_1 "
    "segfaults here (ggml_backend_amx_mul_mat); fp32 weights are not repacked either way.",
    "Same thread count on every side (llama -t/-tb, torch threads, serve --threads); the sides run one "
    "after another, never at once; timings on a shared machine are noisy (load_* keys).",
]


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory (default: the SmolLM2 wheel's, converted)")
    p.add_argument("--dtype", default="float32", help="smcserve's dtype (default float32, as the f32 GGUF)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on every side (default: all cores)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per single stream (default 64; --quick 16)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per sequence at b16/b64 (default 64)")
    p.add_argument("--runs", type=int, default=None, help="single-stream runs, median (default 3; --quick 1)")
    p.add_argument("--jobs", type=int, default=2, help="parallel jobs of the llama.cpp build")
    p.add_argument(
        "--omp-wait-policy",
        choices=WAIT_POLICIES,
        default="passive",
        help="OMP_WAIT_POLICY for every side (default passive; 'unset': libgomp's default, spinning)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: few tokens, one run")
    p.add_argument("--skip", default="", help="comma list of sides to skip: q4_1,grpc,profile,bench")
    return p


def set_wait_policy(policy: str) -> None:
    """libgomp reads OMP_WAIT_POLICY once, when it loads: before torch is imported here, and in the
    environment every llama.cpp process and the gRPC server inherit."""
    if "torch" in sys.modules:
        log("torch is already imported: OMP_WAIT_POLICY applies to the llama.cpp and gRPC processes only")
    if policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    set_wait_policy(args.omp_wait_policy)
    tokens = args.tokens or (16 if args.quick else 64)
    bt = args.batch_tokens or (12 if args.quick else 64)
    runs = args.runs or (1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    load_start = loadavg()
    cache = llamacpp_cache()
    cache.mkdir(parents=True, exist_ok=True)
    build = ensure_build(cache, args.jobs)
    bindir = Path(build.pop("bin"))

    from smcserve.engine.model import load_model, resolve_dtype_choice, resolve_model_path

    hf_dir = resolve_model_path(args.model)
    f32, convert_s = ensure_f32_gguf(cache, hf_dir)
    ggufs = {"llamacpp_f32": f32}
    if "q4_1" not in skip:
        ggufs["llamacpp_q4_1"] = ensure_q4_gguf(cache)
    auto = resolve_dtype_choice("auto", hf_dir, args.threads)
    lm = load_model(args.model, args.dtype, threads=args.threads)
    ps = prompts(lm.tokenizer)
    short, long_ = min(ps), max(ps)
    log(f"single stream, interleaved: {', '.join(ggufs)}, engine")
    with contextlib.ExitStack() as stack:
        servers = {
            side: stack.enter_context(LlamaServer(bindir, g, args.threads, 1, long_ + tokens + 64))
            for side, g in ggufs.items()
        }
        m = measure_single(servers, lm, ps, tokens, runs)
    bench: dict = {}
    if "bench" not in skip:  # right after the servers' single stream, under the load they had
        log("llama-bench")
        bench = {f"{side}_bench": llama_bench(bindir, g, args.threads, ps, tokens) for side, g in ggufs.items()}
    log("16 and 64 sequences")
    for side, figs in measure_batch(bindir, ggufs, args.threads, lm, ps[short], bt).items():
        m[side].update(figs)
    if "grpc" not in skip:
        log("smcserve through gRPC")
        m["grpc"] = measure_grpc(args.model, args.dtype, args.threads, ps, lm.tokenizer, tokens, bt, runs)
    meta = {
        "dtype_chosen": auto.dtype,
        "dtype_chosen_reason": auto.reason,
        "model": args.model or "smollm2-135m-instruct",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": args.threads,
        "omp_wait_policy": args.omp_wait_policy,
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
        **bench,
    }
    if "profile" not in skip:
        log("torch.profiler of one decode step")
        meta["profile"] = profile_steps(lm, ps[short])
    meta["load_avg_start"] = load_start
    meta["load_avg_end"] = loadavg()
    meta["run_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(assemble(m, meta), indent=2))


if __name__ == "__main__":
    main()
