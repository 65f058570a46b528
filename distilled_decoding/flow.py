"""Closed-form categorical flow map: Gaussian noise → codebook index (Distilled Decoding, §1 of the notes).

For one position the teacher's sampling distribution ``p`` over ``V`` codebook vectors ``c_j ∈ R^D`` defines the
target ``Σ_j p_j δ(c_j)``. With the linear path ``x_t = (1 − t) x_0 + t ε`` (noise ``ε ~ N(0, I)`` at t = 1,
data at t = 0) the flow-matching field has the closed form

    w_j(x, t) = softmax_j( log p_j − ‖x − (1 − t) c_j‖² / (2 t²) )      posterior weights
    x̂0(x, t)  = Σ_j w_j c_j                                             denoiser
    v(x, t)   = (x − x̂0) / t                                            velocity  dx/dt

and integrating ``dx/dt = v`` from ``x_1 = ε`` down to a small ``t_min`` maps ε to (a point next to) one
codebook vector; the token is the argmax of the posterior there. The induced map sends N(0, I) to ``p`` up to
solver error. :func:`noise_to_tokens` is the batched map; :func:`denoise`, :func:`velocity` and
:func:`time_grid` are the pieces; :func:`posterior_mean` is the same x̂0 with autograd and a t per row (for
training losses such as Distilled Decoding 2's teacher score; fast, not batch invariant);
:mod:`distilled_decoding.flow_reference` is a plain float64 implementation of
the same map that the tests compare against.

Time grid: the flow is exactly covariant under scaling of the codebook (scaling c by s is the
reparametrisation u → u/s of u = (1 − t)/t, in the coordinate y = x/t where dy/du = x̂0), so grids are defined
for a unit-RMS codebook and moved to the codebook's scale (:func:`code_scale`, :func:`rescale_time`).
Defaults (:data:`DEFAULTS`) were chosen with ``benchmarks/flow_solvers.py``.

The batch-invariant float32 kernels that evaluate the posterior and run the solver live in
:mod:`distilled_decoding.flow_kernels`; this module holds the time grid, the solver's coefficients and the
public API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distilled_decoding.flow_kernels import (
    DEFAULT_CHUNK_ELEMENTS,
    SolverPlan,
    code_scale,
    codebook_layout,
    posterior,
    solve,
    solver_plan,
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_GRID",
    "DEFAULT_PRUNE_NATS",
    "DEFAULT_SOLVER",
    "DEFAULT_STEPS",
    "DEFAULT_T_MAX",
    "DEFAULT_T_MIN",
    "GRIDS",
    "SOLVERS",
    "check_inputs",
    "code_scale",
    "denoise",
    "multistep_coefficients",
    "noise_to_tokens",
    "posterior_logits",
    "posterior_mean",
    "rescale_time",
    "shifted_log_p",
    "solver_times",
    "time_grid",
    "velocity",
]

SOLVERS = ("euler", "heun", "dpm2m", "dpm3m")
GRIDS = ("uniform", "geometric", "logsnr")

DEFAULT_SOLVER = "dpm3m"
DEFAULT_GRID = "geometric"
DEFAULT_STEPS = 24
DEFAULT_T_MIN = 0.05
DEFAULT_T_MAX = 0.9
#: no pruning: every allowed code is evaluated at every step (see noise_to_tokens' ``prune_nats``)
DEFAULT_PRUNE_NATS = None
#: the default settings of :func:`noise_to_tokens`, as recorded in trajectory manifests and benchmarks
DEFAULTS = {
    "solver": DEFAULT_SOLVER,
    "grid": DEFAULT_GRID,
    "steps": DEFAULT_STEPS,
    "t_min": DEFAULT_T_MIN,
    "t_max": DEFAULT_T_MAX,
    "prune_nats": DEFAULT_PRUNE_NATS,
}


# ------------------------------------------------------------------------------------------------------------
# time grid
# ------------------------------------------------------------------------------------------------------------
def _logsnr(t: float) -> float:
    return math.log((1.0 - t) / t)


def time_grid(
    steps: int, grid: str = DEFAULT_GRID, t_min: float = DEFAULT_T_MIN, t_max: float = DEFAULT_T_MAX
) -> list[float]:
    """Decreasing times ``[1, t_1, ..., t_steps = t_min]`` (``steps + 1`` floats) for ``steps`` solver steps.

    ``"uniform"``: uniform in t on [t_min, 1]. ``"geometric"``: uniform in log t on [t_min, 1]
    (t_i = t_min^(i/steps)). ``"logsnr"``: t_1..t_steps uniform in the log-SNR λ = log((1 − t)/t) between
    ``t_max`` and ``t_min`` (the first step goes from 1 to t_max; with one step straight to t_min).
    ``t_max`` is used by ``"logsnr"`` only.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an integer ≥ 1")
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r}: expected one of {GRIDS}")
    if not (1e-5 <= t_min < 1.0):
        raise ValueError(f"t_min={t_min!r}: expected 1e-5 ≤ t_min < 1")
    if not (t_min < t_max < 1.0):
        raise ValueError(f"t_max={t_max!r}: expected t_min < t_max < 1")
    if grid == "uniform":
        inner = [1.0 - (1.0 - t_min) * i / steps for i in range(1, steps)]
    elif grid == "geometric":
        inner = [t_min ** (i / steps) for i in range(1, steps)]
    else:
        lo, hi = _logsnr(t_max), _logsnr(t_min)
        n = steps - 1
        inner = [1.0 / (1.0 + math.exp(lo + (hi - lo) * i / n)) for i in range(n)] if n else []
    return [1.0, *inner, t_min]


