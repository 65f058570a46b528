"""Evaluation of a distilled pipeline against its teacher: samplers, baselines, the table and the sample grid.

Samplers compared on the *same* noise and classes (so the rows of the grid line up):

* ``teacher AR (flow map)`` — the teacher's KV-cache loop with the flow map as token chooser: the mapping
  the student learned (its distribution is the teacher's);
* ``DD 1-step``, ``DD 2-step`` — the student at t = 0, and at its timesteps (0, t₂);
* ``DD refined (T-t₂)`` — teacher-refined: student step, teacher regenerates tokens T..t₂−1, student step;
* baselines from the DD paper (§5 of the notes): ``onestep*`` — every token drawn independently from its
  per-position, per-class marginal (estimated from the teacher's trajectories; the best any one-step set
  predictor that ignores the joint can do), and ``skip-n`` — the teacher's first N−n tokens, then the last n
  in one parallel step: one teacher forward over the prefix plus onestep* guesses for the rest, each
  remaining token drawn from the teacher's conditional given that context (one Jacobi iteration).

Metrics: FID / IS / precision / recall through torch-fidelity (:func:`distilled_decoding.metrics.compute_metrics`,
with the offline digits feature network by default), class accuracy under the digits classifier, sequential
network calls ("steps"), images/s at the evaluation batch size and the speedup over the teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.fileio import atomic_path, atomic_write_json, atomic_write_text
from distilled_decoding.sampling import FlowChooser, MultinomialChooser, sample_tokens

__all__ = ["marginals", "onestep_star", "skip_n", "evaluate_pipeline", "evaluate_job", "format_table", "save_grid"]


# ----------------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------------
def marginals(tokens: Tensor, labels: Tensor, vocab_size: int, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Per-class, per-position token histograms. tokens (M, N) long, labels (M,) → probs (C, N, V) float32."""
    m, n = tokens.shape
    counts = torch.zeros(num_classes, n, vocab_size)
    flat = (labels[:, None] * n + torch.arange(n)[None, :]) * vocab_size + tokens
    counts.view(-1).index_add_(0, flat.reshape(-1), torch.ones(m * n))
    counts += smoothing
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)


