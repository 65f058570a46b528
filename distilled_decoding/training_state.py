"""Training checkpoints without pickle, and the settings a student was trained with.

Accelerate's ``save_state`` / ``load_state`` pickle the optimizer, scheduler, RNG and custom states and load
``custom_checkpoint_*.pkl`` with ``weights_only=False``: a file planted in a checkpoint folder would run code on
resume. Here every state is a tree of dicts, lists, tuples, numbers, strings and tensors, stored as JSON (the
structure) + safetensors (the tensors) — :func:`save_tree` / :func:`load_tree` — so loading never unpickles.

A checkpoint ``checkpoints/checkpoint_<n>/`` holds ``model``, ``optimizer``, ``scheduler``, ``ema`` (main process),
``rng_<rank>`` (each process: torch CPU/CUDA, Python and NumPy generators), ``training_state.json`` (step,
micro-step, Accelerate's accumulation step, the digest of the training settings) and ``COMPLETE`` (JSON: the
sha256 of every file). It is written as ``checkpoint_<n>.partial`` and renamed when complete; only the files
named in ``COMPLETE`` with matching checksums are read, and only by name — other files (``*.pkl``, ``*.bin``)
are never opened.

``training.json`` next to the checkpoints (and in ``final/``) records the settings that produced the student:
the distillation settings that change the result (resolved split / timesteps / precision), the trajectory data
(settings digest and shard checksums) and the teacher's identity. A run whose settings differ is refused with
the differences listed, so a student, its checkpoints and its model card always come from one set of settings.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distilled_decoding.fileio import StagedFolder, atomic_write_json, make_dirs
from distilled_decoding.manifest import json_digest, sha256_file

__all__ = [
    "TrainingStateError",
    "save_tree",
    "load_tree",
    "training_settings",
    "data_provenance",
    "check_training_settings",
    "save_student",
    "CheckpointStore",
    "TRAINING_JSON",
    "COMPLETE",
]

TRAINING_JSON = "training.json"
COMPLETE = "COMPLETE"
STATE_FORMAT = 1
#: DistillConfig fields that do not change the trained weights (paths, logging, checkpoint cadence, samples)
NON_SEMANTIC = ("trajectories", "output_dir", "method", "progress", "log_every", "log_with", "num_workers",
                "save_every", "keep_last", "sample_every", "sample_count")  # fmt: skip


class TrainingStateError(ValueError):
    """A checkpoint or student folder is corrupt, unsafe, or was produced with other settings."""


# ----------------------------------------------------------------------------------------------------------
# JSON + safetensors trees
# ----------------------------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__t__": "tensor", "key": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
        return {"__t__": "ndarray", "key": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__t__": "tuple", "items": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, where) for v in obj]
    if isinstance(obj, Mapping):
        return {"__t__": "dict", "items": [[_encode(k, tensors, where), _encode(v, tensors, where)]
                                           for k, v in obj.items()]}  # fmt: skip
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict) or "__t__" not in obj:
        raise TrainingStateError(f"{where}: unexpected entry {str(obj)[:60]}")
    tag = obj["__t__"]
    if tag in ("tensor", "ndarray"):
        if obj.get("key") not in tensors:
            raise TrainingStateError(f"{where}: tensor {obj.get('key')!r} missing from its safetensors file")
        t = tensors[obj["key"]]
        return t if tag == "tensor" else t.numpy().astype(np.dtype(obj["dtype"]))
    if tag == "tuple":
        return tuple(_decode(v, tensors, where) for v in obj["items"])
    if tag == "dict":
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["items"]}
    raise TrainingStateError(f"{where}: unknown entry type {tag!r}")


def save_tree(folder: Path, name: str, obj: Any) -> list[str]:
    """Write ``obj`` as ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors); returns the files."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    tree = _encode(obj, tensors, name)
    files = [f"{name}.json"]
    (folder / files[0]).write_text(json.dumps({"format": STATE_FORMAT, "tree": tree}))
    if tensors:
        files.append(f"{name}.safetensors")
        save_file(tensors, str(folder / files[1]))
    return files


def load_tree(folder: Path, name: str) -> Any:
    """Read what :func:`save_tree` wrote (safetensors and JSON only)."""
    from safetensors.torch import load_file

    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingStateError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or "tree" not in data:
        raise TrainingStateError(f"{path}: not a training state file of this version")
    st = folder / f"{name}.safetensors"
    try:
        tensors = load_file(str(st)) if st.is_file() else {}
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise TrainingStateError(f"{st}: unreadable ({e})") from None
    return _decode(data["tree"], tensors, str(path))


