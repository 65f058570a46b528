"""The process layout of a run (one process, or several under ``accelerate launch`` / ``torchrun``) and its CPU
threads."""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["process_state", "configure_threads", "launcher_set_threads"]


def process_state() -> Any:
    """Accelerate's ``PartialState``, honouring ``ACCELERATE_USE_CPU`` (which only ``Accelerator`` reads itself:
    a bare ``PartialState()`` on a CPU-only machine would silently run every launched process alone). Also gives
    this process its share of the CPU cores (:func:`configure_threads`).

    Raises ValueError when the launcher started several processes but they did not join one process group.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    configure_threads()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:
        raise ValueError(
            f"WORLD_SIZE={world} processes were launched but this one runs alone (accelerate sees "
            f"{state.num_processes}); on a CPU-only machine launch with ACCELERATE_USE_CPU=1 "
            "(e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`)"
        )
    return state


def launcher_set_threads() -> bool:
    """Whether ``OMP_NUM_THREADS`` in this process was set by ``accelerate launch`` on its own (its default of 1
    thread per process when the user gave no thread count) rather than by the user.

    ``accelerate launch`` exports ``OMP_NUM_THREADS=1`` to the processes it starts unless the user passed
    ``--num_cpu_threads_per_process`` or had ``OMP_NUM_THREADS`` set. The launcher is this process's parent (or
    grandparent, with torch's elastic agent in between); its own environment and command line tell the two cases
    apart. Where they cannot be read (not Linux), the thread count is taken as the user's."""
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return False
    try:
        import psutil

        proc = psutil.Process(os.getppid())
        for _ in range(3):  # accelerate launch → (elastic agent) → this process
            cmd = " ".join(proc.cmdline())
            if "accelerate" in cmd and "launch" in cmd:
                return "--num_cpu_threads_per_process" not in cmd and "OMP_NUM_THREADS" not in proc.environ()
            proc = proc.parent()
            if proc is None:
                return False
    except Exception:  # noqa: BLE001 - no process information: leave the thread count alone
        return False
    return False


def configure_threads() -> int:
    """On a CPU run under ``accelerate launch`` without a user-chosen thread count, give each process its share of
    the cores (physical cores ÷ processes on this machine) instead of accelerate's default of one thread; otherwise
    leave torch's thread count as it is. Returns the number of threads torch uses."""
    if launcher_set_threads() and not torch.cuda.is_available():
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, cores // max(1, local)))
    return torch.get_num_threads()
