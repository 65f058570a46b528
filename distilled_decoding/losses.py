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

Distilled Decoding 2 (:mod:`distilled_decoding.dd2_training`), in the notation of :mod:`~distilled_decoding.
teacher_score`: per position m noise draws (t, ε), x_t = (1 − t) x0 + t ε, every x̂0 in the velocity
parameterisation x̂0 = base − t·u; each loss a mean over samples of per-sample means (process-split invariant):

* :func:`gts_loss` — ground-truth score: x0 = the code of a token the teacher sampled; target the teacher's
  closed-form posterior mean x̂0*(x_t, t | q_<i), not the Monte-Carlo x0: ``‖x̂0_θ − x̂0*‖²``;
* :func:`guidance_loss` — AR-diffusion denoising on generated sequences (the guidance / "fake score" network ψ):
  x0 = the generator's continuous output, prefix its quantised tokens: ``‖x̂0_ψ − x_g‖²``;
* :func:`csd_generator_loss` — conditional score distillation in SiD form: ``ω·[(1 − α)‖f_r − f_f‖² + (f_r −
  f_f)ᵀ(f_f − x_g)]``, f_r the teacher's and f_f the guidance network's x̂0 at the same noisy generated token, both
  on the stop-gradient quantised prefix; gradients reach the generator through x_g (directly and through x_t), not
  the guidance parameters. ω = 1 / mean_{i,d} |x_g − f_r| (stop-gradient, per sample and draw: SiD/DMD's
  normaliser in place of the singular ((1 − t)/t²)² of the Fisher divergence). At α = 1 the direct gradient on x_g
  is −ω (f_r − f_f): toward the teacher's denoiser, away from the generator's own.
