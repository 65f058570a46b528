"""Distilled Decoding students: one forward pass from a noise sequence to the teacher's token sequence.

:mod:`~distilled_decoding.students.base` holds what every student shares (schedule, trajectory points, attention
from the teacher's decode groups, prediction, sampling); each family's file holds its network and official loader:
:class:`~distilled_decoding.students.llamagen.DDStudent` (LlamaGen), :class:`~distilled_decoding.students.var.
DDVARStudent` (VAR), :class:`~distilled_decoding.students.par.DDPARStudent` (PAR). :func:`student_from_teacher` picks
the family's student through the registry.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distilled_decoding.students.base import FewStepStudent, nearest_codes, perturb
from distilled_decoding.students.llamagen import DDStudent
from distilled_decoding.students.par import DDPARStudent
from distilled_decoding.students.var import DDVARStudent
from distilled_decoding.teachers import family_of

__all__ = [
    "FewStepStudent",
    "nearest_codes",
    "perturb",
    "student_from_teacher",
    "DDStudent",
    "DDVARStudent",
    "DDPARStudent",
]


def student_from_teacher(teacher: Any, codebook: Tensor, **kwargs: Any) -> nn.Module:
    """The student of ``teacher``'s family, initialised from it (``kwargs``: the family's ``from_teacher``
    options, e.g. ``split``, ``timesteps``, ``init_input``, ``continuous_head``)."""
    return family_of(teacher).student_class.from_teacher(teacher, codebook, **kwargs)
