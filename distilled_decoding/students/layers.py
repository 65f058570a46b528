"""Layers the Distilled Decoding students add to their teacher's network (official ``dd.py`` names), and the
students' condition tables.

A student's ``cls_embedding`` has the interface of the teacher's condition embedders (``spec``, ``num_positions``,
``key_mask``) plus ``pool`` (the (B, 1, dim) vector that modulates the continuous head) and ``copy_from`` (take the
teacher's weights): :class:`LabelTable` (class ids, one position) or :class:`CaptionTable` (caption features in
``cls_token_num`` positions, the teacher's caption projection). :data:`STUDENT_CONDITION_TABLES` picks one by the
teacher's ``model_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distilled_decoding.conditions import ClassCondition, TextCondition
from distilled_decoding.teachers.llamagen_t2i import CaptionEmbedder

__all__ = ["FinalLayer", "LabelTable", "CaptionTable", "STUDENT_CONDITION_TABLES"]


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

    num_positions = 1

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes = num_classes

    @property
    def spec(self) -> ClassCondition:
        return ClassCondition(self.num_classes)

    def forward(self, labels: Tensor) -> Tensor:
        """labels (B,) → (B, 1, dim)."""
        return self.embedding_table(labels).unsqueeze(1)

    def key_mask(self, labels: Tensor) -> None:
        return None

    def pool(self, embedded: Tensor, key_mask: None) -> Tensor:
        """The class embedding itself (B, 1, dim) (official: it modulates the continuous head)."""
        return embedded

    def copy_from(self, teacher_embedder: nn.Module) -> None:
        """The teacher's class rows (its null row too, when it has one)."""
        table = teacher_embedder.embedding_table.weight
        self.embedding_table.weight.data[: table.shape[0]].copy_(table)


class CaptionTable(CaptionEmbedder):
    """The teacher's caption projection (official keys ``cls_embedding.cap_proj.fc{1,2}.weight`` and the null caption
    ``cls_embedding.uncond_embedding``), without caption dropout: caption features (B, P, C) → (B, P, dim)."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__(caption_dim, dim, 0.0, token_num)

    def pool(self, embedded: Tensor, key_mask: Tensor) -> Tensor:
        """Mean of the projected caption over its real tokens, (B, 1, dim): the caption's counterpart of the class
        embedding that modulates the continuous head (the DD paper releases no T2I code; this is our choice)."""
        m = key_mask.to(embedded.dtype)[..., None]
        return (embedded * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)

    def copy_from(self, teacher_embedder: nn.Module) -> None:
        self.load_state_dict(teacher_embedder.state_dict())

    def forward(self, condition: TextCondition) -> Tensor:
        return self.embed(condition)


#: the student's condition table for each LlamaGen ``model_type``, built from the backbone config
STUDENT_CONDITION_TABLES: dict[str, Callable[[Any], nn.Module]] = {
    "c2i": lambda a: LabelTable(a.num_classes, a.dim),
    "t2i": lambda a: CaptionTable(a.caption_dim, a.dim, a.cls_token_num),
}
