"""LlamaGen class-conditional GPT, numerically equal to the official ``autoregressive/models/gpt.py``.

Module names and state-dict keys are the official ones, so official checkpoints load unchanged::

    cls_embedding.embedding_table.weight   (num_classes + 1, dim)   row ``num_classes`` = null class (CFG)
    tok_embeddings.weight                  (vocab_size, dim)
    layers.{i}.attention.wqkv.weight       ((n_head + 2 n_kv_head) head_dim, dim)
    layers.{i}.attention.wo.weight         (dim, dim)
    layers.{i}.feed_forward.w{1,2,3}.weight
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight, norm.weight
    output.weight                          (vocab_size, dim)

Numerics that decide equality: RMSNorm in fp32 then cast back before the weight; 2-D RoPE with interleaved
pairs, the first half of the pairs rotated by the row, the second by the column, and all-zero rows for the
class token; SDPA with the default ``1/sqrt(head_dim)`` scale; fp32 logits.

Besides teacher forcing (``gpt(tokens, class_labels)``) the model implements the decoding protocol used by
:func:`distilled_decoding.sampling.sample_tokens` (``decode_groups`` / ``begin`` / ``advance``) with a
statically allocated KV cache.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import load_state_dict_file, load_strict
from distilled_decoding.configs import ValidatedConfig

__all__ = ["LlamaGen", "LlamaGenConfig", "LLAMAGEN_PRESETS", "LlamaGenCache"]


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class LlamaGenConfig(ValidatedConfig):
    """The official ``ModelArgs`` fields (c2i). ``block_size`` = number of image tokens (a square)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def validate(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"LlamaGen config: {field}={getattr(self, field)!r}, expected {expected}")

        if self.model_type != "c2i":
            raise bad("model_type", "'c2i' (text-to-image LlamaGen is not supported)")
        if self.cls_token_num != 1:
            raise bad("cls_token_num", "1 for class-conditional models")
        for f in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size", "multiple_of"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "a positive integer")
        if self.dim % self.n_head:
            raise bad("dim", f"a multiple of n_head={self.n_head}")
        if self.head_dim % 4:
            raise bad("dim", f"dim / n_head divisible by 4 for the 2-D RoPE (head_dim is {self.head_dim})")
        kv = self.n_kv_head if self.n_kv_head is not None else self.n_head
        if kv < 1 or self.n_head % kv:
            raise bad("n_kv_head", f"a divisor of n_head={self.n_head}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise bad("block_size", "a perfect square (the token grid is square: 256 = 16x16, 576 = 24x24)")
        for f in (
            "token_dropout_p",
            "attn_dropout_p",
            "resid_dropout_p",
            "ffn_dropout_p",
            "drop_path_rate",
            "class_dropout_prob",
        ):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise bad(f, "a probability in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


#: Official class-conditional sizes (``GPT_models`` in gpt.py). Values are ModelArgs overrides.
LLAMAGEN_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}


# ----------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (official order)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """Class table; with ``dropout_prob > 0`` it has the extra null row used for CFG and label dropout."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor) -> Tensor:
        """labels (B,) → (B, 1, dim); in training, labels are replaced by the null class w.p. dropout_prob."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Interleaved-pair rotation in fp32. x (B, S, H, hd), freqs_cis (S, hd/2, 2) of (cos, sin)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 1) -> Tensor:
    """(cls_token_num + grid², head_dim/2, 2) table of (cos, sin); the class rows are all zeros (official)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, device=freqs.device)
    freqs = torch.outer(t, freqs)
    grid = torch.cat([freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), cache])


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(
        self,
        x: Tensor,
        freqs_cis: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, S, dim). Without ``kv``: causal attention over x. With ``kv`` (two (B, H_kv, S_max, hd)
        buffers): x sits at positions start..start+S-1; its keys/values are written there and the queries
        attend to positions < start+S (``mask`` (S, start+S) bool overrides the causal pattern)."""
        b, s, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary_emb(q.view(b, s, self.n_head, self.head_dim), freqs_cis).transpose(1, 2)
        k = apply_rotary_emb(k.view(b, s, self.n_kv_head, self.head_dim), freqs_cis).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:b, :, start : start + s] = k
            v_cache[:b, :, start : start + s] = v
            k, v = k_cache[:b, :, : start + s], v_cache[:b, :, : start + s]
            causal = mask is None and s > 1 and start == 0
            if mask is None and s > 1 and start > 0:
                mask = torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(start)
        else:
            causal = mask is None
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.attn_dropout_p if self.training else 0.0
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, q_dim)))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, freqs_cis: Tensor, kv=None, start: int = 0, mask: Tensor | None = None) -> Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, kv, start, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


@dataclass
class LlamaGenCache:
    """Static KV cache: ``k``/``v`` of shape (n_layer, B, H_kv, S_max, head_dim), written in place."""

    k: Tensor
    v: Tensor
    pos: int = 0  # number of filled positions (class token included)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------
class LlamaGen(ModelMixin, ConfigMixin):
    """Class-conditional LlamaGen GPT. Constructor arguments are the official ``ModelArgs`` field names.

    ``gpt(tokens, class_labels)``: tokens (B, N) long with N ≤ block_size, class_labels (B,) long →
    logits (B, N, vocab_size) float32 where ``logits[:, i]`` is p(token i | tokens[:, :i], class).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        dim: int = 4096,
        n_layer: int = 32,
        n_head: int = 32,
        n_kv_head: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        token_dropout_p: float = 0.1,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.1,
        ffn_dropout_p: float = 0.1,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        caption_dim: int = 2048,
        class_dropout_prob: float = 0.1,
        model_type: str = "c2i",
        vocab_size: int = 16384,
        cls_token_num: int = 1,
        block_size: int = 256,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
    ):
        super().__init__()
        cfg = LlamaGenConfig(**{f.name: v for f, v in zip(fields(LlamaGenConfig), _args(locals()))})
        self.args = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(cfg, dpr[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._freqs: Tensor | None = None  # fp32 RoPE table, built lazily on the weights' device
        self.initialize_weights()

    # -- construction -------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Official init: N(0, initializer_range) for Linear/Embedding, zero output head."""
        if self.output.weight.is_meta:
            return
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> LlamaGen:
        """Build an official size (``"GPT-B"``, ...) with random weights; overrides are ModelArgs fields."""
        if preset not in LLAMAGEN_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(LLAMAGEN_PRESETS)}")
        return cls(**{**LLAMAGEN_PRESETS[preset], **overrides})

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        preset: str | None = None,
        block_size: int | None = None,
        *,
        key: str | None = None,
        **config: Any,
    ) -> LlamaGen:
        """Load an official c2i checkpoint (``c2i_B_256.pt``, FSDP ``c2i_XXL_384.pt``, ``.safetensors``, ...).

        ``preset`` names an official size; when omitted it is inferred from the tensor shapes. ``block_size``
        is not stored in the files: by default it is read from the file name (``_384`` → 576, else 256).
        ``key`` picks an entry (e.g. ``"ema"``); by default ``model`` / ``module`` / ``state_dict`` / raw.
        Extra keyword arguments are ModelArgs fields (e.g. ``num_classes``, ``vocab_size``).
        """
        path = Path(path)
        sd = load_state_dict_file(path, key=key)
        cfg = official_config(sd, filename=path.name, preset=preset, block_size=block_size, **config)
        with torch.device("meta"):
            model = cls(**cfg)
        what = f"LlamaGen ({_describe_cfg(cfg)})"
        load_strict(model, sd, source=str(path), what=what, ignore=("freqs_cis",), hint=_preset_hint, assign=True)
        return model.eval()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def freqs_cis(self) -> Tensor:
        """(1 + block_size, head_dim/2, 2) float32 RoPE table on the weights' device. Like the official model
        it is not a buffer: never saved, and never cast to the model dtype (rotation runs in fp32)."""
        device = self.output.weight.device
        if self._freqs is None or self._freqs.device != device:
            a = self.args
            self._freqs = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, a.cls_token_num).to(device)
        return self._freqs

    @property
    def num_classes(self) -> int:
        return self.args.num_classes

    @property
    def null_class(self) -> int | None:
        """Index of the unconditional (CFG) class, or None when the class table has no null row."""
        return self.args.num_classes if self.cls_embedding.embedding_table.num_embeddings > self.num_classes else None

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def seq_len(self) -> int:
        return self.args.block_size

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    # -- teacher forcing -------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, class_labels: Tensor) -> Tensor:
        """tokens (B, N) long, class_labels (B,) long → logits (B, N, V) float32 (teacher forcing).

        In training mode class labels are dropped to the null class with probability ``class_dropout_prob``.
        """
        self.check_tokens(tokens, "tokens", max_len=self.seq_len)
        self.check_labels(class_labels, tokens.shape[0])
        return self.logits_from_prefix(tokens[:, :-1], class_labels)

    def logits_from_prefix(self, tokens: Tensor, class_labels: Tensor) -> Tensor:
        """Unvalidated teacher forcing: input ``[class, tokens]`` (B, 1+T) → logits (B, 1+T, V) float32.
        ``class_labels`` may contain the null class."""
        h = torch.cat([self.cls_embedding(class_labels), self.tok_embeddings(tokens)], dim=1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        return self.output(self.norm(h)).float()

    # -- validation ------------------------------------------------------------------------------------------
    def check_tokens(self, tokens: Tensor, name: str = "tokens", max_len: int | None = None) -> None:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"{name}: expected a (B, N) integer tensor with N >= 1, got {_shape_of(tokens)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ValueError(f"{name}: expected an integer dtype (torch.long), got {tokens.dtype}")
        if max_len is not None and tokens.shape[1] > max_len:
            raise ValueError(
                f"{name}: sequence of {tokens.shape[1]} tokens does not fit block_size={self.seq_len}; "
                f"expected N <= {max_len}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"{name}: token ids must lie in [0, {self.vocab_size}) (vocab_size); "
                f"got min {int(tokens.min())}, max {int(tokens.max())}"
            )

    def check_labels(self, class_labels: Tensor, batch: int, name: str = "class_labels") -> None:
        if not isinstance(class_labels, Tensor) or class_labels.ndim != 1 or class_labels.shape[0] != batch:
            raise ValueError(f"{name}: expected a ({batch},) integer tensor, got {_shape_of(class_labels)}")
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer dtype (torch.long), got {class_labels.dtype}")
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= self.num_classes):
            raise ValueError(
                f"{name}: class ids must lie in [0, {self.num_classes}) (num_classes); "
                f"got min {int(class_labels.min())}, max {int(class_labels.max())}"
            )

    # -- KV-cached decoding (protocol of distilled_decoding.sampling) ---------------------------------------
    def decode_groups(self) -> list[tuple[int, int]]:
        """Positions produced by each decoding step: one token at a time, raster order."""
        return [(i, i + 1) for i in range(self.seq_len)]

    def guidance_scales(self, cfg_scale: float, cfg_interval: int = -1) -> list[float] | None:
        """Per-step CFG scale (official: guidance iff cfg_scale > 1; ``cfg_interval`` ≥ 0 switches it off for
        tokens after index cfg_interval + 1). None means no guidance (the batch is not doubled)."""
        if cfg_scale <= 1.0:
            return None
        return [cfg_scale if (cfg_interval < 0 or j <= cfg_interval + 1) else 1.0 for j in range(self.seq_len)]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LlamaGenCache:
        """Allocate a zeroed static KV cache for ``batch_size`` rows and ``max_len`` positions (class token
        included; default 1 + block_size rounded up to a multiple of 8, as the official sampler does)."""
        max_len = find_multiple(max_len or (self.args.cls_token_num + self.seq_len), 8)
        a = self.args
        p = self.output.weight
        shape = (a.n_layer, batch_size, a.kv_heads, max_len, a.head_dim)
        return LlamaGenCache(
            torch.zeros(shape, dtype=p.dtype, device=p.device),
            torch.zeros(shape, dtype=p.dtype, device=p.device),
        )

    def cached_forward(self, cache: LlamaGenCache, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Run embeddings h (B, S, dim) at positions cache.pos.. through the layers, filling the cache.
        Returns the final hidden states (B, S, dim) (before the norm); advances ``cache.pos``."""
        start, s = cache.pos, h.shape[1]
        if start + s > cache.k.shape[3]:
            raise ValueError(f"KV cache holds {cache.k.shape[3]} positions; cannot write up to {start + s}")
        freqs = self.freqs_cis[start : start + s]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, (cache.k[i], cache.v[i]), start, mask)
        cache.pos = start + s
        return h

    def begin(self, class_labels: Tensor, prefix: Tensor | None = None) -> tuple[LlamaGenCache, Tensor]:
        """Prefill [class, prefix]: class_labels (B,) (null class allowed), prefix (B, T) long or None.
        Returns (cache, logits (B, 1, V) float32 for token T)."""
        b = class_labels.shape[0]
        cache = self.new_cache(b)
        h = self.cls_embedding.embedding_table(class_labels).unsqueeze(1)
        if prefix is not None and prefix.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(prefix)], dim=1)
        h = self.cached_forward(cache, h)
        return cache, self.output(self.norm(h[:, -1:])).float()

    def advance(self, cache: LlamaGenCache, tokens: Tensor) -> Tensor:
        """Feed tokens (B, 1) at the next position; returns logits (B, 1, V) float32 for the following one."""
        h = self.cached_forward(cache, self.tok_embeddings(tokens))
        return self.output(self.norm(h)).float()


# ----------------------------------------------------------------------------------------------------------
# helpers for loading
# ----------------------------------------------------------------------------------------------------------
def official_config(
    sd: Mapping[str, Tensor],
    *,
    filename: str = "",
    preset: str | None = None,
    block_size: int | None = None,
    **config: Any,
) -> dict[str, Any]:
    """The constructor arguments for an official checkpoint: preset sizes (inferred from the shapes when
    ``preset`` is None), vocab size and class count read from the tensors, ``block_size`` from the file name
    (``_384`` → 576, otherwise 256) unless given, then explicit ``config`` overrides."""
    if preset is not None and preset not in LLAMAGEN_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(LLAMAGEN_PRESETS)}")
    if preset is None and not {"dim", "n_layer", "n_head"} <= config.keys():
        preset = _infer_preset(sd)
        if preset is None:
            raise ValueError(
                f"{filename}: its shapes fit no official preset ({_describe(sd)}); pass preset= or "
                "dim=/n_layer=/n_head= explicitly"
            )
    if block_size is None:
        m = re.search(r"_(\d{3})(?:\D|$)", Path(filename).stem)
        block_size = (int(m.group(1)) // 16) ** 2 if m and int(m.group(1)) in (256, 384, 512) else 256
    base = dict(LLAMAGEN_PRESETS[preset]) if preset is not None else {}
    return {**base, "block_size": block_size, **_shape_fields(sd), **config}


def _args(local_vars: Mapping[str, Any]) -> list[Any]:
    return [local_vars[f.name] for f in fields(LlamaGenConfig)]


def _shape_of(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _shape_fields(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Config fields that the tensors determine unambiguously (vocab, classes, null row)."""
    out: dict[str, Any] = {}
    if "tok_embeddings.weight" in sd:
        out["vocab_size"] = int(sd["tok_embeddings.weight"].shape[0])
    if "cls_embedding.embedding_table.weight" in sd:  # official tables carry the null row
        out["num_classes"] = int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1
    return out


def _layers(sd: Mapping[str, Tensor]) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("layers.") and k.endswith("attention_norm.weight")})


