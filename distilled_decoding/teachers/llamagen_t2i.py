"""The text-to-image parts of LlamaGen (``model_type="t2i"``): caption embedder and caption attention mask.

Official module names and state-dict keys (``autoregressive/models/gpt.py``)::

    cls_embedding.cap_proj.fc1.weight      (dim, caption_dim)    no bias
    cls_embedding.cap_proj.fc2.weight      (dim, dim)            no bias, GELU(tanh) between
    cls_embedding.uncond_embedding         (120, caption_dim)    a buffer: the caption used for CFG / dropout

The caption features (FLAN-T5-XL: 120 tokens × 2048) fill the first ``cls_token_num`` positions of the sequence,
left-padded (``dataset/t2i.py``, ``sample/sample_t2i.py``). The attention mask of the official trainer and of
``generate`` is causal, hides the padded caption positions from every query, and lets every position attend to
itself (so a padded row is not empty); the null caption of CFG keeps the prompt's mask. Like the class token,
the caption positions have all-zero RoPE rows (their queries and keys are zero vectors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilled_decoding.conditions import TextCondition, TextConditionSpec

__all__ = ["CaptionEmbedder", "CaptionMLP", "caption_attention_mask"]


class CaptionMLP(nn.Module):
    """``fc1`` → GELU(tanh) → ``fc2``, no biases (the official ``MLP`` of ``CaptionEmbedder``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features (B, P, caption_dim) → (B, P, dim), with the learned unconditional caption for CFG.

    ``uncond_embedding`` has ``token_num`` = P rows (120 in every official model: the official class fixes it at
    120 whatever ``cls_token_num`` is, and only P = 120 samples with CFG there). In training mode a row's caption
    is replaced by it with probability ``uncond_prob`` (official ``class_dropout_prob``); the mask is kept.
    """

    def __init__(self, caption_dim: int, dim: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)
        self.uncond_prob = uncond_prob
        self.caption_dim, self.num_positions = caption_dim, token_num

    #: text-conditional models have no null class id (their null condition is the learned caption)
    null_class = None

    @property
    def spec(self) -> TextConditionSpec:
        """What this embedder takes: ``num_positions`` caption positions of width caption_dim; guidance pairs each
        caption with the learned null caption under the same mask (official ``generate``:
        ``zeros_like(cond) + uncond_embedding`` with the emb_masks repeated)."""
        return TextConditionSpec(self.num_positions, self.caption_dim, self.uncond_embedding)

    def forward(self, condition: TextCondition) -> Tensor:
        """(B, P, dim) embeddings; in training mode captions are dropped to the null caption w.p. uncond_prob."""
        feats = condition.features.to(self.uncond_embedding.dtype)
        if self.training and self.uncond_prob > 0:
            drop = torch.rand(feats.shape[0], device=feats.device) < self.uncond_prob
            feats = torch.where(drop[:, None, None], self.uncond_embedding, feats)
        return self.cap_proj(feats)

    def embed(self, condition: TextCondition) -> Tensor:
        """(B, P, dim) embeddings without dropout (decoding)."""
        return self.cap_proj(condition.features.to(self.uncond_embedding.dtype))

    def key_mask(self, condition: TextCondition) -> Tensor:
        """(B, P) bool: which condition positions the other positions may attend to."""
        return condition.mask


def caption_attention_mask(key_mask: Tensor, start: int, length: int) -> Tensor:
    """The official T2I attention mask for queries at positions ``start .. start+length-1`` over keys
    ``0 .. start+length-1``: causal, condition keys only where ``key_mask`` (B, P) is True, and the diagonal
    always allowed. Returns (B, 1, length, start+length) bool (True = attend)."""
    b, p = key_mask.shape
    total = start + length
    q = torch.arange(start, total, device=key_mask.device)[:, None]
    k = torch.arange(total, device=key_mask.device)[None, :]
    valid = F.pad(key_mask[:, :total], (0, max(0, total - p)), value=True)
    return (((k <= q) & valid[:, None, :]) | (k == q))[:, None]
