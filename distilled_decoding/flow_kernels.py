"""Batch-invariant float32 kernels of the categorical flow map, with certified pruning (see :mod:`..flow`).

:func:`solve` runs the multistep solver of :func:`distilled_decoding.flow.noise_to_tokens` on a chunk of rows
(positions): each evaluation computes a row's posterior log-weights, their softmax, and the posterior mean x̂0.

Layout. Row r holds its codes in canonical order (ascending code id: every code if its logits allow all of
them, else the codes they allow, or, after pruning, the codes it kept), then padding (log-weight −inf, a zero
code) up to its canonical length K = 64·2^k. Rows of equal K are evaluated together (a :class:`_Group`).

Arithmetic (float32), per row, in an order fixed by the row alone (its values and K):

* log-weights ``log p_j − b·‖c_j‖² + Σ_d (a·x_d)·c_jd`` (a = (1 − t)/t², b = (1 − t)²/(2t²); the ‖x‖²/(2t²)
  term is a per-row constant): one sequential chain of fused multiply-adds over these D + 2 terms;
* weights ``softmax`` over the row's K entries;
* sums Σ_j w_j·[c_j, 1] over the row's codes in order: one sequential fused multiply-add chain (K ≤ 1024), or 16
  consecutive blocks of ceil(n/16) codes each (padding at the end of the last block) and a sequential sum of the
  16 block sums; x̂0 = Σ w c / Σ w;
* the solver's update (a linear combination of the state and the last x̂0's) as one more chain.

Chains are ``torch.nn.functional.embedding_bag(..., mode="sum", per_sample_weights=...)``, which computes each bag
as a sequential fused multiply-add chain over its entries, one bag per thread; ``softmax`` over the last dim
reduces each row on its own, in an order fixed by K. ``tests/test_flow.py`` checks both against the definition
and the bits of the map across batch sizes, row orders, chunkings and thread counts. No matmul or library
reduction whose order could change with the batch or the thread split: a row's bits depend on its own inputs.

Certified pruning. With z = x/(1 − t) the full log-weight is ℓ_j = log p_j − b·‖z − c_j‖². At the steps the
solver asks for, a row whose codes within ``prune_nats`` + 10 nats of its best are at most a quarter of its codes
(and whose canonical length shrinks at least 4×) keeps only those from the next evaluation on. For the codes it
drops at time t_p (b_p, state z_p) we keep their largest ℓ_j(t_p) =: L. With r_j = ‖z_p − c_j‖ and, at a later
evaluation (b > b_p, state z), δ = ‖z − z_p‖, the triangle inequality ‖z − c_j‖ ≥ r_j − δ gives, for every
dropped code,

    ℓ_j ≤ ℓ_j(t_p) + b_p·r_j² − b·(r_j − δ)₊²  ≤  L + b·b_p·δ² / (b − b_p)

(the middle term is largest at r_j = b·δ/(b − b_p)). Before each evaluation is used this bound is compared with
the best kept code's ℓ; if a dropped code could be within ``prune_nats`` of it, the row gets its full support
back (and may be pruned again later). So at every evaluation, the final argmax included, each dropped code's
posterior weight is certified (up to float32 rounding of the log-weights) to be below e^−prune_nats times the
best code's (with the default 30 nats their total, V·e⁻³⁰ ≈ 1.5e-9 at V = 16384, is under float32 resolution),
and the token is the argmax over the row's full support. The decisions use the row's own values only.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "CodebookLayout",
    "code_scale",
    "codebook_layout",
    "fma_chain",
    "padded_length",
    "posterior",
    "solve",
    "SolverPlan",
    "solver_plan",
]

#: codes of one chunk (rows × padded codes per row); bounds a chunk's memory (about 60 bytes a code).
DEFAULT_CHUNK_ELEMENTS = 1 << 18
_BLOCK = 64  # a row's length is padded to 64·2^k
_ONE_BAG = 1024  # rows up to this length are summed in one chain, longer ones in _BAGS blocks
_BAGS = 16
_PRUNE_SLACK = 10.0  # nats: codes are dropped this far beyond the certified gap
_SHRINK = 4  # a row is compacted once at most 1/_SHRINK of its codes survive and its length shrinks 4×
_MIN_PRUNE_V = 1024  # smaller codebooks are never pruned (a row cannot get much shorter than 64 codes)
_CACHE_SIZE = 4
# solver slots per row: three x̂0's, the state, two constants, Heun's intermediate state and its x̂0
_X0, _X, _ONE, _B, _XE, _X0E, _SLOTS = 0, 3, 4, 5, 6, 7, 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_length(n: int) -> int:
    """A row's canonical length 64·2^k ≥ n."""
    return _BLOCK * _next_pow2(-(-n // _BLOCK))


def _padded_lengths(n: Tensor) -> Tensor:
    blocks = ((n + (_BLOCK - 1)) // _BLOCK).clamp_min(1).double()
    return _BLOCK * torch.exp2(torch.ceil(torch.log2(blocks))).long()


def code_scale(codebook: Tensor) -> float:
    """RMS norm of the codebook rows, rounded to 3 significant digits (so that the summation order, hence
    the device or the thread count, practically cannot change it): (V, D) float → float."""
    rms = float(codebook.detach().double().pow(2).sum(dim=-1).mean().sqrt())
    return float(f"{rms:.3g}")


def fma_chain(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """Per bag b: the sequential fused multiply-add chain Σ_i weights[i]·table[index[i]] over the bag's entries
    i ∈ [offsets[b], offsets[b + 1]) in order: (bags, table columns). (embedding_bag's sum mode.)"""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


def _i32(values: Tensor) -> Tensor:
    return values.to(torch.int32).reshape(-1)


def _row_sq_norms(v: Tensor) -> Tensor:
    """Squared norms of the rows of v (R, D), each a sequential fused multiply-add chain: (R,)."""
    r, d = v.shape
    flat = v.reshape(-1)
    index = torch.arange(r * d, device=v.device, dtype=torch.int32)
    return fma_chain(index, flat.unsqueeze(1), index[::d], flat).squeeze(1)


class CodebookLayout:
    """The codebook in kernel layout: ``dot (D + 1, Kp)`` (the codes transposed, then ‖c_j‖², zero past V;
    Kp = the canonical length of V), ``sums (V + 1, D + 1)`` (rows [c_j, 1], then a zero row for padding) and
    ``scale`` = :func:`code_scale`."""

    def __init__(self, codebook: Tensor):
        cb = codebook.detach().float().contiguous()
        self.v, self.d = cb.shape
        self.kp = padded_length(self.v)
        dot = cb.new_zeros((self.d + 1, self.kp))
        dot[: self.d, : self.v] = cb.t()
        dot[self.d, : self.v] = _row_sq_norms(cb)
        self.dot = dot
        sums = cb.new_zeros((self.v + 1, self.d + 1))
        sums[: self.v, : self.d] = cb
        sums[: self.v, self.d] = 1.0
        self.sums = sums
        self.scale = code_scale(cb)


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


def _compact(sel: Tensor, k: int, *values: tuple[Tensor, float]) -> list[Tensor]:
    """Move each row's selected entries (sel (R, K) bool) to its front, in order: for each (values (R, K),
    fill) the (R, k) result, filled with ``fill`` past the row's count (k ≥ every row's count)."""
    counts = sel.sum(dim=1, keepdim=True)
    slots = torch.arange(k, device=sel.device) < counts
    return [v.new_full((sel.shape[0], k), fill).masked_scatter_(slots, v.masked_select(sel)) for v, fill in values]


class _Rows:
    """Per-row state carried between groups: ``ids (R,)`` positions in the chunk, codes ``log_p``, ``index``
    (R, K) and ``length (R,)``, solver slots ``h (R, 8, D + 2)``, chain weights ``w (R, D + 2)`` = [1, −b, a·x]
    (a·x: the state slot holds the same; x itself at t = 1, where a = 0) and certificates ``events`` of dropped
    codes (L (R, E), z_p (R, E, D), b_p (R, E); None without pruning)."""

    def __init__(self, ids, log_p, index, length, h, w, events):  # noqa: ANN001
        self.ids, self.log_p, self.index, self.length, self.h, self.w, self.events = (
            ids, log_p, index, length, h, w, events)  # fmt: skip

    def select(self, sel: Tensor, k: int) -> _Rows:
        ev = None if self.events is None else [e[sel] for e in self.events]
        return _Rows(self.ids[sel], self.log_p[sel, :k], self.index[sel, :k], self.length[sel], self.h[sel],
                     self.w[sel], ev)  # fmt: skip

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        ev = None if parts[0].events is None else [torch.cat(e) for e in zip(*(p.events for p in parts))]
        fields = ("ids", "log_p", "index", "length", "h", "w")
        return _Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in fields), ev)


class _Group(_Rows):
    """Rows of one canonical length K with their chain tables and bags: the log-weight chain's table (the
    shared codebook when every row holds all V codes, else each row's own copy; then each row's log p), the
    weighted sums' entries and bags, and the solver chain's bags."""

    def __init__(self, cb: CodebookLayout, rows: _Rows, plan: SolverPlan | None):
        super().__init__(rows.ids, rows.log_p.contiguous(), rows.index.contiguous(), rows.length,
                         rows.h.contiguous(), rows.w.contiguous(), rows.events)  # fmt: skip
        self.cb, self.plan = cb, plan
        r, k = self.log_p.shape
        d, dev = cb.d, self.log_p.device
        rr = torch.arange(r, device=dev).unsqueeze(1)
        if k == cb.kp and bool((self.length == cb.v).all()):  # the D dimensions and ‖c‖², then the log p's
            self.table = torch.cat([cb.dot, self.log_p])
            dims = torch.arange(d + 1, device=dev).expand(r, d + 1)
        else:  # dimension i of row r's codes at i·R + r, then the log p's
            self.table = self.log_p.new_empty((d + 2) * r, k)
            torch.index_select(cb.dot, 1, self.index.reshape(-1), out=self.table[: (d + 1) * r].view(d + 1, -1))
            self.table[(d + 1) * r :] = self.log_p
            dims = torch.arange(d + 1, device=dev) * r + rr
        # bag r: log p_r, ‖c‖², c_0 … c_(D−1), weighted by w_r = [1, −b, a·x_r]
        lp_rows = self.table.shape[0] - r + rr
        self.logit_bags = (_i32(torch.cat([lp_rows, dims[:, d:], dims[:, :d]], 1)), _i32(rr * (d + 2)))
        valid = (torch.arange(k, device=dev) < self.length.unsqueeze(1)) & (self.index < cb.v)
        blocks = 1 if k <= _ONE_BAG else _BAGS
        size = (self.length.unsqueeze(1) + (blocks - 1)) // blocks  # consecutive blocks of ceil(n / blocks) codes
        starts = (torch.arange(blocks, device=dev) * size).clamp_max_(k) + rr * k
        self.sum_bags = (_i32(torch.where(valid, self.index, cb.v)), _i32(starts))
        if blocks > 1:
            block_ids = torch.arange(r * blocks, device=dev, dtype=torch.int32)
            self.block_bags = (block_ids, block_ids[::blocks].contiguous(), self.h.new_ones(r * blocks))
        else:
            self.block_bags = None
        # the solver chain: bag r over its slots in the plan's order
        self.h_flat = self.h.view(r * _SLOTS, d + 2)
        self.slot_views = {j: self.h[:, j, 2:] for j in (_X0, _X0 + 1, _X0 + 2, _X, _XE, _X0E)}
        if plan is not None:
            slot_rows = rr * _SLOTS
            self.plan_bags = [_i32(slot_rows + torch.tensor(k, device=dev)) for k in plan.slot_sets]
            self.plan_offsets = _i32(rr * 6)
            self.plan_coefs = plan.coefs.repeat(1, r) if r > 1 else plan.coefs
            self.plan_set = plan.set_of
        self.has_events = self.events is not None and bool((self.events[0] > float("-inf")).any())

    def logits(self, w: Tensor | None = None) -> Tensor:
        """Log-weights (R, K) for chain weights w (R, D + 2) = [1, −b, a·x] (default: the current ones)."""
        entries, offsets = self.logit_bags
        return fma_chain(entries, self.table, offsets, (self.w if w is None else w).view(-1))

    def mean_into(self, logw: Tensor, slot: int) -> None:
        """x̂0 under softmax(logw) into solver slot ``slot``."""
        entries, starts = self.sum_bags
        s = fma_chain(entries, self.cb.sums, starts, torch.softmax(logw, dim=1).view(-1))
        if self.block_bags is not None:
            ids, firsts, ones = self.block_bags
            s = fma_chain(ids, s, firsts, ones)
        num, den = s.split([self.cb.d, 1], dim=1)
        torch.div(num, den, out=self.slot_views[slot])

    def combine(self, e: int) -> Tensor:
        """The chain weights (R, D + 2) after evaluation e: one chain per row over the plan's slots."""
        return fma_chain(self.plan_bags[self.plan_set[e]], self.h_flat, self.plan_offsets, self.plan_coefs[e])

    def state(self, a: float) -> Tensor:
        """x (R, D) from the state slot (a·x; x itself at a = 0)."""
        x = self.h[:, _X, 2:]
        return x / a if a > 0 else x.clone()

    def uncertified(self, logw: Tensor, x: Tensor, t: float, nats: float) -> Tensor:
        """(R,) bool: rows whose dropped codes are not certified to stay ``nats`` below their best kept code."""
        top, z_p, b_p = self.events
        r, e, d = z_p.shape
        b = (1.0 - t) ** 2 / (2.0 * t * t)
        best = logw.amax(dim=1) - _row_sq_norms(x) / (2.0 * t * t)  # the best kept full log-weight (R,)
        delta2 = _row_sq_norms((x / (1.0 - t)).unsqueeze(1).sub(z_p).view(r * e, d)).view(r, e)
        bound = top + delta2.mul_(1.0 + 1e-4).add_(1e-12) * (b * b_p / (b - b_p).clamp_min(1e-30))
        return bound.amax(dim=1) > best - nats

    def prune(self, logw: Tensor, x: Tensor, t: float, nats: float) -> Tensor | None:
        """(R,) bool of the rows to compact to the codes within nats + slack of their best (None if none);
        records the certificate of the codes they drop."""
        keep = logw >= logw.amax(dim=1, keepdim=True) - (nats + _PRUNE_SLACK)  # padding: −inf, never kept
        alive = keep.sum(dim=1)
        shrink = (alive * _SHRINK <= self.length) & (_padded_lengths(alive) * _SHRINK <= _padded_lengths(self.length))
        if not bool(shrink.any()):
            return None
        # certificate: the largest full log-weight ℓ_j = logw_j − ‖x‖²/(2t²) among the dropped codes
        top = logw.masked_fill(keep, float("-inf")).amax(dim=1) - _row_sq_norms(x) / (2.0 * t * t)
        top_all, z_p, b_p = self.events
        rows = shrink.nonzero().squeeze(1)
        free = (top_all[rows] == float("-inf")).int().argmax(dim=1)  # each shrinking row's first unused event
        top_all[rows, free] = top[rows]
        z_p[rows, free] = x[rows] / (1.0 - t)
        b_p[rows, free] = (1.0 - t) ** 2 / (2.0 * t * t)
        self.keep, self.alive = keep, alive
        return shrink

    def compacted(self, shrink: Tensor) -> _Rows:
        """The rows with the shrinking ones compacted to their kept codes."""
        k = self.log_p.shape[1]
        sel = torch.where(
            shrink.unsqueeze(1), self.keep, torch.arange(k, device=self.keep.device) < self.length.unsqueeze(1)
        )
        log_p, index = _compact(sel, k, (self.log_p, float("-inf")), (self.index, 0))
        return _Rows(self.ids, log_p, index, torch.where(shrink, self.alive, self.length), self.h, self.w, self.events)

    def restored(self, rows: Tensor, full: tuple[Tensor, Tensor, Tensor]) -> _Rows:
        """The rows with ``rows`` (R,) bool given their full support back (and their certificates cleared)."""
        full_lp, full_index, full_len = full
        k = max(full_lp.shape[1], self.log_p.shape[1])
        sel = rows.unsqueeze(1)

        def widen(v: Tensor, fill: float) -> Tensor:
            return F.pad(v, (0, k - v.shape[1]), value=fill)

        log_p = torch.where(sel, widen(full_lp[self.ids], float("-inf")), widen(self.log_p, float("-inf")))
        index = torch.where(sel, widen(full_index[self.ids], 0), widen(self.index, 0))
        events = [e.clone() for e in self.events]
        events[0][rows] = float("-inf")
        length = torch.where(rows, full_len[self.ids], self.length)
        return _Rows(self.ids, log_p, index, length, self.h, self.w, events)


def _regroup(cb: CodebookLayout, parts: list[_Rows | _Group], plan: SolverPlan | None) -> list[_Group]:
    """One group per canonical length; a group whose rows all keep theirs is reused as it is."""
    by_k: dict[int, list[_Rows | _Group]] = {}
    for part in parts:
        kk = _padded_lengths(part.length)
        ks = kk.unique().tolist()
        if ks == [part.log_p.shape[1]]:  # all of the part's rows stay together
            by_k.setdefault(ks[0], []).append(part)
            continue
        for k in ks:
            by_k.setdefault(k, []).append(part.select((kk == k).nonzero().squeeze(1), k))
    return [ps[0] if len(ps) == 1 and isinstance(ps[0], _Group) else _Group(cb, _Rows.cat(ps), plan)
            for ps in by_k.values()]  # fmt: skip


def _initial_rows(cb: CodebookLayout, log_p: Tensor, x: Tensor, events: int | None) -> _Rows:
    """Rows of log_p (N, V) in canonical layout (at the chunk's largest canonical length) and the solver's
    initial state from the noise x (N, D)."""
    n, v = log_p.shape
    d, dev = x.shape[1], x.device
    finite = torch.isfinite(log_p)
    length = finite.sum(dim=1)
    if bool((length == v).all()):
        lp = F.pad(log_p, (0, cb.kp - v), value=float("-inf")) if cb.kp > v else log_p
        index = torch.arange(cb.kp, device=dev).expand(n, cb.kp)
    else:
        pos = torch.arange(v, device=dev).expand(n, v)
        lp, index = _compact(finite, padded_length(int(length.max())), (log_p, float("-inf")), (pos, 0))
    h = x.new_zeros(n, _SLOTS, d + 2)
    h[:, _ONE, 0] = 1.0
    h[:, _B, 1] = 1.0
    h[:, _X, 2:] = x
    w = x.new_zeros(n, d + 2)
    w[:, 0] = 1.0  # t = 1: the log p alone
    ev = (
        None
        if events is None
        else [x.new_full((n, events), float("-inf")), x.new_zeros(n, events, d), x.new_zeros(n, events)]
    )
    return _Rows(torch.arange(n, device=dev), lp, index, length, h, w, ev)


def solve(
    cb: CodebookLayout,
    log_p: Tensor,
    x: Tensor,
    ts: Sequence[float],
    plan: SolverPlan,
    heun: bool,
    prune_at: set[int],
    prune_nats: float | None,
) -> Tensor:
    """Tokens (N,) of rows log_p (N, V) (row-max shifted float32, −inf = excluded) from noise x (N, D).

    ``plan``: :func:`solver_plan`; ``heun``: two evaluations a step (never pruned); ``prune_at``: evaluations that
    may start a compaction (of the following evaluations)."""
    prune = prune_nats is not None and cb.v >= _MIN_PRUNE_V and not heun and bool(prune_at)
    rows = _initial_rows(cb, log_p, x, len(prune_at) if prune else None)
    full = (rows.log_p, rows.index, rows.length)
    groups = _regroup(cb, [rows], plan)
    n_eval = plan.n_eval
    e = 0
    while e <= n_eval:  # evaluation e at ts_eval[e]; e = n_eval: the final argmax
        t = _eval_time(ts, e, heun)
        logws = [g.logits() for g in groups]
        if prune and t < 1.0:  # certify every row's dropped codes before using this evaluation
            a = (1.0 - t) / (t * t)
            fails = [
                g.uncertified(lw, g.state(a), t, prune_nats) if g.has_events else None for g, lw in zip(groups, logws)
            ]
            if any(f is not None and bool(f.any()) for f in fails):
                groups = _regroup(cb, [g if f is None or not bool(f.any()) else g.restored(f, full)
                                       for g, f in zip(groups, fails)], plan)  # fmt: skip
                continue
        if e == n_eval:
            break
        slot = _slot_of(e, heun)
        parts: list[_Rows | _Group] = []
        for g, lw in zip(groups, logws):
            g.mean_into(lw, slot)
            shrink = g.prune(lw, g.state((1.0 - t) / (t * t)), t, prune_nats) if prune and e in prune_at else None
            g.w = g.combine(e)
            g.slot_views[_XE if heun and e % 2 == 0 else _X].copy_(g.w[:, 2:])
            parts.append(g if shrink is None else g.compacted(shrink))
        if any(not isinstance(p, _Group) for p in parts):
            groups = _regroup(cb, parts, plan)
        e += 1
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for g, lw in zip(groups, logws):
        out[g.ids] = g.index.gather(1, lw.argmax(dim=1, keepdim=True)).squeeze(1)
    return out


def _eval_time(ts: Sequence[float], e: int, heun: bool) -> float:
    """Time of evaluation e (Heun: two per step, at t_i then t_(i+1)); e = number of evaluations: the end."""
    if not heun:
        return ts[e]
    return ts[-1] if e == 2 * (len(ts) - 1) else ts[e // 2 + e % 2]


def _slot_of(e: int, heun: bool) -> int:
    """The solver slot evaluation e writes its x̂0 to."""
    if heun:
        return _X0 if e % 2 == 0 else _X0E
    return _X0 + e % 3


class SolverPlan:
    """Per evaluation e, the chain that makes the next chain weights [1, −b, a·x] (a, b at the next evaluation's
    time) from the solver slots: ``slots[e]`` (6 slot ids; x̂0's, the state, the constants) and ``coefs`` (E, 6)."""

    def __init__(self, terms: list[list[tuple[int, float]]], device: torch.device):
        sets = [tuple(s for s, _ in t) for t in terms]
        self.slot_sets = sorted(set(sets))
        self.set_of = [self.slot_sets.index(k) for k in sets]
        self.coefs = torch.tensor([[c for _, c in t] for t in terms], dtype=torch.float32, device=device)
        self.n_eval = len(terms)


def solver_plan(
    ts: Sequence[float], coefficients: Sequence[tuple[float, float, float, float]] | None, device: torch.device
) -> SolverPlan:
    """The :class:`SolverPlan` of a multistep solver with ``coefficients`` (cx, c0, c1, c2) per step (x_s = cx·x
    + c0·x̂0_i + c1·x̂0_(i−1) + c2·x̂0_(i−2)), or of Heun's method (``None``: two evaluations a step, at t then s)."""

    def ab(t: float) -> tuple[float, float]:
        return (1.0 - t) / (t * t), (1.0 - t) ** 2 / (2.0 * t * t)

    terms = []
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        (a_t, _), (a_s, b_s) = ab(t), ab(s)
        scale = a_s / a_t if a_t > 0 else a_s  # the state slot holds a_t·x (x itself at t = 1)
        const = [(_ONE, 1.0), (_B, -b_s)]  # last: columns 0 and 1 come out exactly [1, −b]
        if coefficients is None:  # Heun: x_e = (s/t)·x + (1 − s/t)·x̂0; x_s = x + (s − t)/2·(v(x, t) + v(x_e, s))
            h2 = (s - t) / 2.0
            terms.append([(_X, scale * s / t), (_X0, a_s * (1.0 - s / t)), (_XE, 0.0), (_X0E, 0.0), *const])
            terms.append(
                [(_X, scale * (1.0 + h2 / t)), (_X0, -a_s * h2 / t), (_XE, h2 / s), (_X0E, -a_s * h2 / s), *const]
            )
            continue
        cx, c0, c1, c2 = coefficients[i]
        hist = [(_X0 + (i - 1) % 3, a_s * c1), (_X0 + (i - 2) % 3, a_s * c2)]
        terms.append([(_X, scale * cx), (_X0 + i % 3, a_s * c0), *hist, *const])
    return SolverPlan(terms, device)


def posterior(cb: CodebookLayout, log_p: Tensor, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """(log-weights (N, V) up to a per-row constant, −inf at excluded codes; x̂0 (N, D)) of rows log_p (N, V)
    (row-max shifted float32) at states x (N, D) and time t ∈ (0, 1], with the kernels of :func:`solve`."""
    rows = _initial_rows(cb, log_p, x, None)
    a, b = (1.0 - t) / (t * t), (1.0 - t) ** 2 / (2.0 * t * t)
    rows.w[:, 1] = -b
    rows.w[:, 2:] = x * a
    n, v = log_p.shape
    logits = log_p.new_full((n, v + 1), float("-inf"))
    x0 = x.new_empty(x.shape)
    for g in _regroup(cb, [rows], None):
        lw = g.logits()
        valid = torch.arange(lw.shape[1], device=lw.device) < g.length.unsqueeze(1)
        logits[g.ids] = logits[g.ids].scatter_(1, torch.where(valid & (g.index < v), g.index, v), lw)
        g.mean_into(lw, _X0)
        x0[g.ids] = g.h[:, _X0, 2:]
    return logits[:, :v], x0
