"""Issue 11: the flow map's cost as a share of a GPT-B KV-cached CFG step, and its accuracy → JSON.

    python benchmarks/flow_speed.py --out benchmarks/results/flow_speed.json          # ~10 min on 2 cores
    python benchmarks/flow_speed.py --quick --out /tmp/flow_speed.json                 # smoke run (~1 min)

Timing (all in one process, the variants interleaved round by round, medians): one GPT-B decode step with CFG
(``LlamaGen.from_preset("GPT-B")``, random weights, 2B rows, KV cache at position 128) against one call of
:func:`distilled_decoding.flow.noise_to_tokens` for the B positions of that step, with a random l2-normalised
VQ-16 codebook (16,384 × 8) and default settings, for two kinds of logits: ``top-k 8000`` (randn·3, then top-k
8000, as a GPT-B-shaped teacher's CFG-2 logits after the DD paper's top-k) and ``peaked`` (randn·4 over all 16,384
codes). Both wall time and the process's CPU time are reported; the CPU-time share is the robust one on a shared
machine. ``share`` = flow map / GPT-B step (goal ≤ 5 %). The map runs its compiled CPU kernel
(:mod:`distilled_decoding.flow_native`); the ``(torch kernels)`` rows are the same map, same bits, on the torch
kernels (what runs on a GPU, or without a C compiler).

Accuracy: on the settings of ``benchmarks/flow_solvers.py`` (LlamaGen VQ-16 flat top-8000, peaked ×4, peaked ×3
top-900; VAR flat top-900), the fraction of noises whose default-setting token differs from a 256-step reference
(dpm3m, t_min 0.005), and from the float64 reference implementation with the same settings
(:mod:`distilled_decoding.flow_reference`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distilled_decoding import flow, flow_native, flow_reference
from distilled_decoding.teachers.llamagen import LlamaGen

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_solvers  # noqa: E402  (the study's settings)


def _logits(kind: str, batch: int, g: torch.Generator) -> torch.Tensor:
    lg = torch.randn(batch, 16384, generator=g)
    if kind == "top-k 8000":
        lg = lg * 3.0
        kth = lg.topk(8000, dim=-1).values[:, -1:]
        return lg.masked_fill(lg < kth, float("-inf"))
    return lg * 4.0


def _torch_kernels(noise: torch.Tensor, logits: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    with flow_native.torch_kernels():
        return flow.noise_to_tokens(noise, logits, codebook)


def timing(batches: list[int], rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LlamaGen.from_preset("GPT-B", block_size=256).eval()
    g = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(16384, 8, generator=g), dim=-1)
    out: dict[str, Any] = {}
    for b in batches:
        with torch.inference_mode():
            cache, _ = model.begin(torch.zeros(2 * b, dtype=torch.long))
        tok = torch.zeros(2 * b, 1, dtype=torch.long)

        def step(cache: Any = cache, tok: torch.Tensor = tok) -> None:
            with torch.inference_mode():
                cache.pos = 128
                model.advance(cache, tok)

        fns = {"GPT-B step": step}
        for kind in ("top-k 8000", "peaked"):
            lg, noise = _logits(kind, b, g), torch.randn(b, 8, generator=g)
            fns[kind] = lambda lg=lg, noise=noise: flow.noise_to_tokens(noise, lg, codebook)
            fns[f"{kind} (torch kernels)"] = lambda lg=lg, noise=noise: _torch_kernels(noise, lg, codebook)
        wall: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():  # warm-up
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
        row: dict[str, Any] = {}
        for k in fns:
            row[k] = {"wall_ms": 1e3 * statistics.median(wall[k]), "cpu_ms": 1e3 * statistics.median(cpu[k])}
        for k in fns:
            if k == "GPT-B step":
                continue
            for unit in ("wall", "cpu"):
                row[k][f"share_{unit}"] = row[k][f"{unit}_ms"] / row["GPT-B step"][f"{unit}_ms"]
        out[f"batch_{b}"] = row
        print(f"batch {b}:", json.dumps(row), flush=True)
    return out


def accuracy(n: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cases = [("llamagen", k) for k in flow_solvers.P_KINDS["llamagen"]] + [("var", "flat_top900")]
    for setting, kind in cases[:1] if quick else cases:
        codebook = flow_solvers.make_codebook(setting)
        v, d = codebook.shape
        logits = flow_solvers.make_logits(kind, v).expand(n, v)
        noise = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
        ref_cfg = dict(flow_solvers.REF, steps=64 if quick else flow_solvers.REF["steps"])
        t0 = time.perf_counter()
        tokens = flow.noise_to_tokens(noise, logits, codebook)
        seconds = time.perf_counter() - t0
        ref = flow.noise_to_tokens(noise, logits, codebook, **ref_cfg)
        ref64 = flow_reference.noise_to_tokens(noise, logits, codebook)
        out[f"{setting}/{kind}"] = {
            "n": n,
            "mismatch_vs_reference_solution": float((tokens != ref).float().mean()),
            "reference_solution": ref_cfg,
            "mismatch_vs_float64_implementation": float((tokens != ref64).float().mean()),
            "us_per_position": 1e6 * seconds / n,
        }
        print(f"{setting}/{kind}:", json.dumps(out[f"{setting}/{kind}"]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/flow_speed.json")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, few rounds, one accuracy setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-accuracy", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "meta": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": args.threads,
            "flow_defaults": flow.DEFAULTS,
            "compiled_kernel": flow_native.available(),
        },
        "timing": timing([1] if args.quick else [1, 16], 2 if args.quick else args.rounds),
        "accuracy": accuracy(300 if args.quick else args.n_accuracy, args.quick),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