def _describe(sd: Mapping[str, Tensor]) -> str:
    emb = sd.get("tok_embeddings.weight")
    cls = sd.get("cls_embedding.embedding_table.weight")
    parts = [f"{_layers(sd)} layers"]
    if emb is not None:
        parts += [f"dim {emb.shape[1]}", f"vocab {emb.shape[0]}"]
    if cls is not None:
        parts.append(f"class table {cls.shape[0]} rows")
    return ", ".join(parts)


def _describe_cfg(cfg: Mapping[str, Any]) -> str:
    c = {**asdict(LlamaGenConfig()), **cfg}
    return (
        f"dim {c['dim']}, {c['n_layer']} layers, {c['n_head']} heads, vocab {c['vocab_size']}, "
        f"{c['num_classes']} classes, block_size {c['block_size']}"
    )


def _infer_preset(sd: Mapping[str, Tensor]) -> str | None:
    emb = sd.get("tok_embeddings.weight")
    if emb is None:
        return None
    n_layer, dim = _layers(sd), int(emb.shape[1])
    for name, p in LLAMAGEN_PRESETS.items():
        if p["dim"] == dim and p["n_layer"] == n_layer:
            return name
    return None


def _preset_hint(sd: Mapping[str, Tensor]) -> str | None:
    name = _infer_preset(sd)
    desc = _describe(sd)
    cls = sd.get("cls_embedding.embedding_table.weight")
    classes = f", num_classes={cls.shape[0] - 1}" if cls is not None else ""
    if name is not None:
        return f"the checkpoint's shapes ({desc}) fit preset {name!r}{classes}"
    return f"the checkpoint's shapes ({desc}) fit no official preset; pass dim=/n_layer=/n_head={classes}"
