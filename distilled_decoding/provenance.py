"""Provenance: the identity of a teacher (class, config, weights, codebook) that ties trajectories, students and
pipelines to the exact model that produced them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

__all__ = ["teacher_fingerprint", "tensor_bytes"]


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (on the CPU, contiguous), for hashing."""
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def teacher_fingerprint(teacher: torch.nn.Module, codebook: Tensor) -> dict[str, Any]:
    """Identity of a teacher: class, config, sha256 of its weights (names, dtypes, shapes, bytes) and of the
    codebook. Two teachers with equal fingerprints produce the same trajectories."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    cfg = getattr(teacher, "config", {})
    cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    return {
        "class": type(teacher).__name__,
        "config": json.loads(json.dumps(cfg, default=str)),
        "weights_sha256": h.hexdigest(),
        "codebook_sha256": hashlib.sha256(tensor_bytes(codebook.float())).hexdigest(),
        "codebook_shape": list(codebook.shape),
    }
