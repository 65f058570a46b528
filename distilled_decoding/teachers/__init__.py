"""Teacher AR models behind one interface (:class:`~distilled_decoding.teachers.base.Teacher`) and the registry of
teacher families: LlamaGen (raster order), VAR (next-scale), PAR (region-parallel)."""

from __future__ import annotations

from typing import Any

from distilled_decoding.teachers.base import (
    Teacher,
    TeacherFamily,
    families,
    family_of,
    get_family,
    register_family,
)

__all__ = ["Teacher", "TeacherFamily", "families", "family_of", "get_family", "register_family", "load_teacher"]

register_family(
    TeacherFamily(
        name="llamagen",
        teacher="distilled_decoding.teachers.llamagen:LlamaGen",
        student="distilled_decoding.students.llamagen:DDStudent",
        loader="distilled_decoding.teachers.llamagen:load_llamagen",
        description="LlamaGen class-conditional GPT (raster order) + VQ tokenizer",
        schedule_fraction=80 / 256,  # the released LlamaGen DD students: timesteps (0, 80) of 256 tokens
        embedded=("checkpoints/digits_llamagen/gpt", "checkpoints/digits_llamagen/vq"),
        dd2_model="distilled_decoding.students.dd2:ARDiffusion",
        dd2_generator="distilled_decoding.students.dd2:DD2Generator",
    )
)
register_family(
    TeacherFamily(
        name="var",
        teacher="distilled_decoding.teachers.var:VAR",
        student="distilled_decoding.students.var:DDVARStudent",
        loader="distilled_decoding.teachers.var:load_var",
        description="VAR next-scale transformer + its multi-scale VQVAE",
        schedule_fraction=0.5,
        # the released DD-VAR students by (teacher depth, scales) (VAR/README.md commands; split = t2)
        released_schedules={(16, 10): (0, 5), (20, 10): (0, 4), (24, 10): (0, 4)},
        embedded=("checkpoints/digits_var", None),
        needs_tokenizer=False,
        dd2_model="distilled_decoding.students.dd2_var:VARARDiffusion",
        dd2_generator="distilled_decoding.students.dd2_var:DD2VARGenerator",
    )
)
register_family(
    TeacherFamily(
        name="par",
        teacher="distilled_decoding.teachers.par:PAR",
        student="distilled_decoding.students.par:DDPARStudent",
        loader="distilled_decoding.teachers.par:load_par",
        description="PAR region-parallel LlamaGen (k tokens a decoding step) + VQ tokenizer",
        schedule_fraction=80 / 256,
        # PAR-4x converted from the digits LlamaGen by recipes/train_par_teacher.py; LlamaGen's VQ tokenizer
        embedded=("checkpoints/digits_par", "checkpoints/digits_llamagen/vq"),
    )
)


def load_teacher(kind: str, model: Any, tokenizer: Any = None, **options: Any) -> tuple[Any, Any]:
    """``(teacher, tokenizer)`` in eval mode for the registered family ``kind``."""
    return get_family(kind).load(model, tokenizer, **options)
