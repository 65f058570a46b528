"""Solver / time-grid study of the categorical flow map (distilled_decoding.flow) → JSON.

    python benchmarks/flow_solvers.py --out benchmarks/results/flow_solvers.json      # full study (CPU: ~1 h)
    python benchmarks/flow_solvers.py --quick --out /tmp/flow_quick.json              # smoke run (< 1 min)

Settings: LlamaGen VQ-16 (V=16384, D=8, l2-normalised random codebook) and VAR (V=4096, D=32, raw random
codebook randn·0.35, RMS norm ≈ 2; VAR's trained codebook rows have norms ~1–3). For each (setting, p-kind,
solver, grid, steps) the script reports, on the same noises:

* ``mismatch``: fraction of noises whose token differs from a many-step reference solution (dpm3m,
  geometric grid, 256 steps, t_min 0.005). It upper-bounds the TV between the solver's and the reference's
  pushforwards (coupling), with no sampling floor.
* ``paired_tv_bound``: ½·sqrt(χ̂²), where χ̂² is an unbiased estimate of Σ_j (q_j − q_ref,j)² / p_j built from the
  per-code net flow of the mismatched noises; TV ≤ ½·sqrt(χ²) (Cauchy–Schwarz). Much sharper than the raw
  histogram TV, whose multinomial floor is ~0.5·Σ_j sqrt(2 p_j / (π n)).
* ``tv_emp`` / ``tv_floor`` / ``tv_excess``: TV of the token histogram vs p, the mean TV of multinomial samples of
  the same size, and the difference.
* ``us_per_position``: throughput time (all noises, chunked); ``ms_step_b1`` / ``ms_step_b16``: latency of one
  call for the positions of one decoding step at batch 1 / 16 images (each position with its own logits);
  ``ratio_b1`` / ``ratio_b16``: those over one GPT-B KV-cached decode step with CFG (batch 2B), timed with
  ``LlamaGen.from_preset("GPT-B")`` (random weights) at position 128.

A large-sample section (``tv_large``) measures the histogram TV and χ² vs p of the default and of the reference
with ``--n-tv`` noises. Timings use ``--threads`` (default 1) torch threads; they are min-of-repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from distilled_decoding import flow

REF = dict(steps=256, solver="dpm3m", grid="geometric", t_min=0.005)
REF_LARGE = dict(steps=96, solver="dpm3m", grid="geometric", t_min=0.01)  # reference for the large samples


# ------------------------------------------------------------------------------------------------------------
# problem setups
# ------------------------------------------------------------------------------------------------------------
def make_codebook(setting: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if setting == "llamagen":
        return torch.nn.functional.normalize(torch.randn(16384, 8, generator=g), dim=-1)
    return torch.randn(4096, 32, generator=g) * 0.35


def top_k_top_p(logits: torch.Tensor, k: int | None = None, p: float | None = None) -> torch.Tensor:
    out = logits.clone()
    if k is not None and k < out.shape[-1]:
        kth = out.topk(k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if p is not None:
        srt, idx = out.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > p  # keep the smallest prefix whose mass reaches p
        out.scatter_(-1, idx, srt.masked_fill(drop, float("-inf")))
    return out


P_KINDS = {
    "llamagen": ["flat_top8000", "peaked_x4", "peaked_x3_top900"],
    "var": ["flat_top900", "peaked_x4", "peaked_x3_top900_p0.95"],
}


def make_logits(kind: str, v: int, rows: int = 1, seed: int = 1) -> torch.Tensor:
    """(rows, V) logits of one kind (each row drawn independently)."""
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("flat_top"):
        k = int(kind[len("flat_top") :])
        out = torch.full((rows, v), float("-inf"))
        for r in range(rows):
            out[r, torch.randperm(v, generator=g)[:k]] = 0.0
        return out
    scale = float(kind.split("_")[1][1:])
    lg = torch.randn(rows, v, generator=g) * scale
    k = int(kind.split("_top")[1].split("_")[0]) if "_top" in kind else None
    p = float(kind.split("_p")[-1]) if "_p0" in kind else None
    return top_k_top_p(lg, k, p)


# ------------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------------
def tv_floor(p: torch.Tensor, n: int, draws: int = 10) -> tuple[float, float]:
    g = torch.Generator().manual_seed(99)
    vals = [
        0.5 * float((torch.multinomial(p, n, True, generator=g).bincount(minlength=p.numel()) / n - p).abs().sum())
        for _ in range(draws)
    ]
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std())


def histogram_stats(tokens: torch.Tensor, p: torch.Tensor, draws: int = 10) -> dict[str, float]:
    n = tokens.numel()
    c = torch.bincount(tokens, minlength=p.numel()).double()
    tv = 0.5 * float((c / n - p).abs().sum())
    fl, fl_sd = tv_floor(p, n, draws)
    sup = p > 0
    pp, cc = p[sup], c[sup]
    chi2 = float(((cc * (cc - 1) / (n * (n - 1)) - 2 * cc * pp / n + pp * pp) / pp).sum())  # unbiased χ²(q‖p)
    return dict(
        n=n,
        tv_emp=tv,
        tv_floor=fl,
        tv_floor_sd=fl_sd,
        tv_excess=tv - fl,
        chi2_est=chi2,
        chi2_sd=math.sqrt(2 * int(sup.sum())) / n,
        chi2_tv_bound=0.5 * math.sqrt(max(chi2, 0.0)),
        zero_prob_hits=int(c[~sup].sum()),
    )


def paired_stats(tokens: torch.Tensor, ref: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    n = tokens.numel()
    mis = tokens != ref
    a = torch.bincount(tokens[mis], minlength=p.numel()).double()
    b = torch.bincount(ref[mis], minlength=p.numel()).double()
    f, s = a - b, a + b
    sup = p > 0
    chi2 = float(((f * f - s)[sup] / (n * (n - 1)) / p[sup]).sum())
    return dict(
        mismatch=float(mis.float().mean()),
        paired_chi2=chi2,
        paired_tv_bound=0.5 * math.sqrt(max(chi2, 0.0)),
        paired_tv_raw=0.5 * float(f.abs().sum()) / n,
    )


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def min_time(fn: Any, repeat: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gpt_b_step_ms(batch_images: list[int], repeat: int) -> dict[str, Any]:
    """One KV-cached GPT-B decode step with CFG (2B rows) at position 128, in ms (min of repeats)."""
    try:
        from distilled_decoding.teachers.llamagen import LlamaGen

        model = LlamaGen.from_preset("GPT-B", block_size=256).eval()
        impl = "distilled_decoding.teachers.llamagen.LlamaGen(GPT-B).advance"
    except Exception as e:  # pragma: no cover - the teacher module is optional here
        raise SystemExit(f"LlamaGen teacher unavailable ({e!r}); this benchmark needs it") from e
    out: dict[str, Any] = {"impl": impl, "position": 128}
    for b in batch_images:
        rows = 2 * b
        with torch.inference_mode():
            cache, _ = model.begin(torch.zeros(rows, dtype=torch.long))
            tok = torch.zeros(rows, 1, dtype=torch.long)

            def step(cache: Any = cache, tok: torch.Tensor = tok) -> None:
                cache.pos = 128
                model.advance(cache, tok)

            out[str(b)] = 1e3 * min_time(step, repeat)
    return out


def flow_call_ms(cfg: dict[str, Any], codebook: torch.Tensor, kind: str, positions: int, repeat: int) -> float:
    v, d = codebook.shape
    logits = make_logits(kind, v, rows=positions, seed=7)
    noise = torch.randn(positions, d, generator=torch.Generator().manual_seed(8))
    return 1e3 * min_time(lambda: flow.noise_to_tokens(noise, logits, codebook, **cfg), repeat)


# ------------------------------------------------------------------------------------------------------------
# study
# ------------------------------------------------------------------------------------------------------------
def sweep_configs(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            dict(solver="euler", grid="geometric", steps=8),
            dict(solver="dpm3m", grid="geometric", steps=8),
            dict(solver="dpm3m", grid="geometric", steps=flow.DEFAULT_STEPS),
        ]
    cfgs: list[dict[str, Any]] = []
    for solver in flow.SOLVERS:
        for grid in ("geometric", "logsnr", "uniform"):
            if grid == "uniform" and solver not in ("euler", "dpm3m"):
                continue
            for steps in (4, 8, 12, 16, 24, 32, 48):
                if (solver == "heun" and steps > 24) or (steps == 48 and solver != "euler"):
                    continue
                cfgs.append(dict(solver=solver, grid=grid, steps=steps))
    base = dict(solver=flow.DEFAULT_SOLVER, grid=flow.DEFAULT_GRID, steps=flow.DEFAULT_STEPS)
    for t_min in (0.02, 0.035, 0.07, 0.1):
        cfgs.append({**base, "t_min": t_min})
    cfgs.append({**base, "scale": 1.0})  # the unit-scale grid without the codebook-scale shift
    return cfgs


def nfe(cfg: dict[str, Any]) -> int:
    return 2 * cfg["steps"] - 1 if cfg["solver"] == "heun" else cfg["steps"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    quick = args.quick
    settings = args.settings
    repeat = 2 if quick else args.repeat
    gpt = gpt_b_step_ms([1] if quick else [1, 16], repeat)
    print("GPT-B step (ms):", gpt, flush=True)
    results: list[dict[str, Any]] = []
    large: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    default = dict(solver=flow.DEFAULT_SOLVER, grid=flow.DEFAULT_GRID, steps=flow.DEFAULT_STEPS)
    for setting in settings:
        codebook = make_codebook(setting)
        v, d = codebook.shape
        kinds = P_KINDS[setting][:1] if quick else [k for k in P_KINDS[setting] if k in args.kinds]
        for kind in kinds:
            logits = make_logits(kind, v)
            p = torch.softmax(logits[0].double(), dim=0)
            n = args.n_mismatch
            noise = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
            lg = logits.expand(n, v)
            ref_cfg = dict(REF, steps=48 if quick else REF["steps"])
            t0 = time.perf_counter()
            ref = flow.noise_to_tokens(noise, lg, codebook, **ref_cfg)
            ref_s = time.perf_counter() - t0
            info: dict[str, Any] = dict(cfg=ref_cfg, seconds=ref_s, support=int((p > 0).sum()))
            if not quick:  # convergence of the reference itself (on a quarter of the noises)
                m = n // 4
                ref2 = flow.noise_to_tokens(
                    noise[:m], lg[:m], codebook, steps=2 * REF["steps"], solver="dpm3m", t_min=REF["t_min"] / 2
                )
                info["mismatch_vs_2x_steps"] = float((ref2 != ref[:m]).float().mean())
            info.update(histogram_stats(ref, p))
            refs[f"{setting}/{kind}"] = info
            print(f"[{setting} {kind}] reference {ref_s:.1f}s", {k: info[k] for k in ("tv_emp", "tv_floor")})
            for cfg in sweep_configs(quick):
                t0 = time.perf_counter()
                tok = flow.noise_to_tokens(noise, lg, codebook, **cfg)
                sec = time.perf_counter() - t0
                row: dict[str, Any] = dict(
                    setting=setting,
                    V=v,
                    D=d,
                    p_kind=kind,
                    support=int((p > 0).sum()),
                    solver=cfg["solver"],
                    grid=cfg["grid"],
                    steps=cfg["steps"],
                    nfe=nfe(cfg),
                    t_min=cfg.get("t_min", flow.DEFAULT_T_MIN),
                    prune_nats=cfg.get("prune_nats", flow.DEFAULT_PRUNE_NATS),
                    scale=cfg.get("scale", flow.code_scale(codebook)),
                    us_per_position=1e6 * sec / n,
                )
                row.update(paired_stats(tok, ref, p))
                row.update({k: val for k, val in histogram_stats(tok, p, draws=4).items() if k.startswith("tv")})
                if setting == "llamagen" or not quick:
                    for b in [1] if quick else [1, 16]:
                        ms = flow_call_ms(cfg, codebook, kind, positions=b, repeat=repeat)
                        row[f"ms_step_b{b}"] = ms
                        row[f"ratio_b{b}"] = ms / gpt[str(b)]
                results.append(row)
                print(
                    f"  {cfg}: mismatch {row['mismatch']:.4f} pairedTV≤{row['paired_tv_bound']:.4f} "
                    f"{row['us_per_position']:.0f}us/pos "
                    + " ".join(f"b{b}={row[f'ms_step_b{b}']:.1f}ms" for b in (1, 16) if f"ms_step_b{b}" in row),
                    flush=True,
                )
            # large-sample TV of the default and the reference vs p
            nt = args.n_tv
            if nt > 0 and (quick or kind in args.large_kinds):
                noise_l = torch.randn(nt, d, generator=torch.Generator().manual_seed(3))
                lg_l = logits.expand(nt, v)
                tok_d = flow.noise_to_tokens(noise_l, lg_l, codebook, **default)
                entry = dict(setting=setting, p_kind=kind, cfg=default, **histogram_stats(tok_d, p))
                if not quick:
                    tok_r = flow.noise_to_tokens(noise_l, lg_l, codebook, **REF_LARGE)
                    entry["reference_cfg"] = REF_LARGE
                    entry["reference"] = histogram_stats(tok_r, p)
                    entry["paired_vs_reference"] = paired_stats(tok_d, tok_r, p)
                large.append(entry)
                print(f"  large-sample TV (n={nt}):", {k: entry[k] for k in ("tv_emp", "tv_floor", "chi2_tv_bound")})
    return dict(
        meta=dict(
            quick=quick,
            threads=args.threads,
            torch=torch.__version__,
            machine=platform.machine(),
            processor=platform.processor(),
            n_mismatch=args.n_mismatch,
            n_tv=args.n_tv,
            defaults=dict(
                solver=flow.DEFAULT_SOLVER,
                grid=flow.DEFAULT_GRID,
                steps=flow.DEFAULT_STEPS,
                t_min=flow.DEFAULT_T_MIN,
                prune_nats=flow.DEFAULT_PRUNE_NATS,
            ),
            reference=REF,
            reference_large=REF_LARGE,
        ),
        gpt_b_step_ms=gpt,
        references=refs,
        results=results,
        tv_large=large,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/flow_solvers.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few configs (< 1 minute)")
    ap.add_argument("--settings", nargs="+", default=["llamagen", "var"], choices=["llamagen", "var"])
    ap.add_argument("--n-mismatch", type=int, default=None, help="noises per config (default 3000; quick 300)")
    ap.add_argument("--n-tv", type=int, default=None, help="noises for the large-sample TV (default 200000)")
    all_kinds = sorted({k for ks in P_KINDS.values() for k in ks})
    ap.add_argument("--kinds", nargs="+", default=all_kinds, help="p-kinds to study (default: all)")
    ap.add_argument(
        "--large-kinds",
        nargs="+",
        default=["flat_top8000", "flat_top900", "peaked_x4"],
        help="p-kinds that also get the large-sample TV section",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.n_mismatch is None:
        args.n_mismatch = 300 if args.quick else 3000
    if args.n_tv is None:
        args.n_tv = 2000 if args.quick else 60_000
    out = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
