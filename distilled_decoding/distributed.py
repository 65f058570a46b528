"""The process layout of a run (one process, or several under ``accelerate launch`` / ``torchrun``)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["process_state"]


def process_state() -> Any:
    """Accelerate's ``PartialState``, honouring ``ACCELERATE_USE_CPU`` (which only ``Accelerator`` reads itself:
    a bare ``PartialState()`` on a CPU-only machine would silently run every launched process alone).

    Raises ValueError when the launcher started several processes but they did not join one process group.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:
        raise ValueError(
            f"WORLD_SIZE={world} processes were launched but this one runs alone (accelerate sees "
            f"{state.num_processes}); on a CPU-only machine launch with ACCELERATE_USE_CPU=1 "
            "(e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`)"
        )
    return state
