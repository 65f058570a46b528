"""What a teacher or student is conditioned on, behind one small interface.

Every teacher and student exposes ``.condition``: a *condition spec* that knows how to validate, batch, draw and
guide its condition values. The sampling loop, the trajectory builder, the students and the pipeline only talk to
the spec, so a new condition type enters here and nowhere else.

* :class:`ClassCondition` — class-conditional models: values are class ids, a (B,) integer tensor in
  ``[0, num_classes)``; classifier-free guidance pairs every row with ``null_class`` (the extra row of the class
  table), and unconditional draws are uniform over the classes.
* :class:`TextConditionSpec` — text-conditional models: values are :class:`TextCondition` (caption features
  (B, L, C) from a text encoder plus their (B, L) mask, *left-padded* as LlamaGen's text-to-image sampler and
  trainer feed them); guidance pairs every row with the model's learned null caption under the same mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ConditionSpec", "ClassCondition", "TextCondition", "TextConditionSpec", "describe_value"]


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

    def describe(self) -> dict[str, Any]:
        """What the condition is, as JSON (``{"kind": "class", "num_classes": 10}``, ``{"kind": "text", "length": 120,
        "width": 2048}``): compared between a student and a teacher, recorded in trajectory manifests."""

    def from_batch(self, batch: Mapping[str, Tensor]) -> Any:
        """The condition value of a collated training batch (the per-sample fields a
        :class:`~distilled_decoding.trajectories.TrajectoryDataset` returns: ``class_label`` () long, or
        ``caption_features`` (L, C) + ``caption_mask`` (L,) bool)."""


def describe_value(x: Any) -> str:
    """``shape (2, 3) torch.float32`` for tensors, the type name otherwise (for error messages)."""
    if isinstance(x, TextCondition):
        return f"a TextCondition (caption features {tuple(x.features.shape)})"
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


@dataclass(frozen=True)
class TextCondition:
    """Caption features and their mask, as a text-conditional teacher takes them.

    Attributes:
        features: (B, L, C) float: text-encoder hidden states (C = the encoder width, 2048 for FLAN-T5-XL),
            L = the teacher's number of condition positions (120 for LlamaGen T2I). Padding rows are zeros.
        mask: (B, L) bool, True where a position holds a real text token. LlamaGen expects left padding
            (False … False True … True); integer 0/1 masks are converted to bool.
    """

    features: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        f, m = self.features, self.mask
        if not isinstance(f, Tensor) or f.ndim != 3 or not f.dtype.is_floating_point:
            raise ValueError(f"features: expected a (B, L, C) floating-point tensor, got {describe_value(f)}")
        if not isinstance(m, Tensor) or m.ndim != 2:
            raise ValueError(f"mask: expected a (B, L) bool tensor, got {describe_value(m)}")
        if m.dtype != torch.bool:
            if m.dtype.is_floating_point or m.is_complex() or (m.numel() and not bool(((m == 0) | (m == 1)).all())):
                raise ValueError(f"mask: expected a bool (or 0/1 integer) tensor, got dtype {m.dtype}")
            object.__setattr__(self, "mask", m.bool())
        if tuple(self.mask.shape) != tuple(f.shape[:2]):
            raise ValueError(
                f"mask: shape {tuple(self.mask.shape)} does not match the features' (B, L) = {tuple(f.shape[:2])}"
            )
        if self.mask.device != f.device:
            raise ValueError(f"mask: on {self.mask.device}, expected the features' device {f.device}")

    # -- shape -------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def length(self) -> int:
        """L, the number of condition positions."""
        return self.features.shape[1]

    @property
    def width(self) -> int:
        """C, the feature width (the text encoder's hidden size)."""
        return self.features.shape[2]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, rows: int | slice | Tensor | Sequence[int]) -> TextCondition:
        """The conditions of some rows (an int keeps the batch dimension)."""
        if isinstance(rows, int):
            rows = [rows]
        return TextCondition(self.features[rows], self.mask[rows])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """Features moved/cast (the mask only moves)."""
        return TextCondition(self.features.to(device=device, dtype=dtype), self.mask.to(device=device))

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_padded(cls, features: Tensor, mask: Tensor) -> TextCondition:
        """Left-pad encoder output the way LlamaGen's ``sample_t2i.py`` does before calling ``generate``.

        features (B, L, C) and mask (B, L) bool/0-1 as a tokenizer pads them (usually on the right). In each row
        the real positions move, in order, to the end; the mask follows, and the padding features become zeros
        (``features * mask``). For right padding this is exactly the official "naive left-padding".
        """
        raw = cls(features, mask)  # validates
        order = torch.argsort(raw.mask.to(torch.int8), dim=1, stable=True)  # padding first, real tokens in order
        new_mask = raw.mask.gather(1, order)
        moved = raw.features.gather(1, order[..., None].expand(-1, -1, raw.width))
        return cls(moved * new_mask[..., None].to(moved.dtype), new_mask)

    @classmethod
    def cat(cls, conditions: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch dimension (lengths and widths must agree)."""
        if not conditions:
            raise ValueError("conditions: expected at least one TextCondition")
        shapes = {tuple(c.features.shape[1:]) for c in conditions}
        if len(shapes) > 1:
            raise ValueError(f"conditions: cannot concatenate caption features of (L, C) shapes {sorted(shapes)}")
        return cls(torch.cat([c.features for c in conditions]), torch.cat([c.mask for c in conditions]))


@dataclass(frozen=True)
class ClassCondition:
    """Class ids in ``[0, num_classes)``; ``null_class`` is the unconditional id used for guidance (None: the model
    has no unconditional row and cannot be guided)."""

    num_classes: int
    null_class: int | None = None
    name: str = "class_labels"

    def check(self, value: Any, batch: int | None = None, name: str | None = None) -> Tensor:
        """Class ids as a (B,) long tensor (a tensor, or a list of ints); TypeError for Python values that are not
        integer ids (strings, bools, floats, text), ValueError for a tensor of another dtype, a wrong count, an empty
        batch or ids out of range."""
        name = name or self.name
        rows = "B" if batch is None else batch
        if isinstance(value, TextCondition):
            raise TypeError(
                f"{name}: this model is class-conditional and takes class ids, a ({rows},) integer tensor; got "
                f"{describe_value(value)} (prompts need a text-conditional model)"
            )
        if isinstance(value, (str, bytes)):
            raise TypeError(f"{name}: expected integer class ids, got a string {value!r}")
        if isinstance(value, bool):
            raise TypeError(f"{name}: expected integer class ids, got a bool")
        if isinstance(value, Tensor):
            t = value
        elif isinstance(value, (list, tuple)):
            bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int)), None)
            if bad is not None:
                raise TypeError(f"{name}: expected integer class ids, got an element {bad!r}")
            t = torch.tensor(list(value), dtype=torch.long)
        else:
            raise TypeError(f"{name}: expected a ({rows},) integer tensor of class ids, got {describe_value(value)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name}: expected an integer dtype (torch.long), got {t.dtype}")
        if t.ndim == 1 and t.shape[0] == 0:
            raise ValueError(f"{name}: empty; expected one class id per row")
        if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
            raise ValueError(f"{name}: expected a ({rows},) integer tensor of class ids, got shape {tuple(t.shape)}")
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

    def describe(self) -> dict[str, Any]:
        return {"kind": "class", "num_classes": self.num_classes}

    def from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["class_label"]


@dataclass(frozen=True, eq=False)
class TextConditionSpec:
    """Caption features of ``width`` C in ``length`` L positions; ``unconditional`` (L, C) is the model's learned
    null caption used for guidance (None: no guidance)."""

    length: int
    width: int
    unconditional: Tensor | None = None
    name: str = "condition"

    def check(self, value: Any, batch: int | None = None, name: str | None = None) -> TextCondition:
        name = name or self.name
        rows = "B" if batch is None else batch
        if not isinstance(value, TextCondition):
            hint = " - class labels?" if isinstance(value, Tensor) else ""
            raise ValueError(
                f"{name}: this model is text-conditional and takes a TextCondition (caption features ({rows}, "
                f"{self.length}, {self.width}) float + mask ({rows}, {self.length}) bool, e.g. "
                f"T5TextEncoder.encode(prompts)); got {describe_value(value)}{hint}"
            )
        if value.width != self.width:
            raise ValueError(
                f"{name}: caption features of width {value.width}, expected caption_dim={self.width} (the text "
                "encoder's hidden size the model was trained with, 2048 for FLAN-T5-XL)"
            )
        if value.length != self.length:
            raise ValueError(
                f"{name}: {value.length} caption positions, expected {self.length} (the text encoder pads and "
                f"truncates prompts to {self.length} tokens)"
            )
        if (batch is not None and value.batch_size != batch) or value.batch_size == 0:
            raise ValueError(f"{name}: expected {rows} rows (the batch size), got {value.batch_size}")
        return value

    def batch_size(self, value: TextCondition) -> int:
        return value.batch_size

    def with_unconditional(self, value: TextCondition) -> TextCondition:
        if self.unconditional is None:
            raise ValueError("cfg_scale: this model has no unconditional caption; use no guidance")
        null = self.unconditional.to(device=value.device, dtype=value.features.dtype).expand(value.batch_size, -1, -1)
        return TextCondition.cat([value, TextCondition(null, value.mask)])

    def draw(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> TextCondition:
        raise ValueError("prompt: a text-conditional model needs prompts (or prompt embeddings); none were given")

    def take(self, value: TextCondition, index: Tensor | slice) -> TextCondition:
        return value[index]

    def to(self, value: TextCondition, device: Any) -> TextCondition:
        return value.to(device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "length": self.length, "width": self.width}

    def from_batch(self, batch: Mapping[str, Tensor]) -> TextCondition:
        return TextCondition(batch["caption_features"], batch["caption_mask"])
