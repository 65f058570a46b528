"""Speed and memory benchmarks. Every ratio is measured side by side in one run; results are JSON-able dicts.

* :func:`bench_sampler` — tokens/s of the KV-cache sampling loop vs a plain full-recompute loop (and, when the
  official LlamaGen code is importable from a path you give, its ``generate()``), same model and settings;
* :func:`bench_trajectories` — trajectory pairs/s, the flow map's share of the step time, and the ratio of
  flow-map decoding to plain multinomial decoding with the same loop;
* :func:`bench_pipeline` — latency (batch 1) and throughput (larger batches) and peak memory of the teacher's
  ordinary decoding (KV cache, multinomial: the honest baseline every speedup divides by), the teacher through the
  flow map (the trajectory mapping), DD 1-step, DD 2-step and teacher-refined sampling, plus DD 1-step's floor
  (one student forward + the decode);
* :func:`bench_teachers` — teachers of one tokenizer side by side (e.g. the raster LlamaGen and its PAR-4×
  conversion): images/s of flow-map decoding + the tokenizer's decode, and trajectory pairs/s (flow-map decoding
  alone, what :func:`~distilled_decoding.trajectories.build_trajectories` runs), each as a ratio to the first;
* :func:`random_llamagen` — real-shape LlamaGen teachers with random weights for the size benchmarks.

``distilled-decoding bench`` and the scripts in ``benchmarks/`` call these and write JSON.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.samplers import RefinedSampler, TeacherSampler
from distilled_decoding.sampling import FlowChooser, MultinomialChooser, filter_logits, sample_tokens

__all__ = [
    "measure",
    "peak_memory",
    "bench_sampler",
    "bench_trajectories",
    "bench_pipeline",
    "bench_teachers",
    "environment",
    "random_llamagen",
]


def environment() -> dict[str, Any]:
    """Where the numbers were taken."""
    import platform

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "device": dev, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}  # fmt: skip


def random_llamagen(preset: str = "GPT-B", block_size: int = 256, seed: int = 0, **overrides: Any) -> Any:
    """An official LlamaGen size with random weights and a peaked output head like a trained model's (logits std
    ≈ 3: entropy ≈ 5 nats), in eval mode."""
    from distilled_decoding.teachers.llamagen import LlamaGen

    torch.manual_seed(seed)
    gpt = LlamaGen.from_preset(preset, block_size=block_size, **overrides).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(0.0, 0.1)
    return gpt


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median / min wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeat": repeat}


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory above the level at entry, in MiB: CUDA allocator peak on GPU, process RSS (polled every 2 ms)
    on CPU. Yields a dict filled in on exit (``peak_mib``)."""
    out: dict[str, float] = {}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        out["peak_mib"] = (max(peak[0], proc.memory_info().rss) - base) / 2**20


# ----------------------------------------------------------------------------------------------------------
# issue 2: the sampling loop
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def full_recompute_sample(teacher: Any, labels: Tensor, cfg_scale: float, generator: torch.Generator) -> Tensor:
    """The plain loop: every step runs the whole prefix again (no KV cache). Same sampling as the real loop."""
    b, n = labels.shape[0], teacher.seq_len
    tokens = torch.empty(b, 0, dtype=torch.long, device=labels.device)
    null = torch.full_like(labels, teacher.null_class) if cfg_scale > 1.0 else None
    chooser = MultinomialChooser(generator)
    for i in range(n):
        logits = teacher.logits_from_prefix(tokens, labels)[:, -1:]
        if null is not None:
            uncond = teacher.logits_from_prefix(tokens, null)[:, -1:]
            logits = uncond + (logits - uncond) * cfg_scale
        tokens = torch.cat([tokens, chooser(filter_logits(logits), slice(i, i + 1))], dim=1)
    return tokens


def _official_generate(official_repo: str) -> Callable | None:
    import sys

    if not official_repo:
        return None
    sys.path.insert(0, official_repo)
    try:
        from autoregressive.models.generate import generate  # type: ignore[import-not-found]
    finally:
        sys.path.remove(official_repo)
    return generate


