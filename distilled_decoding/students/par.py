"""The Distilled Decoding student for PAR teachers (region-parallel LlamaGen, :mod:`distilled_decoding.teachers.par`).

The LlamaGen student (:class:`~distilled_decoding.students.llamagen.DDStudent`: the teacher's backbone, class table,
norm and logits head copied; ``Linear(D, dim)`` reading each position's noise/data vector; the data/noise indicator;
the continuous head) over PAR's *sequence order*, with two changes that follow the teacher:

* attention follows PAR's decode groups (:func:`~distilled_decoding.students.base.group_attention_mask`): position
  i of decoding step g sees the class, every position of steps < g and itself — the dependency of the flow-map
  trajectories through PAR (k anchors one by one, then k tokens a step, each conditionally independent of its
  group given the context);
* each position gets the 2-D RoPE row of its own raster cell (PAR's ``token_order``), the class row stays zero.

No transition tokens: every position reads its own noise, so each of the k positions of a group already has a
query slot. Timesteps and ``split`` count PAR decoding steps (PAR-4× on 8×8: 4 anchors + 15 groups = 19 steps);
``token_order`` maps the student's sequence order back to the tokenizer's raster grid (the pipeline's decode uses
it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from diffusers.models.modeling_utils import ModelMixin  # also looked up here by diffusers' pipeline loader
from torch import Tensor

from distilled_decoding.model_config import config_init
from distilled_decoding.students.base import group_attention_mask
from distilled_decoding.students.llamagen import DDStudent, DDStudentConfig
from distilled_decoding.teachers.base import step_starts
from distilled_decoding.teachers.llamagen_layers import precompute_freqs_cis_2d
from distilled_decoding.teachers.par import par_decode_groups, region_order

__all__ = ["DDPARStudent", "DDPARStudentConfig"]


@dataclass
class DDPARStudentConfig(DDStudentConfig):
    """:class:`~distilled_decoding.students.llamagen.DDStudentConfig` plus ``ar_token_num`` (k, the teacher's tokens
    per parallel step); ``timesteps`` and ``split`` count PAR decoding steps (k + (N − k) / k of them)."""

    block_size: int = 576
    split: int = 4
    timesteps: Sequence[int] = (0, 4)
    ar_token_num: int = 4

    def step_starts(self) -> list[int]:
        """``[0, 1, ..., k, 2k, ..., N]``: positions decoded after each PAR step (validates k against the grid)."""
        a = self.backbone()
        region_order(a.grid_size, self.ar_token_num)
        return step_starts(par_decode_groups(a.block_size, self.ar_token_num))


class DDPARStudent(DDStudent):
    """DD student of a PAR teacher. ``student(x, class_labels, t)`` → (logits (B, N, V) fp32, vectors (B, N, D)
    fp32), x and the outputs in PAR's sequence order, t (B,) = completed PAR decoding steps.

    Build it with :meth:`from_teacher` (a :class:`~distilled_decoding.teachers.par.PAR`); config:
    :class:`DDPARStudentConfig`. There is no released DD-PAR checkpoint, so :meth:`from_official` is refused.
    """

    family: ClassVar[str] = "par"

    @config_init(DDPARStudentConfig)
    def __init__(self, cfg: DDPARStudentConfig):
        ModelMixin.__init__(self)  # not DDStudent's constructor, which registers DDStudentConfig's fields
        self.init_modules(cfg)
        self._tables: dict[str, Tensor] = {}

    @classmethod
    def teacher_fields(cls, teacher: Any) -> dict[str, Any]:
        return {"ar_token_num": int(teacher.ar_token_num)}

    @classmethod
    def from_official(cls, *args: Any, **kwargs: Any) -> DDPARStudent:
        raise ValueError("DDPARStudent: no official DD checkpoint exists for PAR teachers; use from_teacher(par, ...)")

    # -- tables (built lazily on the weights' device, never saved) -----------------------------------------------
    def _table(self, name: str) -> Tensor:
        device = self.output.weight.device
        t = self._tables.get(name)
        if t is None or t.device != device:
            a = self.args
            order = region_order(a.grid_size, self.config.ar_token_num)
            if name == "token_order":
                t = order
            elif name == "freqs_cis":  # class row zero, then each position's raster-cell row
                raster = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, 1)
                t = raster[[0, *(order + 1).tolist()]]
            else:  # "mask": the teacher's decode groups
                t = group_attention_mask(self.starts, n_prefix=1)
            t = t.to(device)
            self._tables[name] = t
        return t

    @property
    def token_order(self) -> Tensor:  # type: ignore[override]
        """(N,) long: the raster index of each sequence position (the teacher's ``token_order``)."""
        return self._table("token_order")

    @property
    def freqs_cis(self) -> Tensor:
        """(N + 1, head_dim/2, 2): zero row for the class, then the RoPE row of each position's raster cell."""
        return self._table("freqs_cis")

    @property
    def attention_mask(self) -> Tensor:
        """(N + 1, N + 1) bool: class, earlier decode groups and itself (True = attend)."""
        return self._table("mask")
