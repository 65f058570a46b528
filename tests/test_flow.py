"""The categorical flow map: pushforward, agreement with the float64 reference, determinism (batch, order,
chunking, threads), the kernels' arithmetic, convergence, extreme inputs, validation."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import pytest
import torch
from scipy import stats

from distilled_decoding import flow, flow_kernels, flow_native, flow_reference
from distilled_decoding.flow import denoise, noise_to_tokens, posterior_logits, time_grid, velocity
from distilled_decoding.flow_kernels import fma_chain


def _codebook(v: int, d: int, seed: int, normalise: bool = True) -> torch.Tensor:
    c = torch.randn(v, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(c, dim=-1) if normalise else c * 0.5


def _p_kind(kind: str, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.zeros(v)
    if kind == "peaked":
        return torch.randn(v, generator=g) * 3.0
    # top-k truncated: 20 codes kept, the rest excluded
    lg = torch.randn(v, generator=g) * 1.5
    lg[lg.argsort(descending=True)[20:]] = float("-inf")
    return lg


def _histogram_test(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, float, float]:
    """(chi-square p-value, TV of the histogram, TV bound = multinomial floor mean + 5 sd)."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    expected = p.double() * n
    if bool((counts[expected == 0] > 0).any()):
        return 0.0, 1.0, 0.0  # a zero-probability code was returned
    big = expected >= 5  # merge small cells so that the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    pval = float(stats.chi2.sf(chi2, int(keep.sum()) - 1))
    tv = 0.5 * float((counts / n - p.double()).abs().sum())
    g = torch.Generator().manual_seed(123)
    draws = [torch.multinomial(p.double(), n, True, generator=g).bincount(minlength=p.numel()) for _ in range(20)]
    floor = torch.stack([0.5 * (c / n - p).abs().sum() for c in draws])
    return pval, tv, float(floor.mean() + 5 * floor.std())


N_PUSH = 10000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["flat", "peaked", "topk"])
def test_pushforward_matches_softmax(kind: str) -> None:
    v, d = 64, 8
    cb = _codebook(v, d, seed=1)
    logits = _p_kind(kind, v, seed=2)
    noise = torch.randn(N_PUSH, d, generator=torch.Generator().manual_seed(3))
    tokens = noise_to_tokens(noise, logits.expand(N_PUSH, v), cb)
    p = torch.softmax(logits.double(), dim=0)
    pval, tv, bound = _histogram_test(tokens, p)
    assert pval > 1e-3, f"{kind}: chi-square p-value {pval:.2e}"
    assert tv < bound, f"{kind}: TV {tv:.4f} above the multinomial bound {bound:.4f}"


def test_pushforward_raw_codebook() -> None:
    """Unnormalised codebook (VAR-like, varying norms), non-power-of-two V and D."""
    v, d = 100, 5
    cb = _codebook(v, d, seed=4, normalise=False) * 3.0
    logits = torch.randn(v, generator=torch.Generator().manual_seed(5)) * 1.5
    noise = torch.randn(N_PUSH, d, generator=torch.Generator().manual_seed(6))
    tokens = noise_to_tokens(noise, logits.expand(N_PUSH, v), cb)
    pval, tv, bound = _histogram_test(tokens, torch.softmax(logits.double(), dim=0))
    assert pval > 1e-3 and tv < bound, (pval, tv, bound)


@pytest.mark.parametrize("wrong", ["ignore_log_p", "sharpened", "euler_2_steps"])
def test_pushforward_check_detects_a_wrong_map(wrong: str) -> None:
    """Negative controls: the same statistics reject maps whose pushforward is not softmax(logits)."""
    v, d = 64, 8
    cb = _codebook(v, d, seed=1)
    logits = _p_kind("peaked", v, seed=2)
    noise = torch.randn(N_PUSH, d, generator=torch.Generator().manual_seed(3))
    if wrong == "ignore_log_p":
        tokens = noise_to_tokens(noise, torch.zeros(N_PUSH, v), cb)
    elif wrong == "sharpened":
        tokens = noise_to_tokens(noise, (logits * 2).expand(N_PUSH, v), cb)
    else:  # a far too coarse solver is biased, and the test sees it
        tokens = noise_to_tokens(noise, logits.expand(N_PUSH, v), cb, steps=2, solver="euler")
    pval, tv, bound = _histogram_test(tokens, torch.softmax(logits.double(), dim=0))
    assert pval < 1e-6 and tv > bound, (wrong, pval, tv, bound)


