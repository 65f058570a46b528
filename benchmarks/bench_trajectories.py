"""Issue 3: trajectory pairs/s, the flow map's share of the step time, flow-map vs multinomial decoding ratio.

    python benchmarks/bench_trajectories.py --out benchmarks/results/trajectories.json

Configs: GPT-B shape (random weights, cfg 2.0, top-k 8000 as in the DD paper) and the embedded default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distilled_decoding import VQTokenizer, bench
from distilled_decoding.recipe import TeacherConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/trajectories.json")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    tiny, tiny_vq = TeacherConfig().load()
    gpt_b, vq16 = bench.random_llamagen("GPT-B"), VQTokenizer.from_preset("VQ-16").eval()
    out = {
        "embedded_default": bench.bench_trajectories(tiny, tiny_vq.codebook, tuple(args.batch_sizes),
                                                     sampling={"cfg_scale": 2.0}, repeat=args.repeat),
        "gpt_b": bench.bench_trajectories(gpt_b, vq16.codebook, tuple(args.batch_sizes),
                                          sampling={"cfg_scale": 2.0, "top_k": 8000}, repeat=max(1, args.repeat - 1)),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v["results"] for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