def rescale_time(t: float, scale: float) -> float:
    """Move a time of the unit-scale grid to a codebook of RMS norm ``scale``: s·t / (s·t + 1 − t), i.e. the
    log-SNR λ = log((1 − t)/t) shifted by −log(s). Scaling the codebook by s is exactly the reparametrisation
    u = (1 − t)/t → u/s of the flow (in the coordinate y = x/t, where dy/du = x̂0), so a grid that is accurate
    for one codebook is equally accurate for the scaled one."""
    return scale * t / (scale * t + (1.0 - t))  # exactly 1 at t = 1


def solver_times(
    codebook: Tensor,
    steps: int | None = None,
    grid: str | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    scale: float | None = None,
) -> tuple[list[float], list[float]]:
    """(times moved to the codebook's scale, the unit-scale grid) for :func:`noise_to_tokens`' arguments."""
    unit = time_grid(
        DEFAULT_STEPS if steps is None else steps,
        DEFAULT_GRID if grid is None else grid,
        DEFAULT_T_MIN if t_min is None else t_min,
        DEFAULT_T_MAX if t_max is None else t_max,
    )
    scale = code_scale(codebook) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r}: expected a positive number (the codebook's RMS norm by default)")
    return [rescale_time(t, scale) for t in unit], unit


# ------------------------------------------------------------------------------------------------------------
# solver
# ------------------------------------------------------------------------------------------------------------
def multistep_coefficients(ts: Sequence[float], solver: str) -> list[tuple[float, float, float, float]]:
    """Per step i (from t = ts[i] to s = ts[i + 1]) the coefficients (cx, c0, c1, c2) of
    ``x_s = cx·x_t + c0·x̂0_i + c1·x̂0_(i−1) + c2·x̂0_(i−2)``.

    DPM-Solver++ multistep in data-prediction form with α_t = 1 − t, σ_t = t, λ = log(α/σ); evaluations at
    t = 1 (λ = −∞) are not part of the history; the first step is first order (DDIM, exact for a constant x̂0),
    the second at most second order. ``"euler"`` is DDIM throughout."""
    out: list[tuple[float, float, float, float]] = []
    lams: list[float] = []  # λ of the previous evaluations with finite λ
    for t, s in zip(ts[:-1], ts[1:]):
        ddim = (s / t, 1.0 - s / t, 0.0, 0.0)
        if solver == "euler" or t >= 1.0:
            out.append(ddim)
            continue
        lam_t, h = _logsnr(t), _logsnr(s) - _logsnr(t)
        a_s, phi1 = 1.0 - s, math.expm1(-h)  # α_s·(−phi1) = 1 − s/t
        if solver == "dpm3m" and len(lams) >= 2:
            r0, r1 = (lam_t - lams[-1]) / h, (lams[-1] - lams[-2]) / h
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            # x_s = x·s/t − α_s·φ1·x̂0 + α_s·φ2·D1 − α_s·φ3·D2 with D1 = d0 + (d0 − d1)·r0/(r0 + r1),
            # D2 = (d0 − d1)/(r0 + r1), d0 = (x̂0 − m1)/r0, d1 = (m1 − m2)/r1; expanded in x̂0, m1, m2
            k0 = a_s * phi2 * (1.0 + r0 / (r0 + r1)) - a_s * phi3 / (r0 + r1)
            k1 = -a_s * phi2 * r0 / (r0 + r1) + a_s * phi3 / (r0 + r1)
            out.append((s / t, -a_s * phi1 + k0 / r0, -k0 / r0 + k1 / r1, -k1 / r1))
        elif lams:  # dpm2m, or dpm3m's second step
            r = (lam_t - lams[-1]) / h
            out.append((s / t, (1.0 + 0.5 / r) * (1.0 - s / t), -(0.5 / r) * (1.0 - s / t), 0.0))
        else:
            out.append(ddim)
        lams.append(lam_t)
    return out


_plans: dict[tuple, SolverPlan] = {}


def _plan(ts: Sequence[float], solver: str, device: torch.device) -> SolverPlan:
    """The kernels' :class:`SolverPlan` for times ``ts`` (cached: a chooser calls the map once per step)."""
    key = (tuple(ts), solver, device)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 16:
            _plans.clear()
        coefficients = None if solver == "heun" else multistep_coefficients(ts, solver)
        plan = _plans[key] = solver_plan(ts, coefficients, device)
    return plan


# ------------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------------
def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_inputs(noise: Tensor, logits: Tensor, codebook: Tensor, logits_name: str = "logits") -> None:
    """Validate (noise (..., D), logits (..., V), codebook (V, D)); raises ValueError naming the argument."""
    _check_float("noise", noise)
    _check_float(logits_name, logits)
    _check_float("codebook", codebook)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook: expected shape (V, D), got {tuple(codebook.shape)}")
    v, d = codebook.shape
    if noise.dim() < 1 or noise.shape[-1] != d:
        raise ValueError(f"noise: last dim must equal the codebook dim D={d}, got shape {tuple(noise.shape)}")
    if logits.dim() < 1 or logits.shape[-1] != v:
        raise ValueError(f"{logits_name}: last dim must equal the codebook size V={v}, got shape {tuple(logits.shape)}")
    if noise.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"{logits_name}: leading shape {tuple(logits.shape[:-1])} must match noise's {tuple(noise.shape[:-1])}"
        )
    if noise.device != logits.device or codebook.device != noise.device:
        raise ValueError(
            f"codebook: noise ({noise.device}), {logits_name} ({logits.device}) and codebook ({codebook.device}) "
            "must be on one device"
        )


