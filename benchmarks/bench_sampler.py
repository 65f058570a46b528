"""Issue 2: tokens/s of the KV-cache sampling loop vs a plain full-recompute loop (and the official generate()).

    python benchmarks/bench_sampler.py --out benchmarks/results/sampler.json [--official-llamagen /path/LlamaGen]

Configs: GPT-B shape (random weights) at batch 1 and 16, and the embedded default (tiny). CFG 2.0 throughout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distilled_decoding import bench
from distilled_decoding.recipe import TeacherConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/sampler.json")
    p.add_argument("--official-llamagen", default=None, help="LlamaGen checkout: also time its generate()")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    tiny, _ = TeacherConfig().load()
    gpt_b = bench.random_llamagen("GPT-B")
    out = {
        "embedded_default": bench.bench_sampler(tiny, tuple(args.batch_sizes), repeat=args.repeat,
                                                official_repo=args.official_llamagen),
    }  # fmt: skip
    # GPT-B: the quadratic full-recompute loop only at the smallest batch (at batch 16 it takes many minutes on CPU)
    for i, b in enumerate(sorted(args.batch_sizes)):
        r = bench.bench_sampler(gpt_b, (b,), repeat=max(1, args.repeat - 1), official_repo=args.official_llamagen,
                                include_full_recompute=i == 0)  # fmt: skip
        if "gpt_b" not in out:
            out["gpt_b"] = r
        else:
            out["gpt_b"]["results"].update(r["results"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v["results"] for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
