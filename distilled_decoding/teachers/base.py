"""The teacher interface and the registry of teacher families.

Every autoregressive teacher (LlamaGen raster, VAR next-scale, PAR region-parallel, ...) implements
:class:`Teacher`; everything downstream — the one KV-cache sampling loop, the trajectory builder, the students, the
samplers, the recipes — talks to that interface and to the family registry, never to a concrete class.

Orders. A teacher decodes its tokens in its *sequence order*: ``decode_groups()`` lists, for each sequential
decoding step, the contiguous range ``(start, end)`` of sequence positions it produces; a group's tokens are
conditionally independent given every position before ``start`` (LlamaGen: one token per step; VAR: one scale;
PAR: k anchors one by one, then k tokens a step). Distilled Decoding works in sequence order throughout (noise,
trajectories, the student's timesteps = completed decoding steps). ``token_order`` maps sequence positions to the
tokenizer's grid (None = the same order); teacher forcing (``teacher(tokens, condition)``) and the tokens that
``sample_tokens`` returns use the tokenizer's order.

Families. A :class:`TeacherFamily` names a teacher class, its Distilled Decoding student class, the loader that
builds ``(teacher, tokenizer)`` from files or folders, the family's default distillation schedule and its Distilled
Decoding 2 networks (if DD2 serves it). Classes are given as ``"module:Name"`` strings, imported on first use. Adding a
family = one ``register_family`` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from distilled_decoding.conditions import ConditionSpec, describe_value

__all__ = [
    "Teacher",
    "TeacherFamily",
    "register_family",
    "get_family",
    "family_of",
    "families",
    "check_token_ids",
    "step_starts",
]


@runtime_checkable
class Teacher(Protocol):
    """What every teacher implements (shapes: B batch, N = ``seq_len`` tokens, V = ``vocab_size``)."""

    #: registry key of the teacher's family (``"llamagen"``, ``"var"``, ...)
    family: ClassVar[str]

    @property
    def vocab_size(self) -> int: ...

    @property
    def seq_len(self) -> int:
        """N: tokens per image."""

    @property
    def condition(self) -> ConditionSpec:
        """What the teacher is conditioned on (class ids, text features)."""

    @property
    def token_order(self) -> Tensor | None:
        """(N,) long: the tokenizer-grid index of each sequence position, or None when the orders coincide."""

    def decode_groups(self) -> list[tuple[int, int]]:
        """The sequence positions ``[start, end)`` produced by each decoding step, in order."""

    def guidance_scales(self, cfg_scale: float, cfg_interval: int = -1) -> list[float] | None:
        """Per-step classifier-free guidance scale, or None for no guidance (the batch is then not doubled)."""

    def begin(self, condition: Any, prefix: Tensor | None = None) -> tuple[Any, Tensor]:
        """Allocate the decoding state (static KV cache), prefill the condition and an optional ``prefix``
        (B, T) of whole decoding steps (sequence order); return ``(state, logits (B, n, V) float32)`` of the next
        step. ``condition`` may hold unconditional rows (guidance)."""

    def advance(self, state: Any, tokens: Tensor) -> Tensor:
        """Feed the tokens (B, n) chosen at the current step; return the logits (B, n', V) float32 of the next."""

    def logits_from_prefix(self, prefix: Tensor | None, condition: Any) -> Tensor:
        """Teacher forcing in sequence order, unvalidated: a prefix of whole steps (B, T) → logits (B, T', V)
        float32 of every position up to the end of the next step."""


# ------------------------------------------------------------------------------------------------------------
# shared validation and structure
# ------------------------------------------------------------------------------------------------------------
def check_token_ids(
    tokens: Any,
    vocab_size: int,
    name: str = "tokens",
    *,
    length: int | None = None,
    max_len: int | None = None,
    max_len_name: str = "seq_len",
    length_means: str = "the teacher's seq_len",
) -> None:
    """ValueError naming ``name`` unless ``tokens`` is a (B, N) integer tensor of ids in [0, vocab_size) with
    N = ``length`` (when given; ``length_means`` says what it is) or 1 ≤ N ≤ ``max_len`` (when given;
    ``max_len_name`` names that limit)."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name}: expected a (B, N) integer tensor with N >= 1, got {describe_value(tokens)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"{name}: expected an integer dtype (torch.long), got {tokens.dtype}")
    if length is not None and tokens.shape[1] != length:
        raise ValueError(f"{name}: expected {length} tokens per image ({length_means}), got {tokens.shape[1]}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(
            f"{name}: sequence of {tokens.shape[1]} tokens does not fit {max_len_name}={max_len}; "
            f"expected N <= {max_len}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{name}: token ids must lie in [0, {vocab_size}) (vocab_size); "
            f"got min {int(tokens.min())}, max {int(tokens.max())}"
        )


def step_starts(groups: Sequence[tuple[int, int]]) -> list[int]:
    """``[start of step 0, ..., start of the last step, N]``: the number of sequence positions decoded after t
    steps is ``step_starts(groups)[t]``. Raises ValueError unless the groups tile 0..N-1 in order."""
    starts = [0]
    for g, (a, b) in enumerate(groups):
        if a != starts[-1] or b <= a:
            raise ValueError(f"decode groups must tile the sequence in order; group {g} is ({a}, {b})")
        starts.append(b)
    return starts


# ------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------
def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TeacherFamily:
    """A teacher family: the classes and functions that serve it, as ``"module:Name"`` import paths.

    ``schedule_fraction``: the default second timestep of the 2-step schedule as a fraction of the decoding steps
    (LlamaGen: 80 of 256 tokens, the released DD students); ``released_schedules`` maps a teacher size key (the
    family's student passes it) to a released schedule that wins over the fraction. ``embedded``: the family's
    embedded default teacher in ``checkpoints/`` as (model, tokenizer or None) paths relative to the repository;
    ``needs_tokenizer``: whether its loader needs a tokenizer besides the model (a VAR folder holds its VAE).
    ``dd2_model`` / ``dd2_generator``: the family's Distilled Decoding 2 networks (the AR-diffusion model made from
    the teacher — GTS model, guidance network — and the one-step generator), None when DD2 does not serve it.
    """

    name: str
    teacher: str
    student: str | None
    loader: str
    description: str = ""
    schedule_fraction: float = 0.5
    released_schedules: dict[Any, tuple[int, ...]] = field(default_factory=dict)
    embedded: tuple[str, str | None] | None = None
    needs_tokenizer: bool = True
    dd2_model: str | None = None
    dd2_generator: str | None = None

    @property
    def teacher_class(self) -> type:
        return _import(self.teacher)

    @property
    def student_class(self) -> type:
        if self.student is None:
            raise ValueError(f"teacher kind {self.name!r}: no Distilled Decoding student is registered for it yet")
        return _import(self.student)

    @property
    def dd2_model_class(self) -> type:
        """The family's DD2 AR-diffusion model class; ValueError naming the family when DD2 does not serve it."""
        return _import(self._dd2_path(self.dd2_model))

    @property
    def dd2_generator_class(self) -> type:
        """The family's DD2 one-step generator class; ValueError naming the family when DD2 does not serve it."""
        return _import(self._dd2_path(self.dd2_generator))

    def _dd2_path(self, path: str | None) -> str:
        if path is None:
            served = ", ".join(repr(name) for name, f in sorted(_FAMILIES.items()) if f.dd2_generator is not None)
            raise ValueError(f"teacher kind {self.name!r}: Distilled Decoding 2 is implemented for {served} teachers "
                             "only")  # fmt: skip
        return path

    def load(self, model: Any, tokenizer: Any = None, **options: Any) -> tuple[Any, Any]:
        """``(teacher, tokenizer)`` in eval mode from official files, ``save_pretrained`` folders or Hub names."""
        loader: Callable[..., tuple[Any, Any]] = _import(self.loader)
        return loader(model, tokenizer, **options)

    def default_timesteps(self, num_steps: int, key: Any = None) -> tuple[int, ...]:
        """The 2-step schedule ``(0, t2)`` in decoding steps: the released one for ``key`` when there is one, else
        ``t2`` = ``schedule_fraction`` of the steps (rounded down, at least 1, below ``num_steps``)."""
        if key in self.released_schedules:
            return tuple(self.released_schedules[key])
        t2 = int(num_steps * self.schedule_fraction)
        return (0, min(max(1, t2), num_steps - 1))


_FAMILIES: dict[str, TeacherFamily] = {}


def register_family(family: TeacherFamily) -> TeacherFamily:
    """Add (or replace) a family in the registry; returns it."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, TeacherFamily]:
    """The registered families by name."""
    return dict(_FAMILIES)


def get_family(name: str) -> TeacherFamily:
    """The family registered as ``name``; ValueError listing the known ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"teacher kind {name!r}: expected one of {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(teacher: Any) -> TeacherFamily:
    """The family of a teacher object (its class attribute ``family``)."""
    name = getattr(type(teacher), "family", None)
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(
            f"teacher: {type(teacher).__name__} is not a registered teacher family (expected one of "
            f"{sorted(_FAMILIES)})"
        )
    return _FAMILIES[name]
