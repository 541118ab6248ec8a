"""``--num-speculative-tokens auto`` and ``--speculative-max-batch auto``: how many tokens to draft and up
to how many running sequences self-speculative decoding pays on this machine, measured rather than assumed.

A speculative step (k drafts per sequence, one forward over k+1 positions each) yields on average the
heads' accepted length L_k = 1 + a_1 + ... + a_k tokens per sequence, a_j being depth j's acceptance on
held-out prompts (``smcserve mtp train`` measures it and keeps it in the heads' file), where a plain step
yields 1. So speculation pays at batch B while ratio(B), a speculative step's wall time over a plain
one's on the same sequences, is below L_k. That ratio is the CPU's: on our AMX Xeon a 3-position
forward cost about a 1-position one (ratio 1.37 at B = 1: speculation paid for a single stream only);
on a 2-vCPU AVX2 EPYC its BLAS reads the weights half as fast for 3 columns as for 2 and drafting costs a
third of a plain step (ratio ~1.6 at B = 1 against L_2 ~1.5: it pays at no batch). :func:`resolve` times
ratio(B) for B = 1, 2, 4, ... on the model and heads the workers load (the steps ``bench.mtp`` times),
stops at the first B where speculation does not pay and answers the largest B before it (0: never).
With k auto it first times ratio_k(1) for every depth k of the heads and drafts the k that yields the
most tokens per unit of time for a single stream, L_k / ratio_k(1) (:func:`choose_k`): on the EPYC above,
k = 1 (1.35 tokens for 1.22 steps) where k = 2 yields 1.43 for 1.89. Like ``--dtype auto`` it is decided
once, in the launcher, and cached per machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smcserve.engine.config import DEFAULT_NUM_SPECULATIVE_TOKENS, DEFAULT_SPECULATIVE_MAX_BATCH
from smcserve.engine.dtype import BUSY, CpuLoad, cpu_name, machine_cache

log = logging.getLogger(__name__)

CACHE_FILE = "speculation-choice.json"
BATCHES = (1, 2, 4, 8, 16, 32, 64)  # timed in turn until speculation stops paying
REPS = 5  # alternated speculative and plain steps per batch size; the fastest of each is compared


@dataclass(frozen=True)
class SpecChoice:
    k: int  # tokens drafted per step (as given, or chosen)
    max_batch: int  # speculate while a step has at most this many sequences (0: never)
    reason: str
    ratios: dict[int, float] = field(default_factory=dict)  # speculative / plain step time (at k), by batch size
    single_by_k: dict[int, float] = field(default_factory=dict)  # with k auto: ratio at batch 1 for each k


NO_BATCH = "at no batch size (plain decoding)"


def plural(n: int, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def accepted_length(acceptance_per_depth: list[float], k: int) -> float:
    """Tokens a speculative step yields per sequence with k drafts: 1 + the acceptance of depths 1..k (a
    depth's drafts count as accepted only after every earlier depth's were, so each a_j is already the
    probability that the first j drafts all pass)."""
    return 1.0 + sum(acceptance_per_depth[:k])


def choose_k(single_by_k: Mapping[int, float], acceptance_per_depth: list[float]) -> int:
    """The number of drafts that yields the most tokens per unit of time for one sequence: the k maximising
    L_k / ratio_k(1) over the timed ks (``single_by_k``: k → a speculative step's cost at batch 1 in plain
    steps), the smaller k on a tie; also where none pays (the limit is then 0: nothing drafts)."""
    return max(sorted(single_by_k), key=lambda k: accepted_length(acceptance_per_depth, k) / single_by_k[k])


def pays_up_to(ratios: Mapping[int, float], accepted: float) -> int:
    """The largest batch size B such that speculation pays (ratio < ``accepted``) at every timed size up to B."""
    best = 0
    for b in sorted(ratios):
        if ratios[b] >= accepted:
            break
        best = b
    return best


def step_cost_ratios(
    lm, heads, k: int, prompts: list[list[int]], batches=BATCHES, reps: int = REPS, until: float | None = None
) -> dict[int, float]:
    """A speculative step's wall time over a plain decode step's at each batch size (the sequences are
    ``prompts``, repeated as needed, with their KV in place), stopping after the first ratio ≥ ``until``."""
    from smcserve.engine.block_manager import BlockManager
    from smcserve.engine.model_runner import ModelRunner
    from smcserve.engine.sampling import SamplingParams
    from smcserve.engine.speculative import SpecSeq, SpeculativeDecoder

    out: dict[int, float] = {}
    for B in batches:
        batch = [prompts[i % len(prompts)] for i in range(B)]
        blocks = B * (-(-(max(len(p) for p in batch) + k + 8) // 16) + 1)
        dec = SpeculativeDecoder(ModelRunner(lm, blocks, 16), BlockManager(blocks, 16), heads, k, lm.eos_token_ids, B)
        seqs = [SpecSeq(p, SamplingParams(temperature=0.0, max_tokens=k + 2)) for p in batch]
        dec.prefill_many(seqs)  # prompt KV, first token, hidden states
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(reps + 1):  # the first round plans the forwards' row counts (engine/few_rows.py)
            for spec in (False, True):
                starts = [s.table.num_tokens for s in seqs]
                t0 = time.perf_counter()
                if spec:
                    drafts = dec.spec.draft([(s.hidden, s.tokens, s.params, k) for s in seqs])
                    items = [dec._append(s.table, [s.output[-1], *d.tokens]) for s, d in zip(seqs, drafts)]
                    dec.runner.forward_all(items)[0].argmax(-1)
                else:
                    items = [dec._append(s.table, [s.output[-1]]) for s in seqs]
                    dec.runner.forward(items).argmax(-1)
                times[spec].append(time.perf_counter() - t0)
                for s, n in zip(seqs, starts):
                    dec.bm.truncate(s.table, n)
        out[B] = round(min(times[True][1:]) / min(times[False][1:]), 3)
        if until is not None and out[B] >= until:
            break
    return out


def heldout_prompts(lm, n: int) -> list[list[int]]:
    """The first ``n`` shipped held-out instruction prompts, as the model's chat prompts."""
    from smcserve.engine.mtp_train import encode_prompt, instruction_prompts

    return [encode_prompt(lm.tokenizer, t) for t in instruction_prompts("heldout")[:n]]


