"""LlamaGen VQ tokenizer modules with the official names (upstream ``vq_model.py``: ``AttnBlock``, ``Encoder``,
``Decoder``, ``VectorQuantizer``); the shared conv blocks are in :mod:`~distilled_decoding.tokenizers.layers`.

Key layout (what the official files hold)::

    encoder.conv_in → encoder.conv_blocks.{i}.res.{j} / .attn.{j} (last level) / .downsample
      → encoder.mid.{0,1,2} → encoder.norm_out → encoder.conv_out
    decoder.conv_in → decoder.mid.{0,1,2} → decoder.conv_blocks.{i}.res.{j} / .attn.{j} (first block) / .upsample
      → decoder.norm_out → decoder.conv_out
    quantize.embedding.weight (V, D) [+ quantize.codebook_used (65536,)]
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from distilled_decoding.tokenizers.layers import (
    ResnetBlock,
    conv2d,
    decoder_levels,
    encoder_levels,
    group_norm,
    res_attn_lists,
    row_blocks,
    run_res_attn,
    swish,
)

__all__ = [
    "USAGE_HISTORY",
    "AttnBlock",
    "Level",
    "Encoder",
    "Decoder",
    "VectorQuantizer",
    "sq_distances",
    "entropy_loss",
]

USAGE_HISTORY = 65536  #: length of the official ``codebook_used`` ring buffer (hard-coded upstream)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a (B, C, h, w) map with separate 1x1 ``q``/``k``/``v``
    convs and scale C^-0.5, plus the residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv2d(channels, channels, 1)
        self.k = conv2d(channels, channels, 1)
        self.v = conv2d(channels, channels, 1)
        self.proj_out = conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        y = self.norm(x)
        q = rearrange(self.q(y), "b c h w -> b (h w) c")
        k = rearrange(self.k(y), "b c h w -> b c (h w)")
        v = rearrange(self.v(y), "b c h w -> b c (h w)")
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, query, key)
        out = torch.bmm(v, attn.transpose(1, 2))  # (B, C, query)
        return x + self.proj_out(rearrange(out, "b c (h w) -> b c h w", h=h, w=w))


class Level(nn.Module):
    """One resolution level: ``res.{j}`` res blocks, each followed by ``attn.{j}`` on attention levels (the encoder
    / decoder add ``downsample`` / ``upsample``)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.res, self.attn = res_attn_lists(c_in, c_out, n_blocks, dropout, swish, AttnBlock if attention else None)

    def forward(self, x: Tensor) -> Tensor:
        return run_res_attn(x, self.res, self.attn)


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout, swish),
            AttnBlock(channels),
            ResnetBlock(channels, channels, dropout, swish),
        ]
    )


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, z_channels, H/f, W/f) with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        self.conv_in = conv2d(3, ch, 3)
        self.conv_blocks = encoder_levels(ch, ch_mult, num_res_blocks, partial(Level, dropout=dropout))
        c = ch * ch_mult[-1]
        self.mid = _mid(c, dropout)
        self.norm_out = group_norm(c)
        self.conv_out = conv2d(c, z_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.downsample(level(h))
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, 3, h*f, w*f); ``conv_blocks.0`` is the lowest resolution (with attention)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = conv2d(z_channels, c, 3)
        self.mid = _mid(c, dropout)
        self.conv_blocks = nn.ModuleList(decoder_levels(ch, ch_mult, num_res_blocks, partial(Level, dropout=dropout)))
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = conv2d(ch * ch_mult[0], 3, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.upsample(level(h))
        return self.conv_out(swish(self.norm_out(h)))


def sq_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """(M, D), (V, D) → (M, V) squared distances ``|z|^2 + |e|^2 - 2 z.e`` (the official expansion)."""
    return z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * (z @ codebook.t())


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """Official ``compute_entropy_loss`` (softmax): mean per-sample entropy minus the entropy of the mean."""
    logits = affinity / temperature
    probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Codebook ``embedding.weight`` (V, D) and, with ``show_usage``, the ring buffer ``codebook_used``."""

    def __init__(self, size: int, dim: int, beta: float, entropy_ratio: float, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.beta, self.entropy_ratio, self.l2_norm, self.show_usage = beta, entropy_ratio, l2_norm, show_usage
        self.embedding = nn.Embedding(size, dim)
        with torch.no_grad():  # official init: U(-1/V, 1/V), then l2-normalised rows
            self.embedding.weight.uniform_(-1.0 / size, 1.0 / size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> Tensor:
        """(V, D): the l2-normalised rows when ``l2_norm``, else the raw ``embedding.weight``."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: Tensor) -> Tensor:
        """z (M, D) raw latents → (M,) long indices of the nearest codebook rows (computed in float32)."""
        z = z.float()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook().float()
        return torch.cat([sq_distances(part, codebook).argmin(1) for part in row_blocks(z, codebook.shape[0])])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """z (M, D) raw latents → (straight-through z_q (M, D), indices (M,), losses)."""
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook()
        d = sq_distances(z, codebook)
        idx = d.argmin(1)
        z_q = codebook[idx]
        losses: dict[str, Any] = {
            "codebook_loss": torch.mean((z_q - z.detach()) ** 2),
            "commit_loss": self.beta * torch.mean((z_q.detach() - z) ** 2),
            "entropy_loss": self.entropy_ratio * entropy_loss(-d) if self.entropy_ratio else d.new_zeros(()),
        }
        losses["total"] = losses["codebook_loss"] + losses["commit_loss"] + losses["entropy_loss"]
        losses["codebook_usage"] = self._update_usage(idx) if self.training else 0.0
        return z + (z_q - z).detach(), idx, losses

    @torch.no_grad()
    def _update_usage(self, idx: Tensor) -> float:
        """Append ``idx`` to the ring buffer (oldest first) and return unique(buffer) / V, as upstream (0.0 without
        the buffer)."""
        if not self.show_usage:
            return 0.0
        buf = self.codebook_used
        new = idx.to(buf.dtype)[-buf.numel() :]
        buf.copy_(torch.cat([buf[new.numel() :], new]))
        return torch.unique(buf).numel() / self.embedding.num_embeddings
