"""Turn a pretrained LlamaGen into a PAR-k× teacher (PAR itself only trains from scratch; nobody ships this).

:meth:`PAR.from_llamagen <distilled_decoding.teachers.par.PAR.from_llamagen>` copies every LlamaGen weight (the k−1
transition embeddings are the only new parameters); :func:`finetune_par` then fine-tunes the whole model with
cross-entropy, teacher forcing in PAR's region order, on the raster teacher's **own samples** — a trajectory folder
of its token sequences (:func:`~distilled_decoding.trajectories.build_trajectories`, usually with
``store_noise=False``: only the tokens are read). No image data is needed. Class-label dropout (the LlamaGen
config's ``class_dropout_prob``) stays on, so the unconditional row keeps learning the class-marginal and
classifier-free guidance works as before; the other dropouts are the LlamaGen's own unless ``dropout`` sets them.

Sampling the raster teacher *without* guidance (``cfg_scale=1``) gives its conditional distribution; the PAR then
learns the same conditionals (and, through the class dropout, the unconditional) in region order, and is sampled
with the raster teacher's usual guidance — a drop-in replacement decoding k tokens a step.

Training runs with Hugging Face Accelerate like the distillation trainer (:mod:`distilled_decoding.distill`): the
data order is a function of (seed, step) (:class:`~distilled_decoding.distill.StepBatches`), checkpoints are
``save_state`` folders with a completion marker, and a killed run started again resumes from the newest complete
checkpoint to the same final weights as an uninterrupted one (the dropout RNG is restored with the checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distilled_decoding.configs import ValidatedConfig

__all__ = ["PARFinetuneConfig", "finetune_par", "load_sample_tokens"]


@dataclass
class PARFinetuneConfig(ValidatedConfig):
    """Settings of :func:`finetune_par`. ``batch_size`` is the global batch (split across processes);
    ``ema_decay`` 0 disables the EMA (the final weights are then the trained ones)."""

    samples: str = "runs/par_teacher/samples"
    output_dir: str = "runs/par_teacher/finetune"
    ar_token_num: int = 4
    batch_size: int = 128
    max_steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    clip_grad: float = 1.0
    ema_decay: float = 0.0
    dropout: float | None = None  # token / residual / FFN dropout while fine-tuning; None: the LlamaGen's rates
    mixed_precision: str | None = None  # None: bf16 on CUDA, no on CPU
    seed: int = 0
    save_every: int = 250
    keep_last: int = 2
    progress: bool = True

    def validate(self) -> None:
        req = self.require
        for name in ("ar_token_num", "batch_size", "max_steps", "keep_last"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("warmup_steps", "save_every"):
            req(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        req(self.lr > 0, "lr", self.lr, "a number > 0")
        req(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in [0, 1)")
        req(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "null or a number in [0, 1)")
        req(self.mixed_precision in (None, "no", "bf16", "fp16"), "mixed_precision", self.mixed_precision,
            "null, 'no', 'bf16' or 'fp16'")  # fmt: skip


def load_sample_tokens(folder: str | Path, teacher: Any = None, codebook: torch.Tensor | None = None) -> tuple:
    """Every token sequence (M, N) long and class label (M,) long of a trajectory folder (checksums verified).
    With ``teacher`` and ``codebook`` the folder must have been built by that teacher (ValueError otherwise)."""
    from distilled_decoding.provenance import teacher_fingerprint
    from distilled_decoding.trajectories import TrajectoryDataset

    ds = TrajectoryDataset(folder)
    if teacher is not None and codebook is not None:
        mine = teacher_fingerprint(teacher, codebook)
        if mine["weights_sha256"] != ds.teacher["weights_sha256"]:
            raise ValueError(
                f"{folder}: these samples were drawn from another teacher (folder: {ds.teacher['class']} weights "
                f"{ds.teacher['weights_sha256'][:12]}; given: {mine['class']} weights {mine['weights_sha256'][:12]})"
            )
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["tokens"] for it in items]), torch.stack([it["class_label"] for it in items])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and tables, none on norms (the digits teacher recipe's grouping)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def finetune_par(cfg: PARFinetuneConfig, gpt: Any, codebook: torch.Tensor | None = None) -> tuple[Any, dict]:
    """Initialise PAR-``cfg.ar_token_num``× from the LlamaGen ``gpt`` and fine-tune it on ``cfg.samples``.

    Returns ``(par, summary)``: the PAR in eval mode on the CPU (EMA weights when ``ema_decay`` > 0) and a dict of
    the run (steps, seconds, last loss). ``codebook`` (the tokenizer's) lets the samples' provenance be checked.
    Raises ValueError naming ``ar_token_num`` and the grid when k does not tile ``gpt``'s token grid.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from distilled_decoding.distill import StepBatches, StepCounter
    from distilled_decoding.distributed import process_state
    from distilled_decoding.fileio import atomic_write_json
    from distilled_decoding.manifest import json_digest
    from distilled_decoding.teachers.par import PAR
    from distilled_decoding.training_state import CheckpointStore

    process_state()
    par = PAR.from_llamagen(gpt, cfg.ar_token_num)  # validates k against the grid first
    tokens, labels = load_sample_tokens(cfg.samples, gpt, codebook)
    if tokens.shape[1] != par.seq_len:
        raise ValueError(f"{cfg.samples}: sequences of {tokens.shape[1]} tokens, the teacher has {par.seq_len}")
    out = Path(cfg.output_dir)
    mp = cfg.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(
        mixed_precision=mp,
        project_config=ProjectConfiguration(project_dir=str(out)),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=False,
    )
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size}: must be divisible by the {acc.num_processes} processes")
    set_seed(cfg.seed)
    if cfg.dropout is not None:  # the class-label dropout (guidance) is not an nn.Dropout: it stays
        for m in par.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
    par.train()
    ema = EMAModel(par.parameters(), decay=cfg.ema_decay, foreach=False)  # decay 0: the EMA is the model
    opt = torch.optim.AdamW(_param_groups(par, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    counter = StepCounter()
    model, opt, sched = acc.prepare(par, opt, sched)
    ema.to(acc.device)
    # pickle-free checkpoints tied to the settings that change the weights (a run with others is refused)
    semantic = {k: v for k, v in asdict(cfg).items() if k not in ("samples", "output_dir", "save_every", "keep_last",
                                                                  "progress")}  # fmt: skip
    store = CheckpointStore(out / "checkpoints", keep_last=cfg.keep_last, settings_digest=json_digest(semantic))
    states = {"model": model, "optimizer": opt, "scheduler": sched, "ema": ema, "counter": counter}
    if acc.is_main_process:
        store.drop_incomplete()
    acc.wait_for_everyone()
    if (resume := store.latest()) is not None:
        store.load(resume, acc, **states)
        acc.print(f"resumed from {resume} at step {counter.step}")
    start_step = counter.step

    # global batches by (seed, step), this process's slice of each; no DataLoader: creating its iterator would draw
    # from the global RNG after a resume restored it, and the dropouts would then differ from an uninterrupted run
    sampler = StepBatches(len(tokens), cfg.batch_size, cfg.seed, counter.step, cfg.max_steps)
    rank, per = acc.process_index, cfg.batch_size // acc.num_processes
    bar = tqdm(total=cfg.max_steps, initial=counter.step, desc="PAR fine-tuning", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and acc.is_main_process))  # fmt: skip
    t0, loss_value = time.perf_counter(), float("nan")
    for batch in sampler:
        idx = torch.tensor(batch[rank * per : (rank + 1) * per])
        x, y = tokens[idx].to(acc.device), labels[idx].to(acc.device)
        with acc.autocast():
            logits = model(x, y)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())
        acc.backward(loss)
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(acc.unwrap_model(model).parameters())
        counter.step += 1
        counter.micro += 1
        loss_value = float(loss.detach())
        bar.update(1)
        bar.set_postfix(ce=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if cfg.save_every and counter.step % cfg.save_every == 0 and counter.step < cfg.max_steps:
            store.save(acc, **states)
    bar.close()
    if counter.step > start_step:
        store.save(acc, **states)
    acc.wait_for_everyone()
    final = acc.unwrap_model(model)
    ema.copy_to(final.parameters())
    final = final.to("cpu").eval()
    seconds = time.perf_counter() - t0 if counter.step > start_step else 0.0
    previous = json.loads((out / "train_summary.json").read_text()) if (out / "train_summary.json").is_file() else {}
    summary = {
        "steps": counter.step,
        "steps_this_run": counter.step - start_step,
        "seconds_this_run": round(seconds, 1),
        # wall time of every run that trained (a resumed run adds its own to the one before)
        "seconds_total": round((previous.get("seconds_total", 0.0) if start_step else 0.0) + seconds, 1),
        "final_ce": round(loss_value, 5) if counter.step > start_step else previous.get("final_ce"),
        "samples": len(tokens),
        "config": asdict(cfg),
    }
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return final, summary
