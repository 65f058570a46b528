"""The end-to-end distillation job behind ``recipes/distill_llamagen.py``.

Stages (each resumable, each skipped when its output exists):

1. ``trajectories`` — build (noise, tokens) pairs with the frozen teacher (:func:`build_trajectories`);
2. ``train`` — distil the student with Accelerate by ``distill.method`` (:mod:`distilled_decoding.methods`): ``dd1``
   (:func:`train_student`, the default) or ``dd2`` (GTS + CSD → a one-step generator; settings in ``dd2``);
3. ``save`` — write the :class:`DistilledDecodingPipeline` (student + tokenizer, model card);
4. ``evaluate`` — the comparison table and sample grid (:mod:`distilled_decoding.evaluation`).

Configuration: :class:`RecipeConfig` from defaults (the embedded digits teacher), then a YAML file, then
``section.field=value`` overrides, e.g. ``distill.max_steps=2000 trajectories.num_samples=50000``.

Text-to-image teachers (LlamaGen ``model_type="t2i"``) take ``teacher.text_encoder`` (a T5 folder or Hub id,
``google/flan-t5-xl``), ``trajectories.prompts`` (the prompts distilled: a list or a .txt / .csv / .tsv / .json file)
and ``evaluate.prompts`` (+ ``label_column`` for prompt adherence, ``clip_model`` for the CLIP score); the saved
pipeline holds the text encoder. Relative paths that do not exist in the working directory are looked up in the
repository (``checkpoints/digits_t2i/...`` works from anywhere).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distilled_decoding.configs import (
    ConfigError,
    ValidatedConfig,
    build_config,
    merge,
    parse_overrides,
    read_config_file,
)
from distilled_decoding.distill import DistillConfig
from distilled_decoding.fileio import atomic_write_text
from distilled_decoding.hub import is_hub_reference
from distilled_decoding.methods import DD2Config, get_method
from distilled_decoding.training_state import TrainingStateError, check_training_settings, read_training_settings

__all__ = [
    "DEFAULT_CONFIG",
    "RecipeConfig",
    "TeacherConfig",
    "TrajectoryConfig",
    "EvalConfig",
    "load_recipe_config",
    "run",
]

ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: Any) -> Any:
    """A relative path that exists in the repository but not in the working directory → the repository's; anything
    else (absolute paths, Hub references, lists, None) unchanged."""
    if not isinstance(path, str) or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(ROOT / path) if (ROOT / path).exists() else path


STAGES = ("trajectories", "train", "save", "evaluate")
#: the embedded default job (``recipes/distill_llamagen.py`` without ``--config``)
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "digits_llamagen.yaml"
FEATURE_EXTRACTORS = ("digits-cnn", "inception", "inception-v3-compat")


@dataclass
class TeacherConfig(ValidatedConfig):
    """Where the teacher comes from: ``save_pretrained`` folders or official files, for a registered family
    (:func:`distilled_decoding.teachers.families`).

    ``kind="llamagen"``: ``model`` = GPT (``c2i_B_256.pt`` or a folder), ``tokenizer`` = VQ (``vq_ds16_c2i.pt`` or
    a folder), ``preset`` = GPT-B/GPT-L/... (inferred when None). ``kind="var"``: ``model`` = ``var_d16.pth`` (or a
    folder holding the VAE too), ``tokenizer`` = ``vae_ch160v4096z32.pth``, ``preset`` = the depth (16 or "d16").
    Without ``model`` the family's embedded default in ``checkpoints/`` is used.
    Files may be Hub references, e.g. ``model=FoundationVision/LlamaGen/c2i_B_256.pt``
    (see :mod:`distilled_decoding.hub`). ``text_encoder``: text-to-image teachers' T5 encoder and tokenizer (a folder
    or a Hub id such as ``google/flan-t5-xl``), loaded with ``max_length`` = the teacher's caption positions.
    """

    kind: str = "llamagen"
    model: str | None = None
    tokenizer: str | None = None
    preset: str | int | None = None
    block_size: int | None = None
    dtype: str = "float32"
    text_encoder: str | None = None

    def validate(self) -> None:
        from distilled_decoding.teachers import families

        self.require(self.kind in families(), "kind", self.kind, f"one of {sorted(families())}")
        self.require(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "'float32' or 'bfloat16'")
        self.require(self.block_size is None or self.block_size >= 1, "block_size", self.block_size, "null or >= 1")
        embedded = families()[self.kind].embedded
        if self.model is None and embedded:
            self.model = str(ROOT / embedded[0])
            if self.tokenizer is None and embedded[1] is not None:
                self.tokenizer = str(ROOT / embedded[1])
        self.require(bool(self.model), "model", self.model, f"a file or folder path (kind {self.kind!r} has no "
                     "embedded default)")  # fmt: skip
        self.model, self.tokenizer, self.text_encoder = map(repo_path, (self.model, self.tokenizer, self.text_encoder))

    def load(self) -> tuple[Any, Any]:
        from distilled_decoding.teachers import load_teacher

        teacher, tok = load_teacher(self.kind, self.model, self.tokenizer, preset=self.preset,
                                    block_size=self.block_size)  # fmt: skip
        dtype = getattr(torch, self.dtype)
        return (teacher if teacher.dtype == dtype else teacher.to(dtype)), tok

    def load_text_encoder(self, teacher: Any) -> Any:
        """The :class:`~distilled_decoding.text.T5TextEncoder` of a text-conditional ``teacher`` (None when
        ``text_encoder`` is unset); ValueError when it does not fit the teacher."""
        if self.text_encoder is None:
            return None
        from distilled_decoding.text import T5TextEncoder

        length = teacher.condition.describe().get("length")
        if length is None:
            raise ValueError("teacher.text_encoder: the teacher is class-conditional and reads no text; unset it")
        return T5TextEncoder.from_pretrained(self.text_encoder, max_length=length)


@dataclass
class TrajectoryConfig(ValidatedConfig):
    """The teacher's sampling settings to distil and the size of the pair set."""

    num_samples: int = 20000
    batch_size: int = 256
    shard_size: int = 5000
    seed: int = 0
    cfg_scale: float = 2.0
    cfg_interval: int = -1
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    store_noise: bool = True  # False: regenerate noise from (seed, i) when read (VAR: 32x smaller folders)
    # text-to-image teachers: the prompts distilled (a list, or a .txt / .csv / .tsv / .json file and its column)
    prompts: str | tuple[str, ...] | None = None
    prompt_column: str | None = None
    prompt_delimiter: str | None = None

    def load_prompts(self) -> list[str] | None:
        from distilled_decoding.prompts import load_prompts

        return None if self.prompts is None else load_prompts(self.prompts, self.prompt_column, self.prompt_delimiter)

    def validate(self) -> None:
        req = self.require
        for name in ("num_samples", "batch_size", "shard_size"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        req(self.seed >= 0, "seed", self.seed, "an int >= 0")
        req(self.cfg_scale >= 0, "cfg_scale", self.cfg_scale, "a number >= 0")
        req(self.cfg_interval >= -1, "cfg_interval", self.cfg_interval, "an int >= -1 (-1: every step)")
        req(self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 disables top-k)")
        req(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1]")
        req(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        self.prompts = repo_path(self.prompts)

    def sampling(self) -> dict[str, Any]:
        return {"cfg_scale": self.cfg_scale, "cfg_interval": self.cfg_interval, "top_k": self.top_k,
                "top_p": self.top_p, "temperature": self.temperature}  # fmt: skip


@dataclass
class EvalConfig(ValidatedConfig):
    """Evaluation of the distilled pipeline against the teacher (see :mod:`distilled_decoding.evaluation`)."""

    num_images: int = 1000
    batch_size: int = 250
    seed: int = 1234
    # what to compare with: the bundled digits, a folder of real images, or FID statistics (a file or Hub reference,
    # e.g. microsoft/distilled_decoding/ImageNet-256_FID_Statistic/statistic.pth with feature_extractor=inception)
    reference: str = "digits"
    feature_extractor: str = "digits-cnn"
    refine: tuple[int, int] | None = None  # teacher_tokens (T, t2); None: (t2 - t2 // 4, t2)
    skip: tuple[int, ...] | None = None  # skip-n baselines; None: (N // 8, N // 4)
    bench_batches: tuple[int, ...] = (1, 64)
    grid_columns: int = 10
    # more teacher rows of the same tokenizer: [{name: "PAR-4× (converted)", kind: par, model: ...}, ...]
    extra_teachers: tuple[dict[str, Any], ...] = ()
    latency_repeats: int = 3  # timed batch-1 calls per sampler (the batch-1 speedup column); 0: none
    # text-to-image students: evaluation prompts (image i gets prompt i mod P); label_column: the class each prompt
    # names (prompt adherence under the digits classifier); clip_model: CLIP weights for the CLIP score (optional)
    prompts: str | None = None
    prompt_column: str | None = None
    prompt_delimiter: str | None = None
    label_column: str | None = None
    clip_model: str | None = None

    def validate(self) -> None:
        req = self.require
        for name in ("num_images", "batch_size", "grid_columns"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        req(self.seed >= 0, "seed", self.seed, "an int >= 0")
        req(self.latency_repeats >= 0, "latency_repeats", self.latency_repeats, "an int >= 0")
        req(bool(self.reference), "reference", self.reference, "'digits' or a folder of images")
        req(self.feature_extractor in FEATURE_EXTRACTORS, "feature_extractor", self.feature_extractor,
            f"one of {FEATURE_EXTRACTORS}")  # fmt: skip
        req(self.refine is None or 0 <= self.refine[0] <= self.refine[1], "refine", self.refine,
            "null or [T, t2] with 0 <= T <= t2")  # fmt: skip
        req(self.skip is None or all(n >= 1 for n in self.skip), "skip", self.skip, "null or a list of ints >= 1")
        req(all(b >= 1 for b in self.bench_batches), "bench_batches", self.bench_batches, "a list of ints >= 1")
        allowed = {f.name for f in dataclasses.fields(TeacherConfig)}
        for i, entry in enumerate(self.extra_teachers):
            ok = isinstance(entry.get("name"), str) and not set(entry) - allowed - {"name"}
            req(ok, f"extra_teachers[{i}]", entry,
                f"a mapping with a 'name' (the table row) and teacher fields among {sorted(allowed)}")  # fmt: skip
        self.prompts, self.clip_model = repo_path(self.prompts), repo_path(self.clip_model)


@dataclass
class RecipeConfig(ValidatedConfig):
    output_dir: str = "runs/digits"
    stages: tuple[str, ...] = STAGES
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dd2: DD2Config = field(default_factory=DD2Config)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        self.require(not bad, "stages", list(self.stages), f"some of {list(STAGES)} (unknown: {bad})")
        self.require(bool(self.output_dir), "output_dir", self.output_dir, "a folder path")

    @property
    def trajectory_dir(self) -> Path:
        return Path(self.output_dir) / "trajectories"

    @property
    def pipeline_dir(self) -> Path:
        return Path(self.output_dir) / "pipeline"


_SECTIONS = {"teacher": TeacherConfig, "trajectories": TrajectoryConfig, "distill": DistillConfig,
             "dd2": DD2Config, "evaluate": EvalConfig}  # fmt: skip


def load_recipe_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> RecipeConfig:
    """Dataclass defaults ← ``defaults`` ← YAML file ← ``section.key=value`` overrides (values parsed as YAML).
    ``defaults`` has the YAML's nested layout (e.g. ``{"teacher": {"kind": "var"}}``). Without a file,
    :data:`DEFAULT_CONFIG` (the embedded LlamaGen digits job) is read."""
    import copy

    data: dict[str, Any] = copy.deepcopy(dict(defaults or {}))
    path = DEFAULT_CONFIG if path is None else path
    if path is not None:
        merge(data, read_config_file(path))
    parse_overrides(overrides, data)
    top = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; expected some of {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = build_config(_SECTIONS[name], value, name) if name in _SECTIONS else value
    cfg = build_config(RecipeConfig, kwargs)
    # the student trains on this job's trajectories and writes into this job's folder unless told otherwise
    if "trajectories" not in (data.get("distill") or {}):
        cfg.distill.trajectories = str(cfg.trajectory_dir)
    if "output_dir" not in (data.get("distill") or {}):
        cfg.distill.output_dir = str(Path(cfg.output_dir) / "student")
    return cfg


def run(cfg: RecipeConfig) -> dict[str, Any]:
    """Run the configured stages; returns a summary dict (paths, evaluation table when evaluated).

    The job folder is locked while the stages run (a second job on it refuses, naming the holder's pid).
    ``config.json`` records the job's configuration: written when the job starts in a new folder and replaced
    when all stages succeeded; an evaluation-only run never writes it (nor creates any folder)."""
    from distilled_decoding.distributed import process_state
    from distilled_decoding.fileio import job_lock

    if not isinstance(cfg, RecipeConfig):
        raise TypeError(f"cfg: expected a RecipeConfig (see load_recipe_config), got {type(cfg).__name__}")
    state = process_state()
    out = Path(cfg.output_dir)
    _preflight(cfg)
    evaluate_only = set(cfg.stages) <= {"evaluate"}
    if evaluate_only:
        for path, what in ((out, "the job folder"), (cfg.pipeline_dir / "model_index.json", "a saved pipeline"),
                           (Path(cfg.distill.trajectories) / "manifest.json", "the trajectories")):  # fmt: skip
            if not path.exists():
                raise ConfigError(f"output_dir: {path} does not exist ({what}); run the distillation job first")
    with job_lock(out, state, what="distillation job"):
        record = json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
        summary = _run_stages(cfg, state, None if evaluate_only else record)
        if state.is_main_process and not evaluate_only:
            atomic_write_text(out / "config.json", record)
        state.wait_for_everyone()
    return summary


def _preflight(cfg: RecipeConfig) -> None:
    """Paths the stages need, checked before anything is written (one-line :class:`ConfigError`)."""
    from distilled_decoding.teachers import get_family

    for name, value in (("output_dir", cfg.output_dir), ("distill.output_dir", cfg.distill.output_dir),
                        ("distill.trajectories", cfg.distill.trajectories)):  # fmt: skip
        if Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"{name}: {value} exists and is not a folder")
    for name, value in (("teacher.model", cfg.teacher.model), ("teacher.tokenizer", cfg.teacher.tokenizer)):
        if value is not None and not (Path(value).exists() or is_hub_reference(value)):
            raise ConfigError(f"{name}: {value} does not exist (a save_pretrained folder, an official checkpoint "
                              "file or a Hub reference)")  # fmt: skip
    get_method(cfg.distill.method).student_class(cfg.teacher.kind)  # the method exists for this teacher family
    if get_family(cfg.teacher.kind).needs_tokenizer and cfg.teacher.tokenizer is None:
        raise ConfigError(f"teacher.tokenizer: null, but a {cfg.teacher.kind!r} teacher needs its tokenizer")
    reference = cfg.evaluate.reference
    if (
        "evaluate" in cfg.stages
        and reference != "digits"
        and not (Path(reference).exists() or is_hub_reference(reference))
    ):
        raise ConfigError(
            f"evaluate.reference: {reference} does not exist (expected 'digits', a folder of images, or FID "
            "statistics: a file or a Hub reference)"
        )


def _run_stages(cfg: RecipeConfig, state: Any, record: str | None) -> dict[str, Any]:
    teacher, tokenizer = cfg.teacher.load()
    out = Path(cfg.output_dir)
    if record is not None and state.is_main_process and not (out / "config.json").exists():
        atomic_write_text(out / "config.json", record)  # the job's configuration, from its start
    text_encoder = cfg.teacher.load_text_encoder(teacher)
    summary: dict[str, Any] = {"output_dir": str(out)}
    student_dir = Path(cfg.distill.output_dir)

    if "trajectories" in cfg.stages:
        from distilled_decoding.trajectories import build_trajectories

        tc = cfg.trajectories
        build_trajectories(teacher, cfg.trajectory_dir, num_samples=tc.num_samples, batch_size=tc.batch_size,
                           seed=tc.seed, codebook=tokenizer.codebook, shard_size=tc.shard_size,
                           store_noise=tc.store_noise, prompts=tc.load_prompts(), text_encoder=text_encoder,
                           **tc.sampling())  # fmt: skip
    student = None
    method = get_method(cfg.distill.method)
    if "train" in cfg.stages:
        student = method.train(cfg, teacher, tokenizer, state)
    if "save" in cfg.stages and state.is_main_process:
        from distilled_decoding.pipeline import DistilledDecodingPipeline
        from distilled_decoding.trajectories import TrajectoryDataset

        ds = TrajectoryDataset(cfg.distill.trajectories)
        final = student_dir / "final"
        if student is None:
            if not (final / "config.json").is_file():
                raise ConfigError(f"distill.output_dir: {final} holds no trained student; run the 'train' stage")
            student = _student_class(final, method.student_class(cfg.teacher.kind)).from_pretrained(final)
            _check_final_student(cfg, method, ds, student, final)
        info = pipeline_info(cfg, ds, read_training_settings(final))
        text = {} if text_encoder is None else {"text_encoder": text_encoder.model,
                                                "text_tokenizer": text_encoder.tokenizer}  # fmt: skip
        pipe = DistilledDecodingPipeline(student=student, tokenizer=tokenizer, info=info, **text)
        pipe.save_pretrained(cfg.pipeline_dir)
        summary["pipeline"] = str(cfg.pipeline_dir)
    state.wait_for_everyone()
    if "evaluate" in cfg.stages and state.is_main_process:
        from distilled_decoding.evaluation import evaluate_job

        summary["evaluation"] = evaluate_job(cfg, teacher, tokenizer)
    return summary


def _check_final_student(cfg: RecipeConfig, method: Any, ds: Any, student: Any, final: Path) -> None:
    """A student saved earlier is packaged only if this run's settings are the ones it was trained with."""
    stored = read_training_settings(final)
    if stored is None:
        raise TrainingStateError(f"{final}: no training.json; the settings that produced this student are unknown")
    check_training_settings(final, method.settings(cfg, ds, student, stored), what="saved student")


def pipeline_info(cfg: RecipeConfig, ds: Any, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Provenance stored in the pipeline (and its model card): teacher identity, sampling distilled, data, and
    ``training`` — the settings the student was actually trained with (its ``training.json``)."""
    s = ds.settings
    model = Path(cfg.teacher.model)
    # a file's stem (c2i_B_256, also for a Hub reference); a folder's name, or its parent's for a component folder
    name = model.stem if not model.is_dir() else model.parent.name if model.name in ("gpt", "model") else model.name
    return {
        "name": name,
        "teacher": ds.teacher,
        "teacher_sampling": s["sampling"],
        "flow": s["flow"],
        "trajectories": {
            "num_samples": s["num_samples"],
            "seed": s["seed"],
            "condition": s.get("condition"),
            "condition_ids": s.get("condition_ids", s.get("class_labels")),
        },
        "training": dict(
            (training or {}).get("distill")
            or {k: v for k, v in (training or {}).items() if k in ("init", "gts", "csd")}
        ),
        "method": cfg.distill.method,
    }


def _student_class(folder: Path, cls: type) -> type:
    """``cls`` (the student class of this job's method and teacher family), checked against a ``save_pretrained``
    folder's config."""
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name != cls.__name__:
        raise ValueError(f"{folder}: config.json holds a {name!r}, not the {cls.__name__} this job's distill.method "
                         "and teacher make (a student of another method or family?)")  # fmt: skip
    return cls
