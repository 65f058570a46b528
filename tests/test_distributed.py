"""CPU threads under ``accelerate launch``: each process gets its share of the cores unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each process writes its own file: the processes' stdout lines interleave.
SCRIPT = (
    "import os, sys, torch; from distilled_decoding.distributed import process_state; process_state(); "
    "open(os.path.join(sys.argv[1], f'threads.{os.getpid()}'), 'w').write(str(torch.get_num_threads()))"
)


def _launch(tmp_path: Path, *args: str, **env: str) -> list[int]:
    script = tmp_path / "threads.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    out.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no",
           *args, str(script), str(out)]  # fmt: skip
    res = subprocess.run(cmd, env={**base, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [int(f.read_text()) for f in sorted(out.iterdir())]


@pytest.mark.multiproc
def test_accelerate_default_gets_the_cores_and_explicit_counts_are_kept(tmp_path):
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    assert _launch(tmp_path) == [cores]  # accelerate's own OMP_NUM_THREADS=1 is replaced
    assert _launch(tmp_path, "--num_cpu_threads_per_process", "1") == [1]  # the user's choice stays
    assert _launch(tmp_path, OMP_NUM_THREADS="1") == [1]
    if cores >= 2:
        two = _launch(tmp_path, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29531",
                      ACCELERATE_USE_CPU="1")  # fmt: skip
        assert two == [cores // 2] * 2
