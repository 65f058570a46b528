"""The distillation methods of the recipe (``distill.method``): one entry each in :data:`METHODS`.

* ``dd1`` — Distilled Decoding: (noise, tokens) trajectory pairs → a few-step student of the teacher's family
  (:func:`~distilled_decoding.distill.train_student`).
* ``dd2`` — Distilled Decoding 2: the trajectory folder's token sequences → GTS initialisation → conditional score
  distillation → a one-step generator of the teacher's family (the family registry's ``dd2_model`` /
  ``dd2_generator``: LlamaGen's :class:`~distilled_decoding.students.dd2.DD2Generator`, VAR's
  :class:`~distilled_decoding.students.dd2_var.DD2VARGenerator`) (:mod:`distilled_decoding.dd2_training`); settings
  in the recipe's ``dd2`` section (:class:`DD2Config`).

A method gives the ``train`` stage, the class of the student it saves (checked when a saved student is packaged),
the settings recorded in the student's ``training.json`` and extra rows of the evaluation table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilled_decoding.configs import ConfigError, ValidatedConfig
from distilled_decoding.dd2_config import CSDConfig, GTSConfig

__all__ = ["DD2Config", "METHODS", "Method", "get_method"]


@dataclass
class DD2Config(ValidatedConfig):
    """The recipe's ``dd2`` section: stage 1 (``gts``), stage 2 (``csd``), ``init`` ("gts", or "teacher" for the
    ablation without GTS initialisation: CSD starts from the teacher-made AR-diffusion model) and ``euler_steps`` (the
    GTS model's row in the evaluation: Euler steps per token, DD2 App. B.3). The teacher's sampling settings are the
    trajectories' (``trajectories.cfg_scale`` ...); both stages' ``output_dir`` are set under ``distill.output_dir``."""

    gts: GTSConfig = field(default_factory=GTSConfig)
    csd: CSDConfig = field(default_factory=CSDConfig)
    init: str = "gts"
    euler_steps: int = 10

    def validate(self) -> None:
        req = self.require
        req(self.init in ("gts", "teacher"), "init", self.init, "'gts' or 'teacher' (the no-GTS ablation)")
        req(self.euler_steps >= 1, "euler_steps", self.euler_steps, "an int >= 1")
        for name in ("gts", "csd"):
            req(not getattr(self, name).sampling, f"{name}.sampling", getattr(self, name).sampling,
                "{} (a recipe distils the trajectories' sampling: trajectories.cfg_scale, top_k, ...)")  # fmt: skip


@dataclass(frozen=True)
class Method:
    """``train(cfg, teacher, tokenizer, state)`` → the trained student (also saved in ``distill.output_dir/final``
    with its ``training.json``); ``student_class(kind)``; ``settings(cfg, ds, student)`` → what ``training.json`` must
    hold for a saved student to be packaged by this run; ``extra_samplers(cfg, pipe)`` → more evaluation rows."""

    name: str
    train: Callable[..., Any]
    student_class: Callable[[str], type]
    settings: Callable[..., dict[str, Any]]
    extra_samplers: Callable[..., list[Any]]


# ------------------------------------------------------------------------------------------------------------
# DD1
# ------------------------------------------------------------------------------------------------------------
def _dd1_train(cfg: Any, teacher: Any, tokenizer: Any, state: Any) -> Any:
    from distilled_decoding.distill import train_student
    from distilled_decoding.training_state import read_training_settings, save_student

    student_dir = Path(cfg.distill.output_dir)
    tok_dev = tokenizer.to(state.device)
    student = train_student(cfg.distill, teacher=teacher, codebook=tokenizer.codebook,
                            decode=lambda v: tok_dev.decode_vectors(v))  # fmt: skip
    tokenizer.to("cpu")
    if state.is_main_process:
        save_student(student, student_dir / "final", read_training_settings(student_dir))
    return student


def _dd1_settings(cfg: Any, ds: Any, student: Any, stored: dict[str, Any]) -> dict[str, Any]:
    from distilled_decoding.training_state import training_settings

    mp = cfg.distill.mixed_precision or stored["distill"].get("mixed_precision", "no")  # packaging needs no device
    settings = training_settings(cfg.distill, ds, student, mp)
    if cfg.distill.split is not None:  # asked for explicitly: compare with what the student was trained with
        settings["distill"]["split"] = cfg.distill.split
    if cfg.distill.timesteps is not None:
        settings["distill"]["timesteps"] = list(cfg.distill.timesteps)
    return settings


def _family_student(kind: str) -> type:
    from distilled_decoding.teachers import get_family

    return get_family(kind).student_class


# ------------------------------------------------------------------------------------------------------------
# DD2
# ------------------------------------------------------------------------------------------------------------
def _dd2_configs(cfg: Any) -> tuple[GTSConfig, CSDConfig]:
    """The two stages' configs of a recipe: the teacher's sampling = the trajectories', folders under the student's."""
    student_dir = Path(cfg.distill.output_dir)
    sampling = cfg.trajectories.sampling()
    gts = dataclasses.replace(cfg.dd2.gts, output_dir=str(student_dir / "gts"), sampling=sampling)
    csd = dataclasses.replace(cfg.dd2.csd, output_dir=str(student_dir / "csd"), sampling=sampling)
    return gts, csd


def _dd2_settings(cfg: Any, ds: Any, student: Any = None, stored: Any = None) -> dict[str, Any]:
    from distilled_decoding.training_state import data_provenance

    gts, csd = _dd2_configs(cfg)
    return {
        "method": "dd2",
        "init": cfg.dd2.init,
        "gts": gts.semantic() if cfg.dd2.init == "gts" else None,
        "csd": csd.semantic(),
        **data_provenance(ds),
    }


def _dd2_train(cfg: Any, teacher: Any, tokenizer: Any, state: Any) -> Any:
    from distilled_decoding.dd2_training import train_csd, train_gts
    from distilled_decoding.fileio import make_dirs
    from distilled_decoding.par_training import load_sample_tokens
    from distilled_decoding.training_state import check_training_settings, save_student, write_training_json
    from distilled_decoding.trajectories import TrajectoryDataset

    student_dir = Path(cfg.distill.output_dir)
    codebook = tokenizer.codebook.detach()
    ds = TrajectoryDataset(cfg.distill.trajectories)
    settings = _dd2_settings(cfg, ds)
    check_training_settings(student_dir, settings, what="DD2 generator")
    if state.is_main_process:  # recorded first: a later run with other settings is refused, not mixed in
        make_dirs(student_dir)
        write_training_json(student_dir, settings)
    gts_cfg, csd_cfg = _dd2_configs(cfg)
    if cfg.dd2.init == "gts":
        tokens, labels = load_sample_tokens(cfg.distill.trajectories, teacher, codebook)
        init, _ = train_gts(gts_cfg, teacher, codebook, tokens, labels)
        if state.is_main_process:
            save_student(init, student_dir / "gts" / "final", settings)
    else:  # the ablation: the teacher-made AR-diffusion model, fresh head
        init = gts_cfg.initial_model(teacher, codebook)
    generator, _, _ = train_csd(csd_cfg, teacher, codebook, init, pairs=ds)
    if state.is_main_process:
        save_student(generator, student_dir / "final", settings)
    return generator


def _dd2_samplers(cfg: Any, pipe: Any) -> list[Any]:
    """The GTS model's own row (``euler_steps`` Euler steps per token), when it was trained."""
    from distilled_decoding.samplers import ARDiffusionSampler
    from distilled_decoding.teachers import get_family

    final = Path(cfg.distill.output_dir) / "gts" / "final"
    if cfg.dd2.init != "gts" or not (final / "config.json").is_file():
        return []
    model = get_family(cfg.teacher.kind).dd2_model_class.from_pretrained(final).eval()
    return [ARDiffusionSampler(model, cfg.dd2.euler_steps)]


def _dd2_student(kind: str) -> type:
    """The one-step generator class of the teacher family ``kind`` (the registry's ``dd2_generator``)."""
    from distilled_decoding.teachers import get_family

    try:
        return get_family(kind).dd2_generator_class
    except ValueError as e:
        raise ConfigError(f"distill.method='dd2': {e}") from None


METHODS: dict[str, Method] = {
    "dd1": Method("dd1", _dd1_train, _family_student, _dd1_settings, lambda cfg, pipe: []),
    "dd2": Method("dd2", _dd2_train, _dd2_student, _dd2_settings, _dd2_samplers),
}


def get_method(name: str) -> Method:
    """The method registered as ``name``; ValueError naming ``distill.method`` otherwise."""
    if name not in METHODS:
        raise ValueError(f"distill.method={name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]
