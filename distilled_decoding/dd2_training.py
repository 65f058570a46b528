"""Distilled Decoding 2 training with Hugging Face Accelerate: GTS initialisation (stage 1) and CSD (stage 2).

* :func:`train_gts` — the AR-diffusion model of the teacher's family (the family registry's ``dd2_model``:
  :class:`~distilled_decoding.students.dd2.ARDiffusion` for LlamaGen, :class:`~distilled_decoding.students.dd2_var.
  VARARDiffusion` for VAR) made from the teacher, tuned with the ground-truth-score loss (:func:`~distilled_decoding.
  losses.gts_loss`) on token sequences the teacher sampled (a trajectory folder: :func:`~distilled_decoding.
  trajectories.build_trajectories`; no images, noise not needed).
* :func:`train_csd` — the family's one-step generator (``dd2_generator``: :class:`~distilled_decoding.students.dd2.
  DD2Generator`, :class:`~distilled_decoding.students.dd2_var.DD2VARGenerator`) and a guidance network, both
  initialised from the GTS model, trained alternately: each iteration K guidance updates on fresh generated batches
  (:func:`~distilled_decoding.losses.guidance_loss`), then one generator update (:func:`~distilled_decoding.losses.
  csd_generator_loss`); progressive EMA of the generator ``min(ema_max, (it + 1)/(it + 10))`` (diffusers' EMAModel);
  optional performance alignment at iteration ``align_at`` (the generator takes its EMA weights, the guidance network
  alone is retrained ``align_guidance_steps`` times, then K becomes ``guidance_steps_after_align``).
  With the teacher's flow-map (noise, tokens) pairs (``pairs``: a trajectory folder's
  :class:`~distilled_decoding.trajectories.TrajectoryDataset`): the first ``regression_iters`` generator iterations
  train on DMD's regression loss alone (:func:`~distilled_decoding.losses.regression_loss`; no guidance updates),
  then the generator takes its EMA weights, the EMA restarts and CSD begins, its generator loss plus
  ``regression_weight`` × the regression loss.

Determinism: every random draw of an update (batch indices, classes, noise, t, ε) comes from a CPU generator seeded
by (seed, stream, update counter) for the *global* batch, which is then split across processes; the networks have no
dropout. Checkpoints are pickle-free :class:`~distilled_decoding.training_state.CheckpointStore` folders tied to the
settings that change the weights, so a killed run resumes to the same weights and P processes train the same model
as one.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from distilled_decoding.dd2_config import CSDConfig, DD2TrainerConfig, GTSConfig
from distilled_decoding.distill import StepCounter
from distilled_decoding.losses import (
    csd_generator_loss,
    draw_times_and_noise,
    gts_loss,
    guidance_loss,
    regression_loss,
)
from distilled_decoding.provenance import teacher_fingerprint
from distilled_decoding.students.dd2_base import ARDiffusionModel, OneStepGenerator, check_made_from
from distilled_decoding.teacher_score import TeacherScore
from distilled_decoding.teachers.base import families, get_family

__all__ = ["train_csd", "train_gts"]

_STREAM_GUIDE, _STREAM_GEN, _STREAM_BATCH = 2, 3, 100


def _rng(seed: int, stream: int, step: int) -> torch.Generator:
    state = int(np.random.SeedSequence([seed, stream, step]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


class _Counter(StepCounter):
    """Checkpointed progress: ``step`` (optimizer updates of the trained model; CSD: generator iterations), ``micro``
    (CSD: guidance updates) and ``aligned_at`` (CSD: the iteration of the performance alignment, None before it; its
    ``state_dict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.aligned_at: int | None = None

    @property
    def aligned(self) -> bool:
        return self.aligned_at is not None

    def state_dict(self) -> dict[str, int]:
        return {"aligned_at": -1 if self.aligned_at is None else self.aligned_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        at = int(state["aligned_at"])
        self.aligned_at = None if at < 0 else at

    def check_alignment(self, align_at: int | None, where: Path) -> None:
        """ValueError when ``align_at`` contradicts this run's history (resumed from ``where``)."""
        if self.aligned_at is not None and align_at != self.aligned_at:
            raise ValueError(f"align_at={align_at}: the run in {where} was aligned at iteration {self.aligned_at}; "
                             f"resume it with align_at={self.aligned_at}")  # fmt: skip
        if self.aligned_at is None and align_at is not None and align_at < self.step:
            raise ValueError(f"align_at={align_at}: the run in {where} is at iteration {self.step} and was not "
                             f"aligned; resume it with align_at >= {self.step} or null")  # fmt: skip


def _accelerator(cfg: DD2TrainerConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from distilled_decoding.distributed import process_state

    process_state()
    acc = Accelerator(mixed_precision="no", step_scheduler_with_optimizer=False,
                      project_config=ProjectConfiguration(project_dir=str(cfg.output_dir)))  # fmt: skip
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size}: must be divisible by the {acc.num_processes} processes")
    return acc


def _store(acc: Any, cfg: DD2TrainerConfig, what: str, extra: dict[str, Any]) -> Any:
    """The run's checkpoint store (``<output_dir>/checkpoints``), tied to ``cfg.semantic()`` and ``extra`` (e.g. the
    initial model's identity); incomplete checkpoints of a killed run dropped."""
    from distilled_decoding.manifest import json_digest
    from distilled_decoding.training_state import CheckpointStore

    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints", keep_last=cfg.keep_last,
                            settings_digest=json_digest({"stage": what, **cfg.semantic(), **extra}))  # fmt: skip
    if acc.is_main_process:
        store.drop_incomplete()
    acc.wait_for_everyone()
    return store


def _rank_slice(acc: Any, x: Tensor) -> Tensor:
    per = x.shape[0] // acc.num_processes
    return x[acc.process_index * per : (acc.process_index + 1) * per].to(acc.device)


def _batch_indices(n: int, b: int, seed: int, step: int) -> Tensor:
    """Global batch ``step``: positions step·b .. step·b + b − 1 of the epoch-wise permutations of n items (epoch e
    permuted by (seed, e))."""
    out, perms = [], {}
    for pos in range(step * b, (step + 1) * b):
        e = pos // n
        if e not in perms:
            perms[e] = torch.randperm(n, generator=_rng(seed, _STREAM_BATCH + e, 0))
        out.append(int(perms[e][pos % n]))
    return torch.tensor(out)


def _check_pairs(pairs: Any, model: ARDiffusionModel, teacher: Any) -> None:
    """ValueError naming ``pairs`` unless it is a non-empty dataset of (N, D) noise / (N,) token pairs for ``model``,
    built by ``teacher`` when it records its teacher (a trajectory folder's ``teacher`` fingerprint, compared with
    the one ``model`` records, which :func:`check_made_from` has matched to ``teacher``: no second hash)."""
    want = f"the teacher's flow-map pairs (a trajectory folder's dataset) with ({model.seq_len}, "
    want += f"{model.config.codebook_dim}) noise and ({model.seq_len},) tokens"
    try:
        first = pairs[0] if len(pairs) > 0 else None
    except (TypeError, IndexError, KeyError) as err:
        raise ValueError(
            f"pairs: regression_iters / regression_weight need {want}, got {type(pairs).__name__}"
        ) from err
    shapes = None if not isinstance(first, dict) else {k: tuple(getattr(first.get(k), "shape", ())) for k in
                                                        ("noise", "tokens")}  # fmt: skip
    if shapes != {"noise": (model.seq_len, model.config.codebook_dim), "tokens": (model.seq_len,)}:
        raise ValueError(f"pairs: regression_iters / regression_weight need {want}, got items {shapes}")
    made_by, mine = getattr(pairs, "teacher", None), model.config.teacher_sha256
    if made_by is not None and made_by["weights_sha256"] != mine:
        where = getattr(pairs, "root", type(pairs).__name__)
        raise ValueError(f"pairs ({where}): built by another teacher (weights {made_by['weights_sha256'][:12]}; "
                         f"given: {type(teacher).__name__} weights {mine[:12]})")  # fmt: skip


def _warmup(start: float, peak: float, steps: int) -> Any:
    return lambda s: (start + (peak - start) * min(1.0, s / steps)) / peak if steps > 0 else 1.0


def _summary(out: Path, acc: Any, seconds: float, start: int, counter: _Counter, logs: dict, cfg: Any) -> dict:
    """train_summary.json: steps, wall seconds of every run that trained (a resumed run adds its own), last losses."""
    import json

    from distilled_decoding.fileio import atomic_write_json

    path = out / "train_summary.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    summary = {
        "steps": counter.step,
        "guidance_updates": counter.micro,
        "seconds_total": round((previous.get("seconds_total", 0.0) if start else 0.0) + seconds, 1),
        "last": {k: round(v, 6) for k, v in logs.items()} or previous.get("last", {}),
        "config": asdict(cfg),
    }
    if acc.is_main_process:
        atomic_write_json(path, summary)
    return summary