# ----------------------------------------------------------------------------------------------------------
# the settings a student was trained with
# ----------------------------------------------------------------------------------------------------------
def training_settings(
    cfg: Any, ds: Any, student: torch.nn.Module, mixed_precision: str, given_student_sha256: str | None = None
) -> dict[str, Any]:
    """What determines the trained weights: semantic ``DistillConfig`` fields (split and timesteps as resolved
    in the student), the trajectory data, the teacher, and how the student was initialised."""
    distill = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_SEMANTIC}
    distill["split"] = int(student.config.split)
    distill["timesteps"] = [int(t) for t in student.config.timesteps]
    distill["mixed_precision"] = mixed_precision
    return json.loads(json.dumps({
        "distill": distill,
        "student": {"class": type(student).__name__,
                    "init": f"given:{given_student_sha256}" if given_student_sha256 else "from_teacher"},
        **data_provenance(ds),
    }, default=str))  # fmt: skip


def data_provenance(ds: Any) -> dict[str, Any]:
    """``{"trajectories", "teacher"}`` of a student's ``training.json``: the pair folder (settings digest, size, shard
    checksums) and the teacher that built it."""
    shards = [s.get("sha256") for s in ds.manifest["shards"]]
    return {
        "trajectories": {"settings_digest": ds.manifest["settings_digest"], "num_samples": len(ds),
                         "data_sha256": json_digest(shards)},
        "teacher": {k: ds.teacher[k] for k in ("class", "weights_sha256", "codebook_sha256")},
    }  # fmt: skip


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if old != new:
        show = lambda v: (str(v)[:60] + "...") if len(str(v)) > 60 else str(v)  # noqa: E731
        return [f"{prefix.rstrip('.')}: folder has {show(old)}, this run has {show(new)}"]
    return []


def check_training_settings(folder: Path, settings: Mapping[str, Any], *, what: str = "student") -> bool:
    """Compare ``settings`` with ``folder/training.json``. Returns False when the folder holds no training
    output yet; raises :class:`TrainingStateError` listing the differences when it was trained otherwise, or
    when it holds training output whose settings are unknown."""
    path = folder / TRAINING_JSON
    if not path.is_file():
        leftovers = [p.name for p in (folder / "checkpoints", folder / "final") if p.exists()]
        if leftovers:
            raise TrainingStateError(
                f"{folder}: holds {', '.join(leftovers)} but no {TRAINING_JSON} (written by an older version, or "
                "removed): the settings that produced them are unknown, so they are not reused. Use another "
                "output folder, or delete those to retrain"
            )
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingStateError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(old, dict) or "settings" not in old:
        raise TrainingStateError(f"{path}: not a {TRAINING_JSON} of this toolkit (no 'settings' key)")
    diffs = _diff(old["settings"], json.loads(json.dumps(settings, default=str)))
    if diffs:
        raise TrainingStateError(
            f"{folder}: this {what} was trained with other settings; refusing to mix them (resume, reuse or "
            "relabel). Differences:\n  " + "\n  ".join(diffs[:20]) + "\nUse another output folder (e.g. "
            "output_dir=... or distill.output_dir=...) or delete this one to retrain."
        )
    return True


def write_training_json(folder: Path, settings: Mapping[str, Any]) -> None:
    atomic_write_json(folder / TRAINING_JSON, {"settings": settings, "digest": json_digest(settings)}, sort_keys=True)


