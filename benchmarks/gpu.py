"""The one-command GPU benchmark suite (issue 11): ``python benchmarks/gpu.py --out gpu.json`` on one CUDA GPU, or
``--quick`` on a CPU. The same as ``distilled-decoding bench --suite gpu``; see
:mod:`distilled_decoding.bench_suite` and ``benchmarks/README.md``."""

from __future__ import annotations

import sys

from distilled_decoding.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["bench", *(args if "--quick" in args else ["--suite", "gpu", *args])]))
