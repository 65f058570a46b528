"""Batch-invariant float32 kernels of the categorical flow map (see :mod:`distilled_decoding.flow`).

:func:`solve` runs the solver of :func:`distilled_decoding.flow.noise_to_tokens` on a chunk of rows (positions);
each evaluation computes the posterior log-weights of a row's codes, their weights and the posterior mean x̂0.
Two implementations give the same bits: the torch kernels here (any device) and, on CPU, the fused C kernel of
:mod:`distilled_decoding.flow_native` (``csrc/flow_solve.c``, compiled on first use; several times faster), which
:func:`solve` uses when it builds.

Layout. Row r holds its codes in canonical order (ascending code id: every code if its logits allow all of
them, else the codes they allow), then padding (log-weight −inf, a zero code) up to its canonical length
K = 64·2^k. Rows of equal K are evaluated together (a :class:`_Group`).

Arithmetic (float32), per row, in an order fixed by the row alone (its values and K):

* log-weights ``log p_j − b·‖c_j‖² + Σ_d (a·x_d)·c_jd`` (a = (1 − t)/t², b = (1 − t)²/(2t²); the ‖x‖²/(2t²)
  term is a per-row constant): one sequential chain of fused multiply-adds over these D + 2 terms;
* weights ``e_j = flow_exp(l_j − max l)`` (:func:`flow_exp`: Cephes' expf as a fixed sequence of float32
  operations; 0 at padding);
* sums Σ_j e_j·[c_j, 1]: 16 interleaved sequential fused multiply-add chains (lane l takes the positions
  j ≡ l mod 16 in order), then a sequential sum of the 16 lanes; x̂0 = Σ e c / Σ e;
* the solver's step (the next state, a linear combination of the state and the last x̂0's, scaled by the next
  a, with [1, −b] in front: the next chain weights) as one more chain over per-row solver slots.

The chains are ``torch.nn.functional.embedding_bag(..., mode="sum", per_sample_weights=...)``, which computes
each bag as a sequential fused multiply-add chain over its entries, one bag per thread; the C kernel writes the
same chains with ``fmaf`` (compiled without contraction). ``tests/test_flow.py`` checks the chains against their
definition, the two implementations against each other bit for bit, and the map's bits across batch sizes, row
orders, chunkings and thread counts. There is no matmul or library reduction whose order could change with the
batch or the thread split, so a row's bits depend on its own inputs only.

Every allowed code is evaluated at every step (the C kernel skips a lane group whose 16 log-weights are all more
than 87 nats below the best: their weights are exactly 0, so this changes no bit). Certified pruning (dropping
codes whose weight a bound derived from the flow keeps below e⁻³⁰ of the best at every later evaluation) was
implemented in the torch kernels and measured: on CPU its bookkeeping (compaction, regrouping, per-step
certificates) cost more than the evaluations it saved.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distilled_decoding import flow_native

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "CodebookLayout",
    "SolverPlan",
    "code_scale",
    "codebook_layout",
    "flow_exp",
    "fma_chain",
    "padded_length",
    "posterior",
    "posterior_weights",
    "solve",
    "solver_plan",
]

#: codes of one chunk (rows × padded codes per row); bounds a chunk's memory (about 60 bytes a code).
DEFAULT_CHUNK_ELEMENTS = 1 << 18
_BLOCK = 64  # a row's length is padded to 64·2^k
_LANES = 16  # the weighted sums run in 16 interleaved chains (positions ≡ l mod 16), then one chain over those
_CACHE_SIZE = 4
# per-row solver slots (rows of D + 2 values): three x̂0's, the state a·x, the constants [1, 0, …] and
# [0, 1, …], Heun's intermediate state and its x̂0. x̂0's and states use columns 2: and keep zeros in 0 and 1.
_X0, _X, _ONE, _B, _XE, _X0E, _SLOTS = 0, 3, 4, 5, 6, 7, 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_length(n: int) -> int:
    """A row's canonical length 64·2^k ≥ n."""
    return _BLOCK * _next_pow2(-(-n // _BLOCK))


def code_scale(codebook: Tensor) -> float:
    """RMS norm of the codebook rows, rounded to 3 significant digits (so that the summation order, hence
    the device or the thread count, practically cannot change it): (V, D) float → float."""
    rms = float(codebook.detach().double().pow(2).sum(dim=-1).mean().sqrt())
    return float(f"{rms:.3g}")


def fma_chain(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """Per bag b: the sequential fused multiply-add chain Σ_i weights[i]·table[index[i]] over the bag's entries
    i ∈ [offsets[b], offsets[b + 1]) in order (the last bag ends at the last entry): (bags, table columns)."""
    return torch.embedding_bag(table, index, offsets, False, 0, False, weights, False)[0]


# Cephes expf in float32 (Cody-Waite reduction, degree-5 polynomial), op for op as csrc/flow_solve.c's dd_exp
_EXP = dict(log2e=1.44269504088896341, c1=0.693359375, c2=-2.12194440e-4, p0=1.9875691500e-4, p1=1.3981999507e-3,
            p2=8.3334519073e-3, p3=4.1665795894e-2, p4=1.6666665459e-1, p5=5.0000001201e-1, one=1.0)  # fmt: skip
_EXP_MIN = -87.0
_exp_constants: dict[torch.device, dict[str, Tensor]] = {}


def flow_exp(x: Tensor) -> Tensor:
    """exp(x) for float32 x ≤ 0 as the flow kernels define it (0 below −87 and at −inf): a fixed sequence of
    IEEE float32 operations, so that every device and the C kernel give the same bits. Relative error ≈ 1e-7."""
    c = _exp_constants.get(x.device)
    if c is None:  # float32 constants, made once per device (no host-to-device copy per call)
        c = {k: torch.tensor(v, dtype=torch.float32, device=x.device) for k, v in _EXP.items()}
        _exp_constants[x.device] = c
    xc = x.clamp_min(_EXP_MIN)
    n = torch.round(xc * c["log2e"])
    r = xc - n * c["c1"]
    r = r - n * c["c2"]
    z = r * r
    p = r * c["p0"] + c["p1"]
    for k in ("p2", "p3", "p4", "p5"):
        p = p * r + c[k]
    y = p * z + r + c["one"]
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x < _EXP_MIN, 0.0, y * scale)


def posterior_weights(logw: Tensor) -> Tensor:
    """Unnormalised posterior weights e_p = :func:`flow_exp` (l_p − max_q l_q) of log-weights (R, K) (−inf → 0);
    x̂0 = Σ e_p c_p / Σ e_p."""
    return flow_exp(logw - logw.amax(dim=1, keepdim=True))


def _i32(values: Tensor) -> Tensor:
    return values.to(torch.int32).reshape(-1)


class CodebookLayout:
    """The codebook in kernel layout: ``dot (D + 1, Kp)`` (the codes transposed, then their squared norms
    ‖c_j‖² as a sequential fused multiply-add chain; zero past V; Kp = :func:`padded_length` (V)),
    ``sums (V + 1, D + 1)`` (rows [c_j, 1], then a zero row for padding) and ``scale`` = :func:`code_scale`."""

    def __init__(self, codebook: Tensor):
        cb = codebook.detach().float().contiguous()
        self.v, self.d = cb.shape
        self.kp = padded_length(self.v)
        flat = cb.reshape(-1)
        entries = torch.arange(flat.numel(), device=cb.device, dtype=torch.int32)
        dot = cb.new_zeros((self.d + 1, self.kp))
        dot[: self.d, : self.v] = cb.t()
        dot[self.d, : self.v] = fma_chain(entries, flat.unsqueeze(1), entries[:: self.d], flat).squeeze(1)
        self.dot = dot
        sums = cb.new_zeros((self.v + 1, self.d + 1))
        sums[: self.v, : self.d] = cb
        sums[: self.v, self.d] = 1.0
        self.sums = sums
        self.scale = code_scale(cb)
        self._bags: dict[tuple[int, int], tuple] = {}

    def bags(self, r: int, k: int, rows: tuple[Tensor, Tensor] | None) -> tuple:
        """The bags of R rows of canonical length K: (log-weight chain entries and offsets, weighted-sum entries
        and starts, block-sum bags or None). ``rows`` = (code ids (R, K), lengths (R,)), or None for rows that
        hold every code in the shared table (cached by R)."""
        if rows is None and (r, k) in self._bags:
            return self._bags[(r, k)]
        d, dev = self.d, self.dot.device
        rr = torch.arange(r, device=dev).unsqueeze(1)
        if rows is None:
            dims = torch.arange(d + 1, device=dev).expand(r, d + 1)  # shared table rows
            index, length = torch.arange(k, device=dev).expand(r, k), torch.full((r,), self.v, device=dev)
        else:
            dims = torch.arange(d + 1, device=dev) * r + rr  # row r's own dimension rows
            index, length = rows
        table_rows = d + 1 if rows is None else (d + 1) * r
        # bag r of the log-weight chain: log p_r, ‖c‖², c_0 … c_(D−1), weighted by w_r = [1, −b, a·x_r]
        logit = (_i32(torch.cat([table_rows + rr, dims[:, d:], dims[:, :d]], 1)), _i32(rr * (d + 2)))
        valid = (torch.arange(k, device=dev) < length.unsqueeze(1)) & (index < self.v)
        # bag (r, l) of the weighted sums: row r's positions l, l + 16, l + 32, … (the lanes of the C kernel)
        lanes = torch.arange(k, device=dev).view(k // _LANES, _LANES).t().reshape(-1)
        starts = _i32(torch.arange(r * _LANES, device=dev) * (k // _LANES))
        sums = (_i32(torch.where(valid, index, self.v)[:, lanes]), starts, lanes)  # weights go in as w[:, lanes]
        ids = torch.arange(r * _LANES, device=dev, dtype=torch.int32)
        block = (ids, ids[::_LANES].contiguous(), self.dot.new_ones(r * _LANES))
        out = (logit, sums, block)
        if rows is None:
            if len(self._bags) > 8:
                self._bags.clear()
            self._bags[(r, k)] = out
        return out


_cache: list[tuple[weakref.ref, int, tuple, CodebookLayout]] = []


def codebook_layout(codebook: Tensor) -> CodebookLayout:
    """:class:`CodebookLayout` of ``codebook`` (V, D), cached while the tensor lives and is not modified in
    place (a chooser that calls the flow map once per decoding step prepares its codebook once)."""
    try:
        version = codebook._version
    except RuntimeError:  # inference tensors have no version counter: no caching
        version = None
    key = (codebook.device, codebook.dtype, tuple(codebook.shape))
    if version is not None:
        for ref, ver, k, lay in _cache:
            if ref() is codebook and ver == version and k == key:
                return lay
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError("codebook: entries must be finite")
    lay = CodebookLayout(codebook)
    if version is not None:
        _cache[:] = [c for c in _cache if c[0]() is not None][-(_CACHE_SIZE - 1) :]
        _cache.append((weakref.ref(codebook), version, key, lay))
    return lay


class SolverPlan:
    """Per evaluation e, the chain that makes the next chain weights [1, −b, a·x] (a, b at the next
    evaluation's time) from the solver slots: slot ids ``slot_sets[set_of[e]]`` and coefficients ``coefs[e]``."""

    def __init__(self, terms: list[list[tuple[int, float]]], t0: float, heun: bool, device: torch.device):
        sets = [tuple(s for s, _ in t) for t in terms]
        self.slot_sets = sorted(set(sets))
        self.set_of = [self.slot_sets.index(k) for k in sets]
        self.coefs = torch.tensor([[c for _, c in t] for t in terms], dtype=torch.float32, device=device)
        self.heun = heun  # two evaluations a step: at t (x̂0 into _X0), at s (into _X0E)
        self.n_eval = len(terms)
        self.t0 = t0  # the first evaluation's time
        self._bags: dict[int, tuple] = {}
        # per evaluation: the slot its x̂0 goes to and the state slot that receives the next chain weights
        targets, states = ([_X0, _X0E], [_XE, _X]) if heun else ([_X0, _X0 + 1, _X0 + 2], [_X])
        self.targets = [targets[e % len(targets)] for e in range(self.n_eval)]
        self.states = [states[e % len(states)] for e in range(self.n_eval)]
        i32 = dict(dtype=torch.int32, device="cpu")
        slots = torch.tensor([self.slot_sets[k] for k in self.set_of], **i32)
        self.native = (torch.tensor(self.targets, **i32), torch.tensor(self.states, **i32), slots,
                       self.coefs.cpu().contiguous())  # fmt: skip

    def bags(self, r: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """For R rows, per evaluation: the solver chain's entries (r·8 + slot), its offsets, and its coefficients
        (R·6,) (cached by R)."""
        if r not in self._bags:
            if len(self._bags) > 8:
                self._bags.clear()
            rows = torch.arange(r, device=self.coefs.device).unsqueeze(1)
            entries = [_i32(rows * _SLOTS + torch.tensor(s, device=rows.device)) for s in self.slot_sets]
            coefs = (self.coefs.repeat(1, r) if r > 1 else self.coefs).unbind(0)
            self._bags[r] = ([entries[k] for k in self.set_of], _i32(rows * 6), coefs)
        return self._bags[r]


def solver_plan(
    ts: Sequence[float], coefficients: Sequence[tuple[float, float, float, float]] | None, device: torch.device
) -> SolverPlan:
    """The :class:`SolverPlan` on times ``ts`` of a multistep solver with per-step ``coefficients``
    (cx, c0, c1, c2) of x_s = cx·x + c0·x̂0_i + c1·x̂0_(i−1) + c2·x̂0_(i−2), or of Heun's method (``None``: two
    evaluations a step, at t and at s)."""

    def ab(t: float) -> tuple[float, float]:
        return (1.0 - t) / (t * t), (1.0 - t) ** 2 / (2.0 * t * t)

    terms = []
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        (a_t, _), (a_s, b_s) = ab(t), ab(s)
        scale = a_s / a_t if i > 0 else a_s  # the state slot holds a_t·x (x itself before the first step)
        const = [(_ONE, 1.0), (_B, -b_s)]  # last, so that columns 0 and 1 come out exactly [1, −b]
        if coefficients is None:  # x_e = (s/t)·x + (1 − s/t)·x̂0; x_s = x + (s − t)/2·(v(x, t) + v(x_e, s))
            h = (s - t) / 2.0
            terms.append([(_X, scale * s / t), (_X0, a_s * (1.0 - s / t)), (_XE, 0.0), (_X0E, 0.0), *const])
            trapezoid = [(_X, scale * (1.0 + h / t)), (_X0, -a_s * h / t), (_XE, h / s), (_X0E, -a_s * h / s)]
            terms.append([*trapezoid, *const])  # x_e's slot holds a_s·x_e
            continue
        cx, c0, c1, c2 = coefficients[i]
        history = [(_X0 + (i - 1) % 3, a_s * c1), (_X0 + (i - 2) % 3, a_s * c2)]
        terms.append([(_X, scale * cx), (_X0 + i % 3, a_s * c0), *history, *const])
    return SolverPlan(terms, float(ts[0]), coefficients is None, device)


def _canonical_rows(cb: CodebookLayout, log_p: Tensor, finite: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of log_p (N, V) (finite: its finite entries, length: their counts) in canonical order, padded to the
    largest canonical length among them: (log_p (N, K), code ids (N, K))."""
    n, v = log_p.shape
    if bool((length == v).all()):
        lp = F.pad(log_p, (0, cb.kp - v), value=float("-inf")) if cb.kp > v else log_p
        return lp, torch.arange(cb.kp, device=log_p.device).expand(n, cb.kp)
    k = padded_length(int(length.max()))
    if bool((length == length[0]).all()):  # e.g. top-k: each row's finite entries in order, as a (N, n) view
        index = F.pad(finite.nonzero()[:, 1].view(n, -1), (0, k - int(length[0])))
    else:
        dest = torch.where(finite, finite.cumsum(dim=1) - 1, k)
        src = torch.arange(v, device=log_p.device).expand(n, v)
        index = torch.zeros(n, k + 1, dtype=torch.long, device=log_p.device).scatter_(1, dest, src)[:, :k]
    valid = torch.arange(k, device=log_p.device) < length.unsqueeze(1)
    return torch.where(valid, log_p.gather(1, index), float("-inf")), index


def initial_state(x: Tensor, plan: SolverPlan | None) -> tuple[Tensor, Tensor]:
    """Solver slots ``h (R, 8, D + 2)`` (the state x; the constant rows [1, 0, …] and [0, 1, …]) and the first chain
    weights ``w (R, D + 2)`` = [1, −b, a·x] at the plan's first time (the log p alone at t = 1) for states x (R, D)."""
    r, d = x.shape
    h = x.new_zeros(r, _SLOTS, d + 2)
    h[:, _ONE, 0] = 1.0
    h[:, _B, 1] = 1.0
    h[:, _X, 2:] = x
    w = x.new_zeros(r, d + 2)
    w[:, 0] = 1.0
    if plan is not None and plan.t0 < 1.0:
        w[:, 1] = -((1.0 - plan.t0) ** 2) / (2.0 * plan.t0**2)
        w[:, 2:] = x * ((1.0 - plan.t0) / plan.t0**2)
    return h, w


class _Group:
    """Rows of one canonical length K: their log-weight chain (table: the shared codebook when every row holds
    all V codes, else each row's own copy of its codes; then each row's log p), their weighted sums, and their
    solver slots ``h (R, 8, D + 2)`` with the chain weights ``w (R, D + 2)`` = [1, −b, a·x] of the next
    evaluation (a·x: the state slot holds the same, or x itself at t = 1 where a = 0)."""

    def __init__(
        self, cb: CodebookLayout, log_p: Tensor, index: Tensor, length: Tensor, x: Tensor, plan: SolverPlan | None
    ):
        self.cb, self.index = cb, index
        r, k = log_p.shape
        d = cb.d
        shared = k == cb.kp and bool((length == cb.v).all())
        if shared:  # table: the D dimensions and ‖c‖², then the log p's
            self.table = torch.cat([cb.dot, log_p])
        else:  # table: dimension i of row r's codes at i·R + r, then the log p's
            self.table = log_p.new_empty((d + 2) * r, k)
            flat = index.reshape(-1)
            for i in range(d + 1):
                torch.index_select(cb.dot[i], 0, flat, out=self.table[i * r : (i + 1) * r].view(-1))
            self.table[(d + 1) * r :] = log_p
        self.logit_bags, self.sum_bags, self.block_bags = cb.bags(r, k, None if shared else (index, length))
        self.h, self.w = initial_state(x, plan)
        self.slot = {j: self.h[:, j, 2:] for j in (_X0, _X0 + 1, _X0 + 2, _X, _XE, _X0E)}
        if plan is not None:
            self.plan = plan
            self.plan_bags, self.plan_offsets, self.plan_coefs = plan.bags(r)
            self.h_rows = self.h.view(r * _SLOTS, d + 2)

    def logits(self) -> Tensor:
        """Log-weights (R, K) at the current chain weights (−inf at padding)."""
        entries, offsets = self.logit_bags
        return fma_chain(entries, self.table, offsets, self.w.view(-1))

    def mean_into(self, logw: Tensor, slot: int) -> None:
        """x̂0 under the weights :func:`posterior_weights` (logw) into solver slot ``slot``."""
        entries, starts, lanes = self.sum_bags
        s = fma_chain(entries, self.cb.sums, starts, posterior_weights(logw)[:, lanes].reshape(-1))
        s = fma_chain(self.block_bags[0], s, self.block_bags[1], self.block_bags[2])
        num, den = s.split([self.cb.d, 1], dim=1)
        torch.div(num, den, out=self.slot[slot])

    def run(self) -> Tensor:
        """All the plan's evaluations and steps; returns the final log-weights (R, K). (The loop inlines
        :meth:`logits` and :meth:`mean_into` with the aten ops they call, to keep per-op overhead low.)"""
        plan, emb, weights, div = self.plan, torch.embedding_bag, posterior_weights, torch.div
        table, (logit_index, logit_offsets) = self.table, self.logit_bags
        sums, (sum_index, sum_starts, lanes), blocks = self.cb.sums, self.sum_bags, self.block_bags
        h_rows, plan_offsets, d, slot, w = self.h_rows, self.plan_offsets, self.cb.d, self.slot, self.w
        steps = [(slot[plan.targets[e]], self.plan_bags[e], self.plan_coefs[e], slot[plan.states[e]])
                 for e in range(plan.n_eval)]  # fmt: skip
        for target, entries, coef, state in steps:
            logw = emb(table, logit_index, logit_offsets, False, 0, False, w.view(-1), False)[0]
            s = emb(sums, sum_index, sum_starts, False, 0, False, weights(logw)[:, lanes].reshape(-1), False)[0]
            s = emb(s, blocks[0], blocks[1], False, 0, False, blocks[2], False)[0]
            num, den = s.split([d, 1], dim=1)
            div(num, den, out=target)
            w = emb(h_rows, entries, plan_offsets, False, 0, False, coef, False)[0]
            state.copy_(w[:, 2:])
        self.w = w
        return emb(table, logit_index, logit_offsets, False, 0, False, w.view(-1), False)[0]


def solve(cb: CodebookLayout, log_p: Tensor, x: Tensor, plan: SolverPlan) -> Tensor:
    """Tokens (N,) int64 of rows log_p (N, V) (row-max shifted float32, −inf = excluded, ≥ 1 finite per row) from
    noise x (N, D) under the solver ``plan``: the argmax of the posterior after the last step. On CPU the compiled
    kernel when :func:`distilled_decoding.flow_native.available`, else the torch kernels: the same bits either way."""
    if x.device.type == "cpu" and flow_native.available():
        h, w = initial_state(x, plan)
        return flow_native.solve_rows(log_p.contiguous(), cb.dot, h, w, plan.native)
    finite = torch.isfinite(log_p)
    length = finite.sum(dim=1)
    lp, index = _canonical_rows(cb, log_p, finite, length)

    def tokens(g: _Group) -> Tensor:
        return g.index.gather(1, g.run().argmax(dim=1, keepdim=True)).squeeze(1)

    k_max = lp.shape[1]
    if padded_length(int(length.min())) == k_max:  # one canonical length (the usual case)
        return tokens(_Group(cb, lp.contiguous(), index, length, x, plan))
    kk = torch.tensor([padded_length(int(n)) for n in length.tolist()], device=log_p.device)
    out = torch.empty(log_p.shape[0], dtype=torch.long, device=log_p.device)
    for k in kk.unique().tolist():  # rows of one canonical length at a time
        ids = (kk == k).nonzero().squeeze(1)
        out[ids] = tokens(_Group(cb, lp[ids, :k].contiguous(), index[ids, :k], length[ids], x[ids], plan))
    return out


def posterior(cb: CodebookLayout, log_p: Tensor, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """(log-weights (N, V) up to a per-row constant, −inf at excluded codes; x̂0 (N, D)) of rows log_p (N, V)
    (row-max shifted float32) at states x (N, D) and time t ∈ (0, 1], with the kernels of :func:`solve`."""
    finite = torch.isfinite(log_p)
    length = finite.sum(dim=1)
    lp, index = _canonical_rows(cb, log_p, finite, length)
    n, v = log_p.shape
    logits = log_p.new_full((n, v + 1), float("-inf"))
    x0 = x.new_empty(x.shape)
    kk = torch.tensor([padded_length(int(m)) for m in length.tolist()], device=log_p.device)
    for k in kk.unique().tolist():
        ids = (kk == k).nonzero().squeeze(1)
        g = _Group(cb, lp[ids, :k].contiguous(), index[ids, :k], length[ids], x[ids], None)
        g.w[:, 1] = -((1.0 - t) ** 2) / (2.0 * t * t)
        g.w[:, 2:] = x[ids] * ((1.0 - t) / (t * t))
        lw = g.logits()
        valid = torch.arange(k, device=lw.device) < length[ids].unsqueeze(1)
        logits[ids] = logits[ids].scatter_(1, torch.where(valid & (g.index < v), g.index, v), lw)
        g.mean_into(lw, _X0)
        x0[ids] = g.slot[_X0]
    return logits[:, :v], x0
