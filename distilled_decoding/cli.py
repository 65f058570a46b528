"""``distilled-decoding`` command line (also ``python -m distilled_decoding``).

    distilled-decoding distill [--config cfg.yaml] [section.field=value ...]   # the end-to-end job
    distilled-decoding evaluate --output-dir runs/digits                       # re-run the evaluation stage
    distilled-decoding bench [--what sampler,trajectories,pipeline,par] [--gpt-b] [--out bench.json]
    distilled-decoding bench --suite gpu --out gpu.json [--official-llamagen /path] [--compile]   # one GPU
    distilled-decoding bench --quick --out quick.json                                            # CPU smoke test

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
    """Evaluate a finished job. Without ``--config`` the job's own ``config.json`` is the base (its teacher and
    sampling settings); nothing but the evaluation outputs and the pipeline's metrics is written."""
    from distilled_decoding.configs import ConfigError
    from distilled_decoding.recipe import load_recipe_config, run

    config = args.config
    overrides = [*args.overrides, "stages=[evaluate]"]
    if args.output_dir:
        out = Path(args.output_dir)
        if not out.is_dir():
            raise ConfigError(f"--output-dir: {out} is not a folder (expected a job folder with pipeline/ and "
                              "trajectories/)")  # fmt: skip
        if config is None and (out / "config.json").is_file():
            config = out / "config.json"
        overrides.append(f"output_dir={json.dumps(str(out))}")
    if args.num_images is not None:
        if args.num_images < 1:
            raise ConfigError(f"--num-images={args.num_images}: expected an int >= 1")
        overrides.append(f"evaluate.num_images={args.num_images}")
    run(load_recipe_config(config, overrides))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from distilled_decoding import VQTokenizer, bench
    from distilled_decoding.configs import ConfigError
    from distilled_decoding.recipe import TeacherConfig

    if args.suite or args.quick:
        from distilled_decoding.bench_suite import run_suite

        result = run_suite("quick" if args.quick else args.suite, official_repo=args.official_llamagen,
                           dtype=args.dtype, compile_student=args.compile)  # fmt: skip
        print(json.dumps(result["summary"], indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
            print(f"wrote {args.out}")
        return 0
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    unknown = what - {"sampler", "trajectories", "pipeline", "par"}
    if unknown or not what:
        raise ConfigError(f"--what: unknown {sorted(unknown)}; expected some of sampler, trajectories, pipeline, par")
    for name in ("batch_sizes", "gpt_b_batch_sizes"):
        if any(b < 1 for b in getattr(args, name)):
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected ints >= 1")
    if args.threads < 0:
        raise ConfigError(f"--threads={args.threads}: expected an int >= 0 (0: torch's default)")
    pdir = Path(args.pipeline)
    if "pipeline" in what and not (pdir / "model_index.json").is_file():
        raise ConfigError(f"--pipeline: {pdir} holds no pipeline; run `accelerate launch recipes/distill_llamagen.py`")
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
        gpt, vq = bench.random_llamagen("GPT-B"), VQTokenizer.from_preset("VQ-16").eval()
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

        pipe = DistilledDecodingPipeline.from_pretrained(pdir)
        pipe.set_progress_bar_config(disable=True)
        teacher, _ = TeacherConfig(kind=type(pipe.student).family).load()  # the family's embedded teacher
        out["pipeline_default"] = bench.bench_pipeline(pipe, teacher, tuple(args.batch_sizes))
        _show("pipeline (embedded default)", out["pipeline_default"])
        if args.gpt_b:
            from distilled_decoding.students.llamagen import DDStudent

            gpt, vq = bench.random_llamagen("GPT-B"), VQTokenizer.from_preset("VQ-16").eval()
            student = DDStudent.from_teacher(gpt, vq.codebook, init_input="random").eval()
            gpt_pipe = DistilledDecodingPipeline(student=student, tokenizer=vq, info={"teacher_sampling": sampling})
            gpt_pipe.set_progress_bar_config(disable=True)
            out["pipeline_gpt_b"] = bench.bench_pipeline(gpt_pipe, gpt, tuple(args.gpt_b_batch_sizes), repeat=2)
            _show("pipeline (GPT-B shape, VQ-16 decode)", out["pipeline_gpt_b"])
    if args.out:
        from distilled_decoding.fileio import atomic_write_json

        atomic_write_json(args.out, out)
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
        "--suite",
        choices=["gpu"],
        default=None,
        help="the one-command suite at real shapes (random weights) on the default device",
    )
    b.add_argument("--quick", action="store_true", help="the suite with the embedded defaults (a CPU smoke test)")
    b.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="suite: autocast dtype (default bfloat16 on CUDA, float32 on CPU)",
    )
    b.add_argument("--compile", action="store_true", help="suite: also DD 1-step with the student under torch.compile")
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
    from distilled_decoding.configs import command_line_errors

    with command_line_errors(p.prog):
        return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
