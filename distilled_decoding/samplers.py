"""Samplers as objects: every way this toolkit turns a noise sequence into an image's tokens, side by side.

A sampler has a ``name`` (the row of the evaluation table and of the benchmarks), ``steps`` (sequential network
calls) and ``__call__(noise, condition) -> (vectors, tokens)``: noise (B, N, D) standard normal and the condition
(class ids (B,)) → codebook-space vectors (B, N, D) ready for the tokenizer's decoder and tokens (B, N), both in
the teacher's sequence order. The pipeline, the evaluation table and the benchmarks iterate over these objects.

* :class:`TeacherSampler` — the teacher's KV-cache decoding, through the flow map with the given noise (the mapping
  the student learned; its distribution is the teacher's) or ordinary multinomial sampling (``chooser``);
* :class:`StudentSampler` — DD k-step: the student at t = 0, and at its timesteps (0, t₂) for 2 steps;
* :class:`RefinedSampler` — teacher-refined: student step, the teacher regenerates steps T..t₂−1, student step (none
  when t₂ = N: the teacher finishes, DD2's Alg. 4);
* :class:`ARDiffusionSampler` — a DD2 AR-diffusion model (the GTS model): a few Euler steps per token;
* :class:`OneStepStar` — every token drawn independently from its per-position, per-condition marginal (the best a
  one-step set predictor that ignores the joint can do; DD paper's onestep*);
* :class:`SkipN` — the teacher's first steps, then its last ``n`` steps in one parallel step (one teacher forward
  over [prefix, onestep* guesses], each skipped token drawn from its guided, filtered conditional);
* :class:`Reordered` — another sampler's output moved to another sequence order, so that teachers decoding in other
  orders (PAR's regions vs raster) share one table and one decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from distilled_decoding.sampling import (
    FlowChooser,
    MultinomialChooser,
    guide,
    sample_tokens,
    temper_and_filter,
    to_tokenizer_order,
)
from distilled_decoding.students.base import perturb

__all__ = [
    "Sampler",
    "TeacherSampler",
    "StudentSampler",
    "RefinedSampler",
    "ARDiffusionSampler",
    "OneStepStar",
    "SkipN",
    "Reordered",
    "marginals",
    "refined_steps",
]


class Sampler(Protocol):
    name: str

    @property
    def steps(self) -> int:
        """Sequential network calls per image."""

    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        """noise (B, N, D), condition → (vectors (B, N, D), tokens (B, N)) in sequence order."""


def _chooser(kind: str, noise: Tensor, codebook: Tensor, flow: dict[str, Any], generator: Any) -> Any:
    if kind == "flow":
        return FlowChooser(noise, codebook, **flow)
    if kind in ("multinomial", "random"):
        return MultinomialChooser(generator)
    raise ValueError(f"chooser={kind!r}: expected 'flow' or 'multinomial'")


@dataclass
class TeacherSampler:
    """The teacher decoding autoregressively with its ``sampling`` settings (cfg_scale, top_k, ...). ``label`` names
    the row (default: "teacher AR (flow map)" / "teacher AR (multinomial)")."""

    teacher: Any
    codebook: Tensor
    sampling: dict[str, Any] = field(default_factory=dict)
    chooser: str = "flow"
    flow: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return "teacher AR (flow map)" if self.chooser == "flow" else "teacher AR (multinomial)"

    @property
    def steps(self) -> int:
        return len(self.teacher.decode_groups())

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        chooser = _chooser(self.chooser, noise, self.codebook, self.flow, self.generator)
        tokens = sample_tokens(self.teacher, condition, chooser=chooser, order="sequence", **self.sampling)
        return self.codebook.to(tokens.device)[tokens], tokens


@dataclass
class StudentSampler:
    """DD few-step sampling: ``steps=1`` samples at t = 0, ``steps`` = len(timesteps) at every trained timestep."""

    student: Any
    num_steps: int = 1

    def __post_init__(self) -> None:
        n = len(self.student.config.timesteps)
        if isinstance(self.num_steps, bool) or self.num_steps not in (1, n):
            supported = "1 step" if n == 1 else f"1 or {n} steps"
            raise ValueError(
                f"steps={self.num_steps!r}: this student supports {supported} (timesteps "
                f"{list(self.student.config.timesteps)}); for more, use teacher refinement (teacher=..., "
                "teacher_tokens=(T, t2))"
            )

    @property
    def name(self) -> str:
        return f"{self.student.method_name} {self.num_steps}-step"

    @property
    def steps(self) -> int:
        return self.num_steps

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        timesteps = list(self.student.config.timesteps)
        return self.student.sample(noise, condition, timesteps[:1] if self.num_steps == 1 else timesteps)


def refined_steps(teacher_tokens: tuple[int, int], num_steps: int | None = None) -> int:
    """Sequential calls of teacher-refined sampling (T, t₂): a student step (when T > 0), t₂ − T teacher steps, a
    final student step (none when t₂ = ``num_steps``, the teacher's last step)."""
    start, t2 = teacher_tokens
    return (1 if start > 0 else 0) + (t2 - start) + (0 if t2 == num_steps else 1)


@dataclass
class RefinedSampler:
    """Teacher-refined sampling ``teacher_tokens=(T, t₂)`` (in decoding steps; t₂ one of the student's trained
    timesteps, or N): a student step at t = 0 gives the first T steps' tokens, the teacher regenerates steps T..t₂−1
    (through the flow map with the same noise, or multinomial with ``generator``), and a student step at t₂ finishes
    (with t₂ = N the teacher finishes: DD2's Alg. 4, for any student)."""

    student: Any
    teacher: Any
    teacher_tokens: tuple[int, int] | None = None
    chooser: str = "flow"
    sampling: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        timesteps = list(self.student.config.timesteps)
        tt = self.teacher_tokens if self.teacher_tokens is not None else (0, timesteps[-1])
        if not isinstance(tt, (tuple, list)) or len(tt) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                     for v in tt):  # fmt: skip
            raise TypeError(f"teacher_tokens={self.teacher_tokens!r}: expected a pair of ints (T, t2)")
        n = self.student.num_steps
        if tt[1] not in [*timesteps[1:], n] or not 0 <= tt[0] <= tt[1] or (tt[0] == n):
            raise ValueError(
                f"teacher_tokens={self.teacher_tokens!r}: expected (T, t2) with t2 one of the student's trained "
                f"timesteps {timesteps[1:]} or {n} (the teacher finishes), and 0 <= T <= t2, T < {n}"
            )
        self.teacher_tokens = (int(tt[0]), int(tt[1]))
        if self.chooser not in ("flow", "random", "multinomial"):
            raise ValueError(f"teacher_sampling={self.chooser!r}: expected 'flow' or 'random'")

    @property
    def name(self) -> str:
        return f"{self.student.method_name} refined ({self.teacher_tokens[0]}-{self.teacher_tokens[1]})"

    @property
    def steps(self) -> int:
        return refined_steps(self.teacher_tokens, self.student.num_steps)

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        student = self.student
        start, t2 = self.teacher_tokens
        b = noise.shape[0]
        p_start, p2 = (int(v) for v in student.data_positions(torch.tensor([start, t2], device=noise.device)))
        prefix = None
        if start > 0:
            _, tok0 = student.predict(noise, condition, torch.zeros(b, dtype=torch.long, device=noise.device))
            prefix = tok0[:, :p_start]
        chooser = _chooser(self.chooser, noise, student.codebook, self.flow, self.generator)
        head = sample_tokens(self.teacher, condition, chooser=chooser, prefix=prefix, stop=p2, order="sequence",
                             **self.sampling)  # fmt: skip
        if t2 == student.num_steps:  # the teacher finished the sequence
            return student.codebook[head], head
        x = torch.cat([student.codebook[head], noise[:, p2:]], dim=1)
        t = torch.full((b,), t2, dtype=torch.long, device=noise.device)
        return student.predict(perturb(x, student.data_positions(t), noise), condition, t)


