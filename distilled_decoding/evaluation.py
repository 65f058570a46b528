"""Evaluation of a distilled pipeline against its teacher: the table and the sample grid.

The samplers of :mod:`distilled_decoding.samplers` are compared on the *same* noise and classes (so the rows of the
grid line up): the teacher through the flow map (the mapping the student learned), DD 1-step and 2-step,
teacher-refined, and the DD paper's baselines onestep* (per-position marginals estimated from the teacher's
trajectories) and skip-n.

Metrics: FID / IS / precision / recall through torch-fidelity (:func:`distilled_decoding.metrics.compute_metrics`,
with the offline digits feature network by default), class accuracy under the digits classifier, sequential
network calls ("steps"), images/s at the evaluation batch size and the speedup over the teacher, and the latency of
one image (batch 1) and its speedup.

Text-to-image students are evaluated on ``prompts`` (image i gets prompt i mod P): the class accuracy column is
then *prompt adherence* — the digits classifier must find the digit the prompt names (``labels``, one per prompt) —
and with ``clip_model`` (CLIP weights the user supplies; optional torchmetrics) a CLIP score column is filled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.fileio import atomic_path, atomic_write_json, atomic_write_text
from distilled_decoding.samplers import (
    OneStepStar,
    RefinedSampler,
    Reordered,
    Sampler,
    SkipN,
    TeacherSampler,
    marginals,
)

__all__ = [
    "standard_samplers",
    "measure_samplers",
    "evaluate_pipeline",
    "extra_teacher_samplers",
    "evaluate_job",
    "format_table",
    "save_grid",
]


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _latency(fn: Callable[[], Tensor], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    return sorted(_timed(fn)[1] for _ in range(repeats))[repeats // 2]


def _prompt_conditions(pipe: Any, prompts: list[str], n: int, chunk: int = 64) -> Any:
    """The condition of image i = prompt i mod P: each distinct prompt encoded once (``chunk`` at a time)."""
    from distilled_decoding.conditions import TextCondition

    table = TextCondition.cat([pipe.encode_prompt(prompts[s : s + chunk]) for s in range(0, len(prompts), chunk)])
    return pipe.student.condition.take(table.to("cpu"), torch.arange(n) % len(prompts))


def standard_samplers(
    pipe: Any,
    teacher: Any,
    *,
    refine: tuple[int, int] | None = None,
    skip: tuple[int, ...] = (),
    probs: Tensor | None = None,
    seed: int = 0,
) -> list[Sampler]:
    """The rows of the evaluation table, in order: the teacher's ordinary decoding (multinomial, seeded ``seed + 2``:
    the baseline of the speedup column), the teacher through the flow map (the mapping the student learned), the
    student's rows (:meth:`~distilled_decoding.pipeline.DistilledDecodingPipeline.student_samplers`: DD 1-step, 2-step
    and refined ``refine``; DD2 1-step and two refined rows), and with the marginals ``probs`` the baselines onestep*
    and skip-n for n in ``skip`` (drawing from one generator seeded ``seed + 1``, in that order)."""
    student = pipe.student
    sampling = dict(pipe.info.get("teacher_sampling") or {})
    flow = dict(pipe.info.get("flow") or {})
    out: list[Sampler] = [
        TeacherSampler(
            teacher, student.codebook, sampling, "multinomial", generator=torch.Generator().manual_seed(seed + 2)
        ),
        TeacherSampler(teacher, student.codebook, sampling, "flow", flow),
        *pipe.student_samplers(teacher, refine),
    ]
    if probs is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        out.append(OneStepStar(probs, student.codebook, gen))
        out += [SkipN(teacher, n, probs, student.codebook, sampling, flow, gen) for n in skip]
    return out


@torch.no_grad()
def measure_samplers(
    samplers: Sequence[Sampler],
    decode: Callable[[Tensor], Tensor],
    noise: Tensor,
    conditions: Any,
    reference: Any,
    *,
    labels: Tensor | None = None,
    batch_size: int = 250,
    feature_extractor: str = "digits-cnn",
    classifier: Any = None,
    prompts: Sequence[str] | None = None,
    clip_model: Any = None,
    latency_repeats: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Run every sampler on the same ``noise`` (M, N, D) and ``conditions`` (class ids (M,) or a TextCondition of
    M rows) in batches of ``batch_size``, decode with ``decode`` (vectors (B, N, D) → images (B, 3, H, W) in
    [0, 1]) and measure the images against ``reference`` (uint8 (R, 3, H, W) digits: class accuracy of ``labels``
    (M,) too, default the class ids; a folder of images: no class accuracy; FID statistics, see
    :func:`distilled_decoding.fid.statistics_reference`: FID and IS only). ``prompts`` (M) with ``clip_model``: the
    CLIP score; ``latency_repeats`` > 0: the median batch-1 latency.

    Returns ``(rows, images)``: per sampler name the metrics (fid, is, precision, recall, class_acc, clip, steps,
    images_per_s at this batch size, ms_batch1) and the uint8 images (M, 3, H, W)."""
    from tqdm.auto import tqdm

    from distilled_decoding.clip import clip_score
    from distilled_decoding.digits import to_uint8
    from distilled_decoding.fid import statistics_reference
    from distilled_decoding.metrics import class_accuracy, compute_metrics

    if labels is None and isinstance(conditions, Tensor):
        labels = conditions
    rows: dict[str, dict[str, Any]] = {}
    images: dict[str, Tensor] = {}
    num_images = noise.shape[0]
    digits = isinstance(reference, Tensor) and labels is not None  # class accuracy needs the digits classes
    stats = statistics_reference(reference)  # read once, not per sampler
    reference = stats if stats is not None else reference
    for sampler in tqdm(samplers, desc="evaluating", unit="sampler", disable=not progress):
        name, chunks, seconds = sampler.name, [], 0.0
        for s in range(0, num_images, batch_size):
            z, y = noise[s : s + batch_size], conditions[s : s + batch_size]
            out, dt = _timed(lambda z=z, y=y, sampler=sampler: decode(sampler(z, y)[0]))
            chunks.append(to_uint8(out.cpu(), (0.0, 1.0)))
            seconds += dt
        imgs = torch.cat(chunks)
        images[name] = imgs
        m = compute_metrics(imgs, reference, feature_extractor=feature_extractor, prc=stats is None)
        rows[name] = {
            "fid": m["fid"], "is": m["is"], "precision": m.get("precision"), "recall": m.get("recall"),
            "class_acc": class_accuracy(imgs, labels, classifier) if digits else None,
            "clip": clip_score(imgs, list(prompts), clip_model) if clip_model is not None and prompts else None,
            "steps": sampler.steps, "images_per_s": num_images / seconds, "ms_batch1": None,
        }  # fmt: skip
    # batch-1 latency after every image set: its calls draw from the samplers' generators (onestep*, skip-n share
    # one), so timing them in between would change the images of the rows that follow
    for sampler in samplers if latency_repeats else ():
        b1 = _latency(lambda s=sampler, y=conditions[:1]: decode(s(noise[:1], y)[0]), latency_repeats)
        rows[sampler.name]["ms_batch1"] = b1 * 1e3
    return rows, images


