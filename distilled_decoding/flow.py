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
:func:`time_grid` are the pieces.

Time grid: the flow is exactly covariant under scaling of the codebook (scaling c by s is the
reparametrisation u → u/s of u = (1 − t)/t, in the coordinate y = x/t where dy/du = x̂0), so grids are defined
for a unit-RMS codebook and moved to the codebook's scale (:func:`code_scale`, :func:`rescale_time`).
Defaults (:data:`DEFAULT_SOLVER` etc.) were chosen with ``benchmarks/flow_solvers.py``.

Numerics (all in float32):

* Batch invariance. Every per-row quantity is computed with element-wise IEEE operations (mul, add, exp,
  max, compare), and every sum — over the code dimension D and over the codes — is an explicit pairwise
  halving tree of element-wise adds. A row's bits therefore do not depend on the batch size, the chunking,
  or its position in the batch (a matmul or ``torch.sum`` would: their accumulation order changes with the
  shape and the thread split; ``torch.exp`` was checked to give the same bits on any tensor shape). Each
  row's codes sit in a canonical order (ascending code index) and are padded to a power of two with entries
  of weight exactly 0; padding only adds exact zeros at the top of the trees, so the padded length (set by
  the other rows of a chunk) never changes a row's result.
* ``log p`` is only needed up to a per-row constant (it cancels in the softmax), so the logits are shifted
  by their row maximum, an exact operation. ``-inf`` entries (top-k / top-p filtering) are zero-probability
  codes: they are left out of the integration and can never be returned.
* The posterior logits use ``log p_j + (1 − t)/t² x·c_j − (1 − t)²/(2t²) ‖c_j‖²`` (the ‖x‖² term cancels);
  weights below e⁻⁸⁷ (float32 subnormals, very slow on x86) are set to exactly 0.
* Pruning: at fixed steps (every other step of the second half of the grid), a row whose codes within
  ``prune_nats`` (default 30) of its best log-weight are at most a quarter of its codes is compacted to them.
  The decision depends on the row alone (batch invariant); the removed weight, ≤ V·e⁻³⁰ ≈ 1e-9 of the total,
  is below float32 resolution. A chunk stops early once every row has a single code left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

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
    "code_scale",
    "denoise",
    "noise_to_tokens",
    "posterior_logits",
    "rescale_time",
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
DEFAULT_PRUNE_NATS = 30.0
#: float32 elements of one chunk's (rows × D × codes) work tensor; bounds memory for huge V or batches.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
#: a row is compacted once at most 1/_SHRINK of its codes are within prune_nats of its best
_SHRINK = 4
_PRUNE_EVERY = 2
_SUBNORMAL_LOG = -87.0
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


def code_scale(codebook: Tensor) -> float:
    """RMS norm of the codebook rows, rounded to 3 significant digits (so that the summation order, hence
    the device or the thread count, practically cannot change it): (V, D) float → float."""
    rms = float(codebook.detach().double().pow(2).sum(dim=-1).mean().sqrt())
    return float(f"{rms:.3g}")


def rescale_time(t: float, scale: float) -> float:
    """Move a time of the unit-scale grid to a codebook of RMS norm ``scale``: s·t / (s·t + 1 − t), i.e. the
    log-SNR λ = log((1 − t)/t) shifted by −log(s). Scaling the codebook by s is exactly the reparametrisation
    u = (1 − t)/t → u/s of the flow (in the coordinate y = x/t, where dy/du = x̂0), so a grid that is accurate
    for one codebook is equally accurate for the scaled one."""
    return scale * t / (scale * t + 1.0 - t)


# ------------------------------------------------------------------------------------------------------------
# batch-invariant kernels on one chunk of rows
# ------------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _halve_(w: Tensor, dim: int) -> Tensor:
    """Pairwise-halving sum of ``w`` over ``dim`` (power-of-two length), in place; returns the size-1 slice.

    Element-wise adds only, so each output's bits depend on its own inputs alone (batch invariant).
    """
    n = w.shape[dim]
    while n > 1:
        h = n // 2
        w.narrow(dim, 0, h).add_(w.narrow(dim, h, h))
        n = h
    return w.narrow(dim, 0, 1)