def shifted_log_p(logits: Tensor, name: str = "logits") -> Tensor:
    """(N, V) logits → float32 logits minus the row max (exact; p's normaliser cancels in the posterior).
    Raises ValueError on NaN / +inf entries and on rows without a finite entry."""
    lg = logits.float()
    row_max = lg.amax(dim=1, keepdim=True)  # NaN if the row has a NaN, +inf if it has a +inf
    if not bool(torch.isfinite(row_max).all()):
        if bool(torch.isnan(row_max).any()) or bool((row_max == float("inf")).any()):
            raise ValueError(f"{name}: NaN or +inf entries (use -inf to exclude codes)")
        raise ValueError(f"{name}: every row needs at least one finite entry")
    return lg - row_max


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------
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
    prune_nats: float | None = DEFAULT_PRUNE_NATS,  # noqa: ARG001 - see the docstring
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Map Gaussian noise to codebook indices through the flow-matching ODE.

    Args:
        noise: (..., D) float, standard normal ε (one D-vector per position).
        logits: (..., V) float, the teacher's sampling logits for the same positions (after CFG, temperature
            and top-k/top-p filtering; ``-inf`` marks excluded codes; any float dtype, used in float32).
            Every row needs at least one finite entry; ``+inf`` and NaN are rejected.
        codebook: (V, D) float codebook vectors (as the tokenizer uses them, e.g. l2-normalised for VQ-16).
        steps: solver steps (default :data:`DEFAULT_STEPS`).
        solver: ``"euler"`` (= DDIM), ``"heun"`` (2 evaluations a step), ``"dpm2m"`` / ``"dpm3m"``
            (DPM-Solver++ multistep, 2nd / 3rd order); default :data:`DEFAULT_SOLVER`.
        grid, t_min, t_max: the time grid, see :func:`time_grid`, for a codebook of unit RMS norm; it is
            moved to the codebook's scale by :func:`rescale_time`. The token is the posterior argmax at the
            last time.
        scale: the codebook scale used by :func:`rescale_time` (default :func:`code_scale` of ``codebook``).
        prune_nats: accepted (None or a positive number) so that settings recorded by earlier versions, which
            left out codes this many nats below a row's best, keep working; the map now evaluates every allowed
            code at every step, which is exact and on CPU faster than pruning (see
            :mod:`distilled_decoding.flow_kernels`), so the value does not change the result.
        chunk_elements: rows are processed in chunks of at most this many codes (padded V) in all, at least one
            row. Does not change the result.

    Returns:
        (...) int64 code indices; each a deterministic function of its own (noise, logits) row: the batch size,
        the order of the rows, the chunking and the thread count do not change it.
    """
    check_inputs(noise, logits, codebook)
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    if prune_nats is not None and not prune_nats > 0:
        raise ValueError(f"prune_nats={prune_nats!r}: expected a positive number or None")
    cb = codebook_layout(codebook)
    ts, _ = solver_times(codebook, steps, grid, t_min, t_max, cb.scale if scale is None else scale)
    v, d = codebook.shape
    lead = noise.shape[:-1]
    lg = logits.reshape(-1, v)
    n = lg.shape[0]
    out = torch.empty(n, dtype=torch.long, device=noise.device)
    if n == 0:
        return out.reshape(lead)
    log_p = shifted_log_p(lg)
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: entries must be finite")
    x_all = noise.reshape(-1, d).float()
    plan = _plan(ts, solver, noise.device)
    rows = max(1, chunk_elements // cb.kp)
    for i in range(0, n, rows):
        j = i + rows
        out[i:j] = solve(cb, log_p[i:j], x_all[i:j], plan)
    return out.reshape(lead)


def _posterior(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    check_inputs(x, log_p, codebook, "log_p")
    v, d = codebook.shape
    lp = shifted_log_p(log_p.reshape(-1, v), "log_p")
    return posterior(codebook_layout(codebook), lp, x.reshape(-1, d).float(), t)


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t={t!r}: expected 0 < t ≤ 1")
    return t


def posterior_logits(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Posterior log-weights ``log p_j − ‖x − (1 − t) c_j‖² / (2 t²)`` up to a per-row constant:
    x (..., D), t ∈ (0, 1], log_p (..., V) (−inf allowed, ≥ 1 finite per row), codebook (V, D) →
    (..., V) float32 (−inf at excluded codes). Their argmax at small t is the token."""
    return _posterior(x, _check_t(t), log_p, codebook)[0].reshape(log_p.shape)