@torch.no_grad()
def evaluate_pipeline(
    pipe: Any,
    teacher: Any,
    reference: Any,
    *,
    num_images: int = 1000,
    batch_size: int = 250,
    seed: int = 1234,
    refine: tuple[int, int] | None = None,
    skip: tuple[int, ...] = (),
    probs: Tensor | None = None,
    feature_extractor: str = "digits-cnn",
    classifier: Any = None,
    extra: Sequence[Sampler] = (),
    progress: bool = True,
    prompts: list[str] | None = None,
    labels: Tensor | None = None,
    clip_model: Any = None,
    latency_repeats: int = 3,
) -> dict[str, Any]:
    """Generate ``num_images`` images per sampler from the same noise and conditions and measure them.

    reference: real images, uint8 (M, 3, H, W), or a folder of real images (no class accuracy then), or FID
        statistics (:func:`distilled_decoding.fid.statistics_reference`: a file or Hub reference such as
        ``IMAGENET256_FID_STATISTICS``; FID and IS only, no precision / recall).
    probs: per-class marginals (C, N, V) for the baselines (None: no baselines).
    extra: more samplers, as rows right after the teacher's (e.g. another teacher, :class:`Reordered` into the
        student's sequence order).
    prompts: text-conditional students: image i gets ``prompts[i % P]`` (class ids i mod C otherwise); ``labels``
        (P,) the digit each prompt names, for the class-accuracy (prompt adherence) column.
    clip_model: CLIP weights (folder, Hub id or loaded (model, processor)) for the CLIP score of text prompts.
    latency_repeats: timed batch-1 calls per sampler (median, after a warm-up; 0: no batch-1 columns).
    Returns ``{"rows": {name: metrics}, "images": {name: uint8 (B, 3, H, W)}, "labels", "prompts", "settings"}``.
    """
    from distilled_decoding.fid import statistics_reference

    digits = isinstance(reference, Tensor)
    stats = statistics_reference(reference)  # read once
    described = stats.source if stats is not None else str(reference)
    reference = stats if stats is not None else reference
    student = pipe.student
    n_tok, dim = pipe.noise_shape
    if prompts is not None:
        order = torch.arange(num_images) % len(prompts)
        conditions = _prompt_conditions(pipe, list(prompts), num_images)
        labels = None if labels is None else torch.as_tensor(labels)[order]
        image_prompts = [prompts[int(k)] for k in order]
    else:
        labels = conditions = torch.arange(num_images) % student.num_classes
        image_prompts = None
    noise = torch.randn(num_images, n_tok, dim, generator=torch.Generator().manual_seed(seed))
    samplers = standard_samplers(pipe, teacher, refine=refine, skip=skip, probs=probs, seed=seed)
    refine = next((s.teacher_tokens for s in samplers if isinstance(s, RefinedSampler)), refine)
    samplers = [*samplers[:2], *extra, *samplers[2:]]  # other teachers right after this one's rows
    rows, images = measure_samplers(samplers, pipe.decode, noise, conditions, reference, labels=labels,
                                    batch_size=batch_size, feature_extractor=feature_extractor, classifier=classifier,
                                    prompts=image_prompts, clip_model=clip_model, latency_repeats=latency_repeats,
                                    progress=progress)  # fmt: skip
    base, flow_map = rows["teacher AR (multinomial)"], rows["teacher AR (flow map)"]
    for r in rows.values():
        r["speedup"] = r["images_per_s"] / base["images_per_s"]  # vs the teacher's ordinary (multinomial) decoding
        r["speedup_vs_flow_map"] = r["images_per_s"] / flow_map["images_per_s"]
        r["speedup_batch1"] = None if r.get("ms_batch1") is None else base["ms_batch1"] / r["ms_batch1"]
    settings = {"num_images": num_images, "batch_size": batch_size, "seed": seed,
                "refine": list(refine) if refine else None,
                "skip": list(skip), "feature_extractor": feature_extractor,
                "reference": described if not digits else f"digits ({len(reference)} images)",
                "prompts": None if prompts is None else len(prompts), "latency_repeats": latency_repeats}  # fmt: skip
    return {"rows": rows, "images": images, "labels": labels, "prompts": image_prompts, "settings": settings}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`evaluate_pipeline` rows."""
    cols = [
        ("fid", "FID", "{:.3f}"),
        ("is", "IS", "{:.2f}"),
        ("precision", "precision", "{:.3f}"),
        ("recall", "recall", "{:.3f}"),
        ("class_acc", "class acc", "{:.3f}"),
        ("clip", "CLIP", "{:.2f}"),
        ("steps", "steps", "{}"),
        ("images_per_s", "images/s", "{:.1f}"),
        ("speedup", "speedup vs teacher (multinomial)", "{:.1f}x"),
        ("speedup_vs_flow_map", "vs teacher (flow map)", "{:.1f}x"),
        ("ms_batch1", "ms (batch 1)", "{:.1f}"),
        ("speedup_batch1", "speedup (batch 1)", "{:.1f}x"),
    ]
    lines = ["| sampler | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(
            f"| {name} | " + " | ".join("—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols) + " |"
        )
    return "\n".join(lines)


def save_grid(images: dict[str, Tensor], labels: Tensor, path: str | Path, rows: list[str], columns: int = 10) -> None:
    """PNG grid: one column per class (the first image of that class), one row per sampler in ``rows``."""
    from torchvision.utils import save_image

    cols = [int((labels == c).nonzero()[0]) for c in range(min(columns, int(labels.max()) + 1))]
    grid = torch.cat([images[r][cols] for r in rows]).float() / 255.0
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), nrow=len(cols), padding=2, pad_value=1.0, format="png")


def extra_teacher_samplers(entries: Sequence[dict[str, Any]], pipe: Any) -> list[Sampler]:
    """Table rows for other teachers of the same tokenizer (``evaluate.extra_teachers``): each entry is
    ``{"name": row name, **TeacherConfig fields}``. The teacher decodes through the flow map with the pipeline's
    sampling settings, flow map and codebook, its output moved into the student's sequence order. An entry whose
    model does not exist (e.g. the converted PAR before ``recipes/train_par_teacher.py`` made it) or whose tokenizer
    differs from the pipeline's (e.g. the digits rows of the default config in a job on another teacher) is left out
    with a notice."""
    from distilled_decoding.recipe import TeacherConfig

    out: list[Sampler] = []
    sampling = dict(pipe.info.get("teacher_sampling") or {})
    flow = dict(pipe.info.get("flow") or {})
    codebook = pipe.student.codebook
    for entry in entries:
        fields = {k: v for k, v in entry.items() if k != "name"}
        tc = TeacherConfig(**fields)
        if not Path(tc.model).exists():
            print(f"evaluate.extra_teachers: {tc.model} does not exist; the row {entry['name']!r} is left out")
            continue
        teacher, tok = tc.load()
        theirs = getattr(tok, "codebook", None) if tok is not None else getattr(teacher, "codebook", None)
        if theirs is None or theirs.shape != codebook.shape or not torch.allclose(theirs.float().cpu(), codebook.cpu()):
            print(f"evaluate.extra_teachers: {tc.model} uses another tokenizer than this job's (codebook "
                  f"{tuple(codebook.shape)}); the row {entry['name']!r} is left out")  # fmt: skip
            continue
        sampler = TeacherSampler(teacher, codebook, sampling, "flow", flow, label=str(entry["name"]))
        out.append(Reordered(sampler, teacher.token_order, pipe.student.token_order))
    return out


def evaluate_job(cfg: Any, teacher: Any, vq: Any) -> dict[str, Any]:
    """The ``evaluate`` stage of :func:`distilled_decoding.recipe.run`: table, JSON, markdown and grid PNG."""
    from distilled_decoding.digits import load_digits_images
    from distilled_decoding.methods import get_method
    from distilled_decoding.pipeline import DistilledDecodingPipeline
    from distilled_decoding.trajectories import TrajectoryDataset

    ec = cfg.evaluate
    out = Path(cfg.output_dir)
    pipe = DistilledDecodingPipeline.from_pretrained(cfg.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    n_tok, n_steps = teacher.seq_len, len(teacher.decode_groups())
    prompts = labels = None
    if ec.prompts is not None:  # text-to-image: held-out prompts have no trajectory marginals, so no baselines
        from distilled_decoding.prompts import load_prompt_labels, load_prompts

        prompts = load_prompts(ec.prompts, ec.prompt_column, ec.prompt_delimiter)
        if ec.label_column is not None:
            labels = load_prompt_labels(ec.prompts, ec.label_column, ec.prompt_delimiter)
        probs, skip = None, ()
    else:
        ds = TrajectoryDataset(cfg.distill.trajectories)  # the pairs the student was distilled from
        toks = torch.stack([ds[i]["tokens"] for i in range(len(ds))])
        labs = torch.stack([ds[i]["class_label"] for i in range(len(ds))])
        probs = marginals(toks, labs, teacher.vocab_size, teacher.num_classes)
        # skip-1 is no baseline for VAR (its last scale depends on earlier scales only: one parallel step is exact)
        default_skip = {n for n in (max(2, n_steps // 8), max(2, n_steps // 4)) if n < n_steps}
        skip = tuple(ec.skip) if ec.skip is not None else tuple(sorted(default_skip))
    if ec.reference == "digits":
        size = pipe.decode(pipe.student.codebook[torch.zeros(1, n_tok, dtype=torch.long)]).shape[-1]
        reference: Any = load_digits_images(size=size)[0]
    else:
        reference = ec.reference  # a folder of images, or FID statistics (file or Hub reference)
    result = evaluate_pipeline(pipe, teacher, reference, num_images=ec.num_images, batch_size=ec.batch_size,
                               seed=ec.seed, refine=tuple(ec.refine) if ec.refine else None, skip=skip, probs=probs,
                               feature_extractor=ec.feature_extractor, prompts=prompts, labels=labels,
                               clip_model=ec.clip_model, latency_repeats=ec.latency_repeats,
                               extra=extra_teacher_samplers(ec.extra_teachers, pipe)
                               + get_method(cfg.distill.method).extra_samplers(cfg, pipe))  # fmt: skip
    rows = result["rows"]
    extra_names = {str(e["name"]) for e in ec.extra_teachers}
    # rows that are functions of the noise
    grid_rows = [r for r in rows if r.startswith(("teacher AR (flow", "DD")) or r in extra_names]
    if prompts is not None:  # columns: the first prompts (image i has prompt i), labelled with their text
        from distilled_decoding.grid import labelled_grid

        cols = list(range(min(ec.grid_columns, len(prompts), ec.num_images)))
        labelled_grid(result["images"], grid_rows, cols, [prompts[c] for c in cols], out / "samples_grid.png")
    else:
        save_grid(result["images"], result["labels"], out / "samples_grid.png", grid_rows, ec.grid_columns)
    table = format_table(rows)
    teacher_row = rows["teacher AR (flow map)"]
    ratios = {
        name: {
            "fid_ratio": r["fid"] / teacher_row["fid"],
            "class_acc_gap": None if r["class_acc"] is None else teacher_row["class_acc"] - r["class_acc"],
            "speedup_batch1": r.get("speedup_batch1"),
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
