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
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor, nn

from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file, load_strict

__all__ = ["VQTokenizer", "VQ_PRESETS", "infer_vq_config"]

_BASE: dict[str, Any] = {
    "codebook_size": 16384,
    "codebook_embed_dim": 8,
    "codebook_l2_norm": True,
    "codebook_show_usage": True,
    "commit_loss_beta": 0.25,
    "entropy_loss_ratio": 0.0,
    "z_channels": 256,
    "dropout_p": 0.0,
    "ch": 128,
    "num_res_blocks": 2,
}
VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": {**_BASE, "encoder_ch_mult": (1, 1, 2, 2, 4), "decoder_ch_mult": (1, 1, 2, 2, 4)},
    "VQ-8": {**_BASE, "encoder_ch_mult": (1, 2, 2, 4), "decoder_ch_mult": (1, 2, 2, 4)},
}
"""Official LlamaGen tokenizer sizes (``VQ_models`` in ``vq_model.py``); values are constructor arguments."""

USAGE_HISTORY = 65536  # length of the official ``codebook_used`` ring buffer (hard-coded upstream)
_GROUPS = 32  # GroupNorm groups (official ``Normalize``)
_DIST_BLOCK = 1 << 25  # max elements of one (rows, V) distance block in ``encode``


# ----------------------------------------------------------------------------------------------------------
# building blocks (upstream: ResnetBlock, AttnBlock, Downsample, Upsample, Encoder, Decoder, VectorQuantizer)
# ----------------------------------------------------------------------------------------------------------
def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if padding is None else padding)


