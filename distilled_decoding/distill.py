"""Distillation training with Hugging Face Accelerate: noise → tokens, one forward pass.

:func:`train_student` trains the teacher family's student (:mod:`distilled_decoding.students`) on a trajectory
folder with the losses of :mod:`distilled_decoding.losses`.
Accelerate does devices, processes (``accelerate launch``), mixed precision, gradient accumulation and
checkpoints (``save_state`` / ``load_state``, the last ``keep_last`` kept, the latest resumed automatically);
diffusers provides EMA and the warmup + cosine schedule.

Determinism: the data order (a fresh permutation per epoch, seeded by (seed, epoch)) and the timesteps of each
global batch (seeded by (seed, micro-step)) depend only on the step counter, and the global batch is split
across processes (``split_batches``), so a killed-and-resumed run ends with the same weights as an
uninterrupted one, and two processes train the same model as one with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distilled_decoding.trajectories import TrajectoryDataset

__all__ = ["DistillConfig", "train_student", "load_config", "latest_checkpoint"]


@dataclass
class DistillConfig:
    """Training settings. ``batch_size`` is the global batch per micro-step (split across processes);
    the optimiser sees ``batch_size × grad_accum`` samples per step."""

    trajectories: str = "runs/digits/trajectories"
    output_dir: str = "runs/digits/student"
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
        from distilled_decoding.losses import LOSSES

        given = self.loss
        if isinstance(self.loss, str):  # "ce+mse" → {"ce": 1.0, "mse": 1.0}
            self.loss = {name.strip(): 1.0 for name in self.loss.split("+")}
        if (
            not isinstance(self.loss, dict)
            or not self.loss
            or set(self.loss) - set(LOSSES)
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in self.loss.values())
        ):
            raise ValueError(
                f"loss={given!r}: expected weights of some of {sorted(LOSSES)}, e.g. {{ce: 1.0, mse: 1.0}} "
                "(or the shorthand 'ce+mse')"
            )
        self.loss = {k: float(v) for k, v in self.loss.items()}
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        for name in ("warmup_steps", "save_every", "log_every", "sample_every", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: expected > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r}: expected a number in [0, 1)")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: expected None, 'no', 'bf16' or 'fp16'")
        if self.timesteps is not None:
            self.timesteps = tuple(int(t) for t in self.timesteps)
        self.betas = tuple(float(b) for b in self.betas)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **defaults: Any) -> DistillConfig:
    """A :class:`DistillConfig` from ``defaults``, then a YAML file, then ``key=value`` overrides (YAML values)."""
    import yaml

    values: dict[str, Any] = dict(defaults)
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        values.update(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        values[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(raw)
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(names)}")
    return DistillConfig(**values)


# ----------------------------------------------------------------------------------------------------------
# deterministic data order
# ----------------------------------------------------------------------------------------------------------
class _StepBatches(torch.utils.data.Sampler[list[int]]):
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


class _Counter:
    """Checkpointed training progress (optimizer steps and micro-steps)."""

    def __init__(self) -> None:
        self.step = 0
        self.micro = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])


COMPLETE = "COMPLETE"


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in root.glob("checkpoint_*") if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))
    ]
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint_<n>`` folder (Accelerate ``save_state`` + our marker)."""
    complete = [p for _, p in _checkpoints(output_dir) if (p / COMPLETE).exists()]
    return complete[-1] if complete else None


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

    Args:
        teacher, codebook: the teacher the trajectories were built with and its tokenizer codebook; the student
            is initialised from them (:meth:`DDStudent.from_teacher`) unless ``student`` is given. The teacher's
            fingerprint must match the trajectory folder's.
        decode: vectors (B, N, D) → images (B, 3, H, W) in [-1, 1] (frozen tokenizer decoder), for sample grids
            and the ``image`` loss.
        image_loss: (predicted images, target images) → scalar, for the ``image`` loss (default: pixel MSE).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from distilled_decoding.distributed import process_state
    from distilled_decoding.losses import CONTINUOUS_LOSSES, LossContext, distillation_losses
    from distilled_decoding.provenance import teacher_fingerprint
    from distilled_decoding.students import student_from_teacher

    process_state()  # joins the process group (CPU too) and checks the launch
    out = Path(cfg.output_dir)
    mp = cfg.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(cfg.log_with),
        project_config=ProjectConfiguration(
            project_dir=str(out), automatic_checkpoint_naming=True, total_limit=cfg.keep_last
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=False,
    )
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size}: must be divisible by the {acc.num_processes} processes")
    set_seed(cfg.seed)
    ds = TrajectoryDataset(cfg.trajectories)

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
    timesteps = torch.tensor(student.config.timesteps)
    student.train()
    ema = EMAModel(student.parameters(), decay=cfg.ema_decay, foreach=False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    counter = _Counter()
    student, opt, sched = acc.prepare(student, opt, sched)
    ema.to(acc.device)
    acc.register_for_checkpointing(counter, ema)

    resume = latest_checkpoint(out)
    if acc.is_main_process:  # a checkpoint cut short by a kill has no marker: drop it
        for _, p in _checkpoints(out):
            if not (p / COMPLETE).exists():
                shutil.rmtree(p)
    acc.wait_for_everyone()
    if resume is not None:
        acc.load_state(str(resume))
        acc.project_configuration.iteration = int(resume.name.split("_")[1]) + 1
        acc.print(f"resumed from {resume} at step {counter.step}")
    start_step = counter.step

    sampler = _StepBatches(len(ds), cfg.batch_size, cfg.seed, counter.micro, cfg.max_steps * cfg.grad_accum)
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
            _save(acc)
        if fixed is not None and counter.step % cfg.sample_every == 0 and acc.is_main_process:
            _save_grid(acc.unwrap_model(student), ema, fixed, decode, out / "samples" / f"step_{counter.step:06d}.png")
    bar.close()
    if counter.step > start_step:
        _save(acc)
    acc.wait_for_everyone()
    final = acc.unwrap_model(student)
    ema.copy_to(final.parameters())
    final = final.to("cpu").eval()
    if acc.is_main_process:
        elapsed = time.perf_counter() - t_start
        summary = {"steps": counter.step, "seconds": round(elapsed, 2), **{k: round(v, 6) for k, v in logs.items()}}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        acc.print(f"distillation: {counter.step} steps; last losses {summary}")
    for tracker in acc.trackers:  # not acc.end_training(): that would tear down the caller's process group
        tracker.finish()
    return final


def _save(acc: Any) -> None:
    path = Path(acc.save_state())
    acc.wait_for_everyone()
    if acc.is_main_process:
        (path / COMPLETE).touch()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat(rows).clamp(-1, 1).add(1).div(2).float().cpu()
    save_image(grid, str(path), nrow=noise.shape[0])


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
