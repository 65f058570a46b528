"""The end-to-end distillation job behind ``recipes/distill_llamagen.py``.

Stages (each resumable, each skipped when its output exists):

1. ``trajectories`` — build (noise, tokens) pairs with the frozen teacher (:func:`build_trajectories`);
2. ``train`` — distil the student with Accelerate (:func:`train_student`);
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


def repo_path(path: Any) -> Any:
    """A relative path that exists in the repository but not in the working directory → the repository's; anything
    else (absolute paths, Hub references, lists, None) unchanged."""
    if not isinstance(path, str) or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(ROOT / path) if (ROOT / path).exists() else path


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
    # text-to-image teachers: the prompts distilled (a list, or a .txt / .csv / .tsv / .json file and its column)
    prompts: Any = None
    prompt_column: str | None = None
    prompt_delimiter: str | None = None

    def __post_init__(self) -> None:
        self.prompts = repo_path(self.prompts)

    def load_prompts(self) -> list[str] | None:
        from distilled_decoding.prompts import load_prompts

        return None if self.prompts is None else load_prompts(self.prompts, self.prompt_column, self.prompt_delimiter)

    def sampling(self) -> dict[str, Any]:
        return {"cfg_scale": self.cfg_scale, "cfg_interval": self.cfg_interval, "top_k": self.top_k,
                "top_p": self.top_p, "temperature": self.temperature}  # fmt: skip


@dataclass
class EvalConfig:
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
    latency_repeats: int = 3  # timed batch-1 calls per sampler (the batch-1 speedup column); 0: none
    # text-to-image students: evaluation prompts (image i gets prompt i mod P); label_column: the class each prompt
    # names (prompt adherence under the digits classifier); clip_model: CLIP weights for the CLIP score (optional)
    prompts: str | None = None
    prompt_column: str | None = None
    prompt_delimiter: str | None = None
    label_column: str | None = None
    clip_model: str | None = None

    def __post_init__(self) -> None:
        self.prompts, self.clip_model = repo_path(self.prompts), repo_path(self.clip_model)


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
    text_encoder = cfg.teacher.load_text_encoder(teacher)
    summary: dict[str, Any] = {"output_dir": str(out)}

    if "trajectories" in cfg.stages:
        from distilled_decoding.trajectories import build_trajectories

        tc = cfg.trajectories
        build_trajectories(teacher, cfg.trajectory_dir, num_samples=tc.num_samples, batch_size=tc.batch_size,
                           seed=tc.seed, codebook=tokenizer.codebook, shard_size=tc.shard_size,
                           store_noise=tc.store_noise, prompts=tc.load_prompts(), text_encoder=text_encoder,
                           **tc.sampling())  # fmt: skip
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


def pipeline_info(cfg: RecipeConfig, ds: Any) -> dict[str, Any]:
    """Provenance stored in the pipeline (and its model card): teacher identity, sampling distilled, data."""
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
