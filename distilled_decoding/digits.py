"""scikit-learn's bundled digits as small RGB images: the data of the embedded default (no download).

``sklearn.datasets.load_digits`` ships 1,797 grayscale 8×8 digits (10 classes, 174–183 each) with integer
levels 0..16. Here they become ``uint8`` RGB images:

* levels 0..16 are mapped linearly to 0..255 (``level * 255 / 16``);
* 8×8 is upscaled to ``size × size`` with **bicubic** interpolation (``align_corners=False``), clamped to
  [0, 255] and rounded. Bicubic keeps the strokes sharper and more digit-like than bilinear (which blurs the
  8×8 grid into blobs) or nearest (blocky);
* the gray channel is repeated three times.

Split (``split="train"`` / ``"val"``): deterministic and **stratified** — within each class the sample
indices are permuted with ``numpy.random.RandomState(0)`` (NumPy's legacy generator, whose stream is frozen
across versions) and the first ``round(0.15 * n_class)`` go to validation: 1,528 train / 269 val images
(26–27 val images per class).
Both splits are returned in ascending order of the original sklearn index.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "NUM_CLASSES",
    "VAL_FRACTION",
    "SPLIT_SEED",
    "load_digits_images",
    "split_indices",
    "to_model_range",
    "to_uint8",
    "random_affine",
    "augmented",
    "cosine_lr",
]

NUM_CLASSES = 10
VAL_FRACTION = 0.15
SPLIT_SEED = 0
_SPLITS = ("all", "train", "val")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32)  # (1797, 8, 8), levels 0..16
    labels = torch.as_tensor(d.target, dtype=torch.long)
    return images, labels


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, torch.Tensor]:
    """Indices into the 1,797 sklearn digits for each split: ``{"all", "train", "val"}`` → long ``(n,)``."""
    _, labels = _raw_digits()
    y = labels.numpy()
    rng = np.random.RandomState(SPLIT_SEED)
    val = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        perm = rng.permutation(len(idx))
        val.append(idx[perm[: int(round(VAL_FRACTION * len(idx)))]])
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[np.concatenate(val)] = True
    return {
        "all": torch.arange(len(y)),
        "train": torch.as_tensor(np.flatnonzero(~val_mask)),
        "val": torch.as_tensor(np.flatnonzero(val_mask)),
    }


@functools.lru_cache(maxsize=4)
def _images_at(size: int) -> torch.Tensor:
    raw, _ = _raw_digits()
    x = raw[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8) in [0, 255]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp_(0, 255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def load_digits_images(size: int = 32, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as RGB images.

    Args:
        size: output side in pixels (≥ 8; 8 returns the original grid).
        split: ``"all"`` (1,797), ``"train"`` (1,528) or ``"val"`` (269); see the module docstring.

    Returns:
        ``images`` uint8 ``(N, 3, size, size)`` in [0, 255] (three equal channels) and ``labels`` long ``(N,)``
        in [0, 10). Fresh tensors: callers may modify them.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    idx = split_indices()[split]
    _, labels = _raw_digits()
    return _images_at(size)[idx].clone(), labels[idx].clone()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] → float32 in [-1, 1] (``x / 127.5 - 1``), any shape."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 tensor, got {_describe(images)}")
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` (default [-1, 1]; pass ``(0, 1)`` for pipeline outputs) → uint8.

    Values are clamped to the range, mapped linearly to [0, 255] and rounded. uint8 input is returned as is.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor, got {_describe(images)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got dtype {images.dtype}")
    lo, hi = map(float, value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    x = (images.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return x.round_().to(torch.uint8)


def random_affine(
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    max_rotation: float = 10.0,
    max_translation: float = 0.08,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Light training augmentation: one random rotation, scale and shift per image (bilinear, zero fill).

    Args:
        images: ``(B, C, H, W)`` uint8 or float; the output has the same dtype (uint8 is rounded back).
        generator: CPU generator for reproducibility.
        max_rotation: degrees, uniform in ``[-max_rotation, max_rotation]``.
        max_translation: fraction of the image side, uniform per axis.
        scale_range: zoom factor range (> 1 enlarges the digit).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {_describe(images)}")
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) * (hi - lo) + lo

    angle = uniform(-max_rotation, max_rotation) * (math.pi / 180.0)
    scale = uniform(*scale_range)
    shift = torch.stack([uniform(-max_translation, max_translation) for _ in range(2)], dim=1) * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coordinates to input coordinates, hence the inverse scale.
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = images.float()
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if images.dtype == torch.uint8:
        return out.clamp_(0, 255).round_().to(torch.uint8)
    return out.to(images.dtype)


def augmented(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine augmentation then the model range: uint8 or [0, 1] (B, 3, H, W) → float [-1, 1] (B, 3, H, W)."""
    return to_model_range(random_affine(images, generator=generator))


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """The digits recipes' learning rate at ``step`` (0-based) of ``total``: linear warmup over ``warmup`` steps
    (reaching ``base`` at step warmup − 1), then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