# ------------------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------------------
def _mixed_rows(n: int, v: int, seed: int) -> torch.Tensor:
    """Rows with full support, random top-k sizes, and one-hot rows."""
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(n, v, generator=g) * 2.0
    for i in range(n):
        if i % 3 == 1:
            k = int(torch.randint(1, v, (1,), generator=g))
            lg[i, lg[i].argsort()[: v - k]] = float("-inf")
        elif i % 7 == 2:
            lg[i] = float("-inf")
            lg[i, int(torch.randint(0, v, (1,), generator=g))] = 0.0
    return lg


def test_deterministic_across_batch_size_order_and_chunking() -> None:
    v, d, n = 300, 6, 64
    cb = _codebook(v, d, seed=7, normalise=False)
    logits = _mixed_rows(n, v, seed=8)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(9))
    ref = noise_to_tokens(noise, logits, cb)
    singles = torch.cat([noise_to_tokens(noise[i : i + 1], logits[i : i + 1], cb) for i in range(n)])
    sevens = torch.cat([noise_to_tokens(noise[i : i + 7], logits[i : i + 7], cb) for i in range(0, n, 7)])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10))
    shuffled = torch.empty_like(ref)
    shuffled[perm] = noise_to_tokens(noise[perm], logits[perm], cb)
    chunked = noise_to_tokens(noise, logits, cb, chunk_elements=1)  # one row per chunk
    shaped = noise_to_tokens(noise.view(4, 16, d), logits.view(4, 16, v), cb)
    assert torch.equal(ref, singles)
    assert torch.equal(ref, sevens)
    assert torch.equal(ref, shuffled)
    assert torch.equal(ref, chunked)
    assert torch.equal(ref.view(4, 16), shaped)


def test_denoise_bits_do_not_depend_on_the_batch() -> None:
    """The kernel itself is batch invariant to the bit (no matmul / library reduction), also for V = 65536."""
    for v, d in [(300, 6), (65536, 8)]:
        cb = _codebook(v, d, seed=11)
        g = torch.Generator().manual_seed(12)
        x = torch.randn(9, d, generator=g)
        lp = torch.randn(9, v, generator=g)
        full = denoise(x, 0.3, lp, cb)
        for i in (0, 4, 8):
            assert torch.equal(full[i : i + 1], denoise(x[i : i + 1], 0.3, lp[i : i + 1], cb))
        assert torch.equal(full[2:9], denoise(x[2:9], 0.3, lp[2:9], cb))


def test_bits_do_not_depend_on_the_thread_count() -> None:
    """Same tokens and x̂0 bits with 1, 2 and 3 torch threads (the kernels never split a row between threads)."""
    v, d, n = 4096, 8, 24
    cb = _codebook(v, d, seed=30)
    logits = _mixed_rows(n, v, seed=31)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(32))
    lp = torch.randn(n, v, generator=torch.Generator().manual_seed(33)) * 3
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append((noise_to_tokens(noise, logits, cb, steps=6), denoise(noise, 0.4, lp, cb)))
    for tok, x0 in results[1:]:
        assert torch.equal(tok, results[0][0])
        assert torch.equal(x0, results[0][1])


def _needs_native() -> None:
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the flow map runs its torch kernels only")
    assert flow_native.library() is not None, "a C compiler is present but the flow kernel did not build"


def _solve_with(backend: str, noise: torch.Tensor, logits: torch.Tensor, cb: torch.Tensor, **kw) -> torch.Tensor:
    if backend == "torch":
        with flow_native.torch_kernels():
            return noise_to_tokens(noise, logits, cb, **kw)
    assert flow_native.available()
    return noise_to_tokens(noise, logits, cb, **kw)


