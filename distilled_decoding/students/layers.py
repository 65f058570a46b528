"""Layers the Distilled Decoding students add to their teacher's network (official ``dd.py`` names)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FinalLayer", "LabelTable"]


class FinalLayer(nn.Module):
    """PixArt-style final layer: LayerNorm (no affine) modulated by the class embedding, then Linear(dim, D)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (B, S, dim), cond (B, 1, dim) → (B, S, out_dim)."""
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class LabelTable(nn.Module):
    """The class table (``cls_embedding.embedding_table``, num_classes + 1 rows as in the official student)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels).unsqueeze(1)
