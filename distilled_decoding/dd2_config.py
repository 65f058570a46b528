"""Distilled Decoding 2 training settings: :class:`GTSConfig` (stage 1) and :class:`CSDConfig` (stage 2) on the
:class:`DD2TrainerConfig` fields both share; validated dataclasses, read by :mod:`distilled_decoding.dd2_training` and
the recipes' ``dd2.gts`` / ``dd2.csd`` sections. ``semantic()`` is the part of the settings that changes the weights
(what a checkpoint is tied to)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from distilled_decoding.configs import ValidatedConfig
from distilled_decoding.students.dd2_base import HEAD_BASES, ARDiffusionModel
from distilled_decoding.teacher_score import check_sampling
from distilled_decoding.teachers.base import family_of

__all__ = ["CSDConfig", "DD2TrainerConfig", "GTSConfig"]


@dataclass
class DD2TrainerConfig(ValidatedConfig):
    """Settings both stages share. ``batch_size``: the global batch (split across processes); ``draws``: noise draws
    (t, ε) per position sharing one transformer pass; ``sampling``: the teacher's (``cfg_scale``, ``top_k``, ...)."""

    output_dir: str = "runs/dd2"
    batch_size: int = 32
    draws: int = 4
    t_min: float = 0.02
    t_max: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 0
    progress: bool = True
    sampling: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        req = self.require
        for name in ("batch_size", "draws", "keep_last"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("save_every", "log_every"):
            req(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        req(0.0 < self.t_min < self.t_max <= 1.0, "t_min", (self.t_min, self.t_max), "0 < t_min < t_max <= 1")
        req(self.clip_grad >= 0, "clip_grad", self.clip_grad, "a number >= 0 (0: no clipping)")
        self.sampling = check_sampling(self.sampling, "sampling")

    def semantic(self) -> dict[str, Any]:
        """The settings that change the weights (a checkpoint saved under others is not resumed)."""
        skip = ("output_dir", "save_every", "keep_last", "log_every", "progress")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class GTSConfig(DD2TrainerConfig):
    """Stage 1. ``train``: "all" (transformer, input and head) or "head" (the head only); ``head_*`` /
    ``input_hidden``: the AR-diffusion model made from the teacher by its family's ``from_teacher`` (VAR teachers
    already read continuous vectors: ``input_hidden`` 0 keeps their ``word_embed`` alone; > 0 adds a residual MLP that
    starts at zero)."""

    max_steps: int = 300
    lr: float = 3e-4
    warmup_steps: int = 30
    ema_decay: float = 0.999
    train: str = "all"
    head_base: str = "posterior"
    head_width: int = 256
    head_depth: int = 3
    input_hidden: int = 512

    def validate(self) -> None:
        super().validate()
        req = self.require
        req(self.max_steps >= 1, "max_steps", self.max_steps, "an int >= 1")
        req(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an int >= 0")
        req(self.lr > 0, "lr", self.lr, "a number > 0")
        req(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in [0, 1)")
        req(self.train in ("all", "head"), "train", self.train, "'all' or 'head'")
        req(self.head_base in HEAD_BASES, "head_base", self.head_base, f"one of {HEAD_BASES}")

    def initial_model(self, teacher: Any, codebook: Tensor) -> ARDiffusionModel:
        """The untuned AR-diffusion model of these settings, made from ``teacher`` by its family's class (the
        registry's ``dd2_model``: ``from_teacher``, head seeded by ``seed``): what stage 1 starts from, and the no-GTS
        ablation's initialisation. ValueError naming the family when DD2 does not serve it."""
        return family_of(teacher).dd2_model_class.from_teacher(
            teacher, codebook.cpu(), input_hidden=self.input_hidden, head_width=self.head_width,
            head_depth=self.head_depth, head_base=self.head_base, seed=self.seed)  # fmt: skip


@dataclass
class CSDConfig(DD2TrainerConfig):
    """Stage 2 (DD2 Tab. 10/11 names). Learning rates warm up linearly from ``lr_start`` over
    ``warmup_guidance_steps`` guidance updates (the generator's over that number divided by K), then stay constant.
    ``regression_iters`` / ``regression_weight`` (not in DD2; 0 = DD2 as published): generator iterations of
    regression alone on the flow-map pairs before CSD (counted in ``max_iters``), and the weight of the regression
    loss beside the CSD loss after them."""

    max_iters: int = 300
    guidance_steps: int = 5
    guidance_steps_after_align: int = 2
    lr_generator: float = 1e-4
    lr_guidance: float = 2e-4
    lr_start: float = 1e-6
    warmup_guidance_steps: int = 200
    ema_max: float = 0.9999
    alpha: float = 1.0
    t_max: float = 0.98
    align_at: int | None = None
    align_guidance_steps: int = 100
    guidance_train: str = "all"
    generator_t: float = 1.0
    noise_scale: float | None = None
    regression_iters: int = 0
    regression_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        req = self.require
        for name in ("max_iters", "guidance_steps", "guidance_steps_after_align", "align_guidance_steps"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        req(self.warmup_guidance_steps >= 0, "warmup_guidance_steps", self.warmup_guidance_steps, "an int >= 0")
        for name in ("lr_generator", "lr_guidance", "lr_start"):
            req(getattr(self, name) > 0, name, getattr(self, name), "a number > 0")
        req(0.0 <= self.ema_max < 1.0, "ema_max", self.ema_max, "a number in [0, 1)")
        req(self.guidance_train in ("all", "head"), "guidance_train", self.guidance_train, "'all' or 'head'")
        req(0 <= self.regression_iters <= self.max_iters, "regression_iters", self.regression_iters,
            "an int in [0, max_iters]")  # fmt: skip
        req(self.regression_weight >= 0, "regression_weight", self.regression_weight, "a number >= 0")
        req(self.align_at is None or self.regression_iters <= self.align_at < self.max_iters, "align_at",
            self.align_at, "null or an iteration in [regression_iters, max_iters)")  # fmt: skip
        req(0.0 < self.generator_t <= 1.0, "generator_t", self.generator_t, "a number in (0, 1]")
        req(self.noise_scale is None or self.noise_scale > 0, "noise_scale", self.noise_scale, "null or > 0")

    def semantic(self) -> dict[str, Any]:
        """As :meth:`DD2TrainerConfig.semantic` without ``max_iters`` and ``align_at``: after the warm-up the learning
        rates are constant and every draw depends on the update counters only, so a finished run can be extended —
        run it again with a larger ``max_iters`` (and, if it has not been aligned, an ``align_at`` at or after the
        iteration it stopped at) and it continues from its last checkpoint, to the weights of one run. The checkpoint
        records where alignment happened; :func:`train_csd` refuses an ``align_at`` that contradicts it. Without the
        regression settings (both 0) they are left out too: runs saved before those settings existed still resume."""
        drop = {"max_iters", "align_at"}
        if self.regression_iters == 0 and self.regression_weight == 0:
            drop |= {"regression_iters", "regression_weight"}
        return {k: v for k, v in super().semantic().items() if k not in drop}