@pytest.mark.parametrize("solver, steps", [("dpm3m", None), ("dpm2m", 7), ("euler", 5), ("heun", 4)])
def test_the_compiled_kernel_gives_the_torch_kernels_bits(solver: str, steps: int | None) -> None:
    """flow_native's C kernel = the torch kernels, bit for bit: shared and per-row code tables (full rows, top-k,
    ragged, one-hot), small and LlamaGen-size codebooks, rows of several canonical lengths, 1 and 2 threads."""
    _needs_native()
    cases = [(256, 8, 40, True), (100, 3, 30, False), (16384, 8, 6, True), (4096, 32, 6, True)]
    for v, d, n, normalise in cases:
        cb = _codebook(v, d, seed=90 + v, normalise=normalise)
        logits = _mixed_rows(n, v, seed=91 + v) * (2.0 if v > 1000 else 1.0)
        noise = torch.randn(n, d, generator=torch.Generator().manual_seed(92 + v))
        ref = _solve_with("torch", noise, logits, cb, steps=steps, solver=solver)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = _solve_with("native", noise, logits, cb, steps=steps, solver=solver)
            assert torch.equal(got, ref), (v, d, threads, int((got != ref).sum()))
        full = logits[::3].clone()  # rows that all hold every code: the shared table
        assert torch.equal(_solve_with("native", noise[::3], full, cb, steps=steps, solver=solver),
                           _solve_with("torch", noise[::3], full, cb, steps=steps, solver=solver))  # fmt: skip


def _check_solver_state_bits() -> None:
    for v, d, n, solver in [(16384, 8, 8, "dpm3m"), (100, 3, 24, "heun"), (4096, 32, 6, "dpm2m")]:
        cb = _codebook(v, d, seed=93 + v, normalise=v != 100)
        logits = _mixed_rows(n, v, seed=94 + v) * 2.0
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(95 + v))
        layout = flow_kernels.codebook_layout(cb)
        plan = flow._plan(flow.solver_times(cb)[0], solver, x.device)
        log_p = flow.shifted_log_p(logits)
        finite = torch.isfinite(log_p)
        length = finite.sum(dim=1)
        lp, index = flow_kernels._canonical_rows(layout, log_p, finite, length)
        kk = torch.tensor([flow_kernels.padded_length(int(m)) for m in length])
        for k in kk.unique().tolist():
            ids = (kk == k).nonzero().squeeze(1)
            group = flow_kernels._Group(layout, lp[ids, :k].contiguous(), index[ids, :k], length[ids], x[ids], plan)
            tokens = group.index.gather(1, group.run().argmax(dim=1, keepdim=True)).squeeze(1)
            h, w = flow_kernels.initial_state(x[ids], plan)
            native = flow_native.solve_rows(log_p[ids].contiguous(), layout.dot, h, w, plan.native)
            assert torch.equal(native, tokens), (v, k)
            assert torch.equal(h, group.h) and torch.equal(w, group.w), (v, k, float((h - group.h).abs().max()))


