"""Issue 13: DD2 vs DD1 on the embedded LlamaGen digits default — one table, same teacher, noise and seeds → JSON + md.

    python benchmarks/dd2_digits.py                      # runs the missing jobs, then collects the table
    python benchmarks/dd2_digits.py --collect-only       # the table from finished job folders

Jobs (each the recipe, resumable, skipped when its evaluation exists; all on the DD2 job's 8,000 trajectory pairs,
which are the main job's exactly; the evaluation seeds are the recipe's: 1,000 images, classes ``arange % 10``, one
noise tensor for every row):

* ``--dd1`` (default ``runs/digits``): ``recipes/configs/digits_llamagen.yaml`` — the README's main job (DD1);
* ``--dd2`` (default ``runs/digits_dd2``): ``recipes/configs/digits_dd2.yaml`` — GTS, then the regression warm start
  and CSD with the regression loss;
* ``--nogts`` (default ``runs/digits_dd2_nogts``): the same with ``dd2.init=teacher dd2.gts.head_base=none`` — the
  ablation without GTS initialisation, as DD2's: the teacher made an AR-diffusion model with a fresh MLP head, untuned
  (``--nogts-overrides``: by default the warm start and 100 CSD iterations);
* ``--pure`` (default ``runs/digits_dd2_pure``): the DD2 job without the regression settings — DD2 as published
  (GTS + 300 CSD iterations; ``--pure-overrides``).

Rows: the teacher (flow map and multinomial), DD1 1-/2-step and refined, the GTS model (10-step Euler per token),
DD2 1-step and its two teacher-refined settings, the ablations' 1-step rows; each with FID / teacher FID, class
accuracy and the training wall time of the method (DD1: the student's training; DD2: GTS + CSD).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _job(config: Path, out: Path, overrides: list[str]) -> None:
    from distilled_decoding.recipe import load_recipe_config, run

    if (out / "evaluation.json").is_file():
        return
    run(load_recipe_config(config, [f"output_dir={out}", *overrides]))


def _train_seconds(job: Path, method: str) -> float | None:
    """Wall seconds of the method's training in a job folder (DD1: the student; DD2: GTS + CSD; GTS: GTS)."""
    parts = {"dd1": ["student"], "dd2": ["student/gts", "student/csd"], "gts": ["student/gts"]}[method]
    total = 0.0
    for part in parts:
        path = job / part / "train_summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        total += float(s.get("seconds_total", s.get("seconds", 0.0)))
    return round(total, 1) if total else None


def collect(dd1: Path, dd2: Path, nogts: Path, pure: Path) -> dict[str, Any]:
    """The table: rows {name: metrics + fid_ratio + train_s}, the teacher rows from the DD1 job."""
    rows: dict[str, Any] = {}

    def take(job: Path, method: str, names: list[str], rename: dict[str, str] | None = None) -> None:
        path = job / "evaluation.json"
        if not path.is_file():
            return
        found = json.loads(path.read_text())["rows"]
        for name in names:
            if name in found:
                rows[(rename or {}).get(name, name)] = {**found[name], "train_s": _train_seconds(job, method)
                                                        if "teacher" not in name else None}  # fmt: skip

    take(dd1, "dd1", ["teacher AR (multinomial)", "teacher AR (flow map)", "DD 1-step", "DD 2-step"])
    take(dd1, "dd1", [n for n in _names(dd1) if n.startswith("DD refined")])
    take(dd2, "gts", [n for n in _names(dd2) if n.startswith("GTS model")])
    take(dd2, "dd2", [n for n in _names(dd2) if n.startswith("DD2")])
    take(nogts, "dd2", ["DD2 1-step"], {"DD2 1-step": "ablation: DD2 1-step without GTS initialisation"})
    take(pure, "dd2", ["DD2 1-step"], {"DD2 1-step": "ablation: DD2 1-step without the regression loss (as published)"})
    teacher = rows.get("teacher AR (flow map)")
    for r in rows.values():
        if teacher:
            r["fid_ratio"] = r["fid"] / teacher["fid"]
            r["class_acc_gap"] = teacher["class_acc"] - r["class_acc"]
    return rows


def _names(job: Path) -> list[str]:
    path = job / "evaluation.json"
    return list(json.loads(path.read_text())["rows"]) if path.is_file() else []


def markdown(rows: dict[str, Any]) -> str:
    cols = ("FID", "FID / teacher", "IS", "precision", "recall", "class acc", "steps", "train wall (min)")
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        train = "—" if r.get("train_s") is None else f"{r['train_s'] / 60:.1f}"
        vals = [f"{r['fid']:.3f}", f"{r.get('fid_ratio', float('nan')):.2f}x", f"{r['is']:.2f}",
                f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['class_acc']:.3f}", str(r["steps"]),
                train]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dd1", default="runs/digits")
    p.add_argument("--dd2", default="runs/digits_dd2")
    p.add_argument("--nogts", default="runs/digits_dd2_nogts")
    p.add_argument("--pure", default="runs/digits_dd2_pure")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dd2_digits.json"))
    p.add_argument(
        "--nogts-overrides",
        nargs="*",
        default=["dd2.csd.max_iters=700"],
        help="more overrides of the no-GTS ablation job (default: the warm start and 100 CSD iterations)",
    )
    p.add_argument(
        "--pure-overrides",
        nargs="*",
        default=["dd2.csd.regression_iters=0", "dd2.csd.regression_weight=0", "dd2.csd.max_iters=300"],
        help="overrides of the job without the regression settings (default: 300 CSD iterations, as published)",
    )
    p.add_argument("overrides", nargs="*", help="section.field=value for the DD2 jobs (e.g. dd2.csd.max_iters=100)")
    args = p.parse_args()
    dd1, dd2, nogts, pure = Path(args.dd1), Path(args.dd2), Path(args.nogts), Path(args.pure)
    if not args.collect_only:
        from distilled_decoding.distributed import configure_threads

        configure_threads()
        pairs = f"distill.trajectories={dd2 / 'trajectories'}"  # the same 8,000 pairs for every job
        _job(CONFIGS / "digits_dd2.yaml", dd2, list(args.overrides))
        ablation = ["dd2.init=teacher", "dd2.gts.head_base=none", pairs, "stages=[train,save,evaluate]"]
        _job(CONFIGS / "digits_dd2.yaml", nogts, [*ablation, *args.overrides, *args.nogts_overrides])
        _job(CONFIGS / "digits_dd2.yaml", pure, [pairs, "stages=[train,save,evaluate]", *args.overrides,
                                                 *args.pure_overrides])  # fmt: skip
        _job(CONFIGS / "digits_llamagen.yaml", dd1, [pairs, "stages=[train,save,evaluate]"])
    rows = collect(dd1, dd2, nogts, pure)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    jobs = {"dd1": str(dd1), "dd2": str(dd2), "nogts": str(nogts), "pure": str(pure)}
    Path(args.out).write_text(json.dumps({"jobs": jobs, "overrides": args.overrides, "rows": rows}, indent=2))
    md = markdown(rows)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