def read_training_settings(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAINING_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingStateError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise TrainingStateError(f"{path}: not a {TRAINING_JSON} of this toolkit (no 'settings' key)")
    return data["settings"]


def save_student(student: Any, folder: Path, settings: Mapping[str, Any]) -> None:
    """``student.save_pretrained(folder)`` staged and renamed file by file, with its ``training.json``."""
    with StagedFolder(folder, record="config.json") as stage:
        student.save_pretrained(stage.path)
        (stage.path / TRAINING_JSON).write_text(
            json.dumps({"settings": settings, "digest": json_digest(settings)}, indent=2, sort_keys=True) + "\n"
        )
        stage.commit()


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrapped(acc: Any, obj: Any) -> Any:
    return acc.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj


class CheckpointStore:
    """``root/checkpoint_<n>`` folders: save, find the newest complete one, load it, keep the last ``keep_last``.

    Every process must call :meth:`save` and :meth:`load` (``acc``: the Accelerator)."""

    PATTERN = re.compile(r"checkpoint_(\d+)")
    PARTIAL = re.compile(r"checkpoint_(\d+)\.partial")

    def __init__(self, root: Path, keep_last: int, settings_digest: str):
        self.root, self.keep_last, self.digest = Path(root), keep_last, settings_digest

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := self.PATTERN.fullmatch(p.name))]
        return sorted(found)

    def complete(self) -> list[tuple[int, Path]]:
        return [(n, p) for n, p in self._numbered() if (p / COMPLETE).is_file()]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def drop_incomplete(self) -> None:
        """Remove checkpoints cut short by a kill: the ``checkpoint_<n>.partial`` folders :meth:`save` writes
        into. A numbered folder without ``COMPLETE`` was not written by :meth:`save` (it renames a checkpoint into
        place only once complete): it is left alone and never read."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if self.PARTIAL.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)

    def save(self, acc: Any, *, model: Any, optimizer: Any, scheduler: Any, ema: Any, counter: Any,
             extra: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
        """Write a checkpoint (every process calls it). ``extra``: more named states (objects with ``state_dict`` /
        ``load_state_dict``; modules are unwrapped), e.g. a second network and its optimizer."""
        numbered = self._numbered()  # numbered past every checkpoint_<n>, complete or not: nothing is overwritten
        n = numbered[-1][0] + 1 if numbered else 0
        final = self.root / f"checkpoint_{n}"
        part = self.root / f"checkpoint_{n}.partial"
        if acc.is_main_process:
            if part.exists():
                shutil.rmtree(part)
            make_dirs(part)
        acc.wait_for_everyone()
        files = save_tree(part, f"rng_{acc.process_index}", _rng_state())
        if acc.is_main_process:
            files += save_tree(part, "model", acc.unwrap_model(model).state_dict())
            files += save_tree(part, "optimizer", optimizer.state_dict())
            files += save_tree(part, "scheduler", scheduler.state_dict())
            files += save_tree(part, "ema", ema.state_dict())
            for name, obj in (extra or {}).items():
                files += save_tree(part, f"extra_{name}", _unwrapped(acc, obj).state_dict())
            if acc.scaler is not None:
                files += save_tree(part, "scaler", acc.scaler.state_dict())
            state = {"format": STATE_FORMAT, "step": counter.step, "micro": counter.micro,
                     "accelerator_step": int(acc.step), "settings_digest": self.digest}  # fmt: skip
            (part / "training_state.json").write_text(json.dumps(state, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            names = sorted(p.name for p in part.iterdir() if p.is_file())
            marker = {"files": {name: sha256_file(part / name) for name in names}}
            (part / COMPLETE).write_text(json.dumps(marker, indent=2, sort_keys=True))
            part.rename(final)
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _verify(self, folder: Path) -> dict[str, Any]:
        marker = folder / COMPLETE
        try:
            files = json.loads(marker.read_text())["files"]
            assert isinstance(files, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise TrainingStateError(
                f"{folder}: not a checkpoint of this version (its {COMPLETE} marker lists no checksums; older "
                "versions stored pickles, which are never loaded). Delete it, or use another output folder"
            ) from None
        for name in ("training_state.json", "model.json", "optimizer.json", "scheduler.json", "ema.json"):
            if name not in files:
                raise TrainingStateError(f"{folder}: incomplete checkpoint, {name} is not listed in {COMPLETE}")
        for name, sha in files.items():
            path = folder / name
            if "/" in name or not path.is_file():
                raise TrainingStateError(f"{path}: listed in {COMPLETE} but missing")
            if sha256_file(path) != sha:
                raise TrainingStateError(f"{path}: checksum mismatch (corrupt or edited checkpoint file)")
        try:
            state = json.loads((folder / "training_state.json").read_text())
        except ValueError as e:
            raise TrainingStateError(f"{folder / 'training_state.json'}: unreadable ({e})") from None
        if state.get("settings_digest") != self.digest:
            raise TrainingStateError(f"{folder}: saved by a run with other training settings; not resumed")
        return {"files": files, "state": state}

    def load(self, folder: Path, acc: Any, *, model: Any, optimizer: Any, scheduler: Any, ema: Any,
             counter: Any, extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Restore every state from ``folder`` (JSON + safetensors only; checksums verified first)."""
        info = self._verify(folder)
        for name in extra or {}:
            if f"extra_{name}.json" not in info["files"]:
                raise TrainingStateError(f"{folder}: incomplete checkpoint, extra_{name}.json is not listed in "
                                         f"{COMPLETE}")  # fmt: skip
        state = info["state"]
        acc.unwrap_model(model).load_state_dict(load_tree(folder, "model"))
        optimizer.load_state_dict(load_tree(folder, "optimizer"))
        scheduler.load_state_dict(load_tree(folder, "scheduler"))
        ema.load_state_dict(load_tree(folder, "ema"))
        ema.to(acc.device)
        for name, obj in (extra or {}).items():
            _unwrapped(acc, obj).load_state_dict(load_tree(folder, f"extra_{name}"))
        if acc.scaler is not None and "scaler.json" in info["files"]:
            acc.scaler.load_state_dict(load_tree(folder, "scaler"))
        rng = f"rng_{acc.process_index}"
        if f"{rng}.json" in info["files"]:
            _set_rng_state(load_tree(folder, rng))
        counter.step, counter.micro = int(state["step"]), int(state["micro"])
        acc.step = int(state["accelerator_step"])