def cache_key(model_path: Path, heads: Path, k: int | None, dtype: str, quantization: str, threads: int) -> str:
    from smcserve.engine.model import model_fingerprint

    st, weights = heads.stat(), model_fingerprint(Path(model_path), torch.float32)
    return (
        f"{cpu_name()}|torch {torch.__version__}|threads {threads}|{weights}|"
        f"{heads.stem} heads {st.st_size}/{st.st_mtime_ns}|k {'auto' if k is None else k}|{dtype}|{quantization}"
    )


def resolve(
    model_path: Path,
    style: str,
    k: int | None,
    dtype: str,
    quantization: str,
    threads: int,
    *,
    cache_path: Path | None = None,
    ratios_fn: Callable[..., dict[int, float]] | None = None,
    load_probe: Callable[[], CpuLoad] | None = None,
) -> SpecChoice:
    """The measured ``--speculative-max-batch`` (and with ``k`` None, ``--num-speculative-tokens``) for
    these heads, model settings and thread count: from the cache, else timed and cached. ``ratios_fn(k,
    accepted, batches)`` replaces :func:`step_cost_ratios` in tests, ``load_probe`` the CPU-load probe
    (timings taken while other processes kept the CPU busy are used once, not cached). Heads without a
    held-out acceptance (trained before it was measured) get the defaults, with the reason."""
    from smcserve.engine.model import cache_dir, load_model
    from smcserve.engine.mtp import load_heads, read_metadata

    path = Path(model_path) / "mtp" / f"{style}.safetensors"
    meta = read_metadata(path)
    depths = meta["spec"].depths
    acceptance = meta["info"].get("acceptance_per_depth")
    if not acceptance:
        given = min(DEFAULT_NUM_SPECULATIVE_TOKENS, depths) if k is None else k
        reason = (
            f"the defaults (k = {given}, max batch {DEFAULT_SPECULATIVE_MAX_BATCH}): the heads {path} carry no "
            "held-out acceptance (trained before `smcserve mtp train` measured it); retrain them or pass numbers"
        )
        log.warning("speculation: %s", reason)
        return SpecChoice(given, DEFAULT_SPECULATIVE_MAX_BATCH, reason)
    cache_path = Path(cache_path) if cache_path is not None else cache_dir() / CACHE_FILE
    key = cache_key(model_path, path, k, dtype, quantization, threads)
    with machine_cache(cache_path) as entries:  # one process of a machine measures; the others read its answer
        hit = entries.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("max_batch"), int) and isinstance(hit.get("k"), int):
            ratios = {int(b): r for b, r in hit.get("ratios", {}).items()}
            single = {int(j): r for j, r in hit.get("single_by_k", {}).items()}
            reason = f"{hit.get('reason', '')} [cached {hit.get('measured_at', '')}]"
            return SpecChoice(hit["k"], hit["max_batch"], reason, ratios, single)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with (load_probe or CpuLoad)() as load:
                t0 = time.perf_counter()
                measure = ratios_fn
                if measure is None:
                    lm = load_model(str(model_path), dtype, threads, quantization)
                    heads = load_heads(lm, path, style)
                    prompts = heldout_prompts(lm, 8)

                    def measure(j, accepted, batches):
                        return step_cost_ratios(lm, heads, j, prompts, batches, until=accepted)

                single: dict[int, float] = {}
                if k is None:  # every depth at batch 1, then the best one's sweep
                    for j in range(1, depths + 1):
                        single[j] = measure(j, accepted_length(acceptance, j), (1,))[1]
                    k = choose_k(single, acceptance)
                accepted = accepted_length(acceptance, k)
                ratios = {1: single[k]} if single else {}
                if not ratios or ratios[1] < accepted:
                    rest = [b for b in BATCHES if b not in ratios]
                    ratios.update(measure(k, accepted, tuple(rest)))
                took = time.perf_counter() - t0
        finally:
            torch.set_num_threads(saved)
        max_batch = pays_up_to(ratios, accepted)
        shown = ", ".join(f"{b}: {r:.2f}" for b, r in sorted(ratios.items()))
        reason = (
            f"measured: a speculative step (k = {k}) costs {{{shown}}} plain steps by batch size and yields "
            f"{accepted:.2f} tokens (the heads' held-out acceptance), so it pays "
            + (f"up to {max_batch} {plural(max_batch, 'sequence')}" if max_batch else NO_BATCH)
        )
        if single:
            options = ", ".join(
                f"k = {j}: {accepted_length(acceptance, j):.2f} tokens for {r:.2f}" for j, r in sorted(single.items())
            )
            reason += f"; k = {k} yields the most per plain step's time for one sequence ({options})"
        reason += f" on {cpu_name()}, {threads} {plural(threads, 'thread')}, other load {load.others:.0%}"
        if load.others > BUSY:
            reason += "; the CPU was busy while timing: not cached, measured again at the next start"
            log.warning("speculation k %d, max batch %d: %s", k, max_batch, reason)
            return SpecChoice(k, max_batch, reason, ratios, single)
        log.info("speculation k %d, max batch %d: %s; measured in %.1f s", k, max_batch, reason, took)
        entries[key] = {
            "k": k,
            "max_batch": max_batch,
            "reason": reason,
            "ratios": {str(b): r for b, r in ratios.items()},
            "single_by_k": {str(j): r for j, r in single.items()},
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return SpecChoice(k, max_batch, reason, ratios, single)
