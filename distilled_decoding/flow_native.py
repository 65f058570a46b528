"""The fused CPU kernel of the flow map's solver: ``csrc/flow_solve.c``, compiled on first use and called with ctypes.

The kernel computes exactly what :func:`distilled_decoding.flow_kernels.solve`'s torch kernels compute, bit for bit
(the same float32 operations in the same order, see the C file's header; ``tests/test_flow.py`` checks it on every
solver, codebook layout and thread count), in one pass per row and evaluation instead of a few dozen torch ops, so
it only changes the speed. It is compiled once per machine with the system C compiler (``$CC``, else ``cc``; flags
:data:`CFLAGS`) into ``$XDG_CACHE_HOME/distilled_decoding`` (else ``~/.cache/distilled_decoding``, else a temporary
folder), keyed by the source, the compiler and the CPU; without a working compiler :func:`library` returns None and
the flow map runs the torch kernels (a warning says so once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CFLAGS", "SOURCE", "available", "library", "solve_rows", "torch_kernels"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "flow_solve.c"
#: no contraction of a·b + c into fused multiply-adds (the kernel writes its fmaf's), no fast-math reassociation
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-shared", "-fPIC")
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """A folder for the compiled kernel that this user owns and only this user can write (a library is loaded from
    it): ``$XDG_CACHE_HOME/distilled_decoding``, else ``~/.cache/distilled_decoding``, else one in the temp dir."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    fallback = Path(tempfile.gettempdir()) / f"distilled_decoding-{os.getuid()}"
    for folder in (Path(root) / "distilled_decoding", fallback):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = folder.stat()
            if st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no cache folder for the compiled flow kernel that only this user can write")


def _compile(rebuild: bool = False) -> Path:
    """The compiled kernel's path in the cache (compiled now if it is not there, or if ``rebuild``)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r} is not on PATH)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *CFLAGS, _cpu_id()]).encode()).hexdigest()
    target = _cache_dir() / f"flow_solve-{key[:24]}.so"
    if target.is_file() and not rebuild:
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        if done.returncode != 0:
            raise OSError(f"{cc} failed on {SOURCE}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent first uses each compile, one file wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL:
    path = _compile()
    try:
        return ctypes.CDLL(str(path))
    except OSError:  # a damaged cached build: compile it again
        return ctypes.CDLL(str(_compile(rebuild=True)))


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (compiled on the first call of the process, or loaded from the cache), or None when it
    cannot be built here (then the torch kernels run; one warning)."""
    try:
        lib = _load()
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"flow map: the fused CPU kernel is unavailable ({e}); using the torch kernels (same results, "
                      "slower)", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    fn = lib.dd_flow_solve
    fn.restype = ctypes.c_int
    fn.argtypes = [_I, _I, _I, _P, _P, _I, _P, _P, _I, _P, _P, _P, _P, _P, ctypes.c_int]
    return lib


_off = 0


@contextmanager
def torch_kernels() -> Iterator[None]:
    """Within the block the flow map runs its torch kernels on CPU too (same bits, slower): for benchmarks and
    tests that compare the two."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def available() -> bool:
    """Whether the flow map uses the compiled kernel for CPU tensors here (builds it on the first call)."""
    return not _off and library() is not None


def _ptr(t: Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"flow kernel: expected a contiguous CPU {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    return t.data_ptr()


def solve_rows(
    log_p: Tensor, table: Tensor, h: Tensor, w: Tensor, plan: tuple[Tensor, Tensor, Tensor, Tensor]
) -> Tensor:
    """Run the solver on R rows with the compiled kernel (see ``csrc/flow_solve.c``): log_p (R, V) float32 row-max
    shifted logits (−inf = excluded, ≥ 1 finite per row); table (D + 1, Kp) float32: the codes transposed, then their
    squared norms, zero past V (:class:`~distilled_decoding.flow_kernels.CodebookLayout`'s ``dot``); h (R, 8, D + 2)
    solver slots and w (R, D + 2) first chain weights (updated in place); plan = (target (E,), state (E,), slots
    (E, 6) int32; coefs (E, 6) float32). → tokens (R,) int64."""
    lib = library()
    if lib is None:
        raise RuntimeError("flow kernel: not available on this machine")
    r, v = log_p.shape
    d = table.shape[0] - 1
    if h.shape != (r, 8, d + 2) or w.shape != (r, d + 2) or table.shape[1] < v or table.shape[1] % 64:
        shapes = f"log_p {tuple(log_p.shape)}, table {tuple(table.shape)}, h {tuple(h.shape)}, w {tuple(w.shape)}"
        raise ValueError(f"flow kernel: inconsistent shapes {shapes}")
    if d > 1024:
        raise ValueError(f"flow kernel: codebook dimension {d} > 1024 (its accumulators live on the stack)")
    target, state, slots, coefs = plan
    out = torch.empty(r, dtype=torch.int64)
    failed = lib.dd_flow_solve(
        r, v, d, _ptr(log_p, torch.float32), _ptr(table, torch.float32), table.shape[1], _ptr(h, torch.float32),
        _ptr(w, torch.float32), len(target), _ptr(target, torch.int32), _ptr(state, torch.int32),
        _ptr(slots, torch.int32), _ptr(coefs, torch.float32), out.data_ptr(), max(1, torch.get_num_threads()),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"flow kernel: could not allocate {(d + 5) * table.shape[1]} floats of scratch per row")
    return out
