"""Reading official checkpoint files and loading them strictly, with errors that say what is wrong.

One loader for every official format:

* ``.safetensors`` files (read with :mod:`safetensors`),
* ``.pt`` / ``.pth`` / ``.bin`` pickles, always read with ``torch.load(..., weights_only=True)``:
  raw / FSDP state dicts, DDP dicts ``{"model": ...}`` (optionally with ``"ema"``, ``"optimizer"``,
  ``"args"``), deepspeed ``{"module": ...}``, ``{"state_dict": ...}`` and VAR trainer checkpoints
  ``{"trainer": {"var_wo_ddp": ...}}``.

``argparse.Namespace`` (stored as ``"args"`` by the official LlamaGen trainer) is the only non-tensor
class allowed through the ``weights_only`` unpickler; anything else is refused, naming the offending global.

Every function taking a ``path`` also takes a Hub reference (``"FoundationVision/LlamaGen/c2i_B_256.pt"``,
resolved by :func:`distilled_decoding.hub.resolve_file`; ``revision=`` pins it).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "load_state_dict_file",
    "extract_state_dict",
    "load_strict",
]

_NESTED_KEYS = ("model", "module", "state_dict", "var_wo_ddp", "vae_local")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model it is loaded into."""


def _read_file(path: Path) -> object:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.safetensors / .pt / .pth / .bin)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_mmap_ok(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused to unpickle a non-tensor object with weights_only=True ({msg}). "
                "Only plain state dicts are loaded; re-save the weights with safetensors."
            ) from e
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is corrupt or truncated ({msg})") from e


def _mmap_ok(path: Path) -> bool:
    # mmap needs the zip-based format (torch >= 1.6 default); legacy pickles fall back to a plain read.
    import zipfile

    return zipfile.is_zipfile(path)


def extract_state_dict(obj: object, *, key: str | None = None, source: str = "checkpoint") -> dict:
    """Find the state dict inside a loaded checkpoint object.

    ``key`` selects a top-level entry explicitly (e.g. ``"ema"``). Without it the first of
    ``model``, ``module``, ``state_dict`` is used, or the object itself when it already maps names to
    tensors (raw / FSDP format). VAR trainer checkpoints (``{"trainer": {"var_wo_ddp": ...}}``) are
    unwrapped too. Prefixes added by DDP or ``torch.compile`` (``module.``, ``_orig_mod.``) are stripped.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source}: has no entry {key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    elif not _is_tensor_dict(obj):
        if "trainer" in obj and isinstance(obj["trainer"], Mapping):
            obj = obj["trainer"]
        for k in _NESTED_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
        else:
            if "ema" in obj and isinstance(obj["ema"], Mapping):
                obj = obj["ema"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: no state dict found")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{source}: no tensors found; top-level keys are {sorted(map(str, obj))[:20]} "
            "(pass key=... to pick the entry holding the weights)"
        )
    out = {}
    for k, v in tensors.items():
        for p in _STRIPPED_PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _is_tensor_dict(obj: Mapping) -> bool:
    vals = list(obj.values())
    return bool(vals) and sum(isinstance(v, torch.Tensor) for v in vals) >= max(1, len(vals) // 2)


def read_checkpoint(
    path: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None
) -> object:
    """The object stored in a checkpoint file (a local path or a Hub reference, see :mod:`distilled_decoding.hub`),
    read with safetensors or ``torch.load(..., weights_only=True)``."""
    from distilled_decoding.hub import parse_reference, resolve_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint file path or a Hub reference, got {type(path).__name__}")
    if parse_reference(path) is None and not Path(path).expanduser().exists():
        raise CheckpointError(f"checkpoint file not found: {os.fspath(path)} (a local path; Hub references are "
                              "written <owner>/<repo>[@<revision>]/<path/in/repo>)")  # fmt: skip
    return _read_file(resolve_file(path, revision=revision, local_files_only=local_files_only))


def load_state_dict_file(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file in any official format (a local path or a Hub reference such as
    ``"FoundationVision/LlamaGen/c2i_B_256.pt"``) and return its ``{name: tensor}`` state dict."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint file path or a Hub reference, got {type(path).__name__}")
    obj = read_checkpoint(path, revision=revision, local_files_only=local_files_only)
    return extract_state_dict(obj, key=key, source=os.fspath(path))


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    what: str,
    ignore: Iterable[str] = (),
    hint: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``module`` strictly, or raise :class:`CheckpointError` saying why.

    The message names ``source`` (the file) and ``what`` (the model it was loaded into, e.g.
    ``"LlamaGen GPT-B"``), lists the missing and unexpected keys and the shape mismatches, and appends
    ``hint(state_dict)`` when given (typically: which preset the checkpoint's shapes fit instead).
    Keys in ``ignore`` (e.g. a stray ``freqs_cis``) are dropped first. Values are cast to the dtype of
    the module's tensors (official files are fp32; ``lvl_1L`` is int64).
    """
    ignore = set(ignore)
    sd = {k: v for k, v in state_dict.items() if k not in ignore}
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {what}:"]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"  {label}: {shown}")
        extra = hint(sd) if hint is not None else None
        if extra:
            parts.append(f"  {extra}")
        raise CheckpointError("\n".join(parts))
    cast = {k: v.to(dtype=own[k].dtype) if own[k].dtype != v.dtype else v for k, v in sd.items()}
    module.load_state_dict(cast, strict=True, assign=assign)