class _ResnetBlock(nn.Module):
    """GN → swish → conv3x3 → GN → swish → dropout → conv3x3, plus the (1x1 ``nin_shortcut``) residual."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv(c_in, c_out, 3)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(c_out, c_out, 3)
        if c_in != c_out:
            self.nin_shortcut = _conv(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a (B, C, h, w) map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv(channels, channels, 1)
        self.k = _conv(channels, channels, 1)
        self.v = _conv(channels, channels, 1)
        self.proj_out = _conv(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        y = self.norm(x)
        q = rearrange(self.q(y), "b c h w -> b (h w) c")
        k = rearrange(self.k(y), "b c h w -> b c (h w)")
        v = rearrange(self.v(y), "b c h w -> b c (h w)")
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, query, key)
        out = torch.bmm(v, attn.transpose(1, 2))  # (B, C, query)
        return x + self.proj_out(rearrange(out, "b c (h w) -> b c h w", h=h, w=w))


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
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res.{j}`` blocks, each followed by ``attn.{j}`` on attention levels."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.res.append(_ResnetBlock(c_in, c_out, dropout))
            c_in = c_out
            if attention:
                self.attn.append(_AttnBlock(c_out))

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            _ResnetBlock(channels, channels, dropout),
            _AttnBlock(channels),
            _ResnetBlock(channels, channels, dropout),
        ]
    )


class _Encoder(nn.Module):
    """(B, 3, H, W) → (B, z_channels, H/f, W/f) with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        self.conv_in = _conv(3, ch, 3)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            level = _Level(c, ch * mult, num_res_blocks, attention=last, dropout=dropout)
            c = ch * mult
            if not last:
                level.downsample = _Downsample(c)
            self.conv_blocks.append(level)
        self.mid = _mid(c, dropout)
        self.norm_out = _norm(c)
        self.conv_out = _conv(c, z_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, 3, h*f, w*f); ``conv_blocks.0`` is the lowest resolution (attention)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = _conv(z_channels, c, 3)
        self.mid = _mid(c, dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = _Level(c, ch * ch_mult[i], num_res_blocks + 1, attention=i == len(ch_mult) - 1, dropout=dropout)
            c = ch * ch_mult[i]
            if i != 0:
                level.upsample = _Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c)
        self.conv_out = _conv(c, 3, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _sq_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """(M, D), (V, D) → (M, V) squared distances ``|z|^2 + |e|^2 - 2 z.e`` (the official expansion)."""
    return z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * (z @ codebook.t())


def _entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """Official ``compute_entropy_loss`` (softmax): mean per-sample entropy minus the entropy of the mean."""
    logits = affinity / temperature
    probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class _VectorQuantizer(nn.Module):
    """Codebook ``embedding.weight`` (V, D) and, with ``show_usage``, the ring buffer ``codebook_used``."""

    def __init__(self, size: int, dim: int, beta: float, entropy_ratio: float, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.beta, self.entropy_ratio, self.l2_norm = beta, entropy_ratio, l2_norm
        self.embedding = nn.Embedding(size, dim)
        with torch.no_grad():  # official init: U(-1/V, 1/V), then l2-normalised rows
            self.embedding.weight.uniform_(-1.0 / size, 1.0 / size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: Tensor) -> Tensor:
        """z (M, D) raw latents → (M,) long indices of the nearest codebook rows (computed in float32)."""
        z = z.float()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook().float()
        rows = max(1, _DIST_BLOCK // codebook.shape[0])
        return torch.cat([_sq_distances(part, codebook).argmin(1) for part in z.split(rows)])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """z (M, D) raw latents → (straight-through z_q (M, D), indices (M,), losses)."""
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook()
        d = _sq_distances(z, codebook)
        idx = d.argmin(1)
        z_q = codebook[idx]
        losses: dict[str, Any] = {
            "codebook_loss": torch.mean((z_q - z.detach()) ** 2),
            "commit_loss": self.beta * torch.mean((z_q.detach() - z) ** 2),
            "entropy_loss": self.entropy_ratio * _entropy_loss(-d) if self.entropy_ratio else d.new_zeros(()),
        }
        losses["total"] = losses["codebook_loss"] + losses["commit_loss"] + losses["entropy_loss"]
        losses["codebook_usage"] = self._update_usage(idx) if self.training else 0.0
        return z + (z_q - z).detach(), idx, losses

    @torch.no_grad()
    def _update_usage(self, idx: Tensor) -> float:
        """Append ``idx`` to the ring buffer (oldest first) and return unique(buffer) / V, as upstream."""
        buf = getattr(self, "codebook_used", None)
        if buf is None:
            return 0.0
        new = idx.to(buf.dtype)[-buf.numel() :]
        buf.copy_(torch.cat([buf[new.numel() :], new]))
        return torch.unique(buf).numel() / self.embedding.num_embeddings


# ----------------------------------------------------------------------------------------------------------
# config checks and inference from checkpoints
# ----------------------------------------------------------------------------------------------------------
def _validate(cfg: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"VQTokenizer config {name}={cfg[name]!r}: expected {expected}")

    for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(name, "a positive int")
    for name in ("codebook_l2_norm", "codebook_show_usage"):
        if not isinstance(cfg[name], bool):
            raise bad(name, "a bool")
    for name in ("commit_loss_beta", "entropy_loss_ratio"):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(name, "a finite float >= 0")
    p = cfg["dropout_p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise bad("dropout_p", "a float in [0, 1)")
    mults = []
    for name in ("encoder_ch_mult", "decoder_ch_mult"):
        m = cfg[name]
        if (
            isinstance(m, (str, bytes))
            or not isinstance(m, Sequence)
            or not m
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in m)
        ):
            raise bad(name, "a non-empty sequence of positive ints, e.g. (1, 1, 2, 2, 4)")
        widths = [cfg["ch"] * x for x in m]
        if any(wd % _GROUPS for wd in widths):
            raise ValueError(
                f"VQTokenizer config ch={cfg['ch']}, {name}={tuple(m)}: every width ch*mult (here {widths}) "
                f"must be divisible by {_GROUPS} (GroupNorm groups)"
            )
        mults.append(tuple(int(x) for x in m))
    if len(mults[0]) != len(mults[1]):
        raise ValueError(
            f"VQTokenizer config encoder_ch_mult={mults[0]} and decoder_ch_mult={mults[1]} must have the "
            "same length (the decoder must upsample by the factor the encoder downsamples)"
        )
    return mults[0], mults[1]


def _level_widths(sd: Mapping[str, Tensor], part: str) -> tuple[list[int], int]:
    """Output widths of ``{part}.conv_blocks.{i}`` (module order) and the number of res blocks per level."""
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    pat = re.compile(rf"^{part}\.conv_blocks\.(\d+)\.res\.(\d+)\.conv2\.weight$")
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            blocks[i] = max(blocks.get(i, 0), j + 1)
            if j == 0:
                widths[i] = int(v.shape[0])
    if not widths or sorted(widths) != list(range(len(widths))):
        raise CheckpointError(f"no {part}.conv_blocks.{{i}}.res.{{j}}.conv2.weight keys found")
    return [widths[i] for i in range(len(widths))], blocks[0]


def infer_vq_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of a LlamaGen VQ state dict, read from its tensor shapes.

    Returns ``codebook_size``, ``codebook_embed_dim``, ``codebook_show_usage``, ``z_channels``, ``ch``,
    ``num_res_blocks``, ``encoder_ch_mult``, ``decoder_ch_mult``. The loss settings (``codebook_l2_norm``,
    ``commit_loss_beta``, ``entropy_loss_ratio``, ``dropout_p``) are not stored in the files. Raises
    :class:`~distilled_decoding.checkpoints.CheckpointError` when the keys are not those of a VQ tokenizer.
    """
    try:
        size, dim = state_dict["quantize.embedding.weight"].shape
        ch = int(state_dict["encoder.conv_in.weight"].shape[0])
        z_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            "not a LlamaGen VQ tokenizer state dict (needs quantize.embedding.weight (V, D), "
            f"encoder.conv_in.weight, encoder.conv_out.weight; problem with {e})"
        ) from e
    enc, n_res = _level_widths(state_dict, "encoder")
    dec, _ = _level_widths(state_dict, "decoder")
    if any(w % ch for w in enc + dec):
        raise CheckpointError(f"level widths {enc} / {dec} are not multiples of ch={ch}")
    return {
        "codebook_size": int(size),
        "codebook_embed_dim": int(dim),
        "codebook_show_usage": "quantize.codebook_used" in state_dict,
        "z_channels": z_channels,
        "ch": ch,
        "num_res_blocks": n_res,
        "encoder_ch_mult": tuple(w // ch for w in enc),
        "decoder_ch_mult": tuple(w // ch for w in reversed(dec)),
    }


def _describe(cfg: Mapping[str, Any]) -> str:
    return (
        f"codebook {cfg['codebook_size']}x{cfg['codebook_embed_dim']}, ch={cfg['ch']}, "
        f"encoder_ch_mult={tuple(cfg['encoder_ch_mult'])}, decoder_ch_mult={tuple(cfg['decoder_ch_mult'])}, "
        f"num_res_blocks={cfg['num_res_blocks']}, z_channels={cfg['z_channels']}"
    )


def _hint(sd: Mapping[str, Tensor]) -> str:
    try:
        cfg = infer_vq_config(sd)
    except CheckpointError as e:
        return f"hint: {e}; is this a GPT/VAR checkpoint rather than a LlamaGen VQ tokenizer?"
    fields = ("encoder_ch_mult", "decoder_ch_mult", "ch", "num_res_blocks", "z_channels")
    preset = next(
        (
            name
            for name, p in VQ_PRESETS.items()
            if all(tuple(p[f]) == tuple(cfg[f]) if "mult" in f else p[f] == cfg[f] for f in fields)
        ),
        None,
    )
    fit = f"preset={preset!r}" if preset else "no preset"
    return (
        f"hint: the checkpoint's shapes say {_describe(cfg)}; that fits {fit}. Pass preset=None to build the "
        "architecture from the checkpoint, or the matching preset / config overrides."
    )


# ----------------------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------------------
class VQTokenizer(ModelMixin, ConfigMixin):
    """LlamaGen VQ tokenizer: images (B, 3, H, W) in [-1, 1] ↔ tokens (B, h*w), h = H / downsample_factor.

    Constructor arguments are the official ``ModelArgs`` fields plus ``ch`` and ``num_res_blocks`` (hard-coded
    128 and 2 upstream; exposed for small tokenizers). ``forward(images)`` is the training pass
    (reconstruction + VQ losses); inference uses :meth:`encode`, :meth:`decode_tokens` and
    :meth:`decode_vectors`. Presets: :data:`VQ_PRESETS` / :meth:`from_preset`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        codebook_show_usage: bool = True,
        commit_loss_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        dropout_p: float = 0.0,
        ch: int = 128,
        num_res_blocks: int = 2,
    ):
        super().__init__()
        enc_mult, dec_mult = _validate(
            {
                "codebook_size": codebook_size,
                "codebook_embed_dim": codebook_embed_dim,
                "codebook_l2_norm": codebook_l2_norm,
                "codebook_show_usage": codebook_show_usage,
                "commit_loss_beta": commit_loss_beta,
                "entropy_loss_ratio": entropy_loss_ratio,
                "encoder_ch_mult": encoder_ch_mult,
                "decoder_ch_mult": decoder_ch_mult,
                "z_channels": z_channels,
                "dropout_p": dropout_p,
                "ch": ch,
                "num_res_blocks": num_res_blocks,
            }
        )
        self.encoder = _Encoder(ch, enc_mult, num_res_blocks, z_channels, dropout_p)
        self.decoder = _Decoder(ch, dec_mult, num_res_blocks, z_channels, dropout_p)
        self.quantize = _VectorQuantizer(
            codebook_size, codebook_embed_dim, commit_loss_beta, entropy_loss_ratio, codebook_l2_norm,
            codebook_show_usage,
        )  # fmt: skip
        self.quant_conv = _conv(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = _conv(codebook_embed_dim, z_channels, 1)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VQTokenizer:
        """Official size ``"VQ-16"`` / ``"VQ-8"``, fresh (official-init) weights; overrides: config fields."""
        if name not in VQ_PRESETS:
            raise ValueError(f"preset name={name!r}: expected one of {sorted(VQ_PRESETS)}")
        unknown = sorted(set(overrides) - set(VQ_PRESETS[name]))
        if unknown:
            raise ValueError(f"unknown VQTokenizer config field(s) {unknown}; valid: {sorted(VQ_PRESETS[name])}")
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
        if preset is None:
            cfg = {**VQ_PRESETS["VQ-16"], **infer_vq_config(sd)}
        elif preset in VQ_PRESETS:
            cfg = dict(VQ_PRESETS[preset])
        else:
            raise ValueError(f"preset={preset!r}: expected None (infer from the file) or one of {sorted(VQ_PRESETS)}")
        cfg["codebook_show_usage"] = "quantize.codebook_used" in sd
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise ValueError(f"unknown VQTokenizer config field(s) {unknown}; valid: {sorted(cfg)}")
        cfg.update(overrides)
        with torch.device("meta"):
            model = cls(**cfg)
        what = f"LlamaGen VQ tokenizer {preset or ''} ({_describe(cfg)})".replace("  ", " ")
        load_strict(model, sd, source=os.fspath(path), what=what, hint=_hint, assign=True)
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