def onestep_star(probs: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Independent draws from per-position marginals. probs (C, N, V), labels (B,) → tokens (B, N)."""
    p = probs[labels.cpu()]  # (B, N, V)
    b, n, v = p.shape
    return torch.multinomial(p.reshape(b * n, v), 1, generator=generator).view(b, n)


@torch.no_grad()
def skip_n(
    teacher: Any,
    labels: Tensor,
    n_skip: int,
    probs: Tensor,
    *,
    chooser_prefix: Any,
    generator: torch.Generator | None = None,
    sampling: dict[str, Any] | None = None,
) -> Tensor:
    """The teacher decodes all but its last ``n_skip`` steps (tokens for LlamaGen, scales for VAR) with
    ``chooser_prefix`` (e.g. the flow map); the skipped positions then come from one parallel step: one teacher
    forward over [prefix, onestep* guesses], each skipped token drawn from its guided, filtered conditional.
    Returns tokens (B, N)."""
    from distilled_decoding.sampling import filter_logits

    sampling = dict(sampling or {})
    groups = teacher.decode_groups()
    if not 1 <= n_skip < len(groups):
        raise ValueError(f"n_skip={n_skip}: expected 1 <= n_skip < {len(groups)} (the teacher's decoding steps)")
    keep = groups[-n_skip][0]
    head = sample_tokens(teacher, labels, chooser=chooser_prefix, stop=keep, **sampling)
    guess = onestep_star(probs, labels, generator).to(head.device)
    inputs = torch.cat([head, guess[:, keep:]], dim=1)[:, : groups[-1][0]]
    logits = teacher.logits_from_prefix(inputs, labels)[:, keep:]
    scales = teacher.guidance_scales(sampling.get("cfg_scale", 1.0), sampling.get("cfg_interval", -1))
    if scales is not None:
        per_pos = torch.cat([torch.full((e - s,), scales[g]) for g, (s, e) in enumerate(groups)])[keep:]
        uncond = teacher.logits_from_prefix(inputs, torch.full_like(labels, teacher.null_class))[:, keep:]
        logits = uncond + (logits - uncond) * per_pos.to(logits)[None, :, None]
    logits = logits / max(sampling.get("temperature", 1.0), 1e-5)
    logits = filter_logits(logits, sampling.get("top_k", 0), sampling.get("top_p", 1.0))
    tail = MultinomialChooser(generator)(logits, slice(keep, teacher.seq_len))
    return torch.cat([head, tail], dim=1)


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def evaluate_pipeline(
    pipe: Any,
    teacher: Any,
    reference: Tensor | str | Path,
    *,
    num_images: int = 1000,
    batch_size: int = 250,
    seed: int = 1234,
    refine: tuple[int, int] | None = None,
    skip: tuple[int, ...] = (),
    probs: Tensor | None = None,
    feature_extractor: str = "digits-cnn",
    classifier: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``num_images`` images per sampler from the same noise and classes and measure them.

    reference: real images, uint8 (M, 3, H, W), or a folder of real images (no class accuracy then).
    probs: per-class marginals (C, N, V) for the baselines (None: no baselines).
    Returns ``{"rows": {name: metrics}, "images": {name: uint8 (B, 3, H, W)}, "labels", "settings"}``.
    """
    from tqdm.auto import tqdm

    from distilled_decoding.digits import to_uint8
    from distilled_decoding.metrics import class_accuracy, compute_metrics

    student = pipe.student
    n_tok, dim = pipe.noise_shape
    classes = student.num_classes
    labels = torch.arange(num_images) % classes
    noise = torch.randn(num_images, n_tok, dim, generator=torch.Generator().manual_seed(seed))
    sampling = dict(pipe.info.get("teacher_sampling") or {})
    flow_kwargs = dict(pipe.info.get("flow") or {})
    codebook = student.codebook
    timesteps = list(student.config.timesteps)
    t2 = timesteps[-1]
    refine = refine or (t2 - max(1, t2 // 4), t2)

    def teacher_ar(z: Tensor, y: Tensor) -> Tensor:
        tok = sample_tokens(teacher, y, chooser=FlowChooser(z, codebook, **flow_kwargs), **sampling)
        return pipe.decode(codebook[tok])

    samplers: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], int]] = {
        "teacher AR (flow map)": (teacher_ar, len(teacher.decode_groups())),
        "DD 1-step": (lambda z, y: pipe.generate(z, y, steps=1), 1),
    }
    if len(timesteps) > 1:
        samplers["DD 2-step"] = (lambda z, y: pipe.generate(z, y, steps=2), 2)
        samplers[f"DD refined ({refine[0]}-{refine[1]})"] = (
            lambda z, y: pipe.generate(z, y, teacher=teacher, teacher_tokens=refine),
            (1 if refine[0] > 0 else 0) + (refine[1] - refine[0]) + 1,
        )
    if probs is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        samplers["onestep*"] = (lambda z, y: pipe.decode(codebook[onestep_star(probs, y, gen)]), 1)
        for n in skip:
            fn = lambda z, y, n=n: pipe.decode(codebook[skip_n(  # noqa: E731
                teacher, y, n, probs, chooser_prefix=FlowChooser(z, codebook, **flow_kwargs), generator=gen,
                sampling=sampling)])  # fmt: skip
            samplers[f"skip-{n}"] = (fn, len(teacher.decode_groups()) - n + 1)

    rows: dict[str, dict[str, Any]] = {}
    images: dict[str, Tensor] = {}
    digits = not isinstance(reference, (str, Path))  # class accuracy needs the digits classifier's classes
    for name, (fn, steps) in tqdm(samplers.items(), desc="evaluating", unit="sampler", disable=not progress):
        chunks, seconds = [], 0.0
        for s in range(0, num_images, batch_size):
            out, dt = _timed(lambda s=s, fn=fn: fn(noise[s : s + batch_size], labels[s : s + batch_size]))
            chunks.append(to_uint8(out.cpu(), (0.0, 1.0)))
            seconds += dt
        imgs = torch.cat(chunks)
        images[name] = imgs
        m = compute_metrics(imgs, reference, feature_extractor=feature_extractor)
        rows[name] = {
            "fid": m["fid"], "is": m["is"], "precision": m["precision"], "recall": m["recall"],
            "class_acc": class_accuracy(imgs, labels, classifier) if digits else None, "steps": steps,
            "images_per_s": num_images / seconds,
        }  # fmt: skip
    base = rows["teacher AR (flow map)"]["images_per_s"]
    for r in rows.values():
        r["speedup"] = r["images_per_s"] / base
    settings = {"num_images": num_images, "batch_size": batch_size, "seed": seed, "refine": list(refine),
                "skip": list(skip), "feature_extractor": feature_extractor,
                "reference": str(reference) if not digits else f"digits ({len(reference)} images)"}  # fmt: skip
    return {"rows": rows, "images": images, "labels": labels, "settings": settings}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`evaluate_pipeline` rows."""
    cols = [("fid", "FID", "{:.3f}"), ("is", "IS", "{:.2f}"), ("precision", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("class_acc", "class acc", "{:.3f}"), ("steps", "steps", "{}"),
            ("images_per_s", "images/s", "{:.1f}"), ("speedup", "speedup", "{:.1f}x")]  # fmt: skip
    lines = ["| sampler | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(
            f"| {name} | " + " | ".join("—" if r[k] is None else fmt.format(r[k]) for k, _, fmt in cols) + " |"
        )
    return "\n".join(lines)


def save_grid(images: dict[str, Tensor], labels: Tensor, path: str | Path, rows: list[str], columns: int = 10) -> None:
    """PNG grid: one column per class (the first image of that class), one row per sampler in ``rows``."""
    from torchvision.utils import save_image

    cols = [int((labels == c).nonzero()[0]) for c in range(min(columns, int(labels.max()) + 1))]
    grid = torch.cat([images[r][cols] for r in rows]).float() / 255.0
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), nrow=len(cols), padding=2, pad_value=1.0, format="png")


def evaluate_job(cfg: Any, teacher: Any, vq: Any) -> dict[str, Any]:
    """The ``evaluate`` stage of :func:`distilled_decoding.recipe.run`: table, JSON, markdown and grid PNG."""
    from distilled_decoding.digits import load_digits_images
    from distilled_decoding.pipeline import DistilledDecodingPipeline
    from distilled_decoding.trajectories import TrajectoryDataset

    ec = cfg.evaluate
    out = Path(cfg.output_dir)
    pipe = DistilledDecodingPipeline.from_pretrained(cfg.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    ds = TrajectoryDataset(cfg.trajectory_dir)
    toks = torch.stack([ds[i]["tokens"] for i in range(len(ds))])
    labs = torch.stack([ds[i]["class_label"] for i in range(len(ds))])
    probs = marginals(toks, labs, teacher.vocab_size, teacher.num_classes)
    n_tok, n_steps = teacher.seq_len, len(teacher.decode_groups())
    # skip-1 is no baseline for VAR (its last scale depends on earlier scales only: one parallel step is exact)
    default_skip = {n for n in (max(2, n_steps // 8), max(2, n_steps // 4)) if n < n_steps}
    skip = tuple(ec.skip) if ec.skip is not None else tuple(sorted(default_skip))
    if ec.reference == "digits":
        size = pipe.decode(pipe.student.codebook[torch.zeros(1, n_tok, dtype=torch.long)]).shape[-1]
        reference: Any = load_digits_images(size=size)[0]
    else:
        reference = Path(ec.reference)
    result = evaluate_pipeline(pipe, teacher, reference, num_images=ec.num_images, batch_size=ec.batch_size,
                               seed=ec.seed, refine=tuple(ec.refine) if ec.refine else None, skip=skip, probs=probs,
                               feature_extractor=ec.feature_extractor)  # fmt: skip
    rows = result["rows"]
    grid_rows = [r for r in rows if r.startswith(("teacher", "DD"))]
    save_grid(result["images"], result["labels"], out / "samples_grid.png", grid_rows, ec.grid_columns)
    table = format_table(rows)
    teacher_row = rows["teacher AR (flow map)"]
    ratios = {
        name: {
            "fid_ratio": r["fid"] / teacher_row["fid"],
            "class_acc_gap": None if r["class_acc"] is None else teacher_row["class_acc"] - r["class_acc"],
        }
        for name, r in rows.items()
    }
    report = {
        "rows": rows,
        "ratios_to_teacher": ratios,
        "settings": result["settings"],
        "grid": str(out / "samples_grid.png"),
    }
    atomic_write_json(out / "evaluation.json", report)
    pipe.register_to_config(info={**pipe.info, "metrics": rows})  # shown in the model card
    pipe.save_pretrained(cfg.pipeline_dir)
    atomic_write_text(out / "evaluation.md", table + "\n")
    print(table)
    print(f"sample grid (columns: classes; rows: {', '.join(grid_rows)}): {out / 'samples_grid.png'}")
    return report