@dataclass
class ARDiffusionSampler:
    """A DD2 AR-diffusion model (:class:`~distilled_decoding.students.dd2_base.ARDiffusionModel`, e.g. the GTS model)
    sampled step by step (LlamaGen: token by token; VAR: scale by scale) with ``euler_steps`` Euler steps per token
    from the token's own noise (DD2 App. B.3)."""

    model: Any
    euler_steps: int = 10

    @property
    def name(self) -> str:
        return f"GTS model ({self.euler_steps}-step Euler)"

    @property
    def steps(self) -> int:
        return self.model.num_steps

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        return self.model.sample(noise, condition, self.euler_steps)


@dataclass
class Reordered:
    """``sampler``'s output (vectors (B, N, D), tokens (B, N)) moved from its sequence order ``source`` (the
    tokenizer index of each position, e.g. a PAR teacher's ``token_order``; None = the tokenizer's order) to the
    sequence order ``target`` (None: the tokenizer's order). The wrapped sampler reads the noise in its own order."""

    sampler: Any
    source: Tensor | None
    target: Tensor | None = None

    @property
    def name(self) -> str:
        return self.sampler.name

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def __call__(self, noise: Tensor, condition: Any) -> tuple[Tensor, Tensor]:
        vectors, tokens = self.sampler(noise, condition)
        vectors, tokens = to_tokenizer_order(vectors, self.source), to_tokenizer_order(tokens, self.source)
        if self.target is None:
            return vectors, tokens
        target = self.target.to(tokens.device)
        return vectors[:, target], tokens[:, target]


