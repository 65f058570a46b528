"""Compare the student's losses on the embedded default (same trajectories, same schedule) → JSON + markdown.

Variants (``distill.loss``):

* ``ce`` — cross-entropy on tokens only, every position read from the logits head (split = N; the default);
* ``ce+mse`` — the official mixing: cross-entropy, plus codebook-space MSE of the continuous head, which serves the
  positions ≥ split = t₂;
* ``ce+image`` — cross-entropy, plus pixel MSE through the frozen VQ decoder on the continuous-head positions.

Each variant trains, saves and evaluates with the recipe (``recipes/distill_llamagen.py`` settings) on the
trajectories of a finished main job, in ``<root>/<variant>``; a variant whose folder already holds an
``evaluation.json`` is not run again, so variants can run in parallel processes and be collected afterwards::

    accelerate launch recipes/distill_llamagen.py                        # the main job (loss ce)
    python benchmarks/loss_comparison.py --variants ce+mse &             # one process per variant
    python benchmarks/loss_comparison.py --variants ce+image
    python benchmarks/loss_comparison.py --reuse ce=runs/digits          # collect: table of every variant
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from distilled_decoding.recipe import load_recipe_config, run

VARIANTS = ("ce", "ce+mse", "ce+image")
ROWS = ("teacher AR (flow map)", "DD 1-step", "DD 2-step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/loss_comparison")
    p.add_argument("--job", default="runs/digits", help="a finished main job: its trajectories are reused")
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS, help="variants to train here")
    p.add_argument("--reuse", nargs="*", default=[], help="variant=job_dir: take that job's evaluation as is")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/loss_comparison.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    trajectories = Path(args.job) / "trajectories"
    if not (trajectories / "manifest.json").is_file():
        raise SystemExit(f"--job {args.job}: no trajectories in {trajectories}; run the main job first")
    for item in args.reuse:
        name, job = item.split("=", 1)
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(job) / "evaluation.json", root / name / "evaluation.json")
    for name in args.variants:
        if (root / name / "evaluation.json").is_file():
            continue
        overrides = [f"output_dir={root / name}", "stages=[train,save,evaluate]", f"distill.loss={name}",
                     f"distill.trajectories={trajectories}", "evaluate.skip=[]"]  # fmt: skip
        # the trajectory folder is the job's; the recipe reads it from output_dir/trajectories
        (root / name).mkdir(parents=True, exist_ok=True)
        link = root / name / "trajectories"
        if not link.exists():
            link.symlink_to(trajectories.resolve(), target_is_directory=True)
        run(load_recipe_config(None, overrides))

    table: dict[str, dict] = {}
    for name in VARIANTS:
        f = root / name / "evaluation.json"
        if f.is_file():
            rows = json.loads(f.read_text())["rows"]
            table[name] = {r: rows[r] for r in ROWS if r in rows}
    lines = ["| loss | sampler | FID | IS | precision | recall | class acc |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, rows in table.items():
        for r, m in rows.items():
            lines.append(f"| {name} | {r} | {m['fid']:.3f} | {m['is']:.2f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['class_acc']:.3f} |")  # fmt: skip
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