def _tree(w: Tensor, dim: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """The (destination, source) view pairs of :func:`_halve_` on ``w`` and the size-1 view of the result."""
    pairs, n = [], w.shape[dim]
    while n > 1:
        h = n // 2
        pairs.append((w.narrow(dim, 0, h), w.narrow(dim, h, h)))
        n = h
    return pairs, w.narrow(dim, 0, 1)


def _sum_tree(tree: tuple[list[tuple[Tensor, Tensor]], Tensor]) -> Tensor:
    """Run a halving tree made by :func:`_tree` in place; returns the size-1 result view."""
    for dst, src in tree[0]:
        dst.add_(src)
    return tree[1]


def _compact_order(sel: Tensor, counts: Tensor, k: int) -> Tensor:
    """(B, K) positions of the selected entries of each row, in order, then zeros: shape (B, k)."""
    b, n = sel.shape
    dest = torch.where(sel, sel.cumsum(dim=1) - 1, torch.full_like(counts, k).unsqueeze(1))
    src = torch.arange(n, device=sel.device).expand(b, n)
    return torch.zeros(b, k + 1, dtype=torch.long, device=sel.device).scatter_(1, dest, src)[:, :k]


class _Codebook:
    """The codebook in kernel layout: ``codes (D2 + 1, Vpad)`` (transposed, zero-padded, a final row of ones,
    zero at padding) and ``sqnorm (Vpad,)`` = ‖c_j‖² (summed with the halving tree)."""

    def __init__(self, codebook: Tensor):
        v, d = codebook.shape
        self.v, self.d, self.d2 = v, d, _next_pow2(d)
        vp = _next_pow2(v)
        codes = codebook.new_zeros((self.d2 + 1, vp), dtype=torch.float32)
        codes[:d, :v] = codebook.t().float()
        codes[self.d2, :v] = 1.0
        self.codes = codes
        sq = codes[: self.d2] * codes[: self.d2]
        self.sqnorm = _halve_(sq, 0).squeeze(0).clone()

    def pad_x(self, x: Tensor) -> Tensor:
        """(N, D) → (N, D2) float32, zero-padded."""
        x = x.float()
        return torch.nn.functional.pad(x, (0, self.d2 - self.d)) if self.d2 > self.d else x

    def rows(self, log_p: Tensor) -> _Rows:
        """Rows for log_p (B, V) (−inf = excluded code): each row's finite codes in ascending index order,
        padded to a power of two (the shared codebook itself when every code of every row is allowed)."""
        b, v = log_p.shape
        finite = torch.isfinite(log_p)
        counts = finite.sum(dim=1)
        vp = self.codes.shape[1]
        if bool((counts == v).all()):
            lp = torch.nn.functional.pad(log_p, (0, vp - v), value=float("-inf")) if vp > v else log_p
            return _Rows(self, lp, None, torch.full_like(counts, v))
        k = _next_pow2(int(counts.max()))
        order = _compact_order(finite, counts, k)
        valid = torch.arange(k, device=log_p.device).unsqueeze(0) < counts.unsqueeze(1)
        lp = torch.where(valid, log_p.gather(1, order), float("-inf"))
        return _Rows(self, lp, order, counts)


class _Rows:
    """A chunk of B rows. Row r holds ``length[r]`` codes in its canonical order (then padding):
    ``log_p (B, K)`` (−inf at padding), ``index (B, K)`` code ids (None: the shared codebook, position = id),
    and, gathered from the codebook, ``codes (D2 + 1, 1 or B, K)`` and ``sqnorm (1 or B, K)``. Padding
    entries have log_p = −inf, so they get weight exactly 0 and add exact zeros to every sum."""

    def __init__(self, cb: _Codebook, log_p: Tensor, index: Tensor | None, length: Tensor):
        self.cb = cb
        self._buf = log_p.new_empty(0)
        self._set(log_p, index, length)

    def _set(self, log_p: Tensor, index: Tensor | None, length: Tensor) -> None:
        cb = self.cb
        self.log_p, self.index, self.length = log_p, index, length
        if index is None:
            self.codes, self.sqnorm = cb.codes.unsqueeze(1), cb.sqnorm.unsqueeze(0)
        else:
            flat = index.reshape(-1)
            self.codes = cb.codes.index_select(1, flat).view(-1, *index.shape)
            self.sqnorm = cb.sqnorm.index_select(0, flat).view(index.shape)
        d1, (b, k) = self.codes.shape[0], log_p.shape
        if self._buf.numel() < d1 * b * k:  # one work buffer per chunk, reused after every compaction
            self._buf = log_p.new_empty(d1 * b * k)
        self.work = self._buf[: d1 * b * k].view(d1, b, k)  # (D2 + 1, B, K) scratch
        # the halving trees' views, made once per layout: over D (rows of `work`) and over K
        self._tree_d = _tree(self.work[: d1 - 1], 0)
        self._tree_k = _tree(self.work, 2)

    @property
    def size(self) -> int:
        return self.log_p.shape[1]

    def log_weights(self, x: Tensor, t: float) -> Tensor:
        """Posterior log-weights (B, K) up to a per-row constant at state x (B, D2) and time t ∈ (0, 1]:
        log p_j + (1 − t)/t² · x·c_j − (1 − t)²/(2t²) · ‖c_j‖²  (= log p_j − ‖x − (1 − t)c_j‖²/(2t²) + const)."""
        if t >= 1.0:
            return self.log_p.clone()
        a = 1.0 - t
        d2 = x.shape[1]
        torch.mul((x * (a / (t * t))).t().unsqueeze(-1), self.codes[:d2], out=self.work[:d2])
        dot = _sum_tree(self._tree_d).squeeze(0)
        return (self.sqnorm * (-(a * a) / (2.0 * t * t)) + self.log_p).add_(dot)

    def denoise(self, logw: Tensor) -> Tensor:
        """x̂0 (B, D2) from log-weights (B, K); consumes ``logw``."""
        logw = logw.sub_(logw.amax(dim=1, keepdim=True))
        # weights below e^-87 would be float32 subnormals (slow arithmetic on x86): make them exact zeros
        e = logw.masked_fill_(logw < _SUBNORMAL_LOG, float("-inf")).exp_()
        torch.mul(e.unsqueeze(0), self.codes, out=self.work)
        s = _sum_tree(self._tree_k).squeeze(2)  # (D2 + 1, B)
        return (s[:-1] / s[-1:]).t()

    def prune(self, logw: Tensor, nats: float) -> Tensor:
        """Per-row pruning. A row whose codes within ``nats`` of its best are at most half of its length is
        compacted to those codes (kept in order); other rows are left as they are (their far codes keep their
        tiny weights). Whether and how a row is compacted depends on the row alone, so results stay batch
        invariant; the chunk only sets the padding. Returns the log-weights in the new layout."""
        keep = logw >= logw.amax(dim=1, keepdim=True) - nats
        alive = keep.sum(dim=1)
        shrink = alive * _SHRINK <= self.length
        if not bool(shrink.any()):
            return logw
        b, k = keep.shape
        dev = logw.device
        pos = torch.arange(k, device=dev).unsqueeze(0)
        sel = torch.where(shrink.unsqueeze(1), keep, pos < self.length.unsqueeze(1))
        length = torch.where(shrink, alive, self.length)
        k_new = _next_pow2(int(length.max()))
        order = _compact_order(sel, length, k_new)
        valid = torch.arange(k_new, device=dev).unsqueeze(0) < length.unsqueeze(1)
        log_p = torch.where(valid, self.log_p.gather(1, order), float("-inf"))
        logw = torch.where(valid, logw.gather(1, order), float("-inf"))
        index = order if self.index is None else self.index.gather(1, order)
        self._set(log_p, index, length)
        return logw

    def argmax(self, logw: Tensor) -> Tensor:
        pos = logw.argmax(dim=1)
        if self.index is None:
            return pos
        return self.index.gather(1, pos.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------------------------------------
# solver
# ------------------------------------------------------------------------------------------------------------
def _integrate(rows: _Rows, x: Tensor, ts: Sequence[float], solver: str, prune_nats: float | None) -> Tensor:
    """Integrate one chunk from ts[0] = 1 to ts[-1] = t_min; returns token ids (B,).

    Multistep solvers work in the data-prediction form of DPM-Solver++ with α_t = 1 − t, σ_t = t and
    λ = log(α/σ); the first step (from λ = −∞) is first order, the second at most second order.
    """
    hist: list[tuple[float, Tensor]] = []  # (λ, x̂0) at the previous evaluations with finite λ

    n = len(ts) - 1
    # pruning is checked at fixed steps (every other step of the second half), the same for every chunk:
    # each check may compact rows, and a few large compactions cost less than many small ones
    checks = set(range(n // 2, n, _PRUNE_EVERY)) if prune_nats is not None else set()

    def evaluate(x: Tensor, t: float, check: bool = False) -> Tensor:
        logw = rows.log_weights(x, t)
        if check:
            logw = rows.prune(logw, prune_nats)
        return rows.denoise(logw)

    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        if rows.size == 1:  # one candidate left in every row: the tokens are decided
            break
        x0 = evaluate(x, t, i in checks)
        if solver == "heun":
            v1 = (x - x0) / t
            xe = x + v1 * (s - t)
            v2 = (xe - evaluate(xe, s)) / s
            x = x + (v1 + v2) * ((s - t) / 2.0)
            continue
        if solver == "euler" or t >= 1.0:  # DDIM step, exact for a constant x̂0
            x = x * (s / t) + x0 * (1.0 - s / t)
            continue
        lam_t = _logsnr(t)
        h = _logsnr(s) - lam_t
        if solver == "dpm3m" and len(hist) >= 2:
            (l2, m2), (l1, m1) = hist[-2], hist[-1]
            r0, r1 = (lam_t - l1) / h, (l1 - l2) / h
            d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi1 = math.expm1(-h)  # DPM-Solver++ coefficients; α_s·(−phi1) = 1 − s/t
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            a_s = 1.0 - s
            x = x * (s / t) - x0 * (a_s * phi1) + d1 * (a_s * phi2) - d2 * (a_s * phi3)
        elif hist:  # dpm2m, or dpm3m's second step
            l1, m1 = hist[-1]
            r = (lam_t - l1) / h
            x = x * (s / t) + (x0 * (1.0 + 0.5 / r) - m1 * (0.5 / r)) * (1.0 - s / t)
        else:
            x = x * (s / t) + x0 * (1.0 - s / t)
        hist = [*hist[-1:], (lam_t, x0)]
    return rows.argmax(rows.log_weights(x, ts[-1]))


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------
def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def _check_inputs(noise: Tensor, logits: Tensor, codebook: Tensor) -> None:
    _check_float("noise", noise)
    _check_float("logits", logits)
    _check_float("codebook", codebook)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook: expected shape (V, D), got {tuple(codebook.shape)}")
    v, d = codebook.shape
    if noise.dim() < 1 or noise.shape[-1] != d:
        raise ValueError(f"noise: last dim must equal the codebook dim D={d}, got shape {tuple(noise.shape)}")
    if logits.dim() < 1 or logits.shape[-1] != v:
        raise ValueError(f"logits: last dim must equal the codebook size V={v}, got shape {tuple(logits.shape)}")
    if noise.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"logits: leading shape {tuple(logits.shape[:-1])} must match noise's {tuple(noise.shape[:-1])}"
        )
    if noise.device != logits.device or codebook.device != noise.device:
        raise ValueError(
            f"codebook: noise ({noise.device}), logits ({logits.device}) and codebook ({codebook.device}) "
            "must be on one device"
        )
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError("codebook: entries must be finite")


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
    prune_nats: float | None = DEFAULT_PRUNE_NATS,
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
        prune_nats: drop codes whose posterior log-weight is this far below the best (None: never prune).
        chunk_elements: rows are processed in chunks whose (rows × D × codes) work tensor has at most this
            many float32 elements (at least one row). Does not change the result.

    Returns:
        (...) int64 code indices; each a deterministic function of its own (noise, logits) row.
    """
    _check_inputs(noise, logits, codebook)
    steps = DEFAULT_STEPS if steps is None else steps
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    if prune_nats is not None and not prune_nats > 0:
        raise ValueError(f"prune_nats={prune_nats!r}: expected a positive number or None")
    unit = time_grid(
        steps,
        DEFAULT_GRID if grid is None else grid,
        DEFAULT_T_MIN if t_min is None else t_min,
        DEFAULT_T_MAX if t_max is None else t_max,
    )
    scale = code_scale(codebook) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r}: expected a positive number (the codebook's RMS norm by default)")
    ts = [rescale_time(t, scale) for t in unit]
    v, d = codebook.shape
    lead = noise.shape[:-1]
    lg = logits.reshape(-1, v).float()
    n = lg.shape[0]
    out = torch.empty(n, dtype=torch.long, device=noise.device)
    if n == 0:
        return out.reshape(lead)
    log_p = _log_p(lg, "logits")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: entries must be finite")
    cb = _Codebook(codebook)
    x_all = cb.pad_x(noise.reshape(-1, d))
    per_row = (cb.d2 + 1) * _next_pow2(int(torch.isfinite(log_p).sum(dim=1).max()))
    chunk = max(1, chunk_elements // per_row)
    for i in range(0, n, chunk):
        rows = cb.rows(log_p[i : i + chunk])
        out[i : i + chunk] = _integrate(rows, x_all[i : i + chunk], ts, solver, prune_nats)
    return out.reshape(lead)


def _log_p(lg: Tensor, name: str) -> Tensor:
    """(N, V) float32 logits → logits minus the row max (exact; p's normaliser cancels in the posterior)."""
    if bool(torch.isnan(lg).any()) or bool((lg == float("inf")).any()):
        raise ValueError(f"{name}: NaN or +inf entries (use -inf to exclude codes)")
    row_max = lg.amax(dim=1, keepdim=True)
    if bool((row_max == float("-inf")).any()):
        raise ValueError(f"{name}: every row needs at least one finite entry")
    return lg - row_max


def _full_rows(x: Tensor, log_p: Tensor, codebook: Tensor) -> tuple[_Rows, Tensor]:
    _check_inputs(x, log_p, codebook)
    v, d = codebook.shape
    cb = _Codebook(codebook)
    lp = _log_p(log_p.reshape(-1, v).float(), "log_p")
    vp = cb.codes.shape[1]
    lp = torch.nn.functional.pad(lp, (0, vp - v), value=float("-inf")) if vp > v else lp
    return _Rows(cb, lp, None, torch.full((lp.shape[0],), v, device=lp.device)), cb.pad_x(x.reshape(-1, d))


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t={t!r}: expected 0 < t ≤ 1")
    return t


def posterior_logits(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Posterior log-weights ``log p_j − ‖x − (1 − t) c_j‖² / (2 t²)`` up to a per-row constant:
    x (..., D), t ∈ (0, 1], log_p (..., V) (−inf allowed, ≥ 1 finite per row), codebook (V, D) →
    (..., V) float32. Their argmax at small t is the token."""
    t = _check_t(t)
    rows, xx = _full_rows(x, log_p, codebook)
    v = codebook.shape[0]
    return rows.log_weights(xx, t)[:, :v].reshape(log_p.shape[:-1] + (v,))


def denoise(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Posterior mean x̂0 = Σ_j w_j(x, t) c_j: x (..., D), t ∈ (0, 1], log_p (..., V) log-probabilities up
    to a per-row constant (−inf allowed, ≥ 1 finite per row), codebook (V, D) → (..., D) float32."""
    t = _check_t(t)
    rows, xx = _full_rows(x, log_p, codebook)
    d = codebook.shape[1]
    return rows.denoise(rows.log_weights(xx, t))[:, :d].reshape(x.shape[:-1] + (d,))


def velocity(x: Tensor, t: float, log_p: Tensor, codebook: Tensor) -> Tensor:
    """Flow-matching velocity dx/dt = (x − x̂0(x, t)) / t, shapes as in :func:`denoise`."""
    return (x.float() - denoise(x, t, log_p, codebook)) / _check_t(t)
