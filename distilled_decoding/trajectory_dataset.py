"""Reading a finished trajectory folder: :class:`TrajectoryDataset` (random access, verified shards)."""

from __future__ import annotations

import bisect
import operator
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from distilled_decoding.condition_tables import ClassTable, load_condition_table
from distilled_decoding.manifest import (
    MANIFEST,
    TrajectoryError,
    check_digest,
    check_shard_header,
    check_shard_values,
    read_manifest,
    sha256_file,
    shard_ids,
)
from distilled_decoding.trajectory_noise import noise_check, sample_noise

__all__ = ["TrajectoryDataset"]


class TrajectoryDataset(torch.utils.data.Dataset):
    """Random access to a finished trajectory folder.

    ``ds[i]`` → ``{"noise": (N, D) float32, "tokens": (N,) long, "condition_id": () long}`` and the condition the
    student takes (:attr:`table`): ``"class_label": () long``, or ``"caption_features": (L, C) float32`` and
    ``"caption_mask": (L,) bool``. Shards are opened lazily with ``safe_open`` (one handle per shard and process,
    so DataLoader workers each open their own) and their sha256 is checked on first open.
    """

    def __init__(self, out_dir: str | os.PathLike, verify: bool = True):
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
        self.root = Path(out_dir)
        if not self.root.is_dir():
            raise TrajectoryError(f"out_dir: {self.root} is not a folder (expected a trajectory folder)")
        path = self.root / MANIFEST
        self.manifest = read_manifest(path)  # schema, values, the shard plan
        if not self.manifest["complete"]:
            raise TrajectoryError(
                f"{self.root}: the build is incomplete (manifest says complete=false); run build_trajectories "
                "again with the same settings to finish it"
            )
        for k, entry in enumerate(self.manifest["shards"]):  # headers against the manifest: names the key
            check_shard_header(self.root / entry["file"], self.manifest, k)
        check_digest(self.manifest, str(path))
        self.shards = self.manifest["shards"]
        self.settings = self.manifest["settings"]
        self.teacher = self.manifest["teacher"]
        self._starts = [s["start"] for s in self.shards]
        self._verify = verify
        self._regenerate = self.settings.get("noise_storage") == "regenerated"
        s = self.settings
        self._id_key, num_ids, ids = shard_ids(s)
        try:
            self.table = load_condition_table(self.root, s["condition"]) if "condition" in s else ClassTable(num_ids)
        except (OSError, ValueError, KeyError) as e:
            raise TrajectoryError(f"{self.root}: the condition table cannot be read ({e})") from None
        # uniform ids were drawn from each sample's generator before its noise
        self._drawn_classes = num_ids if ids == "uniform" else None
        if self._regenerate:
            check = self.manifest.get("noise_check") or {}
            seed, n, d = int(self.settings["seed"]), self.seq_len, self.codebook_dim
            now = noise_check(seed, len(self), n, d, self._drawn_classes) if check else None
            if now != check:
                raise TrajectoryError(
                    f"{path}: noise is regenerated from (seed, index), but this torch's generator gives other noise "
                    f"than at build time (sha256 {str((now or {}).get('sha256'))[:12]} vs "
                    f"{str(check.get('sha256'))[:12]}); rebuild with store_noise=True or use the torch of the build"
                )
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.shards[-1]["stop"] if self.shards else 0

    @property
    def seq_len(self) -> int:
        return int(self.settings["seq_len"])

    @property
    def codebook_dim(self) -> int:
        return int(self.settings["codebook_dim"])

    def _open(self, k: int) -> Any:
        if os.getpid() != self._pid:  # forked DataLoader worker: open our own handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            info = self.shards[k]
            path = self.root / info["file"]
            if not path.is_file():
                raise TrajectoryError(f"{path}: shard missing")
            if self._verify and sha256_file(path) != info["sha256"]:
                raise TrajectoryError(f"{path}: checksum mismatch (the shard is corrupt or truncated)")
            check_shard_header(path, self.manifest, k)
            try:
                handle = safe_open(str(path), "pt")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise TrajectoryError(f"{path}: unreadable shard ({e})") from e
            check_shard_values(path, self.manifest, k, tensors)
            self._handles[k] = handle
        return self._handles[k]

    def _locate(self, i: int) -> tuple[int, int]:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"index: expected an int, got {type(i).__name__}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        k, j = self._locate(i)
        f = self._open(k)
        if self._regenerate:
            g = self._starts[k] + j
            seed = int(self.settings["seed"])
            noise = sample_noise(seed, [g], self.seq_len, self.codebook_dim, self._drawn_classes)[0][0].float()
        else:
            noise = f.get_slice("noise")[j].float()
        cid = f.get_slice(self._id_key)[j].long().reshape(())
        return {"noise": noise, "tokens": f.get_slice("tokens")[j].long(), "condition_id": cid,
                **self.table.item(int(cid))}  # fmt: skip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}
