"""LlamaGen VQ image tokenizer (VQ-16 / VQ-8), numerically equal to the official ``VQModel``.

Official files (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``: ``{"model": state_dict}``) load unchanged: the module
tree and the state-dict keys are the official ones (VQ-16: 344 keys, 71,883,403 parameters plus the
65,536-element buffer ``quantize.codebook_used``; VQ-8: 300 keys, 70,109,835 + 65,536)::

    encoder.conv_in → encoder.conv_blocks.{i}.res.{j} / .attn.{j} (last level) / .downsample
      → encoder.mid.{0,1,2} → encoder.norm_out → encoder.conv_out → quant_conv (z_channels → D)
    quantize.embedding.weight (V, D) [+ quantize.codebook_used (65536,)]
    post_quant_conv (D → z_channels) → decoder.conv_in → decoder.mid.{0,1,2}
      → decoder.conv_blocks.{i}.res.{j} / .attn.{j} (first block) / .upsample
      → decoder.norm_out → decoder.conv_out

Numerics: GroupNorm(32 groups, eps 1e-6), swish ``x * sigmoid(x)``, stride-2 3x3 conv after a (0, 1, 0, 1)
zero pad to downsample, nearest x2 + 3x3 conv to upsample, single-head attention over the spatial grid with
separate 1x1 ``q``/``k``/``v`` convs and scale ``c ** -0.5``. Quantisation l2-normalises the latent and the
codebook rows (when ``codebook_l2_norm``) and takes the argmin of ``|z|^2 + |e|^2 - 2 z.e``.

Layers: :mod:`~distilled_decoding.tokenizers.vq_layers` (shared conv blocks in
:mod:`~distilled_decoding.tokenizers.layers`); configuration and presets:
:mod:`~distilled_decoding.tokenizers.vq_config`; reading official files:
:mod:`~distilled_decoding.tokenizers.vq_official`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor

from distilled_decoding.checkpoints import load_state_dict_file, load_strict
from distilled_decoding.model_config import config_fields, config_init
from distilled_decoding.tokenizers.layers import conv2d
from distilled_decoding.tokenizers.vq_config import VQ_PRESETS, VQConfig
from distilled_decoding.tokenizers.vq_layers import USAGE_HISTORY, Decoder, Encoder, VectorQuantizer
from distilled_decoding.tokenizers.vq_official import describe_config, infer_vq_config, official_vq_config, preset_hint

__all__ = ["VQTokenizer", "VQConfig", "VQ_PRESETS", "USAGE_HISTORY", "infer_vq_config"]


class VQTokenizer(ModelMixin, ConfigMixin):
    """LlamaGen VQ tokenizer: images (B, 3, H, W) in [-1, 1] ↔ tokens (B, h*w), h = H / downsample_factor.

    Constructor arguments are the fields of :class:`VQConfig` (the official ``ModelArgs`` fields plus ``ch`` and
    ``num_res_blocks``), validated there. ``forward(images)`` is the training pass
    (reconstruction + VQ losses); inference uses :meth:`encode`, :meth:`decode_tokens` and
    :meth:`decode_vectors`. Presets: :data:`VQ_PRESETS` / :meth:`from_preset`.
    """

    _supports_gradient_checkpointing = False

    @config_init(VQConfig)
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.encoder = Encoder(cfg.ch, cfg.encoder_ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.dropout_p)
        self.decoder = Decoder(cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.dropout_p)
        self.quantize = VectorQuantizer(
            cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_loss_beta, cfg.entropy_loss_ratio,
            cfg.codebook_l2_norm, cfg.codebook_show_usage,
        )  # fmt: skip
        self.quant_conv = conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VQTokenizer:
        """Official size ``"VQ-16"`` / ``"VQ-8"``, fresh (official-init) weights; overrides: config fields."""
        if name not in VQ_PRESETS:
            raise ValueError(f"preset name={name!r}: expected one of {sorted(VQ_PRESETS)}")
        fields = config_fields(VQConfig)
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown VQTokenizer config field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**{**VQ_PRESETS[name], **overrides})

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        preset: str | None = None,
        *,
        key: str | None = None,
        revision: str | None = None,
        **overrides: Any,
    ) -> VQTokenizer:
        """Load an official LlamaGen tokenizer file (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``, ``.safetensors``): a
        local path or a Hub reference (``"FoundationVision/LlamaGen/vq_ds16_c2i.pt"``; ``revision`` pins it).

        ``preset=None`` (default) builds the architecture from the checkpoint's shapes
        (:func:`infer_vq_config`), so VQ-16 and VQ-8 files both load; ``preset="VQ-16"`` / ``"VQ-8"`` insists
        on that layout and fails with a hint when the file does not fit. ``overrides`` are config fields (e.g.
        ``entropy_loss_ratio``: loss settings are not stored in the files and default to the official values).
        ``key`` picks an entry of the file (default ``"model"``, as the official samplers; ``"ema"`` where
        present).

        Files saved with ``codebook_show_usage=False`` have no ``quantize.codebook_used`` buffer: unless
        ``codebook_show_usage`` is passed explicitly, it follows the file (so such files load, without usage
        bookkeeping). The model is returned in eval mode.
        """
        sd = load_state_dict_file(path, key=key, revision=revision)
        cfg = official_vq_config(sd, preset, **overrides)
        with torch.device("meta"):
            model = cls(**cfg)
        what = f"LlamaGen VQ tokenizer {preset or ''} ({describe_config(cfg)})".replace("  ", " ")
        load_strict(model, sd, source=os.fspath(path), what=what, hint=preset_hint, assign=True)
        return model.eval()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """(V, D) codebook vectors in the model dtype: l2-normalised rows when ``codebook_l2_norm``, else raw.

        These are the vectors the tokens index (the latent the decoder sees) and the flow map's targets. The
        result is differentiable w.r.t. ``quantize.embedding.weight``; detach it where that is not wanted.
        """
        return self.quantize.codebook()

    @property
    def codebook_size(self) -> int:
        """V, the number of codebook entries (token ids lie in [0, V))."""
        return int(self.config.codebook_size)

    @property
    def embed_dim(self) -> int:
        """D, the codebook vector dimension."""
        return int(self.config.codebook_embed_dim)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: 2 ** (len(encoder_ch_mult) - 1) (16 for VQ-16, 8 for VQ-8)."""
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    # -- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) float in [-1, 1], H and W multiples of ``downsample_factor`` f →
        tokens (B, h*w) long in [0, V), raster order (row-major over the (h, w) = (H/f, W/f) grid).

        Official quantisation: the (l2-normalised) latent's nearest (l2-normalised) codebook row by squared
        distance, computed in float32.
        """
        self._check_images(images)
        z = self.quant_conv(self.encoder(images.to(device=self.device, dtype=self.dtype)))
        idx = self.quantize.nearest(rearrange(z, "b d h w -> (b h w) d"))
        return rearrange(idx, "(b n) -> b n", b=images.shape[0])

    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """tokens (B, h*w) or (B, h, w) integer in [0, V) → images (B, 3, h*f, w*f) float, nominally in
        [-1, 1] but not clamped (official ``decode_code``).

        ``grid=(h, w)`` is required for non-square (B, h*w) input; (B, h, w) input carries its grid.
        Equals ``decode_vectors(codebook[tokens], grid)``.
        """
        if not isinstance(tokens, Tensor):
            raise ValueError(f"tokens must be an integer tensor (B, h*w) or (B, h, w); got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must have an integer dtype (e.g. torch.long); got {tokens.dtype}")
        if tokens.ndim not in (2, 3):
            raise ValueError(f"tokens must have shape (B, h*w) or (B, h, w); got {tuple(tokens.shape)}")
        grid = self._grid(tokens.shape, grid, "tokens")
        if tokens.numel() > 0:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"tokens out of range: min {lo}, max {hi}; expected token ids in "
                    f"[0, {self.codebook_size}) (codebook_size)"
                )
        flat = tokens.reshape(tokens.shape[0], -1).to(device=self.device, dtype=torch.long)
        return self.decode_vectors(self.codebook[flat], grid)

    def decode_vectors(self, vectors: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """vectors (B, h*w, D) or (B, h, w, D) float, codebook-space latents in raster order (codebook rows
        or a student's continuous outputs; no quantisation) → images (B, 3, h*f, w*f), nominally in [-1, 1],
        not clamped. ``grid=(h, w)`` is required for non-square (B, h*w, D) input.
        """
        if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
            what = vectors.dtype if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors must be a float tensor (B, h*w, D) or (B, h, w, D); got {what}")
        if vectors.ndim not in (3, 4) or vectors.shape[-1] != self.embed_dim:
            raise ValueError(
                f"vectors must have shape (B, h*w, {self.embed_dim}) or (B, h, w, {self.embed_dim}) "
                f"(D = codebook_embed_dim); got {tuple(vectors.shape)}"
            )
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("vectors contain NaN or inf values; expected finite codebook-space latents")
        h, w = self._grid(vectors.shape[:-1], grid, "vectors")
        z = rearrange(vectors.reshape(vectors.shape[0], h * w, -1), "b (h w) d -> b d h w", h=h, w=w)
        # contiguous NCHW as in official decode_code (a channels-last view picks other kernels: ~1e-5 off)
        return self._decode(z.to(device=self.device, dtype=self.dtype).contiguous())

    def _decode(self, z: Tensor) -> Tensor:
        """(B, D, h, w) latent → (B, 3, h*f, w*f): post_quant_conv + decoder (the one decode path)."""
        return self.decoder(self.post_quant_conv(z))

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Training pass (official ``VQModel.forward``): images (B, 3, H, W) in [-1, 1] →
        (reconstruction (B, 3, H, W), losses).

        ``losses``: ``codebook_loss`` = mean((z_q - sg[z])^2), ``commit_loss`` = beta * mean((sg[z_q] - z)^2),
        ``entropy_loss`` = entropy_loss_ratio * (per-sample entropy - entropy of the mean assignment) at
        temperature 0.01 (zero when the ratio is 0), ``total`` = their sum (what the official trainer adds to
        the reconstruction losses): scalar tensors, computed in eval mode too. ``codebook_usage`` (float) =
        distinct ids among the last 65,536 assigned / V, updated in training mode when ``codebook_show_usage``
        (else 0.0). z is l2-normalised when ``codebook_l2_norm``; the decoder sees the straight-through z_q.
        """
        self._check_images(images)
        z = self.quant_conv(self.encoder(images.to(device=self.device, dtype=self.dtype)))
        b, _, h, w = z.shape
        z_q, _, losses = self.quantize(rearrange(z, "b d h w -> (b h w) d"))
        return self._decode(rearrange(z_q, "(b h w) d -> b d h w", b=b, h=h, w=w)), losses

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        f = self.downsample_factor
        expected = f"a float tensor of shape (B, 3, H, W) with H and W multiples of {f}, values in [-1, 1]"
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be {expected}; got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"images must be {expected}; got dtype {images.dtype}")
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or images.shape[2] % f
            or images.shape[3] % f
            or 0 in images.shape[2:]
        ):
            raise ValueError(f"images must be {expected}; got shape {tuple(images.shape)}")

    @staticmethod
    def _grid(shape: Sequence[int], grid: tuple[int, int] | None, name: str) -> tuple[int, int]:
        """(B, N) or (B, h, w) leading shape + optional grid → the (h, w) grid, checked."""
        if grid is not None:
            if (
                not isinstance(grid, Sequence)
                or len(grid) != 2
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
            ):
                raise ValueError(f"grid must be a pair of positive ints (h, w); got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        if len(shape) == 3:
            if grid is not None and grid != (shape[1], shape[2]):
                raise ValueError(f"grid={grid} does not match {name} of shape {tuple(shape)}")
            return int(shape[1]), int(shape[2])
        n = int(shape[1])
        if grid is None:
            side = math.isqrt(n)
            if side * side != n or n == 0:
                raise ValueError(f"{name} hold {n} positions, not a square grid: pass grid=(h, w) with h*w = {n}")
            return side, side
        if grid[0] * grid[1] != n:
            raise ValueError(f"grid={grid} has {grid[0] * grid[1]} positions but {name} hold {n} per image")
        return grid
