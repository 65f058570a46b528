"""The one-command benchmark suite: ``distilled-decoding bench --suite gpu --out gpu.json``.

On one CUDA GPU it measures, with random weights at the real shapes, in a few minutes:

* ``sampler``: tokens/s of the KV-cache loop for GPT-B and GPT-L (CFG 2), and of the official ``generate()`` when a
  LlamaGen checkout is given (``--official-llamagen``), side by side;
* ``trajectories``: pairs/s of flow-map decoding at GPT-L shape (cfg 2, top-k 8000; batch 1 / 64 / 256), the flow
  map's share of the decoding time and the ratio to plain multinomial decoding;
* ``pipeline_llamagen``: LlamaGen-L teacher with the 256-px VQ-16 decoder vs its DD student: latency (batch 1),
  images/s (batch 64), peak memory of the multinomial teacher (the baseline every speedup divides by), the
  flow-map teacher, DD 1-step / 2-step and teacher-refined sampling, and DD 1-step's floor;
* ``pipeline_var``: the same for VAR-d16 with its multi-scale VQVAE;
* with ``--compile`` also DD 1-step with the student under ``torch.compile``; ``--dtype bfloat16`` (default on
  CUDA) runs the networks under bf16 autocast.

``--quick`` runs the same sections with the embedded digits teachers (and their random-weight students) instead of
the real sizes, so it finishes in about a minute on a CPU: CI runs it as a smoke test. Every number is measured in
one run; the JSON keeps the environment (device, torch, threads, dtype).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

__all__ = ["run_suite", "SUITES"]

#: what each suite measures: teacher presets and batch sizes
SUITES: dict[str, dict[str, Any]] = {
    "gpu": {
        "sampler_presets": ("GPT-B", "GPT-L"),
        "sampler_batches": (1, 16),
        "trajectory_preset": "GPT-L",
        "trajectory_batches": (1, 64, 256),
        "pipeline_preset": "GPT-L",
        "pipeline_batches": (1, 64),
        "var_depth": 16,
        "repeat": 3,
    },
    "quick": {  # the embedded digits teachers: a CPU smoke test of every section
        "sampler_batches": (2,),
        "trajectory_batches": (2,),
        "pipeline_batches": (2,),
        "repeat": 1,
    },
}


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _llamagen(preset: str | None, device: torch.device) -> tuple[Any, Any]:
    """(teacher, VQ tokenizer): a random-weight official size with VQ-16 at 256 px, or the embedded default."""
    from distilled_decoding import bench
    from distilled_decoding.recipe import TeacherConfig
    from distilled_decoding.tokenizers.vq import VQTokenizer

    if preset is None:
        gpt, vq = TeacherConfig().load()
    else:
        with torch.device(device):
            gpt, vq = bench.random_llamagen(preset, block_size=256), VQTokenizer.from_preset("VQ-16").eval()
    return gpt.to(device).eval(), vq.to(device).eval()


def _var(depth: int | None, device: torch.device) -> Any:
    """A random-weight VAR of ``depth`` owning a default (official-size) VQVAE, or the embedded digits VAR."""
    from distilled_decoding.recipe import TeacherConfig
    from distilled_decoding.teachers.var import VAR

    if depth is None:
        var, _ = TeacherConfig(kind="var").load()
    else:
        torch.manual_seed(0)
        with torch.device(device):
            var = VAR.from_preset(depth, vae_config={})
    return var.to(device).eval()


def _pipeline(teacher: Any, tokenizer: Any, codebook: torch.Tensor, sampling: dict[str, Any]) -> Any:
    from distilled_decoding.pipeline import DistilledDecodingPipeline
    from distilled_decoding.students import student_from_teacher

    student = student_from_teacher(teacher, codebook).to(codebook.device).eval()
    pipe = DistilledDecodingPipeline(student=student, tokenizer=tokenizer, info={"teacher_sampling": sampling})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_suite(
    suite: str = "gpu",
    *,
    official_repo: str | None = None,
    dtype: str | None = None,
    compile_student: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``suite`` ("gpu": real shapes; "quick": the embedded defaults) on the default device (CUDA when
    available) and return the JSON-able results (see the module docstring)."""
    from distilled_decoding import bench

    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}: expected one of {sorted(SUITES)}")
    s = SUITES[suite]
    real = suite != "quick"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
    amp = getattr(torch, dtype)
    out: dict[str, Any] = {"suite": suite, "dtype": dtype, "env": bench.environment()}
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    # 1. the sampling loop (vs the official generate() when a checkout is given)
    out["sampler"] = {}
    for preset in s.get("sampler_presets", (None,)):
        gpt, _ = _llamagen(preset, device)
        with _autocast(device, amp):
            out["sampler"][preset or "embedded"] = bench.bench_sampler(
                gpt, s["sampler_batches"], repeat=s["repeat"], official_repo=official_repo, include_full_recompute=False
            )
        log(f"sampler {preset or 'embedded'} done")
        del gpt

    # 2. trajectories: flow-map decoding vs multinomial decoding with the same loop
    gpt, vq = _llamagen(s.get("trajectory_preset"), device)
    traj_sampling = {"cfg_scale": 2.0, "top_k": 8000} if real else {"cfg_scale": 2.0}
    with _autocast(device, amp):
        out["trajectories"] = bench.bench_trajectories(gpt, vq.codebook, s["trajectory_batches"], repeat=s["repeat"],
                                                       sampling=traj_sampling)  # fmt: skip
    log("trajectories done")

    # 3. LlamaGen teacher vs its DD student, images decoded with the VQ decoder
    if s.get("pipeline_preset") != s.get("trajectory_preset"):
        gpt, vq = _llamagen(s.get("pipeline_preset"), device)
    pipe = _pipeline(gpt, vq, vq.codebook, {"cfg_scale": 2.0, "top_k": 8000} if real else {"cfg_scale": 2.0})
    with _autocast(device, amp):
        out["pipeline_llamagen"] = bench.bench_pipeline(pipe, gpt, s["pipeline_batches"], repeat=s["repeat"])
    if compile_student:
        out["pipeline_llamagen"]["compiled_dd_1_step"] = _compiled_one_step(pipe, s["pipeline_batches"], amp)
    log("pipeline (LlamaGen) done")
    del gpt, vq, pipe

    # 4. VAR teacher vs its DD student
    var = _var(s.get("var_depth"), device)
    var_sampling = {"cfg_scale": 2.0, "top_k": 900, "top_p": 0.95} if real else {"cfg_scale": 1.0}
    pipe = _pipeline(var, var.vae, var.vae.codebook, var_sampling)
    with _autocast(device, amp):
        out["pipeline_var"] = bench.bench_pipeline(pipe, var, s["pipeline_batches"], repeat=s["repeat"])
    log("pipeline (VAR) done")
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["summary"] = summarize(out)
    return out