# ------------------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------------------
def marginals(tokens: Tensor, labels: Tensor, vocab_size: int, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Per-class, per-position token histograms. tokens (M, N) long, labels (M,) → probs (C, N, V) float32."""
    m, n = tokens.shape
    counts = torch.zeros(num_classes, n, vocab_size)
    flat = (labels[:, None] * n + torch.arange(n)[None, :]) * vocab_size + tokens
    counts.view(-1).index_add_(0, flat.reshape(-1), torch.ones(m * n))
    counts += smoothing
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)


def _draw(probs: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
    p = probs[labels.cpu()]  # (B, N, V)
    b, n, v = p.shape
    return torch.multinomial(p.reshape(b * n, v), 1, generator=generator).view(b, n)


@dataclass
class OneStepStar:
    """onestep*: independent draws from per-position marginals ``probs`` (C, N, V) (see :func:`marginals`)."""

    probs: Tensor
    codebook: Tensor
    generator: torch.Generator | None = None
    name: str = "onestep*"
    steps: int = 1

    def __call__(self, noise: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        tokens = _draw(self.probs, condition, self.generator).to(noise.device)
        return self.codebook[tokens], tokens


@dataclass
class SkipN:
    """skip-n: the teacher decodes all but its last ``n`` steps (through the flow map with the given noise); the
    skipped positions then come from one parallel step: one teacher forward over [prefix, onestep* guesses], each
    skipped token drawn from its guided, filtered conditional."""

    teacher: Any
    n: int
    probs: Tensor
    codebook: Tensor
    sampling: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        n_steps = len(self.teacher.decode_groups())
        if not 1 <= self.n < n_steps:
            raise ValueError(f"n_skip={self.n}: expected 1 <= n_skip < {n_steps} (the teacher's decoding steps)")

    @property
    def name(self) -> str:
        return f"skip-{self.n}"

    @property
    def steps(self) -> int:
        return len(self.teacher.decode_groups()) - self.n + 1

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        teacher, s = self.teacher, self.sampling
        groups = teacher.decode_groups()
        keep = groups[-self.n][0]
        chooser = FlowChooser(noise, self.codebook, **self.flow)
        head = sample_tokens(teacher, condition, chooser=chooser, stop=keep, order="sequence", **s)
        guess = _draw(self.probs, condition, self.generator).to(head.device)
        inputs = torch.cat([head, guess[:, keep:]], dim=1)[:, : groups[-1][0]]
        logits = teacher.logits_from_prefix(inputs, condition)[:, keep:]
        scales = teacher.guidance_scales(s.get("cfg_scale", 1.0), s.get("cfg_interval", -1))
        if scales is not None:
            per_pos = torch.cat([torch.full((e - a,), scales[g]) for g, (a, e) in enumerate(groups)])[keep:]
            null = teacher.condition.with_unconditional(condition)[condition.shape[0] :]
            uncond = teacher.logits_from_prefix(inputs, null)[:, keep:]
            logits = guide(logits, uncond, per_pos.to(logits)[None, :, None])
        logits = temper_and_filter(logits, s.get("temperature", 1.0), s.get("top_k", 0), s.get("top_p", 1.0))
        tail = MultinomialChooser(self.generator)(logits, slice(keep, teacher.seq_len))
        tokens = torch.cat([head, tail], dim=1)
        return self.codebook[tokens], tokens