def denoise(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Posterior mean x̂0 = Σ_j w_j(x, t) c_j: x (..., D), t ∈ (0, 1], log_p (..., V) log-probabilities up
    to a per-row constant (−inf allowed, ≥ 1 finite per row), codebook (V, D) → (..., D) float32."""
    return _posterior(x, _check_t(t), log_p, codebook)[1].reshape(x.shape)


def velocity(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Flow-matching velocity dx/dt = (x − x̂0(x, t)) / t, shapes as in :func:`denoise`."""
    return (x.float() - denoise(x, t, log_p, codebook)) / _check_t(t)


def posterior_mean(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Posterior mean x̂0(x, t) = Σ_j w_j c_j, ``w = softmax_j(log p_j + (1 − t)/t² x·c_j − (1 − t)²/(2t²) ‖c_j‖²)``
    (:func:`denoise`'s formula: the ‖x‖² term cancels in the softmax), differentiable in x and log_p, one t per row.

    Args:
        x: (..., D) float noisy vectors x_t = (1 − t) x0 + t ε.
        t: a float or a tensor broadcastable to ``x.shape[:-1]``, every entry in (0, 1].
        log_p: (..., V) log-probabilities up to a per-row constant, broadcastable against ``x.shape[:-1]`` (e.g.
            (B, N, 1, V) for m noise draws (B, N, m, D) per position); −inf excludes a code, ≥ 1 finite per row.
        codebook: (V, D).

    Returns:
        (..., D) float32. A matmul and ``torch.softmax``: equal to :func:`denoise` up to float32 rounding (≈1e-6),
        not bit-identical across batch shapes (use :func:`denoise` / :func:`noise_to_tokens` where that matters).
    """
    _check_float("x", x)
    _check_float("log_p", log_p)
    _check_float("codebook", codebook)
    if codebook.dim() != 2 or x.shape[-1] != codebook.shape[1] or log_p.shape[-1] != codebook.shape[0]:
        raise ValueError(
            f"codebook: expected (V, D) with x (..., D) and log_p (..., V); got codebook {tuple(codebook.shape)}, "
            f"x {tuple(x.shape)}, log_p {tuple(log_p.shape)}"
        )
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.numel() and not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError("t: every entry must lie in (0, 1]")
    cb = codebook.float()
    a = 1.0 - t
    coef = (a / (t * t)).unsqueeze(-1)
    quad = (a * a / (2.0 * t * t)).unsqueeze(-1)
    logits = log_p.float() + coef * (x.float() @ cb.T) - quad * cb.square().sum(-1)
    return torch.softmax(logits, dim=-1) @ cb
