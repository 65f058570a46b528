"""What a teacher or student is conditioned on, behind one small interface.

Every teacher and student exposes ``.condition``: a *condition spec* that knows how to validate, batch, draw and
guide its condition values. The sampling loop, the trajectory builder, the students and the pipeline only talk to
the spec, so a new condition type (text features next to class ids) enters here and nowhere else.

:class:`ClassCondition` — class-conditional models: values are class ids, a (B,) integer tensor in
``[0, num_classes)``; classifier-free guidance pairs every row with ``null_class`` (the extra row of the class
table), and unconditional draws are uniform over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ConditionSpec", "ClassCondition", "describe_value"]


@runtime_checkable
class ConditionSpec(Protocol):
    """The interface of a condition type (see :class:`ClassCondition`)."""

    #: the argument name users pass values under (``class_labels``, ``prompt_embeds``)
    name: str

    def check(self, value: Any, batch: int | None = None, name: str | None = None) -> Any:
        """Validate ``value`` for ``batch`` rows (None: any batch ≥ 1) and return it in canonical form, or raise
        ValueError naming ``name`` (default :attr:`name`) and what was expected."""

    def batch_size(self, value: Any) -> int:
        """Rows of an already checked value."""

    def with_unconditional(self, value: Any) -> Any:
        """The value for a classifier-free-guidance batch: the rows of ``value`` followed by as many unconditional
        rows (2B rows); ValueError when the model has no unconditional condition."""

    def draw(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Any:
        """``n`` conditions drawn uniformly (used when a caller gives none)."""

    def take(self, value: Any, index: Tensor | slice) -> Any:
        """The rows ``index`` of a value."""

    def to(self, value: Any, device: Any) -> Any:
        """The value on ``device``."""


def describe_value(x: Any) -> str:
    """``shape (2, 3) torch.float32`` for tensors, the type name otherwise (for error messages)."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


@dataclass(frozen=True)
class ClassCondition:
    """Class ids in ``[0, num_classes)``; ``null_class`` is the unconditional id used for guidance (None: the model
    has no unconditional row and cannot be guided)."""

    num_classes: int
    null_class: int | None = None
    name: str = "class_labels"

    def check(self, value: Any, batch: int | None = None, name: str | None = None) -> Tensor:
        name = name or self.name
        if isinstance(value, Tensor):
            t = value
        elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
            t = torch.tensor(value, dtype=torch.long)
        else:
            raise ValueError(
                f"{name}: expected a ({'B' if batch is None else batch},) integer tensor of class ids, "
                f"got {describe_value(value)}"
            )
        expected = f"({'B' if batch is None else batch},) integer tensor of class ids"
        if t.ndim != 1 or (batch is not None and t.shape[0] != batch) or t.shape[0] == 0:
            raise ValueError(f"{name}: expected a {expected}, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name}: expected an integer dtype (torch.long), got {t.dtype}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"{name}: class ids must lie in [0, {self.num_classes}) (num_classes); got min {lo}, max {hi}"
            )
        return t.long()

    def batch_size(self, value: Tensor) -> int:
        return int(value.shape[0])

    def with_unconditional(self, value: Tensor) -> Tensor:
        if self.null_class is None:
            raise ValueError("cfg_scale: this model has no null class (class_dropout_prob was 0); use no guidance")
        return torch.cat([value, torch.full_like(value, self.null_class)])

    def draw(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randint(self.num_classes, (n,), generator=generator, device=gen_device).to(device or "cpu")

    def take(self, value: Tensor, index: Tensor | slice) -> Tensor:
        return value[index]

    def to(self, value: Tensor, device: Any) -> Tensor:
        return value.to(device)