def test_the_compiled_kernel_leaves_the_torch_kernels_solver_state() -> None:
    """Not only the tokens: every x̂0, state and chain weight the two implementations hold after the last step is the
    same bit for bit (rows of each canonical length, full rows and top-k rows, V = 16,384 and V = 100; evaluations
    where the kernel's guess of the max log-weight holds, one pass, and where it fails, two passes)."""
    _needs_native()
    _check_solver_state_bits()


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "portable"])  # fmt: skip
def test_every_instruction_set_version_of_the_kernel_gives_the_same_bits(flags, monkeypatch, tmp_path) -> None:
    """The kernel's AVX-512, AVX2 and portable C versions (whichever this CPU runs by default, the others built here
    with the instruction sets switched off) all leave the torch kernels' solver state, bit for bit."""
    _needs_native()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("instruction-set switches of x86 compilers")
    lib = tmp_path / "flow_solve.so"
    cc = os.environ.get("CC") or "cc"
    subprocess.run([cc, *flow_native.CFLAGS, *flags, str(flow_native.SOURCE), "-o", str(lib), "-lm"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    monkeypatch.setattr(flow_native, "_load", lambda: ctypes.CDLL(str(lib)))
    flow_native.library.cache_clear()
    try:
        _check_solver_state_bits()
    finally:
        flow_native.library.cache_clear()


def test_flow_exp_is_exp_to_float32_accuracy() -> None:
    """The kernels' exp: ≤ 2 ulp-ish relative error on [−87, 0], exactly 1 at 0, exactly 0 below −87 and at −inf."""
    x = torch.cat([-torch.rand(200000, generator=torch.Generator().manual_seed(95)) * 87.0,
                   torch.tensor([0.0, -87.0, -87.0001, -1e4, float("-inf")])])  # fmt: skip
    e = flow_kernels.flow_exp(x)
    ref = torch.exp(x.double())
    ok = x >= -87.0
    assert float(((e[ok].double() - ref[ok]) / ref[ok]).abs().max()) < 2.5e-7
    assert e[-5] == 1.0 and float(e[-4]) > 0.0 and bool((e[-3:] == 0).all())


def test_without_a_compiler_the_torch_kernels_run(monkeypatch, tmp_path) -> None:
    """No C compiler: one warning naming the cause, and the same tokens from the torch kernels."""
    v, d, n = 300, 6, 20
    cb = _codebook(v, d, seed=96)
    logits = _mixed_rows(n, v, seed=97)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(98))
    ref = _solve_with("torch", noise, logits, cb)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flow_native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            assert flow_native.library() is None
        assert torch.equal(noise_to_tokens(noise, logits, cb), ref)
        with pytest.raises(RuntimeError, match="not available"):
            plan = flow._plan([1.0, 0.5], "euler", torch.device("cpu")).native
            flow_native.solve_rows(torch.zeros(1, 64), torch.zeros(9, 64), torch.zeros(1, 8, 10), torch.zeros(1, 10),
                                   plan)  # fmt: skip
    finally:
        flow_native.library.cache_clear()


def test_a_damaged_cached_build_is_rebuilt(monkeypatch, tmp_path) -> None:
    """A truncated or overwritten compiled kernel in the cache is compiled again, not loaded (and not fatal)."""
    _needs_native()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flow_native.library.cache_clear()
    try:
        built = flow_native._compile()  # built into the cache, not loaded (a loaded library is never rewritten)
        assert built.parent == tmp_path / "distilled_decoding"
        built.write_bytes(b"not an ELF file")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert flow_native.library() is not None
        assert built.read_bytes()[:4] == b"\x7fELF"
    finally:
        flow_native.library.cache_clear()


def test_the_kernel_cache_is_never_a_folder_others_can_write(monkeypatch, tmp_path) -> None:
    """A library is loaded from the cache: a cache folder that others can write is passed over (for a private one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    shared = tmp_path / "xdg" / "distilled_decoding"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    folder = flow_native._cache_dir()
    assert folder == tmp_path / "tmp" / f"distilled_decoding-{os.getuid()}"
    assert folder.stat().st_mode & 0o077 == 0


def test_fma_chain_is_a_sequential_fused_multiply_add() -> None:
    """The kernels' chains are defined as acc ← fma(w_i, row_i, acc) over a bag's entries in order, from 0: check
    embedding_bag computes exactly that, for the widths the kernels use, including zero-weight padding at the end."""
    g = torch.Generator().manual_seed(40)
    for width, n in [(9, 300), (10, 6), (256, 10), (16384, 10)]:
        table = torch.randn(64, width, generator=g)
        index = torch.randint(0, 64, (2 * n,), generator=g)
        weights = torch.randn(2 * n, generator=g) * torch.rand(2 * n, generator=g) ** 4
        weights[n - 3 : n] = 0.0  # the first bag ends in padding
        out = fma_chain(index.int(), table, torch.tensor([0, n], dtype=torch.int32), weights)
        for b in range(2):
            acc = torch.zeros(width)
            for i in range(b * n, (b + 1) * n):
                acc = torch.addcmul(acc, table[index[i]], weights[i].expand(width))
            assert torch.equal(out[b], acc), (width, b)
        shorter = fma_chain(index[: n - 3].int(), table, torch.tensor([0], dtype=torch.int32), weights[: n - 3])
        assert torch.equal(shorter[0], out[0])


@pytest.mark.parametrize("solver, steps", [("dpm3m", None), ("euler", 6), ("heun", 5)])
def test_fast_map_matches_the_float64_reference(solver: str, steps: int | None) -> None:
    """Token-identical to the dense float64 reference on mixed rows (full support, top-k of random sizes, one-hot;
    rows of several canonical lengths in one call), up to rounding at decision boundaries (≤ 0.2 %)."""
    for v, d, normalise in [(512, 8, True), (100, 5, False)]:
        n = 1200
        cb = _codebook(v, d, seed=50 + v, normalise=normalise)
        logits = _mixed_rows(n, v, seed=51 + v)
        noise = torch.randn(n, d, generator=torch.Generator().manual_seed(52 + v))
        fast = noise_to_tokens(noise, logits, cb, steps=steps, solver=solver)
        ref = flow_reference.noise_to_tokens(noise, logits, cb, steps=steps, solver=solver)
        assert int((fast != ref).sum()) <= n // 500, (v, solver, int((fast != ref).sum()))


def test_denoise_matches_the_reference_on_large_codebooks() -> None:
    """The interleaved weighted sums agree with float64 to float32 accuracy on a LlamaGen-size codebook."""
    v, d = 16384, 8
    cb = _codebook(v, d, seed=60)
    g = torch.Generator().manual_seed(61)
    x = torch.randn(6, d, generator=g)
    lp = torch.randn(6, v, generator=g) * 4
    lp[1, 3000:] = float("-inf")
    for t in (0.9, 0.3, 0.08):
        ref = flow_reference.denoise(x, t, lp, cb)
        torch.testing.assert_close(denoise(x, t, lp, cb).double(), ref, atol=2e-6, rtol=1e-5)


def test_codebook_cache_follows_in_place_changes() -> None:
    """The prepared codebook is cached per tensor; an in-place change must not leave a stale copy behind."""
    v, d, n = 64, 4, 400
    cb = _codebook(v, d, seed=70)
    logits = torch.randn(n, v, generator=torch.Generator().manual_seed(71))
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(72))
    before = noise_to_tokens(noise, logits, cb, steps=8)
    cb.mul_(-1.0)
    after = noise_to_tokens(noise, logits, cb, steps=8)
    assert torch.equal(after, noise_to_tokens(noise, logits, cb.clone(), steps=8))
    assert not torch.equal(before, after)


def test_prune_nats_is_accepted_and_changes_nothing() -> None:
    """Settings recorded by versions that pruned (prune_nats=30) still run, with the exact (unpruned) result."""
    v, d, n = 2048, 8, 64
    cb = _codebook(v, d, seed=80)
    logits = _mixed_rows(n, v, seed=81)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(82))
    assert flow.DEFAULTS["prune_nats"] is None
    assert torch.equal(noise_to_tokens(noise, logits, cb, prune_nats=30.0), noise_to_tokens(noise, logits, cb))


# ------------------------------------------------------------------------------------------------------------
# convergence
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "dpm3m"])
def test_mismatch_decreases_with_steps(solver: str) -> None:
    v, d, n = 256, 8, 3000
    cb = _codebook(v, d, seed=13)
    logits = torch.randn(v, generator=torch.Generator().manual_seed(14)).expand(n, v)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(15))
    ref = noise_to_tokens(noise, logits, cb, steps=128, solver="dpm3m", t_min=0.01)
    rates = [
        float((noise_to_tokens(noise, logits, cb, steps=s, solver=solver) != ref).float().mean())
        for s in (2, 4, 8, 16, 32)
    ]
    assert all(b <= a + 0.002 for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > 3 * rates[-1], rates
    if solver == "dpm3m":
        assert rates[-1] < 0.01, rates


# ------------------------------------------------------------------------------------------------------------
# extreme logits
# ------------------------------------------------------------------------------------------------------------
def test_one_hot_and_sparse_rows() -> None:
    v, d, n = 512, 8, 400
    cb = _codebook(v, d, seed=16)
    g = torch.Generator().manual_seed(17)
    noise = torch.randn(n, d, generator=g) * 3.0
    one_hot = torch.full((n, v), float("-inf"))
    target = torch.randint(0, v, (n,), generator=g)
    one_hot[torch.arange(n), target] = 5.0
    assert torch.equal(noise_to_tokens(noise, one_hot, cb), target)
    sparse = torch.full((n, v), float("-inf"))
    allowed = torch.tensor([3, 200, 511])
    sparse[:, allowed] = torch.tensor([0.0, -1e30, 2.0])  # the middle one is finite but negligible
    tok = noise_to_tokens(noise, sparse, cb)
    assert bool(torch.isin(tok, allowed[[0, 2]]).all())


def test_zero_probability_codes_never_win() -> None:
    """Excluded codes lie right where the noise lands; they must still never be returned."""
    v, d, n = 128, 8, 4000
    cb = _codebook(v, d, seed=18)
    g = torch.Generator().manual_seed(19)
    logits = torch.randn(n, v, generator=g)
    excluded = torch.rand(n, v, generator=g) < 0.9
    excluded[:, 0] = False
    logits[excluded] = float("-inf")
    near = cb[torch.randint(0, v, (n,), generator=g)] + 0.01 * torch.randn(n, d, generator=g)
    for steps, solver in [(24, None), (1, "euler"), (3, "heun")]:
        tok = noise_to_tokens(near, logits, cb, steps=steps, solver=solver)
        assert not bool(excluded[torch.arange(n), tok].any())


def test_huge_vocab_low_precision_inputs_and_outliers() -> None:
    v, d = 65536, 8
    cb = _codebook(v, d, seed=20)
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(3, v, generator=g) * 4
    logits[1, 100:] = float("-inf")
    noise = torch.randn(3, d, generator=g)
    noise[2] *= 1e3  # far outlier
    tok = noise_to_tokens(noise, logits, cb, steps=4)
    assert tok.dtype == torch.long and tok.shape == (3,)
    assert bool(((tok >= 0) & (tok < v)).all()) and int(tok[1]) < 100
    small = noise_to_tokens(noise[:2].half(), logits[:2].bfloat16(), cb.half(), steps=4)
    assert small.shape == (2,) and int(small[1]) < 100
    assert torch.equal(noise_to_tokens(noise.double(), logits.double(), cb.double(), steps=4), tok)


def test_denoise_and_velocity_match_the_formula() -> None:
    v, d = 50, 6
    cb = _codebook(v, d, seed=22, normalise=False)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, d, generator=g)
    lp = torch.log_softmax(torch.randn(2, 3, v, generator=g), dim=-1)
    lp[0, 0, 5:] = float("-inf")
    for t in (1.0, 0.7, 0.2, 0.05):
        a = 1 - t
        dist = ((x.double().unsqueeze(-2) - a * cb.double()) ** 2).sum(-1)
        w = torch.softmax(lp.double() - dist / (2 * t * t), dim=-1)
        x0 = w @ cb.double()
        torch.testing.assert_close(denoise(x, t, lp, cb).double(), x0, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(velocity(x, t, lp, cb).double(), (x.double() - x0) / t, atol=2e-4, rtol=1e-4)
        logw = posterior_logits(x, t, lp, cb).double()
        ok = torch.isfinite(lp)
        ref = (lp.double() - dist / (2 * t * t)).masked_fill(~ok, 0)
        got = logw.masked_fill(~ok, 0)
        shift = (got - ref)[..., :1]  # equal up to a per-row constant
        torch.testing.assert_close((got - shift).masked_fill(~ok, 0), ref, atol=1e-3, rtol=1e-5)


def test_time_grid() -> None:
    for grid in flow.GRIDS:
        for steps in (1, 2, 24):
            ts = time_grid(steps, grid, t_min=0.05)
            assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.05
            assert all(a > b for a, b in zip(ts, ts[1:])), (grid, ts)
    geo = time_grid(4, "geometric", t_min=0.0625)
    assert all(math.isclose(a, b) for a, b in zip(geo, [1, 0.5, 0.25, 0.125, 0.0625]))


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
def test_input_validation() -> None:
    cb = _codebook(16, 4, seed=24)
    noise, logits = torch.randn(5, 4), torch.randn(5, 16)
    cases = [
        (dict(noise=torch.randn(5, 3)), "noise: last dim must equal the codebook dim D=4"),
        (dict(logits=torch.randn(5, 15)), "logits: last dim must equal the codebook size V=16"),
        (dict(logits=torch.randn(6, 16)), "leading shape"),
        (dict(noise=torch.zeros(5, 4, dtype=torch.long)), "noise: expected a floating-point tensor"),
        (dict(logits=torch.zeros(5, 16, dtype=torch.long)), "logits: expected a floating-point tensor"),
        (dict(codebook=torch.zeros(16, 4, dtype=torch.int32)), "codebook: expected a floating-point"),
        (dict(codebook=torch.randn(16)), "codebook: expected shape"),
        (dict(steps=0), "steps=0"),
        (dict(solver="rk4"), "solver='rk4'"),
        (dict(grid="cosine"), "grid='cosine'"),
        (dict(t_min=0.0), "t_min=0.0"),
        (dict(logits=torch.full((5, 16), float("-inf"))), "logits: every row needs at least one finite"),
        (dict(logits=torch.full((5, 16), float("nan"))), "logits: NaN or \\+inf"),
        (dict(logits=torch.full((5, 16), float("inf"))), "logits: NaN or \\+inf"),
        (dict(noise=torch.full((5, 4), float("nan"))), "noise: entries must be finite"),
        (dict(prune_nats=0.0), "prune_nats=0.0"),
    ]
    for kwargs, message in cases:
        args = {**dict(noise=noise, logits=logits, codebook=cb), **kwargs}
        with pytest.raises(ValueError, match=message):
            noise_to_tokens(**args)