def _official_model(official_repo: str, teacher: Any) -> Any:
    import sys

    sys.path.insert(0, official_repo)
    try:
        from autoregressive.models.gpt import ModelArgs, Transformer  # type: ignore[import-not-found]
    finally:
        sys.path.remove(official_repo)
    args = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    model = Transformer(ModelArgs(**args)).eval()
    model.load_state_dict(teacher.state_dict(), strict=True)
    return model.to(next(teacher.parameters()).device)


@torch.no_grad()
def bench_sampler(
    teacher: Any,
    batch_sizes: tuple[int, ...] = (1, 16),
    *,
    cfg_scale: float = 2.0,
    repeat: int = 3,
    official_repo: str | None = None,
    include_full_recompute: bool = True,
) -> dict[str, Any]:
    """tokens/s (generated tokens per second, CFG rows not counted) of our KV-cache loop, the full-recompute loop
    and optionally the official ``generate()`` loaded from ``official_repo`` (a LlamaGen checkout)."""
    device = next(teacher.parameters()).device
    official = _official_generate(official_repo) if official_repo else None
    off_model = _official_model(official_repo, teacher) if official else None
    rows = {}
    for b in batch_sizes:
        labels = torch.arange(b, device=device) % teacher.num_classes
        n_tok = b * teacher.seq_len
        row: dict[str, Any] = {}
        g = torch.Generator(device=device)
        ours = measure(lambda: sample_tokens(teacher, labels, cfg_scale=cfg_scale, generator=g.manual_seed(0)), repeat)
        row["kv_cache"] = {**ours, "tokens_per_s": n_tok / ours["median_s"]}
        if include_full_recompute:
            full = measure(
                lambda: full_recompute_sample(teacher, labels, cfg_scale, g.manual_seed(0)), max(1, repeat - 1)
            )
            row["full_recompute"] = {**full, "tokens_per_s": n_tok / full["median_s"]}
            row["speedup_vs_full_recompute"] = full["median_s"] / ours["median_s"]
        if official is not None:
            off = measure(lambda: official(off_model, labels, teacher.seq_len, cfg_scale=cfg_scale), repeat)
            row["official_generate"] = {**off, "tokens_per_s": n_tok / off["median_s"]}
            row["speedup_vs_official"] = off["median_s"] / ours["median_s"]
        rows[f"batch_{b}"] = row
    return {"teacher": _describe(teacher), "cfg_scale": cfg_scale, "results": rows, "env": environment()}


# ----------------------------------------------------------------------------------------------------------
# issue 3: trajectories
# ----------------------------------------------------------------------------------------------------------
class _TimedChooser:
    def __init__(self, inner: Any):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, logits: Tensor, positions: slice) -> Tensor:
        _sync()
        t0 = time.perf_counter()
        out = self.inner(logits, positions)
        _sync()
        self.seconds += time.perf_counter() - t0
        return out


