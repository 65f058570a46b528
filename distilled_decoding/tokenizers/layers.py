"""Conv building blocks shared by the LlamaGen VQ tokenizer and VAR's multi-scale VQVAE.

Both descend from the taming-transformers autoencoder and agree on these pieces and on their state-dict names:
GroupNorm(32 groups, eps 1e-6); the ``ResnetBlock`` (``norm1, conv1, norm2, conv2[, nin_shortcut]``); the stride-2
``Downsample`` after a (0, 1, 0, 1) zero pad and the nearest-x2 ``Upsample`` (each with its ``conv``); the levels of
the encoder (level i: ch·mult[i−1] → ch·mult[i], attention on the last, then ``downsample``) and of the decoder
(run from the lowest resolution up, one more res block each, then ``upsample``). They differ in the activation
(LlamaGen ``x * sigmoid(x)``, VAR ``F.silu``: not bit-identical, so it is a parameter), the attention block and the
names of the module trees (:mod:`~distilled_decoding.tokenizers.vq_layers`,
:mod:`~distilled_decoding.tokenizers.msvq_layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NORM_GROUPS",
    "DIST_BLOCK",
    "Activation",
    "LevelFactory",
    "swish",
    "group_norm",
    "conv2d",
    "check_group_widths",
    "ResnetBlock",
    "Downsample",
    "Upsample",
    "res_attn_lists",
    "run_res_attn",
    "encoder_levels",
    "decoder_levels",
    "row_blocks",
]

NORM_GROUPS = 32  #: GroupNorm groups (official ``Normalize``)
DIST_BLOCK = 1 << 25  #: max elements of one (rows, V) code-distance block when quantising

Activation = Callable[[Tensor], Tensor]
#: ``make_level(c_in, c_out, n_blocks, last)`` → one resolution level (``last``: the lowest-resolution level)
LevelFactory = Callable[[int, int, int, bool], nn.Module]


def swish(x: Tensor) -> Tensor:
    """LlamaGen's ``nonlinearity``: ``x * sigmoid(x)`` (equal to SiLU mathematically, not bit for bit)."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """The official ``Normalize``: GroupNorm(32, channels, eps=1e-6, affine)."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


def conv2d(c_in: int, c_out: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """k x k conv with "same" padding (k // 2) unless ``padding`` is given."""
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if padding is None else padding)


def check_group_widths(model: str, ch: int, field: str, mults: Sequence[int]) -> None:
    """Raise ValueError unless every level width ``ch * mult`` is divisible by the GroupNorm groups."""
    widths = [ch * m for m in mults]
    if any(w % NORM_GROUPS for w in widths):
        raise ValueError(
            f"{model} config ch={ch}, {field}={tuple(mults)}: every width ch*mult (here {widths}) must be divisible "
            f"by {NORM_GROUPS} (GroupNorm groups)"
        )


class ResnetBlock(nn.Module):
    """(B, c_in, h, w) → (B, c_out, h, w): GN → act → conv3x3 → GN → act → dropout → conv3x3, plus the residual
    (a 1x1 ``nin_shortcut`` conv when c_in != c_out, else the identity, which has no weights)."""

    def __init__(self, c_in: int, c_out: int, dropout: float, act: Activation):
        super().__init__()
        self.act = act
        self.norm1 = group_norm(c_in)
        self.conv1 = conv2d(c_in, c_out, 3)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv2d(c_out, c_out, 3)
        self.nin_shortcut = conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """(B, C, h, w) → (B, C, h/2, w/2): zero pad (0, 1, 0, 1), then a stride-2 3x3 ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """(B, C, h, w) → (B, C, 2h, 2w): nearest x2, then a 3x3 ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def res_attn_lists(
    c_in: int,
    c_out: int,
    n_blocks: int,
    dropout: float,
    act: Activation,
    attn_block: Callable[[int], nn.Module] | None,
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The blocks of one resolution level: ``n_blocks`` ResnetBlocks (the first c_in → c_out) and, when
    ``attn_block`` is given, one attention block ``attn_block(c_out)`` after each (else an empty list)."""
    res, attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        res.append(ResnetBlock(c_in, c_out, dropout, act))
        c_in = c_out
        if attn_block is not None:
            attn.append(attn_block(c_out))
    return res, attn


def run_res_attn(x: Tensor, res: nn.ModuleList, attn: nn.ModuleList) -> Tensor:
    """Apply the blocks of :func:`res_attn_lists`: res block j, then attention block j on attention levels."""
    for j, block in enumerate(res):
        x = block(x)
        if len(attn) > 0:
            x = attn[j](x)
    return x


def encoder_levels(ch: int, ch_mult: Sequence[int], n_blocks: int, make_level: LevelFactory) -> nn.ModuleList:
    """The encoder's levels, highest resolution first: level i maps ch·mult[i−1] (ch for i = 0) → ch·mult[i] with
    ``n_blocks`` res blocks and gets ``downsample`` (a :class:`Downsample`; ``nn.Identity`` on the last level)."""
    levels = nn.ModuleList()
    c = ch
    for i, mult in enumerate(ch_mult):
        last = i == len(ch_mult) - 1
        level = make_level(c, ch * mult, n_blocks, last)
        c = ch * mult
        level.downsample = nn.Identity() if last else Downsample(c)
        levels.append(level)
    return levels


def decoder_levels(ch: int, ch_mult: Sequence[int], n_blocks: int, make_level: LevelFactory) -> list[nn.Module]:
    """The decoder's levels in run order, lowest resolution (level len(ch_mult) − 1, ``last``) first: level i maps
    the previous width (ch·mult[−1] for the first) → ch·mult[i] with ``n_blocks + 1`` res blocks and gets
    ``upsample`` (an :class:`Upsample`; ``nn.Identity`` on level 0)."""
    levels = []
    c = ch * ch_mult[-1]
    for i in reversed(range(len(ch_mult))):
        level = make_level(c, ch * ch_mult[i], n_blocks + 1, i == len(ch_mult) - 1)
        c = ch * ch_mult[i]
        level.upsample = nn.Identity() if i == 0 else Upsample(c)
        levels.append(level)
    return levels


def row_blocks(z: Tensor, vocab_size: int) -> tuple[Tensor, ...]:
    """Split z (M, D) into row blocks whose (rows, vocab_size) distance matrices hold at most ``DIST_BLOCK``
    elements (bounded memory for nearest-code searches; the result does not depend on the split)."""
    return z.split(max(1, DIST_BLOCK // vocab_size))
