"""SMC steering, smcserve vs llamppl 0.2.3: the same task, model, dtype and prompt.

    python -m bench.smc [--particles 16] [--tokens 32] [--max-len 5] [--seed 0] [--scheme multinomial]

Task: "words of at most MAX_LEN letters" (a word is a maximal run of ``str.isalpha`` letters), N
particles, at most TOKENS new tokens (EOS ends a particle earlier), temperature 1. Both sides use the
locally optimal ("masked") proposal: the next token is sampled from the LM restricted to the tokens
that keep every word short enough and the weight is multiplied by that mass; both resample with
the same standard scheme when ESS < 0.5·N (llamppl's ``smc_standard`` default).

* smcserve: the full stack (``smcserve serve`` in a subprocess, gRPC client); wall time of one
  ``steer`` call after one warm-up call with another prompt.
* llamppl: llamppl 0.2.3 from PyPI with genlm-backend's HF backend
  (``CachedCausalLM(AsyncTransformer(model, tokenizer))``), in its own virtual environment
  ``bench/.venv-llamppl`` (created and installed on first use; never a project dependency). Wall
  time of ``smc_standard`` after one short warm-up run (4 tokens) with another prompt, LM caches cleared between,
  model loading excluded; building the particles' ``LMContext`` (the prompt's prefill) is timed, as
  the server's prefill is.

Prints one JSON object. log Z is log of the mean final weight (logsumexp(w) − log N) on both sides.
If llamppl cannot be installed or run, ``llamppl_s`` is null and ``llamppl_error`` says why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMPPL_VENV = HERE / ".venv-llamppl"
LLAMPPL_PACKAGES = ["torch==2.13.0", "llamppl==0.2.3"]

PROMPT = "Describe a cat in a few sentences."
WARMUP_PROMPT = "Write about the weather."

# The llamppl side, run with the llamppl venv's python: argv[1] is a JSON object of parameters.
LLAMPPL_SCRIPT = r'''
import asyncio, json, math, sys, time
import numpy as np
import torch

a = json.loads(sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer
from genlm.backend.llm import AsyncTransformer
from llamppl import CachedCausalLM, LMContext, Model, smc_standard
from llamppl.util import logsumexp

tok = AutoTokenizer.from_pretrained(a["model"])
hf = AutoModelForCausalLM.from_pretrained(a["model"], dtype=getattr(torch, a["dtype"]))
hf.to("cpu")
lm = CachedCausalLM(AsyncTransformer(hf, tok))
L = a["max_len"]
EOS = set(int(e) for e in a["eos_ids"])
special = set(tok.all_special_ids) | EOS


def word_stats(s):
    """(all letters, need, rest_max, trail), as smcserve's max_word_length computes them."""
    if not s or s.isalpha():
        return True, len(s), 0, len(s)
    n, i = len(s), 0
    while i < n and s[i].isalpha():
        i += 1
    lead, run, rest = i, 0, 0
    for ch in s[i:]:
        if ch.isalpha():
            run += 1
            rest = max(rest, run)
        else:
            run = 0
    return False, lead, rest, run


STATS = [word_stats("" if i in special else s) for i, s in enumerate(lm.str_vocab)]
# allowed next tokens given the length `run` of the current (unfinished) word
MASKS = {r: set(i for i, (al, need, rest, _) in enumerate(STATS) if need <= L - r and rest <= L) | EOS
         for r in range(L + 1)}


class ShortWords(Model):
    def __init__(self, prompt_ids, max_tokens):
        super().__init__()
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.context = None
        self.run = 0
        self.n = 0

    def immutable_properties(self):
        return {"prompt_ids", "max_tokens"}

    async def start(self):
        # every particle builds its context here (batched by the backend; the prefill is timed)
        self.context = await LMContext.create(lm, tok.decode(self.prompt_ids))
        assert self.context.tokens == self.prompt_ids, "prompt tokenisation differs"

    async def step(self):
        # locally optimal proposal: restrict to allowed tokens, weight *= their mass
        await self.observe(self.context.mask_dist(MASKS[self.run]), True)
        t = (await self.sample(self.context.next_token())).token_id
        self.n += 1
        if t in EOS:
            self.finish()
            return
        al, need, rest, trail = STATS[t]
        ok = (self.run + need <= L) if al else (self.run + need <= L and rest <= L)
        self.run = self.run + need if al else trail
        self.condition(ok)  # never False with the mask; kept as the exact check
        if self.n >= self.max_tokens:
            self.finish()

    def text(self):
        ids = self.context.tokens[len(self.prompt_ids):]
        return tok.decode(ids, skip_special_tokens=True)


async def run(prompt_ids, seed, tokens):
    np.random.seed(seed)
    lm.clear_cache()
    t0 = time.perf_counter()
    particles = await smc_standard(ShortWords(prompt_ids, tokens), a["particles"],
                                   ess_threshold=a["ess_threshold"], resampling_method=a["scheme"])
    return time.perf_counter() - t0, particles


asyncio.run(run(a["warmup_prompt_ids"], a["seed"] + 1, 4))  # short warm-up: llamppl is slow here
elapsed, particles = asyncio.run(run(a["prompt_ids"], a["seed"], a["tokens"]))
w = np.array([p.weight for p in particles], dtype=float)
log_z = float(logsumexp(w) - math.log(len(particles))) if np.any(w > -np.inf) else float("-inf")
best = int(np.argmax(w))
print("LLAMPPL_RESULT " + json.dumps({
    "seconds": elapsed, "log_z": log_z, "particles": len(particles),
    "live": int(np.sum(w > -np.inf)), "example": particles[best].text(),
    "threads": torch.get_num_threads(), "torch": torch.__version__}))
