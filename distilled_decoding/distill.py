"""Distillation training with Hugging Face Accelerate: noise → tokens, one forward pass.

:func:`train_student` trains the teacher family's student (:mod:`distilled_decoding.students`) on a trajectory
folder with the weighted losses of :mod:`distilled_decoding.losses`.
Accelerate does devices, processes (``accelerate launch``), mixed precision, gradient accumulation and
checkpoints (JSON + safetensors, no pickle: :mod:`distilled_decoding.training_state`; the last ``keep_last``
kept, the latest resumed automatically);
diffusers provides EMA and the warmup + cosine schedule.

Determinism: the data order (a fresh permutation per epoch, seeded by (seed, epoch)) and the timesteps of each
global batch (seeded by (seed, micro-step)) depend only on the step counter, and the global batch is split
across processes (``split_batches``), so a killed-and-resumed run ends with the same weights as an
uninterrupted one, and two processes train the same model as one with the same global batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distilled_decoding.configs import ValidatedConfig, build_config, parse_overrides, read_config_file
from distilled_decoding.fileio import atomic_path, atomic_write_json, job_lock
from distilled_decoding.manifest import json_digest, payload_digest
from distilled_decoding.training_state import (
    CheckpointStore,
    TrainingStateError,
    check_training_settings,
    training_settings,
    write_training_json,
)
from distilled_decoding.trajectories import TrajectoryDataset, TrajectoryError

__all__ = [
    "DistillConfig",
    "train_student",
    "load_config",
    "latest_checkpoint",
    "StepBatches",
    "StepCounter",
]


@dataclass
class DistillConfig(ValidatedConfig):
    """Training settings. ``batch_size`` is the global batch per micro-step (split across processes);
    the optimiser sees ``batch_size × grad_accum`` samples per step. Every field is type-checked when the config
    is made (:class:`~distilled_decoding.configs.ValidatedConfig`)."""

    trajectories: str = "runs/digits/trajectories"
    output_dir: str = "runs/digits/student"
    method: str = "dd1"  # distilled_decoding.methods: "dd1" (this trainer) or "dd2" (the recipe's dd2 section)
    # student
    timesteps: tuple[int, ...] | None = None  # None: the teacher family's default (LlamaGen (0, 80) of 256 tokens)
    split: int | None = None  # None: the last timestep; every step when no loss trains the continuous head
    init_input: str = "lstsq"
    # weighted losses of distilled_decoding.losses (the official DD setting: {ce: 1, mse: 1}); "ce+mse" is shorthand
    loss: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "mse": 1.0})
    # optimisation
    batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str | None = None  # None: bf16 on CUDA, no on CPU
    seed: int = 0
    num_workers: int = 0
    # checkpoints, logging, samples
    save_every: int = 250
    keep_last: int = 2
    log_every: int = 25
    log_with: str | None = None
    sample_every: int = 0
    sample_count: int = 16
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from distilled_decoding.configs import ConfigError
        from distilled_decoding.losses import LOSSES

        if isinstance(self.loss, str):  # the shorthand "ce+mse" → {"ce": 1.0, "mse": 1.0}
            names = [name.strip() for name in self.loss.split("+")]
            if not all(n in LOSSES for n in names):
                raise ConfigError(f"loss={self.loss!r}: expected weights of some of {sorted(LOSSES)}, e.g. "
                                  "{ce: 1.0, mse: 1.0}, or the shorthand 'ce+mse'")  # fmt: skip
            self.loss = dict.fromkeys(names, 1.0)
        super().__post_init__()

    def validate(self) -> None:
        from distilled_decoding.losses import LOSSES
        from distilled_decoding.methods import METHODS

        req = self.require
        req(self.method in METHODS, "method", self.method, f"one of {sorted(METHODS)}")
        req(bool(self.loss) and set(self.loss) <= set(LOSSES) and all(w >= 0 for w in self.loss.values()), "loss",
            self.loss, f"weights >= 0 of some of {sorted(LOSSES)}, e.g. {{ce: 1.0, mse: 1.0}} (or the shorthand "
            "'ce+mse')")  # fmt: skip
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last", "sample_count"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "save_every", "log_every", "sample_every", "num_workers", "seed"):
            req(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        req(self.lr > 0, "lr", self.lr, "a number > 0")
        for name in ("weight_decay", "clip_grad"):
            req(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        req(all(0.0 <= b < 1.0 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        req(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in [0, 1)")
        req(self.mixed_precision in (None, "no", "bf16", "fp16"), "mixed_precision", self.mixed_precision,
            "null, 'no', 'bf16' or 'fp16'")  # fmt: skip
        req(
            self.init_input in ("lstsq", "random", "copy"),
            "init_input",
            self.init_input,
            "'lstsq', 'random' or 'copy' (VAR)",
        )
        req(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        ts = self.timesteps
        req(ts is None or (len(ts) >= 1 and ts[0] == 0 and all(a < b for a, b in zip(ts, ts[1:]))), "timesteps", ts,
            "null or increasing ints starting at 0, e.g. [0, 80]")  # fmt: skip
        req(self.split is None or self.split >= 0, "split", self.split, "null or an int >= 0")
        req(bool(self.trajectories), "trajectories", self.trajectories, "a folder path")
        req(bool(self.output_dir), "output_dir", self.output_dir, "a folder path")


LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **defaults: Any) -> DistillConfig:
    """A :class:`DistillConfig` from ``defaults``, then a YAML file, then ``key=value`` overrides (YAML values);
    every problem is a :class:`~distilled_decoding.configs.ConfigError` naming the field."""
    values: dict[str, Any] = dict(defaults)
    if path is not None:
        values.update(read_config_file(path))
    parse_overrides(overrides, values)
    return build_config(DistillConfig, values)


# ----------------------------------------------------------------------------------------------------------
# deterministic data order
# ----------------------------------------------------------------------------------------------------------
class StepBatches(torch.utils.data.Sampler[list[int]]):
    """Global batches for micro-steps ``start..stop-1``: epoch e is ``randperm(n, seed + e)``, batches are
    consecutive slices of the concatenated epochs, so batch k is a function of (seed, k) only."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.b, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.batch_size = batch_size  # read by accelerate (split_batches)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for k in range(self.start, self.stop):
            out = []
            for pos in range(k * self.b, (k + 1) * self.b):
                e = pos // self.n
                if e != epoch:
                    epoch = e
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
                out.append(int(perm[pos % self.n]))
            yield out


