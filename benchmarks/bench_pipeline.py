"""Issue 5: latency (batch 1), throughput (batch 64) and peak memory of teacher AR, DD 1-step, DD 2-step and
teacher-refined sampling, and DD 1-step against its floor (one student forward + decode).

    python benchmarks/bench_pipeline.py --pipeline runs/digits/pipeline --out benchmarks/results/pipeline.json

Configs: the distilled embedded default, and GPT-B shape (random weights, VQ-16 decoder at 256 px).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distilled_decoding import DDStudent, DistilledDecodingPipeline, VQTokenizer, bench
from distilled_decoding.recipe import TeacherConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="runs/digits/pipeline")
    p.add_argument("--out", default="benchmarks/results/pipeline.json")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    # GPT-B shape decodes 256-px images with VQ-16: seconds per image on a 2-core CPU, so batch 1 by default there;
    # on a GPU pass --gpt-b-batch-sizes 1 64
    p.add_argument("--gpt-b-batch-sizes", type=int, nargs="+", default=[1])
    args = p.parse_args()
    tiny, _ = TeacherConfig().load()
    pipe = DistilledDecodingPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    # millisecond timings: many repeats
    out = {"embedded_default": bench.bench_pipeline(pipe, tiny, tuple(args.batch_sizes), repeat=10)}
    gpt_b, vq16 = bench.random_llamagen("GPT-B"), VQTokenizer.from_preset("VQ-16").eval()
    student = DDStudent.from_teacher(gpt_b, vq16.codebook, init_input="random").eval()
    big = DistilledDecodingPipeline(student=student, tokenizer=vq16, info={"teacher_sampling": {"cfg_scale": 2.0}})
    big.set_progress_bar_config(disable=True)
    out["gpt_b"] = bench.bench_pipeline(big, gpt_b, tuple(args.gpt_b_batch_sizes), repeat=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v["results"] for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
