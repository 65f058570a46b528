"""LlamaGen's layers (official module names, so official state-dict keys load unchanged).

Numerics that decide equality with ``autoregressive/models/gpt.py``: RMSNorm in fp32 then cast back before the
weight; 2-D RoPE with interleaved pairs, the first half of the pairs rotated by the row, the second by the column,
and all-zero rows for the class token; SDPA with the default ``1/sqrt(head_dim)`` scale.
The layers read their sizes from a :class:`~distilled_decoding.teachers.llamagen.LlamaGenConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilled_decoding.conditions import ClassCondition
from distilled_decoding.teachers.llamagen_t2i import CaptionEmbedder

if TYPE_CHECKING:
    from distilled_decoding.teachers.llamagen_config import LlamaGenConfig

__all__ = [
    "RMSNorm",
    "LabelEmbedder",
    "CONDITION_EMBEDDERS",
    "FeedForward",
    "apply_rotary_emb",
    "precompute_freqs_cis_2d",
    "Attention",
    "DropPath",
    "TransformerBlock",
    "LlamaGenCache",
]


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
    """Class table; with ``dropout_prob > 0`` it has the extra null row used for CFG and label dropout.

    The condition embedder of class-conditional LlamaGen (``model_type="c2i"``, one condition position); the
    text-conditional one is :class:`~distilled_decoding.teachers.llamagen_t2i.CaptionEmbedder`. Both have ``spec``
    (the condition they take), ``embed`` (no dropout) and ``key_mask`` (None: plain causal attention)."""

    num_positions = 1

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

    @property
    def null_class(self) -> int | None:
        """The unconditional (CFG) class id, or None when the table has no null row."""
        return self.num_classes if self.embedding_table.num_embeddings > self.num_classes else None

    @property
    def spec(self) -> ClassCondition:
        return ClassCondition(self.num_classes, self.null_class)

    def embed(self, labels: Tensor) -> Tensor:
        """labels (B,) (null class allowed) → (B, 1, dim), no dropout (decoding)."""
        return self.embedding_table(labels).unsqueeze(1)

    def key_mask(self, labels: Tensor) -> None:
        """No mask: the class token is always attended to (plain causal attention)."""
        return None


#: The condition embedder of each ``model_type`` (the official module ``cls_embedding``), built from the config.
CONDITION_EMBEDDERS: dict[str, Callable[[LlamaGenConfig], nn.Module]] = {
    "c2i": lambda cfg: LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob),
    "t2i": lambda cfg: CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.class_dropout_prob, cfg.cls_token_num),
}


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
        attend to positions < start+S (``mask`` (S, start+S) or (B, 1, S, start+S) bool overrides the causal
        pattern; without ``kv`` the mask covers x)."""
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
    """Static KV cache: ``k``/``v`` of shape (n_layer, B, H_kv, S_max, head_dim), written in place.
    ``key_mask`` (B, P) bool: the condition positions that may be attended to (t2i); None = plain causal."""

    k: Tensor
    v: Tensor
    pos: int = 0  # number of filled positions (condition positions included)
    key_mask: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]