* :func:`regression_loss` — DMD's regression loss (Yin et al. 2024) on the flow map's (noise, tokens) pairs: the
  generator's vectors from a pair's noise against the codes of the teacher's tokens, ``‖G(ε) − c_q‖²``; it anchors
  the generator to one exact coupling of noise and teacher samples, which the distribution-matching CSD term alone
  does not (the CSD generator trades recall for precision; see the README's DD2 section).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distilled_decoding.flow import posterior_mean
from distilled_decoding.students.base import nearest_codes, perturb

__all__ = [
    "StudentOutputs",
    "LossContext",
    "LOSSES",
    "ce",
    "mse",
    "image",
    "student_outputs",
    "distillation_losses",
    "draw_times_and_noise",
    "frozen",
    "gts_loss",
    "guidance_loss",
    "csd_generator_loss",
    "regression_loss",
]


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


# ------------------------------------------------------------------------------------------------------------
# Distilled Decoding 2
# ------------------------------------------------------------------------------------------------------------
def draw_times_and_noise(
    generator: torch.Generator, b: int, n: int, m: int, d: int, t_min: float = 0.02, t_max: float = 1.0
) -> tuple[Tensor, Tensor]:
    """t (b, n, m) uniform in [t_min, t_max] and ε (b, n, m, d) standard normal from one seeded CPU generator."""
    t = t_min + (t_max - t_min) * torch.rand(b, n, m, generator=generator)
    return t, torch.randn(b, n, m, d, generator=generator)


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Parameters of ``module`` do not require grad inside the block (input gradients still flow through it)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def _per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(1).mean()


def gts_loss(
    model: Any, tokens: Tensor, class_labels: Tensor, logits: Tensor, t: Tensor, eps: Tensor, *, forward: Any = None
) -> dict[str, Tensor]:
    """GTS loss. tokens (B, N) long sampled from the teacher, class_labels (B,), logits (B, N, V) the teacher's
    sampling logits on that sequence (:func:`~distilled_decoding.teacher_score.teacher_logits`), t (B, N, m),
    eps (B, N, m, D); ``forward``: the (possibly DDP-wrapped) module to call. → ``{"total", "gts"}``."""
    cb = model.codebook
    x0 = cb[tokens].unsqueeze(2)
    x_t = (1.0 - t).unsqueeze(-1) * x0 + t.unsqueeze(-1) * eps
    with torch.no_grad():
        target = posterior_mean(x_t, t, logits.unsqueeze(2), cb)
    pred = (forward or model)(cb[tokens], class_labels, x_t, t)
    loss = _per_sample((pred - target).square().sum(-1))
    return {"total": loss, "gts": loss.detach()}


def guidance_loss(
    guidance: Any, x_g: Tensor, class_labels: Tensor, t: Tensor, eps: Tensor, *, forward: Any = None
) -> dict[str, Tensor]:
    """Denoising loss of the guidance network on generated sequences x_g (B, N, D) (detached); prefix = the quantised
    x_g, x0 = x_g. t (B, N, m), eps (B, N, m, D). → ``{"total", "dsm"}``."""
    x_g = x_g.detach().float()
    cb = guidance.codebook
    x0 = x_g.unsqueeze(2)
    x_t = (1.0 - t).unsqueeze(-1) * x0 + t.unsqueeze(-1) * eps
    pred = (forward or guidance)(cb[nearest_codes(x_g, cb)], class_labels, x_t, t)
    loss = _per_sample((pred - x0).square().sum(-1))
    return {"total": loss, "dsm": loss.detach()}


def csd_generator_loss(
    generator: Any,
    guidance: Any,
    teacher_score: Any,
    noise: Tensor,
    class_labels: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    alpha: float = 1.0,
    forward: Any = None,
) -> dict[str, Tensor]:
    """CSD generator loss (SiD form, see the module docstring). noise (B, N, D), class_labels (B,), t (B, N, m),
    eps (B, N, m, D); ``teacher_score``: a :class:`~distilled_decoding.teacher_score.TeacherScore` (logits taken on
    the generated tokens); ``guidance``: the unwrapped guidance network (frozen here); ``forward``: the (possibly
    DDP-wrapped) generator to call.
    → ``{"total", "sid", "div", "code_dist"}`` (the loss; its value before ω; ‖f_r − f_f‖²; the mean distance of the
    generated vectors to their nearest code)."""
    x_g = (forward or generator)(noise, class_labels)  # (B, N, D), grad
    cb = generator.codebook
    with torch.no_grad():
        tokens = nearest_codes(x_g, cb)
        logits = teacher_score.logits(tokens, class_labels).unsqueeze(2)  # (B, N, 1, V)
        fake_features = guidance.features(cb[tokens], class_labels).unsqueeze(2)
    x_t = (1.0 - t).unsqueeze(-1) * x_g.unsqueeze(2) + t.unsqueeze(-1) * eps
    with frozen(guidance):
        f_f = guidance.denoise(fake_features, x_t, t)
    f_r = posterior_mean(x_t, t, logits, cb)
    xg = x_g.unsqueeze(2)
    diff = f_r - f_f
    term = (diff * (f_f - xg)).sum(-1)
    if alpha != 1.0:
        term = term + (1.0 - alpha) * diff.square().sum(-1)
    with torch.no_grad():
        omega = 1.0 / ((xg - f_r).abs().mean(dim=(1, 3), keepdim=True).squeeze(-1) + 1e-4)  # (B, 1, m)
        code_dist = (x_g - cb[tokens]).norm(dim=-1).mean()
    return {
        "total": _per_sample(omega * term),
        "sid": _per_sample(term).detach(),
        "div": _per_sample(diff.detach().square().sum(-1)),
        "code_dist": code_dist,
    }


def regression_loss(
    generator: Any, noise: Tensor, class_labels: Tensor, tokens: Tensor, *, forward: Any = None
) -> dict[str, Tensor]:
    """Regression on flow-map pairs: noise (B, N, D) → the generator's vectors x (B, N, D), against the codes of the
    teacher's tokens (B, N) long for that noise; ``‖x − c_q‖²`` summed over D, a per-sample mean over positions.
    ``forward``: the (possibly DDP-wrapped) generator to call. → ``{"total", "reg"}``."""
    x = (forward or generator)(noise, class_labels)
    loss = _per_sample((x - generator.codebook[tokens]).square().sum(-1))
    return {"total": loss, "reg": loss.detach()}
