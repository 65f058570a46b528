"""The teacher's closed-form conditional score (Distilled Decoding 2), for every position of a sequence at once.

For position i the teacher gives its sampling distribution ``p_i = p(· | q_<i, condition)`` over the codebook
``{c_j} ⊂ R^D`` — after classifier-free guidance, temperature and top-k / top-p, exactly as the sampling loop hands
it to a token chooser (:func:`distilled_decoding.sampling.guide`, :func:`~distilled_decoding.sampling.
temper_and_filter`). A noisy token ``x_t = (1 − t) q_i + t ε`` (q_i ~ p_i, ε ~ N(0, I), t ∈ (0, 1]) then has, in
closed form (the flow map's posterior, :func:`distilled_decoding.flow.posterior_mean`):

    x̂0(x, t)  = Σ_j w_j c_j,   w = softmax_j( log p_ij − ‖x − (1 − t) c_j‖² / (2 t²) )
    score     = ∇_x log p_t(x) = −(x − (1 − t) x̂0) / t²
    velocity  = E[ε − q_i | x_t = x] = (x − x̂0) / t          (dx_t/dt of the linear path)

One teacher forward over the clean sequence (conditional and unconditional rows in one batch when guided) gives
``p_i`` for all positions: :func:`teacher_logits`. :class:`TeacherScore` bundles a teacher, its codebook and its
sampling settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distilled_decoding.flow import posterior_mean
from distilled_decoding.sampling import guide, temper_and_filter, validate_sampling_args

__all__ = ["SAMPLING_KEYS", "TeacherScore", "check_sampling", "score_from_x0", "teacher_logits", "velocity_from_x0"]

#: the keyword arguments of :func:`teacher_logits` (those of :func:`~distilled_decoding.sampling.sample_tokens`)
SAMPLING_KEYS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")


def check_sampling(sampling: dict[str, Any], name: str = "sampling") -> dict[str, Any]:
    """``sampling`` validated as keyword arguments of :func:`teacher_logits`; ValueError naming ``name``."""
    if not isinstance(sampling, dict):
        raise ValueError(f"{name}: expected a mapping of sampling settings, got {type(sampling).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; expected some of {list(SAMPLING_KEYS)}")
    validate_sampling_args(cfg_scale=sampling.get("cfg_scale", 1.0), temperature=sampling.get("temperature", 1.0),
                           top_k=sampling.get("top_k", 0), top_p=sampling.get("top_p", 1.0))  # fmt: skip
    return dict(sampling)


@torch.no_grad()
def teacher_logits(
    teacher: Any,
    tokens: Tensor,
    condition: Any,
    *,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """The teacher's sampling logits of every position given the clean tokens, from one forward.

    Args:
        teacher: a :class:`~distilled_decoding.teachers.base.Teacher`.
        tokens: (B, N) long, whole sequences in the teacher's order (the last decoding step's tokens are not read:
            position i's logits depend on earlier steps only).
        condition: the teacher's condition for B rows (class ids (B,) for class-conditional teachers).
        cfg_scale, cfg_interval, temperature, top_k, top_p: as :func:`~distilled_decoding.sampling.sample_tokens`.

    Returns:
        (B, N, V) float32 logits; ``log_softmax`` of them is log p_i (−inf = excluded by top-k / top-p). Equal to what
        ``sample_tokens`` hands its chooser at each step for this prefix (up to KV-cache rounding).
    """
    validate_sampling_args(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    teacher.check_tokens(tokens, "tokens", max_len=teacher.seq_len)
    if tokens.shape[1] != teacher.seq_len:
        raise ValueError(f"tokens: expected whole sequences of {teacher.seq_len} tokens, got {tuple(tokens.shape)}")
    spec, b = teacher.condition, tokens.shape[0]
    condition = spec.check(condition, b)
    groups = teacher.decode_groups()
    prefix = tokens[:, : groups[-1][0]]
    scales = teacher.guidance_scales(cfg_scale, cfg_interval)
    if scales is None:
        logits = teacher.logits_from_prefix(prefix, condition)
    else:
        both = teacher.logits_from_prefix(torch.cat([prefix, prefix]), spec.with_unconditional(condition))
        per_position = torch.cat([torch.full((e - s,), float(scales[g])) for g, (s, e) in enumerate(groups)])
        s = per_position.to(both.device)[None, :, None]
        logits = torch.where(s == 1.0, both[:b], guide(both[:b], both[b:], s))
    return temper_and_filter(logits.float(), temperature, top_k, top_p)


def score_from_x0(x: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """Score of the noisy marginal from the posterior mean: −(x − (1 − t) x̂0) / t². x, x0 (..., D); t broadcastable
    to x.shape[:-1]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).unsqueeze(-1)
    return -(x.float() - (1.0 - t) * x0) / (t * t)


def velocity_from_x0(x: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """Flow-matching velocity from the posterior mean: (x − x̂0) / t. Shapes as :func:`score_from_x0`."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).unsqueeze(-1)
    return (x.float() - x0) / t


class TeacherScore:
    """The frozen teacher as a conditional score model of noisy tokens.

    ``ts = TeacherScore(teacher, codebook, cfg_scale=2.0)``; ``logits = ts.logits(tokens, condition)`` (B, N, V) once
    per clean sequence, then for noisy tokens x_t (B, N, D) — or (B, N, m, D) with m draws per position and
    ``logits[:, :, None]`` — at times t (B, N) / (B, N, m): ``ts.x0(x_t, t, logits)`` (the posterior mean,
    differentiable in x_t), ``ts.score(...)``, ``ts.velocity(...)``.
    """

    def __init__(self, teacher: Any, codebook: Tensor, **sampling: Any):
        self.sampling = check_sampling(sampling)
        if not isinstance(codebook, Tensor) or codebook.ndim != 2 or codebook.shape[0] != teacher.vocab_size:
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ValueError(f"codebook: expected ({teacher.vocab_size}, D) for this teacher, got {got}")
        self.teacher, self.codebook = teacher, codebook.detach().float()

    def logits(self, tokens: Tensor, condition: Any) -> Tensor:
        """(B, N) clean tokens and their condition → (B, N, V) sampling logits of every position."""
        return teacher_logits(self.teacher, tokens, condition, **self.sampling)

    def x0(self, x_t: Tensor, t: Tensor | float, logits: Tensor) -> Tensor:
        """Posterior mean (..., D) of noisy tokens x_t (..., D) at t under the per-position logits (..., V)."""
        return posterior_mean(x_t, t, logits, self.codebook.to(x_t.device))

    def score(self, x_t: Tensor, t: Tensor | float, logits: Tensor) -> Tensor:
        """∇ log p_t(x_t) (..., D): −(x_t − (1 − t) x̂0) / t²."""
        return score_from_x0(x_t, t, self.x0(x_t, t, logits))

    def velocity(self, x_t: Tensor, t: Tensor | float, logits: Tensor) -> Tensor:
        """Flow-matching velocity (..., D): (x_t − x̂0) / t."""
        return velocity_from_x0(x_t, t, self.x0(x_t, t, logits))
