"""What every Distilled Decoding student shares: the schedule, the trajectory points, the attention structure derived
from the teacher's decode groups, input checks, the one-step prediction and few-step sampling.

Vocabulary (all counts in the teacher's *decoding steps*, positions in its sequence order):

* ``starts``: ``[0, end of step 0, ..., N]`` — after t completed steps the first ``starts[t]`` positions are data
  (LlamaGen: t tokens; VAR: the tokens of t scales; PAR: anchors then groups of k);
* timestep t: the student's input is the trajectory point X_t = (data of the first t steps, original noise after);
  ``timesteps`` is the training / few-step schedule, e.g. (0, 80) for LlamaGen-B;
* ``split``: positions of the first ``split`` steps are read from the logits head (argmax → codebook vector), the
  rest from the continuous head (official ``split_t`` / ``loss_split_t``);
* attention: position i sees the condition, every position of earlier steps and itself — exactly the dependency of
  the flow-map trajectories (:func:`group_attention_mask`).

A student class mixes in :class:`FewStepStudent` and provides ``forward(x, condition, t) -> (logits, vectors)``,
the ``codebook`` buffer, ``config.timesteps`` / ``config.split``, ``starts`` and ``condition`` (a
:class:`~distilled_decoding.conditions.ConditionSpec`). Default schedules come from the teacher family
(:meth:`~distilled_decoding.teachers.base.TeacherFamily.default_timesteps`) through :func:`resolve_schedule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DecodingSteps",
    "FewStepStudent",
    "CheckedLoading",
    "check_noise",
    "check_saved_class",
    "perturb",
    "nearest_codes",
    "group_attention_mask",
    "validate_schedule",
    "resolve_schedule",
]


def perturb(x: Tensor, n_data: Tensor, noise: Tensor) -> Tensor:
    """The trajectory point: keep the first ``n_data`` positions of x (data), reset the rest to the original
    noise. x, noise (B, N, D); n_data (B,) long → (B, N, D)."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < n_data[:, None]
    return torch.where(keep[..., None], x, noise)


