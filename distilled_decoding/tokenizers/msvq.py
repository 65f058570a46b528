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

Phi selection per scale: :func:`~distilled_decoding.tokenizers.msvq_quant.phi_indices`.

Layers: :mod:`~distilled_decoding.tokenizers.msvq_layers` (shared conv blocks in
:mod:`~distilled_decoding.tokenizers.layers`), the quantizer :mod:`~distilled_decoding.tokenizers.msvq_quant`;
configuration: :mod:`~distilled_decoding.tokenizers.msvq_config`; reading official files:
:mod:`~distilled_decoding.tokenizers.msvq_official`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import load_state_dict_file, load_strict
from distilled_decoding.model_config import config_init
from distilled_decoding.tokenizers.layers import conv2d
from distilled_decoding.tokenizers.msvq_config import PATCH_NUMS_256, PATCH_NUMS_512, MSVQConfig
from distilled_decoding.tokenizers.msvq_layers import Decoder, Encoder
from distilled_decoding.tokenizers.msvq_official import (
    config_hint,
    describe_config,
    fit_usage_buffer,
    infer_msvq_config,
    official_msvq_config,
)
from distilled_decoding.tokenizers.msvq_quant import MultiScaleQuantizer, phi_indices

__all__ = ["MultiScaleVQVAE", "MSVQConfig", "PATCH_NUMS_256", "PATCH_NUMS_512", "phi_indices", "infer_msvq_config"]


class MultiScaleVQVAE(ModelMixin, ConfigMixin):
    """VAR's multi-scale VQVAE: images (B, 3, H, W) in [-1, 1] ↔ scale-major tokens (B, L), L = Σ pn².

    Constructor arguments are the fields of :class:`MSVQConfig` (the official ``VQVAE`` names plus the ``ddconfig``
    fields the official class hard-codes), validated there. The defaults are the released tokenizer
    ``vae_ch160v4096z32.pth`` (note ``ch=160``; the official class default is 128).
    H = W = ``v_patch_nums[-1] · downsample_factor`` (256 for the official model).

    ``test_mode=True`` (official default) freezes the parameters at construction (``requires_grad=False``, eval);
    pass ``test_mode=False`` to train. ``forward(images)`` is the training pass; inference uses :meth:`encode`,
    :meth:`decode_tokens`, :meth:`decode_vectors` and the VAR helpers :meth:`tokens_to_var_input`,
    :meth:`vectors_to_var_input`, :meth:`next_autoregressive_input`.
    """

    _supports_gradient_checkpointing = False

    @config_init(MSVQConfig)
    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums: tuple[int, ...] = cfg.v_patch_nums
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = conv2d(self.Cvae, self.Cvae, cfg.quant_conv_ks)
        self.post_quant_conv = conv2d(self.Cvae, self.Cvae, cfg.quant_conv_ks)
        ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        self._slices = [(int(a), int(b)) for a, b in zip([0, *ends[:-1]], ends)]
        if cfg.test_mode:
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
        cfg = official_msvq_config(sd, **overrides)
        with torch.device("meta"):
            model = cls(**cfg)
        sd = fit_usage_buffer(sd, model.num_scales)
        what = f"MultiScaleVQVAE ({describe_config(model.config)})"
        load_strict(model, sd, source=os.fspath(path), what=what, hint=config_hint, assign=True)
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