# ------------------------------------------------------------------------------------------------------------
# stage 1: GTS
# ------------------------------------------------------------------------------------------------------------
def train_gts(
    cfg: GTSConfig,
    teacher: Any,
    codebook: Tensor,
    tokens: Tensor,
    labels: Tensor,
    model: ARDiffusionModel | None = None,
) -> tuple[ARDiffusionModel, dict]:
    """Stage 1: ``model`` (default :meth:`GTSConfig.initial_model`) tuned with the GTS loss on
    the teacher's token sequences ``tokens`` (M, N) long with their class ``labels`` (M,). Returns (the EMA model in
    eval mode on the CPU, the run's summary); writes ``train_summary.json`` and checkpoints under ``output_dir``."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    acc = _accelerator(cfg)
    out = Path(cfg.output_dir)
    if model is None:
        model = cfg.initial_model(teacher, codebook)
    check_made_from(model, teacher, codebook, "GTS model")
    if tokens.ndim != 2 or tokens.shape[1] != model.seq_len or labels.shape != tokens.shape[:1]:
        raise ValueError(f"tokens: expected (M, {model.seq_len}) sequences with (M,) labels, got "
                         f"{tuple(tokens.shape)} and {tuple(labels.shape)}")  # fmt: skip
    params = list(model.head.parameters()) if cfg.train == "head" else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    counter = _Counter()
    wrapped, opt, sched = acc.prepare(model, opt, sched)
    ema.to(acc.device)
    states = {"model": wrapped, "optimizer": opt, "scheduler": sched, "ema": ema, "counter": counter}
    store = _store(acc, cfg, "gts", {"init": model.config.teacher_sha256})
    if (resume := store.latest()) is not None:
        store.load(resume, acc, **states)
        acc.print(f"resumed from {resume} at step {counter.step}")
    start = counter.step
    score = TeacherScore(teacher.to(acc.device), codebook.to(acc.device), **cfg.sampling)
    n, d, m = model.seq_len, model.config.codebook_dim, cfg.draws
    bar = tqdm(total=cfg.max_steps, initial=counter.step, desc="DD2 GTS", unit="step",
               disable=not (cfg.progress and acc.is_main_process))  # fmt: skip
    t0, logs = time.perf_counter(), {}
    while counter.step < cfg.max_steps:
        idx = _batch_indices(tokens.shape[0], cfg.batch_size, cfg.seed, counter.step)
        t, eps = draw_times_and_noise(_rng(cfg.seed, _STREAM_GEN, counter.step), cfg.batch_size, n, m, d, cfg.t_min,
                                      cfg.t_max)  # fmt: skip
        tok, lab = _rank_slice(acc, tokens[idx]), _rank_slice(acc, labels[idx])
        losses = gts_loss(model, tok, lab, score.logits(tok, lab), _rank_slice(acc, t), _rank_slice(acc, eps),
                          forward=wrapped)  # fmt: skip
        acc.backward(losses["total"])
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        counter.step += 1
        logs = {k: float(v.detach()) for k, v in losses.items()}
        bar.update(1)
        bar.set_postfix(gts=f"{logs['gts']:.4g}")
        if cfg.log_every and counter.step % cfg.log_every == 0:
            acc.print(f"GTS step {counter.step} {time.perf_counter() - t0:.0f}s {logs}", flush=True)
        if cfg.save_every and counter.step % cfg.save_every == 0 and counter.step < cfg.max_steps:
            store.save(acc, **states)
    bar.close()
    if counter.step > start:
        store.save(acc, **states)
    final = acc.unwrap_model(wrapped)
    ema.copy_to(params)
    final = final.to("cpu").eval()
    for p in final.parameters():
        p.requires_grad_(True)
    summary = _summary(out, acc, time.perf_counter() - t0 if counter.step > start else 0.0, start, counter, logs, cfg)
    return final, summary


# ------------------------------------------------------------------------------------------------------------
# stage 2: CSD
# ------------------------------------------------------------------------------------------------------------
def train_csd(
    cfg: CSDConfig, teacher: Any, codebook: Tensor, init: ARDiffusionModel, pairs: Any = None
) -> tuple[OneStepGenerator, ARDiffusionModel, dict]:
    """Stage 2: generator (the registry's ``dd2_generator`` of ``init``'s family) and guidance network both
    initialised from ``init`` (the GTS model; the teacher-made AR-diffusion model for the no-GTS ablation). ``pairs``:
    the teacher's flow-map pairs, items ``{"noise" (N, D), "tokens" (N,), "condition_id" ()}`` (a
    :class:`~distilled_decoding.trajectories.TrajectoryDataset` of this teacher), needed by the regression settings
    only. Returns (generator with its EMA weights, guidance network, the run's summary), in eval mode on the CPU;
    writes ``train_summary.json`` and checkpoints under ``output_dir``."""
    from diffusers.training_utils import EMAModel

    if not isinstance(init, ARDiffusionModel):
        names = " or ".join(f.dd2_model.rpartition(":")[2] for f in families().values() if f.dd2_model)
        raise TypeError(f"init: expected an {names} (the GTS model), got {type(init).__name__}")
    check_made_from(init, teacher, codebook, "GTS model")
    if cfg.regression_iters > 0 or cfg.regression_weight > 0:
        _check_pairs(pairs, init, teacher)
    acc = _accelerator(cfg)
    out = Path(cfg.output_dir)
    generator = get_family(init.family).dd2_generator_class.from_ar_diffusion(
        init, generator_t=cfg.generator_t, noise_scale=cfg.noise_scale
    )
    guidance = init.replica()
    generator.train()
    guidance.train()
    guide_params = list(guidance.parameters())
    if cfg.guidance_train == "head":
        guide_params = [*guidance.head.parameters(), *([] if guidance.output is None else guidance.output.parameters())]
        for p in guidance.parameters():
            p.requires_grad_(False)
        for p in guide_params:
            p.requires_grad_(True)
    ema = EMAModel(generator.parameters(), decay=cfg.ema_max, foreach=False)  # decay min(ema_max, (1+k)/(10+k))
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_generator, betas=cfg.betas, weight_decay=0.0)
    opt_d = torch.optim.AdamW(guide_params, lr=cfg.lr_guidance, betas=cfg.betas, weight_decay=0.0)
    warm_g = max(1, cfg.warmup_guidance_steps // cfg.guidance_steps)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _warmup(cfg.lr_start, cfg.lr_generator, warm_g))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _warmup(cfg.lr_start, cfg.lr_guidance,
                                                               cfg.warmup_guidance_steps))  # fmt: skip
    counter = _Counter()
    gen_w, guide_w, opt_g, opt_d, sched_g, sched_d = acc.prepare(generator, guidance, opt_g, opt_d, sched_g, sched_d)
    ema.to(acc.device)
    states = {"model": gen_w, "optimizer": opt_g, "scheduler": sched_g, "ema": ema, "counter": counter,
              "extra": {"guidance": guide_w, "guidance_optimizer": opt_d, "guidance_scheduler": sched_d,
                        "flags": counter}}  # fmt: skip
    init_digest = {
        "init": init.config.teacher_sha256,
        "init_weights": teacher_fingerprint(init, init.codebook)["weights_sha256"],
    }
    store = _store(acc, cfg, "csd", init_digest)
    if (resume := store.latest()) is not None:
        store.load(resume, acc, **states)
        counter.check_alignment(cfg.align_at, resume)
        acc.print(f"resumed from {resume} at iteration {counter.step}")
    start = counter.step
    score = TeacherScore(teacher.to(acc.device), codebook.to(acc.device), **cfg.sampling)
    n, d, m, classes = init.seq_len, init.config.codebook_dim, cfg.draws, init.num_classes

    def inputs(stream: int, step: int) -> tuple[Tensor, ...]:
        g = _rng(cfg.seed, stream, step)
        labels = torch.randint(classes, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, n, d, generator=g)
        t, eps = draw_times_and_noise(g, cfg.batch_size, n, m, d, cfg.t_min, cfg.t_max)
        return tuple(_rank_slice(acc, x) for x in (noise, labels, t, eps))

    def regression_batch(step: int) -> tuple[Tensor, ...]:
        items = [pairs[int(i)] for i in _batch_indices(len(pairs), cfg.batch_size, cfg.seed, step)]
        noise, tokens, labels = (torch.stack([it[k] for it in items]) for k in ("noise", "tokens", "condition_id"))
        return tuple(_rank_slice(acc, x) for x in (noise.float(), labels.long(), tokens.long()))

    def guidance_update() -> dict[str, float]:
        noise, labels, t, eps = inputs(_STREAM_GUIDE, counter.micro)
        with torch.no_grad():
            x_g = generator(noise, labels)
        losses = guidance_loss(guidance, x_g, labels, t, eps, forward=guide_w)
        acc.backward(losses["total"])
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(guide_params, cfg.clip_grad)
        opt_d.step()
        sched_d.step()
        opt_d.zero_grad(set_to_none=True)
        counter.micro += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    bar = tqdm(total=cfg.max_iters, initial=counter.step, desc="DD2 CSD", unit="it",
               disable=not (cfg.progress and acc.is_main_process))  # fmt: skip
    t0, logs = time.perf_counter(), {}

    def generator_update(losses: dict[str, Tensor], guidance_logs: dict[str, float]) -> dict[str, float]:
        acc.backward(losses["total"])
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(generator.parameters(), cfg.clip_grad)
        opt_g.step()
        sched_g.step()
        opt_g.zero_grad(set_to_none=True)
        ema.step(generator.parameters())
        counter.step += 1
        now = {**guidance_logs, **{k: float(v.detach()) for k, v in losses.items()}}
        bar.update(1)
        bar.set_postfix({k: f"{now[k]:.4g}" for k in ("div", "dsm", "reg") if k in now})
        if cfg.log_every and counter.step % cfg.log_every == 0:
            acc.print(f"CSD it {counter.step} {time.perf_counter() - t0:.0f}s {now}", flush=True)
        if cfg.save_every and counter.step % cfg.save_every == 0 and counter.step < cfg.max_iters:
            store.save(acc, **states)
        return now

    while counter.step < cfg.max_iters:
        if counter.step < cfg.regression_iters:  # the warm start: regression alone, no guidance updates
            losses = regression_loss(generator, *regression_batch(counter.step), forward=gen_w)
            logs = generator_update(losses, {})
            continue
        if counter.step == cfg.regression_iters > 0 and counter.micro == 0:  # CSD begins from the EMA weights
            ema.copy_to(generator.parameters())
            ema.optimization_step = 0  # the progressive EMA restarts
        if cfg.align_at is not None and counter.step == cfg.align_at and not counter.aligned:
            ema.copy_to(generator.parameters())  # performance alignment: the generator takes its EMA weights
            for _ in range(cfg.align_guidance_steps):
                guidance_update()
            counter.aligned_at = counter.step
        for _ in range(cfg.guidance_steps_after_align if counter.aligned else cfg.guidance_steps):
            logs = guidance_update()
        noise, labels, t, eps = inputs(_STREAM_GEN, counter.step)
        losses = csd_generator_loss(generator, guidance, score, noise, labels, t, eps, alpha=cfg.alpha,
                                    forward=gen_w)  # fmt: skip
        if cfg.regression_weight > 0:
            reg = regression_loss(generator, *regression_batch(counter.step), forward=gen_w)
            losses = {**losses, "total": losses["total"] + cfg.regression_weight * reg["total"], "reg": reg["reg"]}
        logs = generator_update(losses, logs)
    bar.close()
    if counter.step > start:
        store.save(acc, **states)
    gen = acc.unwrap_model(gen_w)
    ema.copy_to(gen.parameters())
    gen, guide = gen.to("cpu").eval(), acc.unwrap_model(guide_w).to("cpu").eval()
    summary = _summary(out, acc, time.perf_counter() - t0 if counter.step > start else 0.0, start, counter, logs, cfg)
    return gen, guide, summary
