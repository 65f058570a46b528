"""VAR's multi-scale residual VQVAE, numerically equal to the official ``models/vqvae.py`` + ``models/quant.py``.

Official files (``vae_ch160v4096z32.pth``: a raw state dict) load unchanged; the module tree and the keys are the
official ones (324 keys, 108,948,355 parameters + the (S, V) buffer ``quantize.ema_vocab_hit_SV``)::

    encoder.conv_in → encoder.down.{i}.block.{j} / .attn.{j} (last level) / .downsample.conv → encoder.mid.
      {block_1, attn_1, block_2} → encoder.norm_out → encoder.conv_out → quant_conv (z_channels → z_channels)
    quantize.embedding.weight (V, Cvae), quantize.ema_vocab_hit_SV (S, V),
      quantize.quant_resi.qresi_ls.{k} (the Phi convs; ``.qresi`` when fully shared, ``.{k}`` when not shared)
    post_quant_conv → decoder.conv_in → decoder.mid.* → decoder.up.{i}.block.{j} / .attn.{j} / .upsample.conv
      (``up.{i}`` indexed by level, run from the lowest resolution up) → decoder.norm_out → decoder.conv_out

Token layout: a (B, L) sequence is *scale-major*: scale s (a pn_s × pn_s map, raster order) occupies positions
``scale_slices[s]``, L = Σ pn_s². Quantisation is residual over scales: f_hat starts at 0; at scale s the rest
f − f_hat is area-downsampled to pn_s, each position takes its nearest codebook row (Euclidean, the raw codebook,
which is *not* normalised), and the chosen map is bicubic-upsampled back to the full latent size, passed through
its Phi conv (``h·(1 − r) + conv3x3(h)·r``, r = ``quant_resi``) and added to f_hat.

Phi selection: scale s of S uses Phi ``argmin_k |ticks_k − s/(S − 1)|`` with ``ticks = linspace(1/3K, 1 − 1/3K, K)``
for K = 4 Phi convs (``linspace(1/2K, 1 − 1/2K, K)`` otherwise), computed in float64 exactly as the official
``PhiPartiallyShared`` does. For the official 10 scales and K = 4 the table is hard-coded to
``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]``: scales 2 and 7 are exact mathematical ties that float rounding breaks this way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor, nn

from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file, load_strict

__all__ = ["MultiScaleVQVAE", "PATCH_NUMS_256", "PATCH_NUMS_512", "phi_indices", "infer_msvq_config"]

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  #: official 256px schedule (L = 680)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  #: official 512px schedule (L = 2240, VAR-d36)
_OFFICIAL_PHI_TABLE = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # 10 scales, 4 Phi convs
_GROUPS = 32  # GroupNorm groups (official ``Normalize``)
_DIST_BLOCK = 1 << 25  # max elements of one (rows, V) distance block


def phi_indices(num_scales: int, num_phis: int) -> list[int]:
    """Index of the Phi conv used by each scale (see the module docstring). ``num_phis`` = K."""
    if num_scales < 2 or num_phis < 1:
        raise ValueError(f"phi_indices: expected num_scales >= 2 and num_phis >= 1, got {num_scales}, {num_phis}")
    if (num_scales, num_phis) == (10, 4):
        return list(_OFFICIAL_PHI_TABLE)
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


# ----------------------------------------------------------------------------------------------------------
# building blocks (official names: ResnetBlock, AttnBlock, Downsample2x, Upsample2x, Encoder, Decoder, Phi)
# ----------------------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if padding is None else padding)


class _ResnetBlock(nn.Module):
    """GN → SiLU → conv3x3 → GN → SiLU → dropout → conv3x3, plus the residual (1x1 ``nin_shortcut``)."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv(c_in, c_out, 3)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = _conv(c_out, c_out, 3)
        self.nin_shortcut = _conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class _AttnBlock(nn.Module):
    """Single-head attention over the h*w positions with one 1x1 ``qkv`` conv (rows [q | k | v]), scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1)
        self.proj_out = _conv(channels, channels, 1)
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


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` res blocks, each followed by ``attn.{j}`` when the level has attention."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(_ResnetBlock(c_in, c_out, dropout))
            c_in = c_out
            if attention:
                self.attn.append(_AttnBlock(c_out))

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels, dropout)
        self.attn_1 = _AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = _ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    """(B, 3, H, W) → (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        ch, mult, n = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
        self.conv_in = _conv(cfg["in_channels"], ch, 3)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            level = _Level(c, ch * m, n, attention=last and cfg["using_sa"], dropout=cfg["dropout"])
            c = ch * m
            if not last:
                level.downsample = _Downsample(c)
            self.down.append(level)
        self.mid = _Mid(c, cfg["dropout"], cfg["using_mid_sa"])
        self.norm_out = _norm(c)
        self.conv_out = _conv(c, cfg["z_channels"], 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, 3, h*f, w*f). ``up.{i}`` is level i (``up.{last}`` runs first, with attention)."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        ch, mult, n = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
        c = ch * mult[-1]
        self.conv_in = _conv(cfg["z_channels"], c, 3)
        self.mid = _Mid(c, cfg["dropout"], cfg["using_mid_sa"])
        levels = []
        for i in reversed(range(len(mult))):
            attention = i == len(mult) - 1 and cfg["using_sa"]
            level = _Level(c, ch * mult[i], n + 1, attention=attention, dropout=cfg["dropout"])
            c = ch * mult[i]
            if i != 0:
                level.upsample = _Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = _conv(c, cfg["in_channels"], 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Phi(nn.Conv2d):
    """``h·(1 − r) + conv3x3(h)·r`` with r = |quant_resi| (official ``Phi``)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class _PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi


class _PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls


class _Quantizer(nn.Module):
    """Official ``VectorQuantizer2``: codebook, usage EMA buffer, Phi convs and the residual multi-scale recipes.

    All maps are (B, Cvae, H, W) with H = W = the last patch number; per-scale tensors are (B, pn², Cvae).
    """

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.vocab_size, self.Cvae = cfg["vocab_size"], cfg["z_channels"]
        self.using_znorm, self.beta = cfg["using_znorm"], cfg["beta"]
        self.v_patch_nums: tuple[int, ...] = tuple(cfg["v_patch_nums"])
        s, r, share = len(self.v_patch_nums), cfg["quant_resi"], cfg["share_quant_resi"]

        def phi() -> nn.Module:
            return _Phi(self.Cvae, r) if abs(r) > 1e-6 else nn.Identity()

        if share == 0:  # not shared: one Phi per scale (or default_qresi_counts)
            k = cfg["default_qresi_counts"] or s
            self.quant_resi = nn.ModuleList([phi() for _ in range(k)])
            self._phis = list(self.quant_resi)
        elif share == 1:  # one Phi for every scale
            self.quant_resi = _PhiShared(phi())
            self._phis = [self.quant_resi.qresi]
        else:  # partially shared: K Phi convs spread over the scales
            k = share
            self.quant_resi = _PhiPartiallyShared(nn.ModuleList([phi() for _ in range(k)]))
            self._phis = list(self.quant_resi.qresi_ls)
        self.phi_index = phi_indices(s, len(self._phis)) if len(self._phis) > 1 else [0] * s
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(s, self.vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    # -- pieces ---------------------------------------------------------------------------------------------
    def phi(self, si: int) -> nn.Module:
        return self._phis[self.phi_index[si]]

    @property
    def full_size(self) -> int:
        return self.v_patch_nums[-1]

    def nearest(self, z: Tensor) -> Tensor:
        """z (M, Cvae) → (M,) long: the nearest codebook row (Euclidean on the raw codebook, or the largest cosine
        with ``using_znorm``), computed with the official expansion ``|z|² + |e|² − 2 z·e`` in blocks of rows."""
        e = self.embedding.weight.detach()
        rows = max(1, _DIST_BLOCK // e.shape[0])
        out = []
        for part in z.detach().split(rows):
            if self.using_znorm:
                out.append(torch.argmax(F.normalize(part, dim=-1) @ F.normalize(e.T, dim=0), dim=1))
            else:
                d = torch.sum(part.square(), dim=1, keepdim=True) + torch.sum(e.square(), dim=1, keepdim=False)
                d.addmm_(part, e.T, alpha=-2, beta=1)
                out.append(torch.argmin(d, dim=1))
        return torch.cat(out)

    def _up_phi(self, si: int, h: Tensor) -> Tensor:
        """h (B, Cvae, pn, pn) of scale si → its contribution to f_hat: bicubic upsampling to the full size (all
        scales but the last), then Phi."""
        if si != len(self.v_patch_nums) - 1:
            h = F.interpolate(h, size=(self.full_size, self.full_size), mode="bicubic")
        return self.phi(si)(h)

    @staticmethod
    def _to_map(vectors: Tensor, pn: int) -> Tensor:
        """(B, pn², C) raster-order vectors → (B, C, pn, pn) (a strided view, like the official transpose + view)."""
        return vectors.transpose(1, 2).reshape(vectors.shape[0], vectors.shape[2], pn, pn)

    # -- the residual recipes -----------------------------------------------------------------------------
    def f_to_idx(self, f: Tensor) -> list[Tensor]:
        """f (B, Cvae, H, W) encoder latent → per-scale indices [(B, pn²) long] (official ``f_to_idxBl_or_fhat``)."""
        b, c, h, w = f.shape
        if (h, w) != (self.full_size, self.full_size):
            raise ValueError(
                f"latent grid {h}x{w} does not match the last patch number {self.full_size} of v_patch_nums"
            )
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        last = len(self.v_patch_nums) - 1
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx = self.nearest(rearrange(z, "b c h w -> (b h w) c"))
            emb = rearrange(self.embedding(idx), "(b h w) c -> b c h w", b=b, h=pn, w=pn)
            if si != last:
                emb = F.interpolate(emb, size=(h, w), mode="bicubic")
            hh = self.phi(si)(emb.contiguous())
            f_hat.add_(hh)
            f_rest.sub_(hh)
            out.append(idx.reshape(b, pn * pn))
        return out

    def vectors_to_fhat(self, per_scale: Sequence[Tensor]) -> Tensor:
        """[(B, pn², Cvae)] for every scale → f_hat (B, Cvae, H, W) (official ``embed_to_fhat``)."""
        v0 = per_scale[0]
        f_hat = v0.new_zeros(v0.shape[0], self.Cvae, self.full_size, self.full_size)
        for si, (vec, pn) in enumerate(zip(per_scale, self.v_patch_nums)):
            f_hat.add_(self._up_phi(si, self._to_map(vec, pn)))
        return f_hat

    def var_inputs(self, per_scale: Sequence[Tensor]) -> tuple[Tensor | None, Tensor]:
        """The first k scales [(B, pn², Cvae)] (k < S) → (next-scale inputs for scales 1..k, (B, T, Cvae) with
        T = Σ_{s=1..k} pn_s², or None when k = 0; f_hat after k scales). Official ``idxBl_to_var_input``."""
        b = per_scale[0].shape[0] if per_scale else 0
        f_hat = self.embedding.weight.new_zeros(b, self.Cvae, self.full_size, self.full_size)
        nxt = []
        for si, vec in enumerate(per_scale):
            pn, pn_next = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            f_hat.add_(self._up_phi(si, self._to_map(vec, pn)))
            nxt.append(
                F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(b, self.Cvae, -1).transpose(1, 2)
            )
        return (torch.cat(nxt, dim=1) if nxt else None), f_hat

    def next_input(self, si: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Official ``get_next_autoregressive_input``: add scale si's map h (B, Cvae, pn, pn) to f_hat **in place**;
        return (f_hat, the next scale's input map (B, Cvae, pn', pn')) — (f_hat, f_hat) after the last scale."""
        f_hat.add_(self._up_phi(si, h))
        if si == len(self.v_patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass (official ``VectorQuantizer2.forward``): f (B, Cvae, H, W) → (straight-through f_hat,
        vq_loss). vq_loss = mean over scales of ``beta·mse(sg[f_hat_s], f) + mse(f_hat_s, sg[f])`` where f_hat_s is
        the cumulative quantised map after scale s (commitment to the encoder, codebook/Phi fit to the latent)."""
        f = f.float()
        b, c, h, w = f.shape
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        last = len(self.v_patch_nums) - 1
        vq_loss = f.new_zeros(())
        hits = []
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx = self.nearest(rearrange(z, "b c h w -> (b h w) c"))
            hits.append(idx.bincount(minlength=self.vocab_size).float())
            emb = rearrange(self.embedding(idx), "(b h w) c -> b c h w", b=b, h=pn, w=pn)
            if si != last:
                emb = F.interpolate(emb, size=(h, w), mode="bicubic")
            hh = self.phi(si)(emb.contiguous())
            f_hat = f_hat + hh
            f_rest = f_rest - hh.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
        if self.training:
            self._record_hits(torch.stack(hits))
        return (f_hat.detach() - f_no_grad).add_(f), vq_loss / len(self.v_patch_nums)

    @torch.no_grad()
    def _record_hits(self, hit_SV: Tensor) -> None:
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hit_SV)
        if self.record_hit == 0:
            self.ema_vocab_hit_SV.copy_(hit_SV)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV.mul_(0.9).add_(hit_SV.mul(0.1))
        else:
            self.ema_vocab_hit_SV.mul_(0.99).add_(hit_SV.mul(0.01))
        self.record_hit += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch signature
        # official VQVAE.load_state_dict: a usage buffer recorded for another scale count is replaced by ours
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.ema_vocab_hit_SV.shape[0]:
            state_dict[key] = self.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=4096,
    z_channels=32,
    ch=160,
    dropout=0.0,
    beta=0.25,
    using_znorm=False,
    quant_conv_ks=3,
    quant_resi=0.5,
    share_quant_resi=4,
    default_qresi_counts=0,
    v_patch_nums=PATCH_NUMS_256,
    test_mode=True,
    ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    using_sa=True,
    using_mid_sa=True,
    in_channels=3,
)


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"MultiScaleVQVAE config {name}={cfg[name]!r}: expected {expected}")

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "in_channels"):
        if not is_int(cfg[name]) or cfg[name] < 1:
            raise bad(name, "a positive int")
    for name in ("share_quant_resi", "default_qresi_counts"):
        if not is_int(cfg[name]) or cfg[name] < 0:
            raise bad(name, "an int >= 0")
    if not is_int(cfg["quant_conv_ks"]) or cfg["quant_conv_ks"] < 1 or cfg["quant_conv_ks"] % 2 == 0:
        raise bad("quant_conv_ks", "a positive odd int (the conv keeps the latent size)")
    for name in ("using_znorm", "test_mode", "using_sa", "using_mid_sa"):
        if not isinstance(cfg[name], bool):
            raise bad(name, "a bool")
    for name, lo, hi in (("dropout", 0.0, 1.0), ("beta", 0.0, math.inf), ("quant_resi", -1.0, 1.0)):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise bad(name, f"a float in [{lo}, {hi}]")
    for name in ("v_patch_nums", "ch_mult"):
        v = cfg[name]
        if (
            isinstance(v, (str, bytes))
            or not isinstance(v, Sequence)
            or not v
            or not all(is_int(x) and x >= 1 for x in v)
        ):
            raise bad(name, "a non-empty sequence of positive ints")
        cfg[name] = tuple(int(x) for x in v)
    pns = cfg["v_patch_nums"]
    if len(pns) < 2 or any(a >= b for a, b in zip(pns, pns[1:])):
        raise bad(
            "v_patch_nums", "at least 2 strictly increasing patch numbers, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)"
        )
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    if any(w % _GROUPS for w in widths):
        raise ValueError(
            f"MultiScaleVQVAE config ch={cfg['ch']}, ch_mult={cfg['ch_mult']}: every width ch*mult (here {widths}) "
            f"must be divisible by {_GROUPS} (GroupNorm groups)"
        )
    return cfg


def _phi_keys(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    ls = {int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight")}
    if ls:
        return {"share_quant_resi": len(ls)}
    if "quantize.quant_resi.qresi.weight" in sd:
        return {"share_quant_resi": 1}
    own = {int(k.split(".")[2]) for k in sd if k.startswith("quantize.quant_resi.") and k.endswith(".weight")}
    if own:
        return {"share_quant_resi": 0, "default_qresi_counts": len(own)}
    return {"quant_resi": 0.0}


def infer_msvq_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of an official VQVAE state dict, read from its tensor shapes: ``vocab_size``,
    ``z_channels``, ``ch``, ``ch_mult``, ``num_res_blocks``, ``using_sa``, ``using_mid_sa``, ``quant_conv_ks``,
    ``in_channels`` and the Phi layout (``share_quant_resi`` / ``default_qresi_counts`` / ``quant_resi`` = 0).
    ``v_patch_nums`` is not stored (only the scale count, in ``quantize.ema_vocab_hit_SV``) and is not returned."""
    try:
        vocab, cvae = state_dict["quantize.embedding.weight"].shape
        ch, c_in = state_dict["encoder.conv_in.weight"].shape[:2]
        ks = state_dict["quant_conv.weight"].shape[-1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            "not a VAR multi-scale VQVAE state dict (needs quantize.embedding.weight (V, Cvae), "
            f"encoder.conv_in.weight, quant_conv.weight; problem with {e})"
        ) from e
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if len(parts) == 7 and parts[:2] == ["encoder", "down"] and parts[3] == "block" and parts[5] == "conv1":
            i, j = int(parts[2]), int(parts[4])
            blocks[i] = max(blocks.get(i, 0), j + 1)
            if j == 0 and parts[6] == "weight":
                widths[i] = int(v.shape[0])
    if not widths or sorted(widths) != list(range(len(widths))) or any(w % ch for w in widths.values()):
        raise CheckpointError(f"cannot read the encoder levels (encoder.down.{{i}}.block.0.conv1): widths {widths}")
    last = len(widths) - 1
    return {
        "vocab_size": int(vocab),
        "z_channels": int(cvae),
        "ch": int(ch),
        "in_channels": int(c_in),
        "ch_mult": tuple(widths[i] // ch for i in range(len(widths))),
        "num_res_blocks": blocks[0],
        "using_sa": f"encoder.down.{last}.attn.0.qkv.weight" in state_dict,
        "using_mid_sa": "encoder.mid.attn_1.qkv.weight" in state_dict,
        "quant_conv_ks": int(ks),
        **_phi_keys(state_dict),
    }


# ----------------------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------------------
class MultiScaleVQVAE(ModelMixin, ConfigMixin):
    """VAR's multi-scale VQVAE: images (B, 3, H, W) in [-1, 1] ↔ scale-major tokens (B, L), L = Σ pn².

    Constructor arguments are the official ``VQVAE`` names plus the ``ddconfig`` fields the official class
    hard-codes (``ch_mult``, ``num_res_blocks``, ``using_sa``, ``using_mid_sa``, ``in_channels``). The defaults are
    the released tokenizer ``vae_ch160v4096z32.pth`` (note ``ch=160``; the official class default is 128).
    H = W = ``v_patch_nums[-1] · downsample_factor`` (256 for the official model).

    ``test_mode=True`` (official default) freezes the parameters at construction (``requires_grad=False``, eval);
    pass ``test_mode=False`` to train. ``forward(images)`` is the training pass; inference uses :meth:`encode`,
    :meth:`decode_tokens`, :meth:`decode_vectors` and the VAR helpers :meth:`tokens_to_var_input`,
    :meth:`vectors_to_var_input`, :meth:`next_autoregressive_input`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = PATCH_NUMS_256,
        test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        in_channels: int = 3,
    ):
        super().__init__()
        cfg = _validate({k: v for k, v in locals().items() if k in _DEFAULTS})
        self.V, self.Cvae = cfg["vocab_size"], cfg["z_channels"]
        self.patch_nums: tuple[int, ...] = cfg["v_patch_nums"]
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quantize = _Quantizer(cfg)
        ks = cfg["quant_conv_ks"]
        self.quant_conv = _conv(self.Cvae, self.Cvae, ks)
        self.post_quant_conv = _conv(self.Cvae, self.Cvae, ks)
        ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        self._slices = [(int(a), int(b)) for a, b in zip([0, *ends[:-1]], ends)]
        if cfg["test_mode"]:
            self.eval()
            self.requires_grad_(False)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_official(
        cls, path: str | os.PathLike, *, key: str | None = None, revision: str | None = None, **overrides: Any
    ) -> MultiScaleVQVAE:
        """Load an official VQVAE file (``vae_ch160v4096z32.pth``, raw state dict; or ``.safetensors``): a local path
        or a Hub reference (``"FoundationVision/var/vae_ch160v4096z32.pth"``; ``revision`` pins it).

        The architecture is read from the tensor shapes (:func:`infer_msvq_config`), so small VQVAEs in the official
        format load too; ``overrides`` are config fields (``v_patch_nums`` is not stored in the files and defaults
        to the 256px schedule; ``test_mode`` defaults to True). Like the official ``VQVAE.load_state_dict``, a
        ``quantize.ema_vocab_hit_SV`` buffer recorded for another scale count is replaced by zeros of our shape.
        """
        sd = load_state_dict_file(path, key=key, revision=revision)
        unknown = sorted(set(overrides) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown MultiScaleVQVAE config field(s) {unknown}; valid: {sorted(_DEFAULTS)}")
        cfg = {**_DEFAULTS, **infer_msvq_config(sd), **overrides}
        with torch.device("meta"):
            model = cls(**cfg)
        s = len(model.patch_nums)
        hit = sd.get("quantize.ema_vocab_hit_SV")
        if hit is not None and hit.ndim == 2 and hit.shape[0] != s:
            sd = {**sd, "quantize.ema_vocab_hit_SV": torch.zeros(s, hit.shape[1], dtype=hit.dtype)}
        what = f"MultiScaleVQVAE ({_describe(model.config)})"
        load_strict(model, sd, source=os.fspath(path), what=what, hint=_hint, assign=True)
        model.requires_grad_(not model.config.test_mode)
        return model.eval()

    @torch.no_grad()
    def init_codebook_(self, eini: float) -> None:
        """Official ``VectorQuantizer2.eini``: eini > 0 → trunc-normal(std=eini); eini < 0 → U(±|eini|/V)."""
        w = self.quantize.embedding.weight
        if eini > 0:
            nn.init.trunc_normal_(w, std=eini)
        elif eini < 0:
            w.uniform_(-abs(eini) / self.V, abs(eini) / self.V)

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """(V, Cvae) raw codebook ``quantize.embedding.weight`` (VAR does not normalise it). Tokens index these rows;
        they are the flow map's targets and VAR's per-position vectors."""
        return self.quantize.embedding.weight

    @property
    def vocab_size(self) -> int:
        return self.V

    @property
    def embed_dim(self) -> int:
        """Cvae, the codebook vector dimension."""
        return self.Cvae

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L = Σ pn² (680 for the 256px schedule)."""
        return self._slices[-1][1]

    @property
    def scale_slices(self) -> list[tuple[int, int]]:
        """(begin, end) token positions of each scale in the scale-major sequence."""
        return list(self._slices)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images this tokenizer encodes/decodes: last patch number × downsample factor."""
        return self.patch_nums[-1] * self.downsample_factor

    def split_scales(self, x: Tensor) -> list[Tensor]:
        """(B, T, ...) scale-major → list of the per-scale chunks (B, pn², ...) covering the first T positions
        (T must end a scale)."""
        t = x.shape[1]
        return [x[:, a:b] for a, b in self._slices if b <= t]

    # -- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1], H = W = ``image_size`` → tokens (B, L) long, scale-major (official
        ``img_to_idxBl``, concatenated)."""
        self._check_images(images)
        f = self.quant_conv(self.encoder(images.to(device=self.device, dtype=self.dtype)))
        return torch.cat(self.quantize.f_to_idx(f), dim=1)

    def tokens_to_fhat(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) → f_hat (B, Cvae, pn_S, pn_S), the cumulative quantised latent."""
        self._check_tokens(tokens, "tokens", full=True)
        return self.vectors_to_fhat(self.codebook[tokens.to(self.device, torch.long)])

    def vectors_to_fhat(self, vectors: Tensor) -> Tensor:
        """vectors (B, L, Cvae) scale-major (codebook rows or continuous predictions) → f_hat (B, Cvae, pn_S, pn_S):
        per scale, bicubic upsampling to the full size (except the last), Phi, accumulation (official
        ``embed_to_fhat``)."""
        self._check_vectors(vectors, full=True)
        return self.quantize.vectors_to_fhat(self.split_scales(vectors.to(self.device, self.dtype)))

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """f_hat (B, Cvae, h, w) → images (B, 3, h·f, w·f) clamped to [-1, 1] (official)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) long scale-major → images (B, 3, H, W) in [-1, 1]. Equals ``decode_vectors(codebook[t])``."""
        self._check_tokens(tokens, "tokens", full=True)
        return self.decode_vectors(self.codebook[tokens.to(self.device, torch.long)])

    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """vectors (B, L, Cvae) scale-major, one vector per token position (codebook rows, or a student's continuous
        outputs; no quantisation) → images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.vectors_to_fhat(vectors))

    def tokens_to_var_input(self, tokens: Tensor) -> Tensor:
        """Teacher-forcing input of VAR (official ``idxBl_to_var_input``): tokens (B, T) of the first k whole scales →
        (B, T' − first_l, Cvae), the area-downsampled cumulative f_hat fed to scales 1..k (T' = end of scale k).
        With T = L the last scale is not used (it feeds no later scale): (B, L − first_l, Cvae)."""
        self._check_tokens(tokens, "tokens", full=False)
        return self.vectors_to_var_input(self.codebook[tokens.to(self.device, torch.long)])

    def vectors_to_var_input(self, vectors: Tensor, return_fhat: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """As :meth:`tokens_to_var_input` with per-position vectors (B, T, Cvae) in place of codebook rows. With
        ``return_fhat``: (inputs, f_hat (B, Cvae, pn_S, pn_S) accumulated over the scales used)."""
        self._check_vectors(vectors, full=False)
        vectors = vectors.to(self.device, self.dtype)
        per_scale = self.split_scales(vectors)[: self.num_scales - 1]
        if per_scale:
            inputs, f_hat = self.quantize.var_inputs(per_scale)
        else:
            inputs = vectors.new_zeros(vectors.shape[0], 0, self.Cvae)
            f_hat = vectors.new_zeros(vectors.shape[0], self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        return (inputs, f_hat) if return_fhat else inputs

    def next_autoregressive_input(self, si: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One VAR decoding step (official ``get_next_autoregressive_input``): add scale ``si``'s map h
        (B, Cvae, pn, pn) to f_hat (B, Cvae, pn_S, pn_S) **in place**; returns (f_hat, next scale's input map
        (B, Cvae, pn_{si+1}, pn_{si+1})), or (f_hat, f_hat) after the last scale."""
        if not 0 <= si < self.num_scales:
            raise ValueError(f"si={si}: expected a scale index in [0, {self.num_scales})")
        return self.quantize.next_input(si, f_hat, h)

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training pass (official ``VQVAE.forward`` + ``VectorQuantizer2.forward``): images (B, 3, H, W) in [-1, 1]
        → (reconstruction (B, 3, H, W), not clamped; losses).

        ``losses``: ``vq_loss`` (official: mean over scales of β·mse(sg[f_hat_s], f) + mse(f_hat_s, sg[f])),
        ``rec_loss`` = mse(reconstruction, images), ``total`` = rec_loss + vq_loss. The decoder sees the
        straight-through f_hat (gradients reach the encoder). The official trainer (not released) adds perceptual
        and GAN losses; those are left to the caller. In training mode the per-scale codebook hit EMA
        (``quantize.ema_vocab_hit_SV``) is updated as upstream (see :meth:`codebook_usage`).
        """
        self._check_images(images)
        x = images.to(device=self.device, dtype=self.dtype)
        f_hat, vq_loss = self.quantize(self.quant_conv(self.encoder(x)))
        rec = self.decoder(self.post_quant_conv(f_hat.to(self.dtype)))
        rec_loss = F.mse_loss(rec.float(), x.float())
        return rec, {"rec_loss": rec_loss, "vq_loss": vq_loss, "total": rec_loss + vq_loss}

    @torch.no_grad()
    def codebook_usage(self, tokens_per_scale_batch: int | None = None) -> list[float]:
        """Per-scale % of codebook entries whose hit EMA is ≥ the official margin ``0.08 · (B·H·W) / V``
        (``tokens_per_scale_batch`` = B·H·W of the training batch, summed over processes)."""
        n = tokens_per_scale_batch or self.patch_nums[-1] ** 2
        margin = n / self.V * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.quantize.ema_vocab_hit_SV]

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        s, c = self.image_size, self.config.in_channels
        expected = f"a float tensor of shape (B, {c}, {s}, {s}) with values in [-1, 1]"
        if not isinstance(images, Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be {expected}; got {got}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(
                f"images must be {expected} (image_size = last patch number × {self.downsample_factor}); "
                f"got shape {tuple(images.shape)}"
            )

    def _check_len(self, n: int, name: str, full: bool) -> None:
        ends = [b for _, b in self._slices]
        if full and n != self.seq_len:
            raise ValueError(
                f"{name}: expected {self.seq_len} positions per image (L = Σ pn² for v_patch_nums="
                f"{self.patch_nums}), got {n}"
            )
        if not full and n not in ends:
            raise ValueError(f"{name}: {n} positions do not end a scale; expected one of {ends}")

    def _check_tokens(self, tokens: Tensor, name: str, full: bool) -> None:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            raise ValueError(
                f"{name}: expected a (B, L) integer tensor, got "
                f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer dtype (torch.long), got {tokens.dtype}")
        self._check_len(tokens.shape[1], name, full)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.V):
            raise ValueError(
                f"{name}: token ids must lie in [0, {self.V}) (vocab_size); "
                f"got min {int(tokens.min())}, max {int(tokens.max())}"
            )

    def _check_vectors(self, vectors: Tensor, full: bool) -> None:
        if (
            not isinstance(vectors, Tensor)
            or not vectors.is_floating_point()
            or vectors.ndim != 3
            or vectors.shape[2] != self.Cvae
        ):
            got = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(
                f"vectors: expected a float tensor (B, L, {self.Cvae}) (Cvae = z_channels), got {got}"
                + (f" {vectors.dtype}" if isinstance(vectors, Tensor) else "")
            )
        self._check_len(vectors.shape[1], "vectors", full)
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("vectors: contain NaN or inf values")


def _describe(cfg: Mapping[str, Any]) -> str:
    return (
        f"vocab {cfg['vocab_size']}, z_channels {cfg['z_channels']}, ch {cfg['ch']}, ch_mult "
        f"{tuple(cfg['ch_mult'])}, num_res_blocks {cfg['num_res_blocks']}, share_quant_resi "
        f"{cfg['share_quant_resi']}, quant_resi {cfg['quant_resi']}"
    )


def _hint(sd: Mapping[str, Tensor]) -> str:
    try:
        cfg = {**_DEFAULTS, **infer_msvq_config(sd)}
    except CheckpointError as e:
        return f"hint: {e}; is this a VAR transformer or LlamaGen checkpoint rather than the VAR VQVAE?"
    return f"hint: the checkpoint's shapes say {_describe(cfg)}"
