"""``distilled-decoding`` command line (also ``python -m distilled_decoding``).

    distilled-decoding distill [--config cfg.yaml] [section.field=value ...]   # the end-to-end job
    distilled-decoding evaluate --output-dir runs/digits                       # re-run the evaluation stage
    distilled-decoding bench [--what sampler,trajectories,pipeline,par] [--gpt-b] [--out bench.json]

(Never ``dd``: that name belongs to the coreutils tool.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _distill(args: argparse.Namespace) -> int:
    from distilled_decoding.recipe import load_recipe_config, run

    run(load_recipe_config(args.config, args.overrides))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from distilled_decoding.recipe import load_recipe_config, run

    overrides = [*args.overrides, "stages=[evaluate]"]
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.num_images:
        overrides.append(f"evaluate.num_images={args.num_images}")
    run(load_recipe_config(args.config, overrides))
    return 0


def _gpt_b_shape(vq_too: bool) -> tuple[Any, Any]:
    """GPT-B-shaped teacher (random weights, a peaked output head like a trained model) and a VQ-16 tokenizer."""
    import torch

    from distilled_decoding import LlamaGen, VQTokenizer

    torch.manual_seed(0)
    gpt = LlamaGen.from_preset("GPT-B", block_size=256).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(0.0, 0.1)  # logits std ≈ 3: entropy ≈ 5 nats, as a trained model's
    vq = VQTokenizer.from_preset("VQ-16").eval() if vq_too else None
    return gpt, vq


def _bench(args: argparse.Namespace) -> int:
    import torch

    from distilled_decoding import bench
    from distilled_decoding.recipe import TeacherConfig

    what = {w.strip() for w in args.what.split(",") if w.strip()}
    unknown = what - {"sampler", "trajectories", "pipeline", "par"}
    if unknown:
        raise SystemExit(f"--what: unknown {sorted(unknown)}; expected sampler, trajectories, pipeline, par")
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"env": bench.environment()}
    default_gpt, default_vq = TeacherConfig().load()
    sampling = {"cfg_scale": 2.0}
    if "sampler" in what:
        out["sampler_default"] = bench.bench_sampler(default_gpt, (1, 16), official_repo=args.official_llamagen)
        _show("sampler (embedded default)", out["sampler_default"])
    if "trajectories" in what:
        out["trajectories_default"] = bench.bench_trajectories(default_gpt, default_vq.codebook, (1, 16),
                                                               sampling=sampling)  # fmt: skip
        _show("trajectories (embedded default)", out["trajectories_default"])
    if "par" in what:
        par_cfg = TeacherConfig(kind="par")
        if Path(par_cfg.model).exists():
            par, _ = par_cfg.load()
            vq = default_vq

            def decode(v: torch.Tensor) -> torch.Tensor:
                return vq.decode_vectors(v).float().clamp(-1, 1).add(1).div(2)

            teachers = {"LlamaGen raster": default_gpt, f"PAR-{par.ar_token_num}x (converted)": par}
            out["par_vs_raster"] = bench.bench_teachers(teachers, vq.codebook.detach(), decode,
                                                        tuple(args.batch_sizes), sampling=sampling)  # fmt: skip
            _show("PAR vs raster teacher (images/s with decode; trajectory pairs/s)", out["par_vs_raster"])
        else:
            print(f"--what par: {par_cfg.model} does not exist (python recipes/train_par_teacher.py makes it)")
    if args.gpt_b and what & {"sampler", "trajectories"}:
        gpt, vq = _gpt_b_shape(vq_too=True)
        if "sampler" in what:
            out["sampler_gpt_b"] = bench.bench_sampler(gpt, (1, 16), repeat=2, official_repo=args.official_llamagen,
                                                       include_full_recompute=not args.skip_full_recompute)  # fmt: skip
            _show("sampler (GPT-B shape)", out["sampler_gpt_b"])
        if "trajectories" in what:
            gpt_b_sampling = {"cfg_scale": 2.0, "top_k": 8000}  # the DD paper's LlamaGen setting
            out["trajectories_gpt_b"] = bench.bench_trajectories(gpt, vq.codebook, (1, 16), repeat=2,
                                                                 sampling=gpt_b_sampling)  # fmt: skip
            _show("trajectories (GPT-B shape)", out["trajectories_gpt_b"])
    if "pipeline" in what:
        from distilled_decoding.pipeline import DistilledDecodingPipeline

        pdir = Path(args.pipeline)
        if not (pdir / "model_index.json").is_file():
            raise SystemExit(
                f"--pipeline: {pdir} holds no pipeline; run `accelerate launch recipes/distill_llamagen.py`"
            )
        pipe = DistilledDecodingPipeline.from_pretrained(pdir)
        pipe.set_progress_bar_config(disable=True)
        teacher, _ = TeacherConfig(kind=type(pipe.student).family).load()  # the family's embedded teacher
        out["pipeline_default"] = bench.bench_pipeline(pipe, teacher, tuple(args.batch_sizes))
        _show("pipeline (embedded default)", out["pipeline_default"])
        if args.gpt_b:
            from distilled_decoding.students.llamagen import DDStudent

            gpt, vq = _gpt_b_shape(vq_too=True)
            student = DDStudent.from_teacher(gpt, vq.codebook, init_input="random").eval()
            gpt_pipe = DistilledDecodingPipeline(student=student, tokenizer=vq, info={"teacher_sampling": sampling})
            gpt_pipe.set_progress_bar_config(disable=True)
            out["pipeline_gpt_b"] = bench.bench_pipeline(gpt_pipe, gpt, tuple(args.gpt_b_batch_sizes), repeat=2)
            _show("pipeline (GPT-B shape, VQ-16 decode)", out["pipeline_gpt_b"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


def _show(title: str, result: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for batch, row in result["results"].items():
        flat = []
        for k, v in row.items():
            if isinstance(v, dict):
                keys = (
                    "steps",
                    "tokens_per_s",
                    "images_per_s",
                    "pairs_per_s",
                    "peak_mib",
                    "speedup_vs_teacher",
                    "images_per_s_vs_first",
                    "pairs_per_s_vs_first",
                )
                flat.append(f"{k}: " + ", ".join(f"{kk} {v[kk]:.4g}" for kk in keys if kk in v))
            else:
                flat.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        print(f"  {batch}:\n    " + "\n    ".join(flat))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distilled-decoding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="run the end-to-end distillation job (recipes/distill_llamagen.py)")
    d.add_argument("--config", default=None)
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=_distill)
    e = sub.add_parser("evaluate", help="evaluate a distilled pipeline against its teacher (table + grid)")
    e.add_argument("--config", default=None)
    e.add_argument("--output-dir", default=None, help="the job folder holding pipeline/ and trajectories/")
    e.add_argument("--num-images", type=int, default=None)
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_evaluate)
    b = sub.add_parser("bench", help="speed and memory benchmarks (JSON)")
    b.add_argument(
        "--what",
        default="sampler,trajectories,pipeline,par",
        help="par: the converted PAR-4x digits teacher vs the raster one, --batch-sizes",
    )
    b.add_argument(
        "--pipeline",
        default="runs/digits/pipeline",
        help="a distilled pipeline folder of an embedded teacher (default job; runs/digits_par/pipeline: PAR)",
    )
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    b.add_argument("--gpt-b", action="store_true", help="also at GPT-B shape with random weights")
    b.add_argument("--gpt-b-batch-sizes", type=int, nargs="+", default=[1, 16])
    b.add_argument("--official-llamagen", default=None, help="path to a LlamaGen checkout to time its generate()")
    b.add_argument("--skip-full-recompute", action="store_true")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--out", default=None, help="write the results as JSON here")
    b.set_defaults(fn=_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
