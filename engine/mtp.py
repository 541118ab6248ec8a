"""Multi-token prediction (MTP) heads on a frozen trunk: the drafts of self-speculative decoding.

Two styles over the trunk's last hidden state ``h0`` (before the final norm), sharing the model's
embedding and unembedding (``lm_head``), each head one transformer block (a copy of the trunk's last
layer as initialisation):

- ``deepseek`` (DeepSeek-V3): depth k (1-based; the trunk is depth 0) at position p reads the
  previous depth's hidden state ``h_{k-1}[p]`` and the embedding of token ``x[p+k]`` (RMSNorm both,
  concat, project to d), runs its block and predicts ``x[p+k+1]``. The causal chain is kept: each
  depth knows the tokens drafted before it.
- ``gloeckle`` (Gloeckle et al. 2024): head k reads ``h0`` alone and predicts ``x[p+k+1]``.

With ``features`` (deepseek only), depth 1 also reads the trunk's outputs after those layers (EAGLE-3's
fused features, Li et al. 2025): each RMSNormed, concatenated and projected to d, added to its input
projection (zero-initialised, so training starts from the plain head). The trunk then hands the heads a
row per position of [h0, the outputs after each listed layer] (``ModelRunner.features``) instead of h0.

The heads predict over a draft vocabulary, the corpus's most frequent tokens (``vocab``; as in
FR-Spec, Zhao et al. 2025): on a CPU the unembedding is the bulk of a head's cost, and a draft
outside it is merely one the verifier would rarely accept. Each block attends over a sliding
window of ``window`` positions, in training and drafting alike, so drafting needs only the last
``window`` trunk hidden states of a sequence (the heads keep no KV cache of their own).
Heads are saved as safetensors in ``<model dir>/mtp/`` with the fingerprint of the weights they were
trained on; :func:`load_heads` refuses heads trained for other weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smcserve.engine.few_rows import columns_faster
from smcserve.engine.model import LoadedModel, model_fingerprint
from smcserve.engine.quant import columns_product

STYLES = ("deepseek", "gloeckle")
DEFAULT_DEPTHS = 3
DEFAULT_WINDOW = 32


def default_features(layers: int) -> tuple[int, ...]:
    """``smcserve mtp train``'s features for a trunk of ``layers`` layers: the outputs after a quarter, half
    and three quarters of them (EAGLE-3's low, middle and high features; h0, after the last, is read anyway).
    SmolLM2-135M (30 layers): 8, 15, 23."""
    return tuple(sorted({n for n in (int(layers * i / 4 + 0.5) for i in (1, 2, 3)) if 1 <= n < layers}))


class HeadsMismatch(ValueError):
    """Heads trained for other weights (or another shape) than the loaded model's."""


@dataclass(frozen=True)
class MTPSpec:
    style: str = "deepseek"
    depths: int = DEFAULT_DEPTHS
    window: int = DEFAULT_WINDOW
    features: tuple[int, ...] = ()  # trunk layers (1-based: the output after that many) depth 1 also reads

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(int(n) for n in self.features))  # (a JSON list)
        if self.features and self.style != "deepseek":
            raise ValueError("features: only deepseek heads read mid-layer features")
        if any(n < 1 for n in self.features) or len(set(self.features)) != len(self.features):
            raise ValueError(f"features: distinct layer counts ≥ 1, got {list(self.features)}")
        if self.style not in STYLES:
            raise ValueError(f"style: must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.depths < 1:
            raise ValueError(f"depths: must be ≥ 1, got {self.depths}")
        if self.window < 1:
            raise ValueError(f"window: must be ≥ 1, got {self.window}")


def weights_fingerprint(lm: LoadedModel) -> str:
    """The identity of the weights heads are trained on (fp32, unquantised: one set of heads serves every dtype)."""
    return model_fingerprint(lm.path, torch.float32)


def heads_path(lm: LoadedModel, style: str) -> Path:
    """Where ``smcserve mtp train`` saves heads (a subfolder: the model's own ``*.safetensors`` glob
    decides its fingerprint, so the heads must not sit next to them)."""
    return lm.path / "mtp" / f"{style}.safetensors"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def window_mask(n: int, window: int, valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Causal sliding-window mask ``[B or 1, 1, n, n]``: query i sees keys j with i - window < j ≤ i
    (and ``valid[b, j]``, for left-padded rows); on ``valid``'s device (else ``device``)."""
    device = valid.device if valid is not None else device
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    mask = (j <= i) & (i - j < window)
    mask = mask[None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
        # a padded query attends to itself (no NaN)
        mask = mask | torch.eye(n, dtype=torch.bool, device=device)[None, None]
    return mask


def block_forward(
    layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, last: int = 0
):
    """One decoder layer (the trunk's module layout: llama, mistral, qwen2/3) on ``x`` [B, T, d]; with
    ``last``, the outputs of the last ``last`` positions only (every position still gives its key and value:
    a draft's last depth needs one query, not the window's)."""
    a = layer.self_attn
    B, T, _ = x.shape
    D = a.head_dim
    h = layer.input_layernorm(x)
    k = a.k_proj(h).view(B, T, -1, D)
    v = a.v_proj(h).view(B, T, -1, D)
    if last:
        x, h, mask = x[:, -last:], h[:, -last:], mask[..., -last:, :]
    Q = x.shape[1]
    q = a.q_proj(h).view(B, Q, -1, D)
    if hasattr(a, "q_norm"):
        q, k = a.q_norm(q), a.k_norm(k)
    q = (q * cos[:, -Q:] + _rotate_half(q) * sin[:, -Q:]).transpose(1, 2)
    k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
    x = x + a.o_proj(o.transpose(1, 2).reshape(B, Q, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class MTPHeads(nn.Module):
    """``spec.depths`` extra prediction heads for ``model`` (an HF causal LM whose embedding, rotary
    embedding, final norm and ``lm_head`` are shared, not copied: they are not parameters of this module)."""

    def __init__(self, model: nn.Module, spec: MTPSpec):
        super().__init__()
        self.spec = spec
        inner = model.model
        d = model.config.hidden_size
        self.shared = _Shared(inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head)
        self.blocks = nn.ModuleList(copy.deepcopy(inner.layers[-1]) for _ in range(spec.depths))
        self.out_norms = nn.ModuleList(copy.deepcopy(inner.norm) for _ in range(spec.depths))
        if spec.style == "deepseek":
            self.h_norms = nn.ModuleList(copy.deepcopy(inner.norm) for _ in range(spec.depths))
            self.e_norms = nn.ModuleList(copy.deepcopy(inner.norm) for _ in range(spec.depths))
            self.projs = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(spec.depths))
            with torch.no_grad():
                for p in self.projs:  # start as the sum of the two normed inputs
                    p.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], dim=1))
        if spec.features:
            layers = model.config.num_hidden_layers
            if max(spec.features) >= layers:
                raise ValueError(f"features: layer counts below the trunk's {layers} (its last is h0)")
            self.f_norms = nn.ModuleList(copy.deepcopy(inner.norm) for _ in spec.features)
            self.f_proj = nn.Linear(len(spec.features) * d, d, bias=False)
            nn.init.zeros_(self.f_proj.weight)
        self.d = d
        self.register_buffer("vocab", torch.arange(model.config.vocab_size))  # draft vocabulary (token ids)
        self._unembed: torch.Tensor | None = None
        ref = next(model.parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    def set_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict the drafts to ``token_ids`` (ascending)."""
        self.vocab = torch.as_tensor(token_ids, dtype=torch.long, device=self.vocab.device).sort().values
        self._unembed = None

    def unembed(self) -> torch.Tensor:
        """The rows of the shared unembedding for the draft vocabulary [V', d] (frozen; cached)."""
        if self._unembed is None or self._unembed.shape[0] != self.vocab.numel():
            self._unembed = self.shared.lm_head.weight.detach()[self.vocab]
        return self._unembed

    # --- one depth -----------------------------------------------------------------------------
    def depth_hidden(
        self, k: int, prev: torch.Tensor, next_tokens: torch.Tensor | None, mask: torch.Tensor, last: int = 0
    ) -> torch.Tensor:
        """Depth ``k`` (0-based) over [B, T] positions: ``prev`` the trunk's (gloeckle) or the previous
        depth's (deepseek) hidden states, ``next_tokens`` the tokens ``x[p+k+1]`` (deepseek only); ``last``:
        the hidden states of the last ``last`` positions only."""
        if self.spec.style == "deepseek":
            h, mids = prev[..., : self.d], prev[..., self.d :]  # depth 1 with features: [h0, mid-layer outputs]
            e = self.shared.embed(next_tokens).to(prev.dtype)
            x = self.projs[k](torch.cat([self.h_norms[k](h), self.e_norms[k](e)], dim=-1))
            if k == 0 and self.spec.features:
                parts = mids.split(self.d, dim=-1)
                x = x + self.f_proj(torch.cat([n(m) for n, m in zip(self.f_norms, parts)], dim=-1))
        else:
            x = prev
        positions = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.shared.rotary(x, positions)
        return block_forward(self.blocks[k], x, cos[:, :, None], sin[:, :, None], mask, last)

    def logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Depth ``k``'s logits over the draft vocabulary (index i is token ``vocab[i]``)."""
        x, w = self.out_norms[k](h), self.unembed()
        if x.dim() == 2 and not torch.is_grad_enabled() and columns_faster(w, x.shape[0]):  # drafting
            return columns_product(x, w, None).float()
        return F.linear(x, w).float()

    def trunk_logits(self, h0: torch.Tensor) -> torch.Tensor:
        """The trunk's own next-token logits from its hidden states ``h0`` (or feature rows, h0 first), over
        the draft vocabulary (the targets of self-distillation)."""
        return F.linear(self.shared.norm(h0[..., : self.d]), self.unembed()).float()

    # --- drafting ------------------------------------------------------------------------------
    @torch.inference_mode()
    def draft(
        self, h0: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, pick, depths: int | None = None
    ) -> list[list[int]]:
        """Draft ``depths`` tokens per row (default: every depth; the depths beyond do not run).

        ``h0`` [B, W, d]: trunk hidden states of the last W positions p (left-padded, ``valid`` [B, W]);
        ``tokens`` [B, W]: the token after each, ``x[p+1]`` (the last column is the token just decided).
        ``pick(k, logits [B, V']) -> LongTensor [B]`` chooses depth k's draft (an index into ``vocab``:
        argmax, or a sample).
        """
        mask = window_mask(h0.shape[1], self.spec.window, valid)
        prev, toks, drafts = h0, tokens, []
        depths = self.spec.depths if depths is None else depths
        for k in range(depths):
            # depth k at p needs x[p+k+1]: shift in the drafts so far (the last column gets the newest)
            if self.spec.style == "deepseek" and k > 0:
                toks = torch.cat([toks[:, 1:], drafts[-1][:, None]], dim=1)
            # the next deepseek depth reads this one's whole window; otherwise only the last position counts
            chained = self.spec.style == "deepseek" and k + 1 < depths
            h = self.depth_hidden(k, prev, toks, mask, last=0 if chained else 1)
            drafts.append(self.vocab[pick(k, self.logits(k, h[:, -1]))])
            if self.spec.style == "deepseek":
                prev = h
        return torch.stack(drafts, dim=1).tolist()


class _Shared:
    """The trunk's modules the heads use but do not own (kept out of ``state_dict`` and ``parameters``)."""

    def __init__(self, embed: nn.Module, rotary: nn.Module, norm: nn.Module, lm_head: nn.Module):
        self.embed, self.rotary, self.norm, self.lm_head = embed, rotary, norm, lm_head


# --- saving and loading ----------------------------------------------------------------------------
def save_heads(heads: MTPHeads, lm: LoadedModel, path: Path | None = None, **info) -> Path:
    """Write ``heads`` (fp32 safetensors) with their spec, the weights' fingerprint and ``info``."""
    from safetensors.torch import save_file

    path = Path(path) if path is not None else heads_path(lm, heads.spec.style)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v if k == "vocab" else v.detach().float().contiguous() for k, v in heads.state_dict().items()}
    meta = {"fingerprint": weights_fingerprint(lm), "spec": json.dumps(asdict(heads.spec)), "info": json.dumps(info)}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "fingerprint": meta.get("fingerprint", ""),
        "spec": MTPSpec(**json.loads(meta.get("spec", "{}"))),
        "info": json.loads(meta.get("info", "{}")),
    }


def check_heads(model_path: Path, style: str = "deepseek", k: int = 1, path: Path | None = None) -> MTPSpec:
    """The spec of the heads at ``path`` (default ``model_path/mtp/<style>.safetensors``) after checking that
    they exist, were trained for these weights and have at least ``k`` depths; :class:`HeadsMismatch` (a
    ValueError, with what to do) otherwise. Reads only the metadata (``smcserve serve`` checks before its
    workers start)."""
    path = Path(path) if path is not None else Path(model_path) / "mtp" / f"{style}.safetensors"
    if not path.is_file():
        raise HeadsMismatch(f"no MTP heads at {path}: train them with `smcserve mtp train --style {style}`")
    meta = read_metadata(path)
    expected = model_fingerprint(Path(model_path), torch.float32)
    if meta["fingerprint"] != expected:
        raise HeadsMismatch(
            f"MTP heads {path} were trained for other model weights (fingerprint {meta['fingerprint'] or 'none'}, "
            f"the loaded model's is {expected}); train them for this model with `smcserve mtp train`"
        )
    if meta["spec"].style != style and path.name == f"{style}.safetensors":
        raise HeadsMismatch(f"MTP heads {path} are {meta['spec'].style!r} heads, not {style!r}")
    if not 1 <= k <= meta["spec"].depths:
        raise HeadsMismatch(f"num_speculative_tokens: 1 to the heads' {meta['spec'].depths} depths ({path}), got {k}")
    return meta["spec"]


def load_heads(lm: LoadedModel, path: Path | None = None, style: str = "deepseek") -> MTPHeads:
    """The heads at ``path`` (default: the model's ``mtp/<style>.safetensors``), in the model's dtype.

    Raises :class:`HeadsMismatch` when they were trained for other weights, FileNotFoundError when absent."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else heads_path(lm, style)
    if not path.is_file():
        raise FileNotFoundError(f"no MTP heads at {path}: train them with `smcserve mtp train --style {style}`")
    heads = MTPHeads(lm.model, check_heads(lm.path, style, 1, path))
    state = load_file(path)
    heads.set_vocab(state["vocab"])
    try:
        heads.load_state_dict({k: v if k == "vocab" else v.to(lm.dtype) for k, v in state.items()})
    except RuntimeError as err:
        raise HeadsMismatch(f"MTP heads {path} do not fit the loaded model: {err}") from err
    heads.eval()
    return heads
