"""Distilled Decoding losses: small functions of one student forward, summed with the weights the config names.

The trainer assembles the trajectory point X_t (data of the first t steps, original noise after), runs the student
once (:func:`student_outputs`) and evaluates each loss named in ``weights`` (e.g. ``{"ce": 1.0, "mse": 1.0}``) on
the result; ``total`` = Σ weight · loss. Every loss is averaged per sample first, then over the batch, so a global
batch split across processes gives the same value as one process.

* ``ce``: cross-entropy of the logits head at every noise position (≥ t) against the teacher's tokens;
* ``mse``: codebook-space squared error of the continuous head at noise positions from ``split_position`` on;
* ``image``: pixel MSE (or ``image_loss``) of images decoded through the frozen tokenizer decoder, continuous-head
  vectors at those late positions vs the teacher's tokens.

Adding a loss = one function ``(out, context) -> scalar`` and one entry in :data:`LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distilled_decoding.students.base import perturb

__all__ = ["StudentOutputs", "LossContext", "LOSSES", "ce", "mse", "image", "student_outputs", "distillation_losses"]


@dataclass
class StudentOutputs:
    """One student forward on a batch: raw heads and the targets and masks the losses read.

    logits (B, N, V) float32, vectors (B, N, D) float32, tokens (B, N) long (the teacher's), data (B, N, D) their
    codebook vectors, noisy (B, N) float (1 at positions ≥ data_positions(t)), late (B, N) float (noisy and ≥
    split_position)."""

    logits: Tensor
    vectors: Tensor
    tokens: Tensor
    data: Tensor
    noisy: Tensor
    late: Tensor


@dataclass
class LossContext:
    """What some losses need besides the outputs: ``decode`` vectors (B, N, D) → images (frozen tokenizer decoder)
    and an optional ``image_loss`` (predicted images, target images) → scalar (default pixel MSE)."""

    decode: Callable[[Tensor], Tensor] | None = None
    image_loss: Callable[[Tensor, Tensor], Tensor] | None = None


def _per_sample_mean(values: Tensor, mask: Tensor) -> Tensor:
    return ((values * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def ce(out: StudentOutputs, ctx: LossContext) -> Tensor:
    """Cross-entropy of the logits head at noise positions."""
    per_pos = F.cross_entropy(out.logits.transpose(1, 2), out.tokens, reduction="none")
    return _per_sample_mean(per_pos, out.noisy)


def mse(out: StudentOutputs, ctx: LossContext) -> Tensor:
    """Codebook-space squared error of the continuous head at late noise positions (mean over D)."""
    return _per_sample_mean((out.vectors - out.data.float()).square().mean(-1), out.late)


def image(out: StudentOutputs, ctx: LossContext) -> Tensor:
    """Image-space error through the frozen decoder: continuous vectors at late noise positions, data elsewhere."""
    if ctx.decode is None:
        raise ValueError("loss 'image' needs the tokenizer decoder (decode=...)")
    pred = torch.where(out.late.bool()[..., None], out.vectors.to(out.data.dtype), out.data)
    fn = ctx.image_loss or (lambda a, b: (a - b).square().mean())
    return fn(ctx.decode(pred), ctx.decode(out.data).detach())


#: the registered losses by config name
LOSSES: dict[str, Callable[[StudentOutputs, LossContext], Tensor]] = {"ce": ce, "mse": mse, "image": image}

#: losses that train the continuous head (without one, every position is read from the logits head)
CONTINUOUS_LOSSES = frozenset({"mse", "image"})


def student_outputs(student: Any, batch: Mapping[str, Tensor], t: Tensor, forward: Any = None) -> StudentOutputs:
    """Assemble X_t from the batch (``noise`` (B, N, D), ``tokens`` (B, N) and the condition fields the student's
    spec reads: ``class_label`` (B,), or ``caption_features`` + ``caption_mask``) at timesteps t (B,) and run the
    student once (``forward`` replaces ``student`` for the call, e.g. its DDP wrapper)."""
    tokens = batch["tokens"]
    data = student.codebook[tokens]
    n_data = student.data_positions(t)
    x_t = perturb(data, n_data, batch["noise"].to(data.dtype))
    logits, vectors = (forward or student)(x_t, student.condition.from_batch(batch), t)
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    noisy = (pos >= n_data[:, None]).float()
    late = noisy * (pos >= student.split_position).float()
    return StudentOutputs(logits, vectors, tokens, data, noisy, late)


def distillation_losses(
    student: Any,
    batch: Mapping[str, Tensor],
    t: Tensor,
    weights: Mapping[str, float],
    *,
    forward: Any = None,
    context: LossContext | None = None,
) -> dict[str, Tensor]:
    """``{name: loss for each weighted loss, "total": Σ weight · loss}`` for one batch (see the module docstring)."""
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise ValueError(f"loss: unknown {unknown}; expected some of {sorted(LOSSES)}")
    out = student_outputs(student, batch, t, forward)
    ctx = context or LossContext()
    losses = {name: LOSSES[name](out, ctx) for name in weights}
    total = sum(float(w) * losses[name] for name, w in weights.items())
    return {**losses, "total": total}
