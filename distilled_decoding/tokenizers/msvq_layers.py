"""VAR VQVAE encoder/decoder modules with the official names (``models/basic_vae.py``: ``AttnBlock``, ``Encoder``,
``Decoder``); the shared conv blocks are in :mod:`~distilled_decoding.tokenizers.layers`, the quantizer in
:mod:`~distilled_decoding.tokenizers.msvq_quant`.

Key layout (what the official files hold)::

    encoder.conv_in → encoder.down.{i}.block.{j} / .attn.{j} (last level) / .downsample.conv
      → encoder.mid.{block_1, attn_1, block_2} → encoder.norm_out → encoder.conv_out
    decoder.conv_in → decoder.mid.* → decoder.up.{i}.block.{j} / .attn.{j} / .upsample.conv
      (``up.{i}`` indexed by level, run from the lowest resolution up) → decoder.norm_out → decoder.conv_out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from distilled_decoding.tokenizers.layers import (
    LevelFactory,
    ResnetBlock,
    conv2d,
    decoder_levels,
    encoder_levels,
    group_norm,
    res_attn_lists,
    run_res_attn,
)
from distilled_decoding.tokenizers.msvq_config import MSVQConfig

__all__ = ["AttnBlock", "Level", "Mid", "Encoder", "Decoder"]


class AttnBlock(nn.Module):
    """Single-head attention over the h*w positions with one 1x1 ``qkv`` conv (rows [q | k | v]), scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, 1)
        self.proj_out = conv2d(channels, channels, 1)
        self.w_ratio = int(channels) ** (-0.5)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h, w).unbind(1)
        q = rearrange(q, "b c h w -> b (h w) c").contiguous()
        k = rearrange(k, "b c h w -> b c (h w)").contiguous()
        attn = torch.softmax(torch.bmm(q, k).mul_(self.w_ratio), dim=2)  # (B, query, key)
        v = rearrange(v, "b c h w -> b c (h w)").contiguous()
        out = torch.bmm(v, attn.permute(0, 2, 1).contiguous())  # (B, C, query)
        return x + self.proj_out(rearrange(out, "b c (h w) -> b c h w", h=h, w=w).contiguous())


class Level(nn.Module):
    """One resolution level: ``block.{j}`` res blocks (SiLU), each followed by ``attn.{j}`` on attention levels
    (the encoder / decoder add ``downsample`` / ``upsample``)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.block, self.attn = res_attn_lists(c_in, c_out, n_blocks, dropout, F.silu, AttnBlock if attention else None)

    def forward(self, x: Tensor) -> Tensor:
        return run_res_attn(x, self.block, self.attn)


class Mid(nn.Module):
    """``block_1`` → ``attn_1`` (``nn.Identity`` without ``using_mid_sa``) → ``block_2``."""

    def __init__(self, channels: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, F.silu)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, F.silu)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level_factory(cfg: MSVQConfig) -> LevelFactory:
    def make(c_in: int, c_out: int, n_blocks: int, last: bool) -> Level:
        return Level(c_in, c_out, n_blocks, last and cfg.using_sa, cfg.resnet_dropout)

    return make


class Encoder(nn.Module):
    """(B, in_channels, H, W) → (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        ch, c = cfg.ch, cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv2d(cfg.in_channels, ch, 3)
        self.down = encoder_levels(ch, cfg.ch_mult, cfg.num_res_blocks, _level_factory(cfg))
        self.mid = Mid(c, cfg.resnet_dropout, cfg.using_mid_sa)
        self.norm_out = group_norm(c)
        self.conv_out = conv2d(c, cfg.z_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, in_channels, h*f, w*f). ``up.{i}`` is level i (``up.{last}`` runs first, with
    attention)."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        ch, c = cfg.ch, cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv2d(cfg.z_channels, c, 3)
        self.mid = Mid(c, cfg.resnet_dropout, cfg.using_mid_sa)
        self.up = nn.ModuleList(reversed(decoder_levels(ch, cfg.ch_mult, cfg.num_res_blocks, _level_factory(cfg))))
        self.norm_out = group_norm(ch * cfg.ch_mult[0])
        self.conv_out = conv2d(ch * cfg.ch_mult[0], cfg.in_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))