'''


def ensure_llamppl_venv() -> Path:
    """Create bench/.venv-llamppl with llamppl 0.2.3 and CPU torch the first time; its python."""
    py = LLAMPPL_VENV / "bin" / "python"
    marker = LLAMPPL_VENV / ".installed"
    if marker.exists() and marker.read_text().strip() == " ".join(LLAMPPL_PACKAGES):
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMPPL_VENV)], check=True)
    # torch first and pinned, so that llamppl/genlm-backend never pull another (CUDA) build
    for pkgs in (["torch==2.13.0"], LLAMPPL_PACKAGES):
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(pkgs)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    r = subprocess.run([str(py), "-c", "import torch, sys; sys.exit(torch.version.cuda is not None)"])
    if r.returncode != 0:
        raise RuntimeError("the llamppl venv has a CUDA build of torch; expected the CPU wheel")
    marker.write_text(" ".join(LLAMPPL_PACKAGES))
    return py


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def measure_llamppl(args, model_path: Path, dtype: str, prompt_ids, warmup_ids, eos_ids) -> dict:
    py = ensure_llamppl_venv()
    params = {
        "model": str(model_path),
        "dtype": dtype,
        "max_len": args.max_len,
        "tokens": args.tokens,
        "particles": args.particles,
        "seed": args.seed,
        "scheme": args.scheme,
        "ess_threshold": args.ess_threshold,
        "prompt_ids": prompt_ids,
        "warmup_prompt_ids": warmup_ids,
        "eos_ids": eos_ids,
    }
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [str(py), "-c", LLAMPPL_SCRIPT, json.dumps(params)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=args.llamppl_timeout,
    )
    for line in r.stdout.splitlines():
        if line.startswith("LLAMPPL_RESULT "):
            return json.loads(line[len("LLAMPPL_RESULT ") :])
    raise RuntimeError(f"llamppl script exited with {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")


def measure_smcserve(args, dtype: str, threads: int) -> dict:
    from smcserve.client import Client
    from smcserve.loadtest.server_process import ServeProcess

    potentials = [{"kind": "max_word_length", "max_len": args.max_len}]
    kw = dict(
        particles=args.particles,
        max_tokens=args.tokens,
        potentials=potentials,
        scheme=args.scheme,
        ess_threshold=args.ess_threshold,
    )
    serve_args = ["--dtype", dtype] + (["--threads", str(threads)] if threads else [])
    with ServeProcess(*serve_args) as server, Client(server.address) as client:
        client.wait_ready()
        client.steer(messages=[{"role": "user", "content": WARMUP_PROMPT}], seed=args.seed + 1, **kw)
        t0 = time.perf_counter()
        res = client.steer(messages=[{"role": "user", "content": PROMPT}], seed=args.seed, **kw)
        elapsed = time.perf_counter() - t0
    live = [p for p in res.particles if p.weight > 0]
    best = max(res.particles, key=lambda p: p.weight)
    return {
        "seconds": elapsed,
        "log_z": res.log_z,
        "status": res.status,
        "particles": len(res.particles),
        "live": len(live),
        "example": best.text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheme", default="multinomial", choices=["multinomial", "stratified", "systematic", "residual"])
    ap.add_argument("--ess-threshold", type=float, default=0.5)
    ap.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (same on both sides)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the smcserve workers (0: all cores)")
    ap.add_argument("--llamppl-timeout", type=float, default=1800)
    ap.add_argument("--skip-llamppl", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from smcserve.engine.model import resolve_dtype, resolve_model_path

    model_path = resolve_model_path(None)
    dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids, warmup_ids = chat_ids(tokenizer, PROMPT), chat_ids(tokenizer, WARMUP_PROMPT)
    try:  # EOS as the engine takes it: generation_config's ids and the tokenizer's
        gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        gen_eos = None
    gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    eos = sorted({int(i) for i in [*gen_eos, tokenizer.eos_token_id] if i is not None})

    out: dict = {
        "task": f"words of at most {args.max_len} letters",
        "prompt": PROMPT,
        "model": str(model_path),
        "dtype": dtype,
        "N": args.particles,
        "tokens": args.tokens,
        "seed": args.seed,
        "scheme": args.scheme,
        "ess_threshold": args.ess_threshold,
        "proposal": "masked (locally optimal)",
        "threads": args.threads or torch.get_num_threads(),
    }

    s = measure_smcserve(args, dtype, args.threads)
    out.update(
        smcserve_s=s["seconds"],
        smcserve_log_z=s["log_z"],
        smcserve_status=s["status"],
        smcserve_particles=s["particles"],
        smcserve_live=s["live"],
        smcserve_example=s["example"],
    )

    out.update(llamppl_s=None, llamppl_log_z=None, speedup=None)
    if args.skip_llamppl:
        out["llamppl_error"] = "skipped (--skip-llamppl)"
    else:
        try:
            lp = measure_llamppl(args, model_path, dtype, prompt_ids, warmup_ids, eos)
            out.update(
                llamppl_s=lp["seconds"],
                llamppl_log_z=lp["log_z"],
                llamppl_particles=lp["particles"],
                llamppl_live=lp["live"],
                llamppl_example=lp["example"],
                llamppl_threads=lp["threads"],
                llamppl_torch=lp["torch"],
                speedup=lp["seconds"] / s["seconds"],
            )
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            out["llamppl_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
