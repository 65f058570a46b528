"""Per-sample randomness of trajectory folders: sample i's noise (and uniform condition id) is a function of
``(seed, i)`` alone, whatever the batch, process or run, and a checksum that detects a torch whose generator
changed (folders that regenerate their noise instead of storing it)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distilled_decoding.provenance import tensor_bytes

__all__ = ["sample_noise", "noise_check"]


def _sample_seed(seed: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` of dataset ``seed`` (NumPy SeedSequence mixing: well spread,
    stable across NumPy versions)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def sample_noise(
    seed: int,
    indices: Sequence[int],
    seq_len: int,
    dim: int,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Noise (n, N, D) float16 and, when ``num_classes`` is given, uniform condition ids (n,) long in
    [0, num_classes) (class labels, or prompt indices) for the samples ``indices``. Each sample draws from its own
    CPU generator seeded by (seed, index): first the id, then the noise, so sample i is the same in any batch,
    process or run."""
    noise = torch.empty(len(indices), seq_len, dim, dtype=torch.float16)
    labels = torch.empty(len(indices), dtype=torch.long) if num_classes is not None else None
    g = torch.Generator(device="cpu")
    for row, i in enumerate(indices):
        g.manual_seed(_sample_seed(seed, int(i)))
        if labels is not None:
            labels[row] = torch.randint(num_classes, (1,), generator=g)[0]
        noise[row] = torch.randn(seq_len, dim, generator=g).to(torch.float16)
    return noise, labels


def noise_check(seed: int, n: int, seq_len: int, dim: int, num_classes: int | None) -> dict[str, Any]:
    """sha256 of the regenerated fp16 noise of three samples (first, middle, last)."""
    idx = sorted({0, n // 2, n - 1})
    noise, _ = sample_noise(seed, idx, seq_len, dim, num_classes)
    return {"indices": idx, "sha256": hashlib.sha256(tensor_bytes(noise)).hexdigest()}