def nearest_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector. x (..., D), codebook (V, D) → long (...)."""
    d = (x.float().unsqueeze(-2) - codebook.float()).square().sum(-1)
    return d.argmin(-1)


def group_attention_mask(starts: Sequence[int], n_prefix: int = 1) -> Tensor:
    """Boolean attention mask (L, L), L = n_prefix + N, True = attend: the ``n_prefix`` condition positions attend
    causally among themselves; token position i of decoding step g attends to the condition, to every position of
    steps < g and to itself (not to the other positions of its own step)."""
    n = starts[-1]
    step = torch.empty(n, dtype=torch.long)
    for g, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        step[a:b] = g
    level = torch.cat([torch.full((n_prefix,), -1, dtype=torch.long), step])  # condition below every step
    mask = level[:, None] > level[None, :]
    mask |= torch.eye(n_prefix + n, dtype=torch.bool)
    mask[:n_prefix, :n_prefix] = torch.ones(n_prefix, n_prefix, dtype=torch.bool).tril()
    return mask


def validate_schedule(timesteps: Sequence[int], split: int, num_steps: int) -> tuple[tuple[int, ...], int]:
    """``(timesteps, split)`` checked against ``num_steps`` decoding steps, or ValueError naming the field:
    timesteps increasing ints starting at 0, each < num_steps; split an int in [0, num_steps]."""
    ts = list(timesteps) if isinstance(timesteps, (list, tuple)) else None
    if (
        not ts
        or ts[0] != 0
        or any(isinstance(v, bool) or not isinstance(v, int) for v in ts)
        or any(b <= a for a, b in zip(ts, ts[1:]))
        or ts[-1] >= num_steps
    ):
        raise ValueError(
            f"timesteps={ts if ts is not None else timesteps!r}: expected increasing numbers of completed decoding "
            f"steps starting at 0, each "
            f"< {num_steps} (the teacher's steps: tokens for LlamaGen, scales for VAR)"
        )
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= num_steps:
        raise ValueError(f"split={split!r}: expected a number of decoding steps in [0, {num_steps}]")
    return tuple(ts), split


def resolve_schedule(
    family: Any,
    num_steps: int,
    key: Any = None,
    timesteps: Sequence[int] | None = None,
    split: int | None = None,
    *,
    continuous_head: bool = True,
) -> tuple[tuple[int, ...], int]:
    """The one place schedule defaults are computed: ``timesteps`` default to the family's
    (:meth:`~distilled_decoding.teachers.base.TeacherFamily.default_timesteps`); ``split`` defaults to the last
    timestep, or to every step when no continuous head is trained (``continuous_head=False``: all positions are
    read from the logits head)."""
    ts = tuple(timesteps) if timesteps is not None else family.default_timesteps(num_steps, key)
    if split is None:
        split = ts[-1] if continuous_head else num_steps
    return validate_schedule(ts, split, num_steps)


def check_saved_class(path: Any, cls: type, subfolder: str | None = None) -> None:
    """ValueError naming the file when a local ``save_pretrained`` folder holds another model class than ``cls`` (e.g.
    a DD2 generator where a DD student is expected); Hub ids and folders without a config are left to diffusers."""
    import json
    import os
    from pathlib import Path

    if not isinstance(path, (str, os.PathLike)):
        return
    config = Path(path) / (subfolder or "") / "config.json"
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if name is not None and name != cls.__name__:
        raise ValueError(f"{config}: holds a {name}, not a {cls.__name__}; load it with {name}.from_pretrained (or "
                         "DistilledDecodingPipeline, which picks the class from model_index.json)")  # fmt: skip


def check_noise(noise: Any, n: int, d: int) -> None:
    """ValueError naming ``noise`` unless it is a finite float (B, n, d) tensor with B >= 1."""
    if not isinstance(noise, Tensor) or noise.ndim != 3 or tuple(noise.shape[1:]) != (n, d):
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected shape (B, {n}, {d}) = (B, N, D), got {got}")
    if not noise.dtype.is_floating_point:
        raise ValueError(f"noise: expected a floating dtype (standard normal values), got {noise.dtype}")
    if noise.shape[0] == 0:
        raise ValueError(f"noise: empty batch, shape {tuple(noise.shape)}; expected at least one row (B >= 1)")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: contains NaN or inf; expected finite standard normal values")


class CheckedLoading:
    """Mixin for diffusers models: ``from_pretrained`` checks first that a local folder holds this class
    (:func:`check_saved_class`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        check_saved_class(pretrained_model_name_or_path, cls, kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]


class DecodingSteps:
    """A network laid out in the teacher's decoding steps: ``starts`` (the first position of each step, then N)."""

    starts: list[int]

    @property
    def seq_len(self) -> int:
        """N: tokens per image (sequence positions)."""
        return self.starts[-1]

    @property
    def num_steps(self) -> int:
        """The teacher's decoding steps (tokens for LlamaGen, scales for VAR; valid timesteps 0 .. num_steps − 1)."""
        return len(self.starts) - 1


class FewStepStudent(DecodingSteps, CheckedLoading):
    """Schedule, checks, prediction and sampling shared by every student flavour (see the module docstring)."""

    codebook: Tensor
    config: Any
    condition: Any
    #: tokenizer-grid index of each sequence position (None: the teacher decodes in the tokenizer's order)
    token_order: Tensor | None = None
    #: the method's name in sampler rows ("DD 1-step", "DD2 1-step", ...)
    method_name: str = "DD"

    # -- schedule -------------------------------------------------------------------------------------------
    @property
    def split_position(self) -> int:
        """First position read from the continuous head: the end of the first ``split`` steps."""
        return self.starts[self.config.split]

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def data_positions(self, t: Tensor) -> Tensor:
        """Leading data positions after t completed steps. t (B,) long → (B,) long."""
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.num_steps):
            raise ValueError(f"t: expected numbers of completed decoding steps in [0, {self.num_steps}], got {t}")
        return torch.tensor(self.starts, device=t.device)[t.long()]

    # -- inputs -----------------------------------------------------------------------------------------------
    def check_inputs(self, noise: Any, condition: Any) -> Any:
        """ValueErrors naming the argument unless noise is a finite float (B, N, D) tensor and ``condition`` fits
        B rows; returns the condition in canonical form."""
        self.check_noise(noise)
        return self.condition.check(condition, noise.shape[0])

    def check_noise(self, noise: Any) -> None:
        """ValueError naming ``noise`` unless it is a finite float (B, N, D) tensor with B >= 1."""
        check_noise(noise, self.seq_len, int(self.config.codebook_dim))

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x_t: Tensor, condition: Any, t: Tensor) -> tuple[Tensor, Tensor]:
        """One DD step from the trajectory point x_t (B, N, D) at t (B,) → (mixed vectors (B, N, D), tokens (B, N))
        (official ``final_predict`` + ``get_final_sequence``).

        Data positions (< ``data_positions(t)``) are copied from the input (tokens = their nearest codes); positions
        < ``split_position`` become the codebook vector of the argmax token; later positions take the continuous
        head's vector (their token is still the argmax)."""
        logits, cont = self(x_t, condition, t)
        tokens = logits.argmax(-1)
        pos = torch.arange(x_t.shape[1], device=x_t.device)[None, :]
        known = pos < self.data_positions(t)[:, None]
        tokens = torch.where(known, nearest_codes(x_t, self.codebook), tokens)
        quant = self.codebook[tokens]
        cont = torch.where(known[..., None], x_t.to(quant.dtype), cont.to(quant.dtype))
        return torch.where((pos < self.split_position)[..., None], quant, cont), tokens

    @torch.no_grad()
    def sample(self, noise: Tensor, condition: Any, timesteps: Sequence[int] = (0,)) -> tuple[Tensor, Tensor]:
        """Few-step sampling (official ``sample.py``): for each t in ``timesteps`` re-noise the positions after the
        first t steps with the *same* noise and run one step. noise (B, N, D) → (vectors (B, N, D), tokens (B, N))."""
        condition = self.check_inputs(noise, condition)
        noise = noise.to(self.codebook.dtype)
        x, tokens = noise, None
        for step in timesteps:
            t = torch.full((noise.shape[0],), int(step), dtype=torch.long, device=noise.device)
            x, tokens = self.predict(perturb(x, self.data_positions(t), noise), condition, t)
        return x, tokens