def _compiled_one_step(pipe: Any, batches: tuple[int, ...], amp: torch.dtype) -> dict[str, Any]:
    """DD 1-step latency with the student under ``torch.compile`` (first call: compilation, not timed)."""
    from distilled_decoding import bench

    student = pipe.student
    student.compile()
    n_tok, dim = pipe.noise_shape
    rows = {}
    for b in batches:
        noise = torch.randn(b, n_tok, dim, device=student.codebook.device)
        labels = torch.arange(b, device=noise.device) % student.num_classes
        with _autocast(noise.device, amp):
            t = bench.measure(lambda z=noise, y=labels: pipe.generate(z, y, steps=1), repeat=3, warmup=2)
        rows[f"batch_{b}"] = {**t, "images_per_s": b / t["median_s"]}
    return rows


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios of a suite run: DD 1-step / 2-step speedups over the multinomial teacher at batch 1 and
    the largest batch, trajectory cost relative to multinomial decoding and the flow map's share."""
    out: dict[str, Any] = {}
    for key in ("pipeline_llamagen", "pipeline_var"):
        for batch, row in results.get(key, {}).get("results", {}).items():
            for name in ("DD 1-step", "DD 2-step"):
                if name in row:
                    out[f"{key} {batch} {name} speedup vs teacher (multinomial)"] = row[name]["speedup_vs_teacher"]
    for batch, row in results.get("trajectories", {}).get("results", {}).items():
        out[f"trajectories {batch} flow-map / multinomial decoding"] = row["ratio_flow_to_multinomial"]
        out[f"trajectories {batch} flow map share of the step"] = row["flow_map_share_of_step"]
    return out
