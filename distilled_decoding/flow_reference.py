"""Plain float64 reference of the categorical flow map, for tests and benchmarks.

Dense over every code of every row, no batch-invariance engineering: the posterior log-weights
``log p_j − ‖x − (1 − t)·c_j‖²/(2t²)`` in float64, ``softmax``, ``x̂0 = w @ codebook``, integrated with a plain
loop (:func:`integrate`) on the same time grid and solver coefficients as
:func:`distilled_decoding.flow.noise_to_tokens`, whose tokens should equal these on all but a vanishing fraction
of rows (float32 vs float64 rounding near decision boundaries). Memory: (rows × V) float64 per chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from distilled_decoding.flow import DEFAULT_SOLVER, SOLVERS, check_inputs, multistep_coefficients, solver_times

__all__ = ["denoise", "integrate", "noise_to_tokens", "posterior_logits"]


def integrate(
    denoise_fn: Callable[[Tensor, float, int], Tensor], x: Tensor, ts: Sequence[float], solver: str
) -> Tensor:
    """Integrate ``dx/dt = (x − x̂0(x, t)) / t`` from ts[0] = 1 to ts[-1]; returns the final x.

    ``denoise_fn(x, t, i)`` returns x̂0 for states x (N, D); ``i`` is the index of t in ``ts`` (Heun's second
    evaluation of step i passes ``i + 1``). Multistep solvers use
    :func:`distilled_decoding.flow.multistep_coefficients`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    if solver == "heun":
        for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
            x0 = denoise_fn(x, t, i)
            v1 = (x - x0) / t
            xe = x + v1 * (s - t)
            v2 = (xe - denoise_fn(xe, s, i + 1)) / s
            x = x + (v1 + v2) * ((s - t) / 2.0)
        return x
    hist: list[Tensor] = []  # x̂0 of the previous evaluations with finite λ (newest last)
    for i, (t, (cx, c0, c1, c2)) in enumerate(zip(ts[:-1], multistep_coefficients(ts, solver))):
        x0 = denoise_fn(x, t, i)
        x = x * cx + x0 * c0
        if c1:
            x = x + hist[-1] * c1
        if c2:
            x = x + hist[-2] * c2
        if t < 1.0:
            hist = [*hist[-1:], x0]
    return x


def _log_p64(logits: Tensor, name: str) -> Tensor:
    lg = logits.double()
    if bool(torch.isnan(lg).any()) or bool((lg == float("inf")).any()):
        raise ValueError(f"{name}: NaN or +inf entries (use -inf to exclude codes)")
    row_max = lg.amax(dim=-1, keepdim=True)
    if bool((row_max == float("-inf")).any()):
        raise ValueError(f"{name}: every row needs at least one finite entry")
    return lg - row_max


def posterior_logits(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """x (N, D), t ∈ (0, 1], log_p (N, V) (−inf allowed), codebook (V, D) → (N, V) float64
    ``log p_j − ‖x − (1 − t)c_j‖²/(2t²)`` (the ‖x‖² part computed per row, not dropped)."""
    x, c, lp = x.double(), codebook.double(), log_p.double()
    a = 1.0 - t
    sq = (x * x).sum(-1, keepdim=True) - 2.0 * a * (x @ c.t()) + (a * a) * (c * c).sum(-1)
    return lp - sq / (2.0 * t * t)


def denoise(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """x̂0 = softmax(posterior_logits) @ codebook: (N, D) float64."""
    return torch.softmax(posterior_logits(x, t, log_p, codebook), dim=-1) @ codebook.double()


def noise_to_tokens(
    noise: Tensor,
    logits: Tensor,
    codebook: Tensor,
    steps: int | None = None,
    solver: str | None = None,
    *,
    grid: str | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    scale: float | None = None,
    chunk_rows: int = 256,
) -> Tensor:
    """The flow map of :func:`distilled_decoding.flow.noise_to_tokens` (same arguments, no pruning) in float64:
    noise (..., D), logits (..., V), codebook (V, D) → (...) int64 code indices."""
    check_inputs(noise, logits, codebook)
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    ts, _ = solver_times(codebook, steps, grid, t_min, t_max, scale)
    v, d = codebook.shape
    lp = _log_p64(logits.reshape(-1, v), "logits")
    x_all = noise.reshape(-1, d).double()
    out = torch.empty(lp.shape[0], dtype=torch.long, device=noise.device)
    for i in range(0, lp.shape[0], chunk_rows):
        rows = lp[i : i + chunk_rows]
        x = integrate(lambda x, t, _, rows=rows: denoise(x, t, rows, codebook), x_all[i : i + chunk_rows], ts, solver)
        out[i : i + chunk_rows] = posterior_logits(x, ts[-1], rows, codebook).argmax(dim=-1)
    return out.reshape(noise.shape[:-1])
