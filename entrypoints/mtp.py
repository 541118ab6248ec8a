"""``smcserve mtp train``: self-distil the served model's MTP heads (engine/mtp_train.py) and save them
next to the converted model (``<model dir>/mtp/<style>.safetensors``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    t = parser
    t.add_argument("action", choices=["train"], help="train: self-distil MTP heads for the model (resumable)")
    from smcserve.engine.mtp import DEFAULT_DEPTHS, DEFAULT_WINDOW, STYLES
    from smcserve.engine.mtp_train import TrainConfig

    d = TrainConfig()
    t.add_argument("--model", default=None, help="the default model, or a local Hugging Face model directory")
    t.add_argument(
        "--style", choices=STYLES, default="deepseek", help="deepseek: chained depths; gloeckle: heads on h0"
    )
    t.add_argument("--depths", type=int, default=DEFAULT_DEPTHS, help="extra prediction depths (drafts per step)")
    t.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="positions a head's block attends over")
    t.add_argument(
        "--features",
        type=_layer_list,
        default=None,
        help="deepseek: trunk layers whose outputs depth 1 also reads, e.g. 8,16,24 (EAGLE-3's fused features);"
        " default: after a quarter, half and three quarters of the layers; none: h0 only",
    )
    t.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (a resumed run continues to this many)")
    t.add_argument("--batch", type=int, default=d.batch, help="windows per step")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (cosine decay)")
    t.add_argument("--completions", type=int, default=d.completions, help="sampled completions per training prompt")
    t.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per sampled completion")
    t.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help="tokens the heads draft from; 0: all")
    t.add_argument(
        "--depth1-share",
        type=_share,
        default=d.depth1_share,
        help="share of the schedule in which depth 1 trains alone before every depth does (0: all from the start)",
    )
    t.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="wall-time budget, corpus included (the learning rate anneals by steps or time, whichever is"
        " further; 0: steps only)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the corpus and the windows")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--work", type=Path, default=None, help="corpus and checkpoint folder (default: MODEL/mtp/work)")
    t.add_argument("--output", type=Path, default=None, help="heads file (default: MODEL/mtp/STYLE.safetensors)")
    t.set_defaults(func=run_train)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a share from 0 up to (not including) 1, got {text!r}")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"layer counts separated by commas, e.g. 8,16,24; got {text!r}") from None


HELDOUT_PROMPTS = 8  # held-out prompts the trained heads' acceptance is measured on (32 greedy tokens each)


def run_train(args) -> int:
    from smcserve.engine.model import load_model
    from smcserve.engine.mtp import MTPSpec, default_features
    from smcserve.engine.mtp_train import TrainConfig, instruction_prompts, train

    lm = load_model(args.model, "float32", args.threads)
    features = args.features
    if features is None:  # the default: deepseek heads read mid-layer features, gloeckle heads cannot
        features = default_features(lm.config.num_hidden_layers) if args.style == "deepseek" else ()
    spec = MTPSpec(args.style, args.depths, args.window, features)
    cfg = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        completions=args.completions,
        max_tokens=args.max_tokens,
        draft_vocab=args.draft_vocab,
        depth1_share=args.depth1_share,
        minutes=args.minutes,
        seed=args.seed,
    )
    heldout = instruction_prompts("heldout")[:HELDOUT_PROMPTS]
    result = train(lm, spec, cfg, args.work or lm.path / "mtp" / "work", args.output, heldout=heldout)
    print(
        json.dumps(
            {
                "heads": str(result.path),
                "style": spec.style,
                "depths": spec.depths,
                "features": list(spec.features),
                "steps": result.steps,
                "loss_per_depth": [round(v, 3) for v in result.losses],
                "corpus_tokens": result.corpus_tokens,
                "train_minutes": round(result.train_minutes, 2),
                "heldout_acceptance_per_depth": result.acceptance_per_depth,
            }
        )
    )
    return 0
