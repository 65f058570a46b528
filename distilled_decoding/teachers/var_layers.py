"""VAR's layers (official names: ``SelfAttention``, ``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead``,
``SharedAdaLin`` of ``models/basic_var.py``), so official state-dict keys load unchanged.

Numerics that decide equality: AdaLN chunk order (γ1, γ2, s1, s2, b1, b2), non-affine LayerNorm, l2-normalised q/k
times ``exp(min(scale_mul_1H11, log 100))`` with softmax scale 1 (``attn_l2_norm``; the older checkpoints use
scale 0.25/sqrt(head_dim) instead), plain SDPA and a GELU(tanh) MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilled_decoding.teachers.llamagen_layers import DropPath

if TYPE_CHECKING:
    from distilled_decoding.teachers.var_config import VARConfig

__all__ = ["SelfAttention", "FFN", "SharedAdaLin", "AdaLNSelfAttn", "AdaLNBeforeHead", "VARCache"]


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float, proj_drop: float, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self, x: Tensor, attn_bias: Tensor | None, kv: tuple[Tensor, Tensor] | None = None, start: int = 0
    ) -> Tensor:
        """x (B, l, C). Without ``kv``: attention among the l positions under ``attn_bias`` (additive, (1, 1, l, l)).
        With ``kv`` (two (B, H, L, head_dim) buffers): x sits at positions start..start+l−1; its keys/values are
        written there and the queries attend to the filled positions [0, start+l) (masked by ``attn_bias``, if
        given, of shape (1, 1, l, start+l))."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias=bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # (B, H, l, hd)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:b, :, start : start + n] = k
            v_cache[:b, :, start : start + n] = v
            k, v = k_cache[:b, :, : start + n], v_cache[:b, :, : start + n]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)  # (B, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        c = self.C = cfg.embed_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(c, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate, cfg.attn_l2_norm)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio), cfg.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(c, 6 * c))

    def modulation(self, cond: Tensor) -> Tensor:
        """cond (B, D) (or the shared (B, 1, 6, C) with shared_aln) → (B, 1, 6, C) = (γ1, γ2, s1, s2, b1, b2)."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(
        self, x: Tensor, mod: Tensor, attn_bias: Tensor | None, kv: tuple[Tensor, Tensor] | None = None, start: int = 0
    ) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, kv, start)
        x = x + self.drop_path(h.mul_(gamma1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, d: int, eps: float):
        super().__init__()
        self.C = c
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(d, 2 * c))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


@dataclass
class VARCache:
    """Decoding state: static KV cache ``k``/``v`` (depth, B, H, L, head_dim) written in place, the cumulative latent
    ``f_hat`` (B, Cvae, pn_S, pn_S), the class embeddings ``cond`` (B, C) and per-block AdaLN modulations."""

    k: Tensor
    v: Tensor
    f_hat: Tensor
    cond: Tensor
    mods: list[Tensor]
    lvl_pos: Tensor
    scale: int = -1  # the scale whose logits were returned last
    pos: int = 0  # number of filled cache positions

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]