@torch.no_grad()
def bench_trajectories(
    teacher: Any,
    codebook: Tensor,
    batch_sizes: tuple[int, ...] = (1, 16),
    *,
    sampling: dict[str, Any] | None = None,
    repeat: int = 3,
    flow_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pairs/s of flow-map decoding, the flow map's share of the decoding time, and the time ratio
    flow-map decoding / multinomial decoding with the same loop and settings (goal ≤ 1.05 at GPT-B shape), in
    wall time and in the process's CPU time."""
    sampling = dict(sampling or {"cfg_scale": 2.0})
    flow_kwargs = dict(flow_kwargs or {})
    device = next(teacher.parameters()).device
    codebook = codebook.to(device=device, dtype=torch.float32)
    rows = {}
    for b in batch_sizes:
        labels = torch.arange(b, device=device) % teacher.num_classes
        noise = torch.randn(b, teacher.seq_len, codebook.shape[1], device=device)
        flow = _TimedChooser(FlowChooser(noise, codebook, **flow_kwargs))
        multi = _TimedChooser(MultinomialChooser(torch.Generator(device=device).manual_seed(0)))
        # interleave the two so that machine-load drift hits both alike; CPU time as well as wall time (on a
        # shared machine the process's CPU time is the steadier measure)
        t_flow, t_multi = [], []
        for _ in range(repeat + 1):
            for chooser, times in ((flow, t_flow), (multi, t_multi)):
                chooser.seconds = 0.0
                _sync()
                t0, c0 = time.perf_counter(), time.process_time()
                sample_tokens(teacher, labels, chooser=chooser, **sampling)
                _sync()
                times.append((time.perf_counter() - t0, chooser.seconds, time.process_time() - c0))
        t_flow, t_multi = t_flow[1:], t_multi[1:]  # the first round is the warm-up
        tf = statistics.median(t for t, _, _ in t_flow)
        tm = statistics.median(t for t, _, _ in t_multi)
        cf = statistics.median(c for _, _, c in t_flow)
        cm = statistics.median(c for _, _, c in t_multi)
        rows[f"batch_{b}"] = {
            "flow_map_decode_s": tf,
            "multinomial_decode_s": tm,
            "pairs_per_s": b / tf,
            "ratio_flow_to_multinomial": tf / tm,
            "ratio_flow_to_multinomial_cpu_time": cf / cm,
            "flow_map_share_of_step": statistics.median(c / t for t, c, _ in t_flow),
            "multinomial_share_of_step": statistics.median(c / t for t, c, _ in t_multi),
        }
    from distilled_decoding import flow as flow_module

    return {"teacher": _describe(teacher), "codebook": list(codebook.shape), "sampling": sampling,
            "flow": {**getattr(flow_module, "DEFAULTS", {}), **flow_kwargs}, "results": rows,
            "env": environment()}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# issue 5: the distilled pipeline
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_pipeline(
    pipe: Any,
    teacher: Any,
    batch_sizes: tuple[int, ...] = (1, 64),
    *,
    refine: tuple[int, int] | None = None,
    repeat: int = 3,
) -> dict[str, Any]:
    """Latency / throughput / peak memory of each sampler at each batch size (images decoded, in [0, 1]).

    Speedups are reported against the teacher's ordinary decoding (``speedup_vs_teacher``: KV cache, multinomial,
    same batch and sampling settings) and against its flow-map decoding (``speedup_vs_teacher_flow_map``).
    ``floor`` is the 1-step sampler's lower bound: one student prediction over the whole sequence (forward, tokens,
    their vectors) plus the decode. The student's rows: :meth:`~distilled_decoding.pipeline.DistilledDecodingPipeline.
    student_samplers` (DD: 1-step, 2-step, refined; DD2: 1-step, two refined)."""
    student = pipe.student
    device = student.codebook.device
    n_tok, dim = pipe.noise_shape
    sampling = dict(pipe.info.get("teacher_sampling") or {})
    flow_kwargs = dict(pipe.info.get("flow") or {})
    generator = torch.Generator(device=device).manual_seed(0)
    objects = [TeacherSampler(teacher, student.codebook, sampling, "multinomial", generator=generator),
               TeacherSampler(teacher, student.codebook, sampling, "flow", flow_kwargs),
               *pipe.student_samplers(teacher, refine)]  # fmt: skip
    one_step = objects[2].name
    results: dict[str, Any] = {}
    for b in batch_sizes:
        noise = torch.randn(b, n_tok, dim, device=device)
        labels = torch.arange(b, device=device) % student.num_classes
        zero = torch.zeros(b, dtype=torch.long, device=device)

        def floor() -> Tensor:
            return pipe.decode(student.predict(noise, labels, zero)[0])

        samplers: dict[str, Callable[[], Tensor]] = {
            s.name: (lambda s=s: pipe.decode(s(noise, labels)[0])) for s in objects
        }
        samplers[f"{one_step} floor (forward + decode)"] = floor
        row = {}
        for name, fn in samplers.items():
            with peak_memory() as mem:
                t = measure(fn, repeat=repeat if b == 1 or "teacher" not in name else max(1, repeat - 2))
            row[name] = {**t, "latency_s" if b == 1 else "batch_s": t["median_s"],
                         "images_per_s": b / t["median_s"], "peak_mib": mem["peak_mib"]}  # fmt: skip
        base, flow = row["teacher AR (multinomial)"]["median_s"], row["teacher AR (flow map)"]["median_s"]
        for r in row.values():
            r["speedup_vs_teacher"] = base / r["median_s"]
            r["speedup_vs_teacher_flow_map"] = flow / r["median_s"]
        row[f"{one_step} / floor"] = row[one_step]["median_s"] / row[f"{one_step} floor (forward + decode)"]["median_s"]
        results[f"batch_{b}"] = row
    refined = [list(s.teacher_tokens) for s in objects if isinstance(s, RefinedSampler)]
    return {"student": type(student).__name__, "tokens": n_tok, "refine": refined[0] if len(refined) == 1 else refined,
            "results": results, "env": environment()}  # fmt: skip


@torch.no_grad()
def bench_teachers(
    teachers: dict[str, Any],
    codebook: Tensor,
    decode: Callable[[Tensor], Tensor],
    batch_sizes: tuple[int, ...] = (1, 64),
    *,
    sampling: dict[str, Any] | None = None,
    repeat: int = 3,
    flow_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Teachers of one tokenizer side by side, interleaved so that machine-load drift hits all alike.

    ``teachers``: row name → teacher (the first is the baseline of the ratios); ``decode``: vectors (B, N, D) in the
    tokenizer's order → images. Per batch size and teacher: ``images_per_s`` (flow-map decoding with ``sampling`` +
    the decode), ``pairs_per_s`` (flow-map decoding alone: trajectory building), ``steps`` and both ratios to the
    first teacher."""
    from distilled_decoding.samplers import Reordered, TeacherSampler

    sampling = dict(sampling or {"cfg_scale": 2.0})
    device = codebook.device
    samplers = {name: Reordered(TeacherSampler(t, codebook, sampling, "flow", dict(flow_kwargs or {})), t.token_order)
                for name, t in teachers.items()}  # fmt: skip
    first = next(iter(teachers.values()))
    results: dict[str, Any] = {}
    for b in batch_sizes:
        noise = torch.randn(b, first.seq_len, codebook.shape[1], generator=torch.Generator().manual_seed(b)).to(device)
        labels = torch.arange(b, device=device) % first.num_classes
        times: dict[str, dict[str, list[float]]] = {n: {"images": [], "pairs": []} for n in samplers}
        for r in range(repeat + 1):  # the first round is the warm-up
            for name, s in samplers.items():
                for kind, fn in (("pairs", lambda s=s: s(noise, labels)),
                                 ("images", lambda s=s: decode(s(noise, labels)[0]))):  # fmt: skip
                    _sync()
                    t0 = time.perf_counter()
                    fn()
                    _sync()
                    if r:
                        times[name][kind].append(time.perf_counter() - t0)
        row: dict[str, Any] = {}
        for name, s in samplers.items():
            ti, tp = statistics.median(times[name]["images"]), statistics.median(times[name]["pairs"])
            row[name] = {"steps": s.steps, "images_s": ti, "images_per_s": b / ti, "pairs_s": tp, "pairs_per_s": b / tp}
        base = row[next(iter(samplers))]
        for r_ in row.values():
            r_["images_per_s_vs_first"] = r_["images_per_s"] / base["images_per_s"]
            r_["pairs_per_s_vs_first"] = r_["pairs_per_s"] / base["pairs_per_s"]
        results[f"batch_{b}"] = row
    return {"teachers": {n: _describe(t) for n, t in teachers.items()}, "sampling": sampling, "repeat": repeat,
            "results": results, "env": environment()}  # fmt: skip


def _describe(model: Any) -> dict[str, Any]:
    cfg = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    keep = ("dim", "n_layer", "n_head", "vocab_size", "block_size", "depth", "embed_dim", "num_classes")
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype), **{k: cfg[k] for k in keep if k in cfg}}  # fmt: skip
