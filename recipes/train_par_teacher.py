"""Turn a pretrained LlamaGen teacher into a PAR-k× teacher (k tokens per decoding step), on its own samples.

PAR (Wang et al., CVPR 2025) trains from scratch; here a raster LlamaGen is converted instead
(:mod:`distilled_decoding.par_training`): ``PAR.from_llamagen`` copies every weight (the k−1 transition embeddings
are the only new parameters) and the model is fine-tuned with cross-entropy, teacher forcing in PAR's region order,
on token sequences sampled from the raster teacher itself — no image data. Class-label dropout stays on, so
classifier-free guidance works as before. Stages (each resumable; a finished one is skipped when run again):

1. ``samples`` — ``--num-samples`` sequences from the raster teacher through the trajectory builder (flow map,
   ``store_noise=False``: only tokens are kept) with ``--sample-cfg`` (default 1: its conditional distribution;
   the PAR is then sampled with the teacher's usual guidance, ``--eval-cfg``) into ``<work>/samples``;
2. ``finetune`` — Accelerate, deterministic data order, checkpoints in ``<work>/finetune``; a killed run resumes to
   the same weights as an uninterrupted one;
3. ``save`` — ``<out>`` (``save_pretrained``: config.json + safetensors) and ``<out>/training.json``, the record of
   how it was made;
4. ``evaluate`` — raster teacher vs PAR through the flow map on the same noise and classes (``--eval-images``,
   FID / IS / precision / recall / class accuracy with the digits tools), images/s and trajectory pairs/s at each of
   ``--bench-batches`` (1 and 64) side by side in one run; the numbers go into ``<out>/training.json``.

Defaults: the embedded digits teacher (``checkpoints/digits_llamagen``, 8×8 tokens: PAR-4× decodes 4 anchors +
15 groups = 19 steps instead of 64) and the settings that made the shipped ``checkpoints/digits_par`` (its
``training.json`` holds the record): 20,000 unguided samples (11 min), 1,000 steps of batch 64, AdamW lr 3e-4
(warmup 50, cosine to 0), weight decay 0.05, no dropout but the class label's, EMA 0.995 (37 min); one torch thread
on a shared 2-core CPU. Measured (1,000 images, CFG 2, flow map, digits feature network): FID 1.090 vs the raster
teacher's 1.314 (0.83×; class accuracy 0.973 vs 0.991), images/s at batch 1 2.9× the raster teacher's. The
LlamaGen's own dropout (0.1, ``--dropout -1``) fits far slower: FID 1.63 after 500 steps. Oversubscribed threads
slow these small matrices down ten-fold: pass ``--threads 1`` when the machine is shared::

    python recipes/train_par_teacher.py --threads 1            # → checkpoints/digits_par
    python recipes/train_par_teacher.py --gpt c2i_B_256.pt --tokenizer vq_ds16_c2i.pt --out par_b_4x \\
        --ar-token-num 4 --num-samples 1000000 --sample-batch 256 --stages samples finetune save

A k whose root does not divide the token grid (e.g. ``--ar-token-num 9`` on 8×8) is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

STAGES = ("samples", "finetune", "save", "evaluate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", default=None, help="LlamaGen: official file or save_pretrained folder (default: embedded)")
    p.add_argument("--tokenizer", default=None, help="VQ tokenizer file or folder (default: embedded)")
    p.add_argument("--preset", default=None, help="GPT-B, GPT-L, ... (inferred when omitted)")
    p.add_argument("--ar-token-num", type=int, default=4, help="k: tokens per parallel step (a perfect square)")
    p.add_argument("--out", default="checkpoints/digits_par", help="where the converted PAR is saved")
    p.add_argument("--work", default="runs/par_teacher", help="samples and training checkpoints")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    # samples
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--sample-cfg", type=float, default=1.0, help="guidance of the raster teacher's samples")
    p.add_argument("--seed", type=int, default=0)
    # fine-tuning
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--dropout", type=float, default=0.0, help="token/residual/FFN dropout (-1: the LlamaGen's)")
    p.add_argument("--save-every", type=int, default=250)
    # evaluation
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--eval-cfg", type=float, default=2.0, help="guidance of both teachers in the comparison")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--bench-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--bench-repeat", type=int, default=3, help="timed rounds per batch size (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate(gpt: Any, par: Any, vq: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The raster teacher and the PAR through the flow map on the same noise and classes: the metrics table and
    images/s at each of ``--bench-batches`` (side by side, one run)."""
    from distilled_decoding.bench import bench_teachers
    from distilled_decoding.digits import load_digits_images
    from distilled_decoding.evaluation import format_table, measure_samplers
    from distilled_decoding.samplers import Reordered, TeacherSampler

    codebook = vq.codebook.detach()
    sampling = {"cfg_scale": args.eval_cfg}
    names = {"LlamaGen raster teacher": gpt, f"PAR-{par.ar_token_num}× (converted)": par}
    samplers = [Reordered(TeacherSampler(t, codebook, sampling, label=n), t.token_order) for n, t in names.items()]

    def decode(vectors: torch.Tensor) -> torch.Tensor:
        return vq.decode_vectors(vectors).float().clamp(-1, 1).add(1).div(2)

    n_img, n_tok = args.eval_images, gpt.seq_len
    noise = torch.randn(n_img, n_tok, codebook.shape[1], generator=torch.Generator().manual_seed(args.eval_seed))
    labels = torch.arange(n_img) % gpt.num_classes
    size = decode(codebook[torch.zeros(1, n_tok, dtype=torch.long)]).shape[-1]
    reference = load_digits_images(size=size)[0]
    rows, _ = measure_samplers(samplers, decode, noise, labels, reference, batch_size=args.eval_batch,
                               progress=not args.no_progress)  # fmt: skip
    speed = bench_teachers(
        names, codebook, decode, tuple(args.bench_batches), sampling=sampling, repeat=args.bench_repeat
    )
    first = next(iter(rows))
    for name, r in rows.items():
        r["fid_ratio"] = r["fid"] / rows[first]["fid"]
        for b, brow in speed["results"].items():
            r[f"images_per_s_{b}"] = brow[name]["images_per_s"]
            r[f"speedup_{b}"] = brow[name]["images_per_s_vs_first"]
    print(format_table({n: {**r, "speedup": r[f"speedup_batch_{args.bench_batches[0]}"]} for n, r in rows.items()}))
    return {"rows": rows, "speed": speed, "settings": {"num_images": n_img, "batch_size": args.eval_batch,
            "seed": args.eval_seed, "sampling": sampling, "reference": f"digits ({len(reference)} images)",
            "feature_extractor": "digits-cnn"}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from distilled_decoding.par_training import PARFinetuneConfig, finetune_par
    from distilled_decoding.recipe import TeacherConfig
    from distilled_decoding.teachers.par import PAR, region_order
    from distilled_decoding.trajectories import build_trajectories

    gpt, vq = TeacherConfig(kind="llamagen", model=args.gpt, tokenizer=args.tokenizer, preset=args.preset).load()
    region_order(gpt.args.grid_size, args.ar_token_num)  # refuse a k that does not tile the grid before any work
    work, out = Path(args.work), Path(args.out)
    record: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "samples" in args.stages:
        timing = work / "samples_timing.json"  # the build's wall time, kept for the record of a resumed run
        done = (work / "samples" / "manifest.json").is_file() and timing.is_file()
        build_trajectories(gpt, work / "samples", num_samples=args.num_samples, batch_size=args.sample_batch,
                           seed=args.seed, cfg_scale=args.sample_cfg, codebook=vq.codebook, shard_size=5000,
                           store_noise=False, progress=not args.no_progress)  # fmt: skip
        if not done:
            seconds = round(time.perf_counter() - t0, 1)
            timing.write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))
        record["samples_timing"] = json.loads(timing.read_text())
    cfg = PARFinetuneConfig(samples=str(work / "samples"), output_dir=str(work / "finetune"),
                            ar_token_num=args.ar_token_num, batch_size=args.batch_size, max_steps=args.steps,
                            lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                            ema_decay=args.ema_decay, dropout=None if args.dropout < 0 else args.dropout,
                            seed=args.seed, save_every=args.save_every, progress=not args.no_progress)  # fmt: skip
    par = None
    if "finetune" in args.stages:
        t1 = time.perf_counter()
        par, summary = finetune_par(cfg, gpt, vq.codebook)
        record["finetune"] = {**summary, "seconds": round(time.perf_counter() - t1, 1)}
    if "save" in args.stages:
        if par is None:
            raise ValueError("--stages: save needs finetune in the same run (it writes the fine-tuned weights)")
        par.save_pretrained(out)
        manifest = json.loads((work / "samples" / "manifest.json").read_text())
        info = {
            "what": f"PAR-{args.ar_token_num}x converted from a LlamaGen teacher and fine-tuned on its own samples "
            "(recipes/train_par_teacher.py)",
            "source_teacher": {"path": str(args.gpt or "checkpoints/digits_llamagen/gpt"), **manifest["teacher"]},
            "samples": {"num_samples": args.num_samples, "sampling": manifest["settings"]["sampling"],
                        "flow": manifest["settings"]["flow"], "seed": args.seed},
            "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), **record,
        }  # fmt: skip
        (out / "training.json").write_text(json.dumps(info, indent=2, default=str))
    if "evaluate" in args.stages:
        par = par if par is not None else PAR.from_pretrained(out)
        report = evaluate(gpt, par.eval(), vq, args)
        path = out / "training.json"
        if path.is_file():
            info = json.loads(path.read_text())
            path.write_text(json.dumps({**info, "evaluation": report}, indent=2, default=str))
        record["evaluation"] = report
    return record


if __name__ == "__main__":
    main()
