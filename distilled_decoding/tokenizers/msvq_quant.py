"""VAR's multi-scale residual quantizer with the official names (``models/quant.py``: ``VectorQuantizer2``, ``Phi``,
``PhiShared``, ``PhiPartiallyShared``).

Keys: ``quantize.embedding.weight`` (V, Cvae), ``quantize.ema_vocab_hit_SV`` (S, V), and the Phi convs
``quantize.quant_resi.qresi_ls.{k}`` (partially shared), ``.qresi`` (fully shared) or ``.{k}`` (not shared).

Phi selection: scale s of S uses Phi ``argmin_k |ticks_k − s/(S − 1)|`` with ``ticks = linspace(1/3K, 1 − 1/3K, K)``
for K = 4 Phi convs (``linspace(1/2K, 1 − 1/2K, K)`` otherwise), computed in float64 exactly as the official
``PhiPartiallyShared`` does. For the official 10 scales and K = 4 the table is hard-coded to
``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]``: scales 2 and 7 are exact mathematical ties that float rounding breaks this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from distilled_decoding.tokenizers.layers import row_blocks
from distilled_decoding.tokenizers.msvq_config import MSVQConfig

__all__ = ["phi_indices", "Phi", "PhiShared", "PhiPartiallyShared", "MultiScaleQuantizer"]

_OFFICIAL_PHI_TABLE = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # 10 scales, 4 Phi convs


def phi_indices(num_scales: int, num_phis: int) -> list[int]:
    """Index of the Phi conv used by each scale (see the module docstring). ``num_phis`` = K."""
    if num_scales < 2 or num_phis < 1:
        raise ValueError(f"phi_indices: expected num_scales >= 2 and num_phis >= 1, got {num_scales}, {num_phis}")
    if (num_scales, num_phis) == (10, 4):
        return list(_OFFICIAL_PHI_TABLE)
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class Phi(nn.Conv2d):
    """``h·(1 − r) + conv3x3(h)·r`` with r = |quant_resi| (official ``Phi``)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiShared(nn.Module):
    """One Phi for every scale, as ``qresi`` (official ``PhiShared``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi


class PhiPartiallyShared(nn.Module):
    """K Phi convs spread over the scales, as ``qresi_ls.{k}`` (official ``PhiPartiallyShared``)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls


class MultiScaleQuantizer(nn.Module):
    """Official ``VectorQuantizer2``: codebook, usage EMA buffer, Phi convs and the residual multi-scale recipes.

    All maps are (B, Cvae, H, W) with H = W = the last patch number; per-scale tensors are (B, pn², Cvae).
    """

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.using_znorm, self.beta = cfg.using_znorm, cfg.beta
        self.v_patch_nums: tuple[int, ...] = tuple(cfg.v_patch_nums)
        s, r, share = len(self.v_patch_nums), cfg.quant_resi, cfg.share_quant_resi

        def phi() -> nn.Module:
            return Phi(self.Cvae, r) if abs(r) > 1e-6 else nn.Identity()

        if share == 0:  # not shared: one Phi per scale (or default_qresi_counts)
            k = cfg.default_qresi_counts or s
            self.quant_resi = nn.ModuleList([phi() for _ in range(k)])
            self._phis = list(self.quant_resi)
        elif share == 1:  # one Phi for every scale
            self.quant_resi = PhiShared(phi())
            self._phis = [self.quant_resi.qresi]
        else:  # partially shared: K Phi convs spread over the scales
            k = share
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([phi() for _ in range(k)]))
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
        out = []
        for part in row_blocks(z.detach(), e.shape[0]):
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

    def quantize_scale(self, si: int, f_rest: Tensor) -> tuple[Tensor, Tensor]:
        """One residual step: f_rest (B, Cvae, H, W) → (indices (B·pn²,) long of the nearest codes of f_rest
        area-downsampled to pn = v_patch_nums[si], their map's contribution to f_hat (B, Cvae, H, W): bicubic
        upsampling (all scales but the last), then Phi)."""
        b, _, h, w = f_rest.shape
        pn, last = self.v_patch_nums[si], si == len(self.v_patch_nums) - 1
        z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        idx = self.nearest(rearrange(z, "b c h w -> (b h w) c"))
        emb = rearrange(self.embedding(idx), "(b h w) c -> b c h w", b=b, h=pn, w=pn)
        if not last:
            emb = F.interpolate(emb, size=(h, w), mode="bicubic")
        return idx, self.phi(si)(emb.contiguous())

    @staticmethod
    def _to_map(vectors: Tensor, pn: int) -> Tensor:
        """(B, pn², C) raster-order vectors → (B, C, pn, pn) (a strided view, like the official transpose + view)."""
        return vectors.transpose(1, 2).reshape(vectors.shape[0], vectors.shape[2], pn, pn)

    # -- the residual recipes -----------------------------------------------------------------------------
    def f_to_idx(self, f: Tensor) -> list[Tensor]:
        """f (B, Cvae, H, W) encoder latent → per-scale indices [(B, pn²) long] (official ``f_to_idxBl_or_fhat``)."""
        b, _, h, w = f.shape
        if (h, w) != (self.full_size, self.full_size):
            raise ValueError(
                f"latent grid {h}x{w} does not match the last patch number {self.full_size} of v_patch_nums"
            )
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            idx, hh = self.quantize_scale(si, f_rest)
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
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        vq_loss = f.new_zeros(())
        hits = []
        for si in range(len(self.v_patch_nums)):
            idx, hh = self.quantize_scale(si, f_rest)
            hits.append(idx.bincount(minlength=self.vocab_size).float())
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
