"""distilled-decoding: turn pretrained image autoregressive models into one- or two-step generators.

The public API is re-exported here. Submodules are imported lazily so that ``import distilled_decoding``
and the command line start fast (diffusers alone takes seconds to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # teachers and tokenizers
    "LlamaGen": "distilled_decoding.teachers.llamagen",
    "LLAMAGEN_PRESETS": "distilled_decoding.teachers.llamagen",
    "VAR": "distilled_decoding.teachers.var",
    "PAR": "distilled_decoding.teachers.par",
    "PAR_PRESETS": "distilled_decoding.teachers.par",
    "VQTokenizer": "distilled_decoding.tokenizers.vq",
    "MultiScaleVQVAE": "distilled_decoding.tokenizers.msvq",
    # conditions and text encoders
    "TextCondition": "distilled_decoding.conditions",
    "T5TextEncoder": "distilled_decoding.text",
    "PromptEmbeddingCache": "distilled_decoding.text",
    "encode_prompts": "distilled_decoding.text",
    "load_prompts": "distilled_decoding.prompts",
    "clip_score": "distilled_decoding.clip",
    # checkpoints
    "CheckpointError": "distilled_decoding.checkpoints",
    "load_state_dict_file": "distilled_decoding.checkpoints",
    # Hugging Face Hub references and the released students
    "resolve_file": "distilled_decoding.hub",
    "HubReferenceError": "distilled_decoding.hub",
    "load_release": "distilled_decoding.releases",
    "RELEASES": "distilled_decoding.releases",
    # sampling
    "sample_tokens": "distilled_decoding.sampling",
    "MultinomialChooser": "distilled_decoding.sampling",
    "FlowChooser": "distilled_decoding.sampling",
    # flow map
    "noise_to_tokens": "distilled_decoding.flow",
    # trajectories
    "build_trajectories": "distilled_decoding.trajectories",
    "TrajectoryDataset": "distilled_decoding.trajectories",
    # teacher interface and families
    "Teacher": "distilled_decoding.teachers",
    "TeacherFamily": "distilled_decoding.teachers",
    "register_family": "distilled_decoding.teachers",
    "get_family": "distilled_decoding.teachers",
    "family_of": "distilled_decoding.teachers",
    "load_teacher": "distilled_decoding.teachers",
    "ClassCondition": "distilled_decoding.conditions",
    # students, losses, samplers and pipeline
    "DDStudent": "distilled_decoding.students.llamagen",
    "DDVARStudent": "distilled_decoding.students.var",
    "DDPARStudent": "distilled_decoding.students.par",
    "student_from_teacher": "distilled_decoding.students",
    "DistillConfig": "distilled_decoding.distill",
    "train_student": "distilled_decoding.distill",
    "TeacherSampler": "distilled_decoding.samplers",
    "StudentSampler": "distilled_decoding.samplers",
    "RefinedSampler": "distilled_decoding.samplers",
    "ARDiffusionSampler": "distilled_decoding.samplers",
    "OneStepStar": "distilled_decoding.samplers",
    "SkipN": "distilled_decoding.samplers",
    "DistilledDecodingPipeline": "distilled_decoding.pipeline",
    # Distilled Decoding 2
    "ARDiffusion": "distilled_decoding.students.dd2",
    "DD2Generator": "distilled_decoding.students.dd2",
    "VARARDiffusion": "distilled_decoding.students.dd2_var",
    "DD2VARGenerator": "distilled_decoding.students.dd2_var",
    "TeacherScore": "distilled_decoding.teacher_score",
    "teacher_logits": "distilled_decoding.teacher_score",
    "GTSConfig": "distilled_decoding.dd2_config",
    "CSDConfig": "distilled_decoding.dd2_config",
    "train_gts": "distilled_decoding.dd2_training",
    "train_csd": "distilled_decoding.dd2_training",
}
_SUBMODULES = {
    "flow",
    "sampling",
    "samplers",
    "checkpoints",
    "conditions",
    "text",
    "prompts",
    "condition_tables",
    "clip",
    "trajectories",
    "students",
    "losses",
    "teachers",
    "provenance",
    "pipeline",
    "metrics",
    "bench",
    "hub",
    "releases",
    "fid",
    "teacher_score",
    "methods",
}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"distilled_decoding.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'distilled_decoding' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from distilled_decoding import (
        bench,
        checkpoints,
        clip,
        condition_tables,
        conditions,
        fid,
        flow,
        hub,
        losses,
        methods,
        metrics,
        pipeline,
        prompts,
        provenance,
        releases,
        samplers,
        sampling,
        students,
        teacher_score,
        teachers,
        text,
        trajectories,
    )
    from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file
    from distilled_decoding.clip import clip_score
    from distilled_decoding.conditions import ClassCondition, TextCondition
    from distilled_decoding.dd2_config import CSDConfig, GTSConfig
    from distilled_decoding.dd2_training import train_csd, train_gts
    from distilled_decoding.distill import DistillConfig, train_student
    from distilled_decoding.flow import noise_to_tokens
    from distilled_decoding.hub import HubReferenceError, resolve_file
    from distilled_decoding.pipeline import DistilledDecodingPipeline
    from distilled_decoding.prompts import load_prompts
    from distilled_decoding.releases import RELEASES, load_release
    from distilled_decoding.samplers import (
        ARDiffusionSampler,
        OneStepStar,
        RefinedSampler,
        SkipN,
        StudentSampler,
        TeacherSampler,
    )
    from distilled_decoding.sampling import FlowChooser, MultinomialChooser, sample_tokens
    from distilled_decoding.students import student_from_teacher
    from distilled_decoding.students.dd2 import ARDiffusion, DD2Generator
    from distilled_decoding.students.dd2_var import DD2VARGenerator, VARARDiffusion
    from distilled_decoding.students.llamagen import DDStudent
    from distilled_decoding.students.par import DDPARStudent
    from distilled_decoding.students.var import DDVARStudent
    from distilled_decoding.teacher_score import TeacherScore, teacher_logits
    from distilled_decoding.teachers import (
        Teacher,
        TeacherFamily,
        family_of,
        get_family,
        load_teacher,
        register_family,
    )
    from distilled_decoding.teachers.llamagen import LLAMAGEN_PRESETS, LlamaGen
    from distilled_decoding.teachers.par import PAR, PAR_PRESETS
    from distilled_decoding.teachers.var import VAR
    from distilled_decoding.text import PromptEmbeddingCache, T5TextEncoder, encode_prompts
    from distilled_decoding.tokenizers.msvq import MultiScaleVQVAE
    from distilled_decoding.tokenizers.vq import VQTokenizer
    from distilled_decoding.trajectories import TrajectoryDataset, build_trajectories
