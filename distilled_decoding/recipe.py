"""The end-to-end distillation job behind ``recipes/distill_llamagen.py``.

Stages (each resumable, each skipped when its output exists):

1. ``trajectories`` — build (noise, tokens) pairs with the frozen teacher (:func:`build_trajectories`);
2. ``train`` — distil the student with Accelerate (:func:`train_student`);
3. ``save`` — write the :class:`DistilledDecodingPipeline` (student + tokenizer, model card);
4. ``evaluate`` — the comparison table and sample grid (:mod:`distilled_decoding.evaluation`).

Configuration: :class:`RecipeConfig` from defaults (the embedded digits teacher), then a YAML file, then
``section.field=value`` overrides, e.g. ``distill.max_steps=2000 trajectories.num_samples=50000``.
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

from distilled_decoding.distill import DistillConfig

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
STAGES = ("trajectories", "train", "save", "evaluate")
#: the embedded default job (``recipes/distill_llamagen.py`` without ``--config``)
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "digits_llamagen.yaml"


@dataclass
class TeacherConfig:
    """Where the teacher comes from: ``save_pretrained`` folders or official files, for a registered family
    (:func:`distilled_decoding.teachers.families`).

    ``kind="llamagen"``: ``model`` = GPT (``c2i_B_256.pt`` or a folder), ``tokenizer`` = VQ (``vq_ds16_c2i.pt`` or
    a folder), ``preset`` = GPT-B/GPT-L/... (inferred when None). ``kind="var"``: ``model`` = ``var_d16.pth`` (or a
    folder holding the VAE too), ``tokenizer`` = ``vae_ch160v4096z32.pth``, ``preset`` = the depth (16 or "d16").
    Without ``model`` the family's embedded default in ``checkpoints/`` is used.
    """

    kind: str = "llamagen"
    model: str | None = None
    tokenizer: str | None = None
    preset: str | int | None = None
    block_size: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from distilled_decoding.teachers import families

        if self.kind not in families():
            raise ValueError(f"teacher.kind={self.kind!r}: expected one of {sorted(families())}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"teacher.dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        embedded = families()[self.kind].embedded
        if self.model is None and embedded:
            self.model = str(ROOT / embedded[0])
            if self.tokenizer is None and embedded[1] is not None:
                self.tokenizer = str(ROOT / embedded[1])
        if self.model is None:
            raise ValueError(f"teacher.model: required for kind={self.kind!r} (no embedded default)")

    def load(self) -> tuple[Any, Any]:
        from distilled_decoding.teachers import load_teacher

        teacher, tok = load_teacher(self.kind, self.model, self.tokenizer, preset=self.preset,
                                    block_size=self.block_size)  # fmt: skip
        dtype = getattr(torch, self.dtype)
        return (teacher if teacher.dtype == dtype else teacher.to(dtype)), tok


@dataclass
class TrajectoryConfig:
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

    def sampling(self) -> dict[str, Any]:
        return {"cfg_scale": self.cfg_scale, "cfg_interval": self.cfg_interval, "top_k": self.top_k,
                "top_p": self.top_p, "temperature": self.temperature}  # fmt: skip


@dataclass
class EvalConfig:
    """Evaluation of the distilled pipeline against the teacher (see :mod:`distilled_decoding.evaluation`)."""

    num_images: int = 1000
    batch_size: int = 250
    seed: int = 1234
    reference: str = "digits"  # real images to compare with: the bundled digits, or a folder of images
    feature_extractor: str = "digits-cnn"
    refine: tuple[int, int] | None = None  # teacher_tokens (T, t2); None: (t2 - t2 // 4, t2)
    skip: tuple[int, ...] | None = None  # skip-n baselines; None: (N // 8, N // 4)
    bench_batches: tuple[int, ...] = (1, 64)
    grid_columns: int = 10
    # more teacher rows of the same tokenizer: [{name: "PAR-4× (converted)", kind: par, model: ...}, ...]
    extra_teachers: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        allowed = {f.name for f in dataclasses.fields(TeacherConfig)}
        for i, entry in enumerate(self.extra_teachers or ()):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or set(entry) - allowed - {"name"}:
                raise ValueError(
                    f"evaluate.extra_teachers[{i}]={entry!r}: expected a mapping with a 'name' (the table row) and "
                    f"teacher fields among {sorted(allowed)}"
                )
        self.extra_teachers = tuple(dict(e) for e in self.extra_teachers or ())


@dataclass
class RecipeConfig:
    output_dir: str = "runs/digits"
    stages: tuple[str, ...] = STAGES
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown {bad}; expected some of {STAGES}")
        self.stages = tuple(self.stages)

    @property
    def trajectory_dir(self) -> Path:
        return Path(self.output_dir) / "trajectories"

    @property
    def pipeline_dir(self) -> Path:
        return Path(self.output_dir) / "pipeline"


_SECTIONS = {"teacher": TeacherConfig, "trajectories": TrajectoryConfig, "distill": DistillConfig,
             "evaluate": EvalConfig}  # fmt: skip


def load_recipe_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> RecipeConfig:
    """Dataclass defaults ← ``defaults`` ← YAML file ← ``section.key=value`` overrides (values parsed as YAML).
    ``defaults`` has the YAML's nested layout (e.g. ``{"teacher": {"kind": "var"}}``). Without a file,
    :data:`DEFAULT_CONFIG` (the embedded LlamaGen digits job) is read."""
    import copy

    import yaml

    data: dict[str, Any] = copy.deepcopy(dict(defaults or {}))
    path = DEFAULT_CONFIG if path is None else path
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping with sections {sorted(_SECTIONS)}")
        for key, value in loaded.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value (e.g. distill.max_steps=500)")
        key, raw = item.split("=", 1)
        parts = key.strip().lstrip("-").replace("-", "_").split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    top = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; expected some of {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS:
            cls = _SECTIONS[name]
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping of {cls.__name__} fields")
            fields = {f.name for f in dataclasses.fields(cls)}
            extra = sorted(set(value) - fields)
            if extra:
                raise ValueError(f"{name}: unknown field(s) {extra}; expected some of {sorted(fields)}")
            kwargs[name] = cls(**value)
        else:
            kwargs[name] = value
    cfg = RecipeConfig(**kwargs)
    # the student trains on this job's trajectories and writes into this job's folder unless told otherwise
    if "trajectories" not in (data.get("distill") or {}):
        cfg.distill.trajectories = str(cfg.trajectory_dir)
    if "output_dir" not in (data.get("distill") or {}):
        cfg.distill.output_dir = str(Path(cfg.output_dir) / "student")
    return cfg


def run(cfg: RecipeConfig) -> dict[str, Any]:
    """Run the configured stages; returns a summary dict (paths, evaluation table when evaluated)."""
    from distilled_decoding.distributed import process_state

    state = process_state()
    out = Path(cfg.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    teacher, tokenizer = cfg.teacher.load()
    summary: dict[str, Any] = {"output_dir": str(out)}

    if "trajectories" in cfg.stages:
        from distilled_decoding.trajectories import build_trajectories

        tc = cfg.trajectories
        build_trajectories(teacher, cfg.trajectory_dir, num_samples=tc.num_samples, batch_size=tc.batch_size,
                           seed=tc.seed, codebook=tokenizer.codebook, shard_size=tc.shard_size,
                           store_noise=tc.store_noise, **tc.sampling())  # fmt: skip
    student = None
    if "train" in cfg.stages:
        from distilled_decoding.distill import train_student

        tok_dev = tokenizer.to(state.device)
        decode = lambda v: tok_dev.decode_vectors(v)  # noqa: E731
        student = train_student(cfg.distill, teacher=teacher, codebook=tokenizer.codebook, decode=decode)
        tokenizer = tokenizer.to("cpu")
        if state.is_main_process:
            student.save_pretrained(Path(cfg.distill.output_dir) / "final")
    if "save" in cfg.stages and state.is_main_process:
        from distilled_decoding.pipeline import DistilledDecodingPipeline
        from distilled_decoding.trajectories import TrajectoryDataset

        if student is None:
            final = Path(cfg.distill.output_dir) / "final"
            student = _student_class(final).from_pretrained(final)
        info = pipeline_info(cfg, TrajectoryDataset(cfg.trajectory_dir))
        pipe = DistilledDecodingPipeline(student=student, tokenizer=tokenizer, info=info)
        pipe.save_pretrained(cfg.pipeline_dir)
        summary["pipeline"] = str(cfg.pipeline_dir)
    state.wait_for_everyone()
    if "evaluate" in cfg.stages and state.is_main_process:
        from distilled_decoding.evaluation import evaluate_job

        summary["evaluation"] = evaluate_job(cfg, teacher, tokenizer)
    return summary


def pipeline_info(cfg: RecipeConfig, ds: Any) -> dict[str, Any]:
    """Provenance stored in the pipeline (and its model card): teacher identity, sampling distilled, data."""
    s = ds.settings
    model = Path(cfg.teacher.model)
    # a file's stem (c2i_B_256); a folder's name, or its parent's for a component folder (digits_llamagen/gpt)
    name = model.stem if model.is_file() else model.parent.name if model.name in ("gpt", "model") else model.name
    return {
        "name": name,
        "teacher": ds.teacher,
        "teacher_sampling": s["sampling"],
        "flow": s["flow"],
        "trajectories": {"num_samples": s["num_samples"], "seed": s["seed"], "class_labels": s["class_labels"]},
        "training": {
            k: v
            for k, v in dataclasses.asdict(cfg.distill).items()
            if k not in ("trajectories", "output_dir", "progress", "extra")
        },  # fmt: skip
    }


def _student_class(folder: Path) -> type:
    """The student class recorded in a ``save_pretrained`` folder's config.json."""
    from distilled_decoding.teachers import families

    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    by_name = {f.student_class.__name__: f.student_class for f in families().values()}
    if name not in by_name:
        raise ValueError(f"{folder}: config.json names student class {name!r}; expected one of {sorted(by_name)}")
    return by_name[name]
