"""CLIP score of generated images against their prompts, through ``torchmetrics.multimodal.CLIPScore``.

Optional: needs ``torchmetrics`` (``pip install "distilled-decoding[clip]"``) and CLIP weights the user supplies — a
``transformers`` CLIP folder (``CLIPModel`` + ``CLIPProcessor``, e.g. a local copy of ``openai/clip-vit-large-patch14``)
or a Hub id (read from the Hugging Face cache, offline with ``HF_HUB_OFFLINE=1``). The score is torchmetrics': the
mean over images of 100 × cos(image embedding, prompt embedding), clipped at 0 (Hessel et al. 2021 without their 2.5
weight). Prompts longer than the CLIP text model's positions (77) are truncated by torchmetrics with a warning.

With transformers ≥ 5, ``CLIPModel.get_{image,text}_features`` return ``BaseModelOutputWithPooling`` instead of the
tensor that torchmetrics 1.9 expects (Lightning-AI/torchmetrics#3407); :class:`ProjectedFeatures` hands torchmetrics
the projected embeddings (``pooler_output``) either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["clip_score", "load_clip", "ProjectedFeatures"]


class ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected (B, E) tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(model: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a folder or a Hub id; ValueError naming ``clip_model`` otherwise."""
    from transformers import CLIPModel, CLIPProcessor

    src = str(model)
    if (src.startswith((".", "/", "~")) or src.count("/") > 1) and not Path(src).expanduser().exists():
        raise ValueError(f"clip_model: folder {src} does not exist (expected CLIP weights: a folder or a Hub id)")
    try:
        return CLIPModel.from_pretrained(src).eval(), CLIPProcessor.from_pretrained(src)
    except OSError as e:
        raise ValueError(f"clip_model={src!r}: cannot load CLIP weights ({str(e).splitlines()[0]})") from e


def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    model: str | os.PathLike | tuple[nn.Module, Any],
    *,
    batch_size: int = 64,
) -> float:
    """CLIP score of ``images`` (N, 3, H, W) uint8 (or float in [0, 1]) against ``prompts`` (N strings); ``model``
    is a CLIP folder / Hub id or a loaded ``(CLIPModel, CLIPProcessor)``."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as e:
        raise ImportError(
            "clip_model: the CLIP score needs torchmetrics (pip install 'distilled-decoding[clip]' or pip install "
            "torchmetrics); leave clip_model unset to skip it"
        ) from e
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    clip, processor = load_clip(model) if isinstance(model, (str, os.PathLike)) else model
    metric = CLIPScore(model_name_or_path=lambda: (ProjectedFeatures(clip), processor))
    for s in range(0, len(prompts), batch_size):
        metric.update(images[s : s + batch_size], prompts[s : s + batch_size])
    return float(metric.compute())