def _collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class StepCounter:
    """Checkpointed training progress (optimizer steps and micro-steps)."""

    def __init__(self) -> None:
        self.step = 0
        self.micro = 0


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint_<n>`` folder (see :mod:`distilled_decoding.training_state`)."""
    return CheckpointStore(Path(output_dir) / "checkpoints", keep_last=1, settings_digest="").latest()


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------
def train_student(
    cfg: DistillConfig,
    *,
    teacher: Any = None,
    codebook: Tensor | None = None,
    student: torch.nn.Module | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    image_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> torch.nn.Module:
    """Train a student on ``cfg.trajectories`` and return it (unwrapped, with the EMA weights, on CPU).

    ``cfg.output_dir`` is one job's folder: it is locked while training (a second job refuses, naming the
    holder's pid), its ``training.json`` records the settings the student is trained with, and a run with other
    settings (loss, lr, seed, split, timesteps, trajectories, teacher, ...) is refused with the differences
    listed — it never resumes, reuses or relabels a student trained otherwise (use a fresh ``output_dir``).
    Checkpoints are JSON + safetensors (:mod:`distilled_decoding.training_state`): nothing is unpickled.

    Args:
        teacher, codebook: the teacher the trajectories were built with and its tokenizer codebook; the student
            is initialised from them (the family's ``from_teacher``) unless ``student`` is given. The teacher's
            fingerprint must match the trajectory folder's.
        decode: vectors (B, N, D) → images (B, 3, H, W) in [-1, 1] (frozen tokenizer decoder), for sample grids
            and the ``image`` loss.
        image_loss: (predicted images, target images) → scalar, for the ``image`` loss (default: pixel MSE).
    """
    from distilled_decoding.distributed import process_state

    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg: expected a DistillConfig, got {type(cfg).__name__}")
    if not Path(cfg.trajectories).is_dir():  # before the lock creates output_dir
        raise TrajectoryError(f"trajectories: {cfg.trajectories} is not a folder (expected a trajectory folder)")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise TrainingStateError(f"output_dir: {cfg.output_dir} exists and is not a folder")
    state = process_state()  # joins the process group (CPU too) and checks the launch
    with job_lock(cfg.output_dir, state, what="training"):
        return _train_student(cfg, teacher=teacher, codebook=codebook, student=student, decode=decode,
                              image_loss=image_loss)  # fmt: skip


def _train_student(cfg, *, teacher, codebook, student, decode, image_loss) -> torch.nn.Module:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from distilled_decoding.losses import CONTINUOUS_LOSSES, LossContext, distillation_losses
    from distilled_decoding.provenance import teacher_fingerprint
    from distilled_decoding.students import student_from_teacher

    out = Path(cfg.output_dir)
    mp = cfg.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(cfg.log_with),
        project_config=ProjectConfiguration(project_dir=str(out)),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=False,
    )
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size}: must be divisible by the {acc.num_processes} processes")
    set_seed(cfg.seed)
    ds = TrajectoryDataset(cfg.trajectories)

    given_sha256 = None if student is None else payload_digest(student.state_dict())
    continuous_head = bool(set(cfg.loss) & CONTINUOUS_LOSSES)
    if student is None:
        if teacher is None or codebook is None:
            raise ValueError("teacher and codebook are required to initialise a student (or pass student=)")
        mine = teacher_fingerprint(teacher, codebook)
        theirs = ds.teacher
        if mine["weights_sha256"] != theirs["weights_sha256"] or mine["codebook_sha256"] != theirs["codebook_sha256"]:
            raise ValueError(
                f"{cfg.trajectories}: these trajectories were built by another teacher "
                f"(folder: {theirs['class']} weights {theirs['weights_sha256'][:12]}, codebook "
                f"{theirs['codebook_sha256'][:12]}; given: {mine['class']} weights {mine['weights_sha256'][:12]}, "
                f"codebook {mine['codebook_sha256'][:12]})"
            )
        student = student_from_teacher(teacher, codebook.cpu(), split=cfg.split, timesteps=cfg.timesteps,
                                       init_input=cfg.init_input, continuous_head=continuous_head)  # fmt: skip
    if not continuous_head and student.config.split < student.num_steps:
        raise ValueError(
            f"loss={cfg.loss}: no loss trains the continuous head, but split={student.config.split} would read the "
            f"positions after it from that head; use split={student.num_steps} (or leave split unset) or add 'mse' "
            "/ 'image'"
        )
    if ds.seq_len != student.seq_len or ds.codebook_dim != student.config.codebook_dim:
        raise ValueError(
            f"{cfg.trajectories}: pairs of {ds.seq_len} tokens × {ds.codebook_dim} dims do not fit the student "
            f"(N={student.seq_len}, D={student.config.codebook_dim})"
        )
    # the settings this student is trained with: a folder trained otherwise is refused, never mixed
    settings = training_settings(cfg, ds, student, mp, given_sha256)
    trained_before = check_training_settings(out, settings)
    acc.wait_for_everyone()
    if acc.is_main_process and not trained_before:
        write_training_json(out, settings)
    store = CheckpointStore(out / "checkpoints", keep_last=cfg.keep_last, settings_digest=json_digest(settings))

    timesteps = torch.tensor(student.config.timesteps)
    student.train()
    ema = EMAModel(student.parameters(), decay=cfg.ema_decay, foreach=False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    counter = StepCounter()
    student, opt, sched = acc.prepare(student, opt, sched)
    ema.to(acc.device)
    states = {"model": student, "optimizer": opt, "scheduler": sched, "ema": ema, "counter": counter}

    if acc.is_main_process:  # a checkpoint cut short by a kill is incomplete: drop it
        store.drop_incomplete()
    acc.wait_for_everyone()
    resume = store.latest()
    if resume is not None:
        store.load(resume, acc, **states)
        acc.print(f"resumed from {resume} at step {counter.step}")
    start_step = counter.step

    sampler = StepBatches(len(ds), cfg.batch_size, cfg.seed, counter.micro, cfg.max_steps * cfg.grad_accum)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=_collate, num_workers=cfg.num_workers)
    dl = acc.prepare_data_loader(dl, device_placement=True)
    if cfg.log_with:
        acc.init_trackers("distilled-decoding", config=_flat(dataclasses.asdict(cfg)))

    rank, per = acc.process_index, cfg.batch_size // acc.num_processes
    fixed = _fixed_samples(ds, cfg.sample_count) if cfg.sample_every and decode is not None else None
    bar = tqdm(total=cfg.max_steps, initial=counter.step, desc="distilling", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and acc.is_main_process))  # fmt: skip
    t_start, logs = time.perf_counter(), {}
    for batch in dl:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counter.micro)
        t_all = timesteps[torch.randint(len(timesteps), (cfg.batch_size,), generator=g)]
        t = t_all[rank * per : (rank + 1) * per].to(acc.device)
        with acc.accumulate(student):
            with acc.autocast():
                losses = distillation_losses(acc.unwrap_model(student), batch, t, cfg.loss, forward=student,
                                             context=LossContext(decode, image_loss))  # fmt: skip
            acc.backward(losses["total"])
            if acc.sync_gradients and cfg.clip_grad > 0:
                acc.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            opt.step()
            if acc.sync_gradients:
                sched.step()
            opt.zero_grad(set_to_none=True)
        counter.micro += 1
        if not acc.sync_gradients:
            continue
        ema.step(acc.unwrap_model(student).parameters())
        counter.step += 1
        logs = {k: float(v.detach()) for k, v in losses.items() if v.ndim == 0}
        logs["lr"] = sched.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        if cfg.log_with and counter.step % max(cfg.log_every, 1) == 0:
            acc.log(logs, step=counter.step)
        if cfg.save_every and counter.step % cfg.save_every == 0 and counter.step < cfg.max_steps:
            store.save(acc, **states)
        if fixed is not None and counter.step % cfg.sample_every == 0 and acc.is_main_process:
            _save_grid(acc.unwrap_model(student), ema, fixed, decode, out / "samples" / f"step_{counter.step:06d}.png")
    bar.close()
    if counter.step > start_step:
        store.save(acc, **states)
    acc.wait_for_everyone()
    final = acc.unwrap_model(student)
    ema.copy_to(final.parameters())
    final = final.to("cpu").eval()
    if acc.is_main_process:
        elapsed = time.perf_counter() - t_start
        summary = {"steps": counter.step, "seconds": round(elapsed, 2), **{k: round(v, 6) for k, v in logs.items()}}
        atomic_write_json(out / "train_summary.json", summary)
        acc.print(f"distillation: {counter.step} steps; last losses {summary}")
    for tracker in acc.trackers:  # not acc.end_training(): that would tear down the caller's process group
        tracker.finish()
    return final


def _fixed_samples(ds: TrajectoryDataset, n: int) -> dict[str, Tensor]:
    items = [ds[i] for i in range(min(n, len(ds)))]
    return _collate(items)


@torch.no_grad()
def _save_grid(student, ema, fixed, decode, path: Path) -> None:
    from torchvision.utils import save_image

    ema.store(student.parameters())
    ema.copy_to(student.parameters())
    was = student.training
    student.eval()
    device = next(student.parameters()).device
    spec = student.condition
    noise, labels = fixed["noise"].to(device), spec.to(spec.from_batch(fixed), device)
    rows = [decode(student.codebook[fixed["tokens"].to(device)])]
    for steps in ([0], list(student.config.timesteps)):
        rows.append(decode(student.sample(noise, labels, steps)[0]))
    ema.restore(student.parameters())
    student.train(was)
    grid = torch.cat(rows).clamp(-1, 1).add(1).div(2).float().cpu()
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), nrow=noise.shape[0], format="png")


def _trackers(log_with: str | None) -> Any:
    if not log_with:
        return None
    import importlib.util

    names = [n.strip() for n in log_with.split(",") if n.strip()]
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    usable = [n for n in names if importlib.util.find_spec(modules.get(n, n)) is not None]
    return usable or None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
