"""Distilled Decoding training pairs: noise sequences mapped to token sequences through a frozen teacher.

:func:`build_trajectories` runs the teacher's KV-cache sampling loop with the flow map as the token chooser,
so token i of a sample is a deterministic function of (noise_1..noise_i, condition). It writes safetensors
shards and a ``manifest.json``::

    out_dir/
      manifest.json                 teacher identity, settings, shard list (ranges, sha256), "complete"
      shard-00000.safetensors       noise (n, N, D) float16, tokens (n, N) int16/int32,
      shard-00001.safetensors       condition_id (n,) int16/int32, index (n,) int64
      prompts.json                  text-conditional teachers: the prompts (condition_id = index)
      prompt_embeddings/            ... and each distinct prompt's caption features, once (PromptEmbeddingCache)

The condition of a sample is one integer, ``condition_id``: a class id, or the index of a prompt
(:mod:`distilled_decoding.condition_tables` turns ids into what the teacher and the student take; the reader
returns ``class_label``, or ``caption_features`` + ``caption_mask``, besides it). Folders of format 1 (``class_label``
shards) are still read.

With ``store_noise=False`` the shards hold no noise: it is regenerated from (seed, i) by :func:`sample_noise`
when read (VAR: 680×32 fp16 noise is 43.5 KB per pair, the tokens 1.4 KB), and the manifest keeps a sha256 of
regenerated noise that the reader checks, so a torch whose generator changed is detected instead of silently
pairing other noise with the tokens.

Guarantees:

* the noise and condition (class, prompt) of sample i depend on ``(seed, i)`` alone (a per-sample
  ``torch.Generator`` on the CPU) unless given, and the teacher runs on exactly the stored fp16-rounded noise;
* shards are the unit of work: written atomically (temporary file + rename), split round-robin across
  processes (``accelerate launch``), skipped on restart only when their bytes are intact (the sealed
  manifest's sha256, or before sealing the payload digest each shard carries in its header; anything else is
  rebuilt) — a killed run resumes where it stopped and ends byte-identical to an uninterrupted one; a restart
  with other settings or another teacher (prompts and text encoder included) is refused with the differences
  listed; one build per folder at a
  time (:class:`~distilled_decoding.fileio.JobLock`);
* the manifest is validated before use (:mod:`distilled_decoding.manifest`: schema, shard plan, digest of the
  settings, shard headers); :class:`TrajectoryDataset` verifies each shard's checksum and values on first open
  and names the file and key it cannot accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from distilled_decoding.condition_tables import ClassTable, condition_table
from distilled_decoding.fileio import atomic_path, atomic_write_text, job_lock, make_dirs
from distilled_decoding.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_KEY,
    TrajectoryError,
    check_digest,
    check_shard_header,
    json_digest,
    payload_digest,
    read_manifest,
    sha256_file,
    shard_bytes_ok,
    shard_name,
)
from distilled_decoding.provenance import teacher_fingerprint, tensor_bytes
from distilled_decoding.sampling import FlowChooser, sample_tokens, validate_sampling_args
from distilled_decoding.trajectory_dataset import TrajectoryDataset
from distilled_decoding.trajectory_noise import noise_check, sample_noise

__all__ = [
    "build_trajectories",
    "TrajectoryDataset",
    "TrajectoryError",
    "sample_noise",
    "MANIFEST",
    "FORMAT_VERSION",
]


# ----------------------------------------------------------------------------------------------------------
# identity and settings
# ----------------------------------------------------------------------------------------------------------


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            show = lambda v: (str(v)[:60] + "...") if len(str(v)) > 60 else str(v)  # noqa: E731
            out.append(f"{prefix}{k}: folder has {show(a)}, this run has {show(b)}")
    return out


# ----------------------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    num_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)


def _int_dtype(max_value: int) -> torch.dtype:
    return torch.int16 if max_value <= torch.iinfo(torch.int16).max else torch.int32


def build_trajectories(
    teacher: Any,
    out_dir: str | os.PathLike,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    cfg_scale: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    *,
    codebook: Tensor | None = None,
    class_labels: Sequence[int] | Tensor | None = None,
    prompts: Any = None,
    text_encoder: Any = None,
    prompt_indices: Sequence[int] | Tensor | None = None,
    cfg_interval: int = -1,
    shard_size: int = 10_000,
    flow_kwargs: Mapping[str, Any] | None = None,
    store_noise: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Path:
    """Build ``num_samples`` (noise, tokens, condition) pairs with ``teacher`` into ``out_dir``; returns the path.

    Args:
        teacher: a model implementing the decoding protocol (:mod:`distilled_decoding.sampling`), frozen.
        codebook: (V, D) codebook vectors of the teacher's tokenizer (``vq.codebook`` for LlamaGen; VAR
            teachers carry one, used when this is None).
        class_labels: one label per sample (length ``num_samples``), or None for uniform random classes.
        prompts: text-conditional teachers: a list of prompts or a prompt file (:func:`distilled_decoding.prompts.
            load_prompts`: .txt one a line, a .csv / .tsv column named ``prompt``/``caption``/``text``, COCO .json);
            each distinct prompt is encoded once by ``text_encoder`` (a :class:`~distilled_decoding.text.
            T5TextEncoder` with ``max_length`` = the teacher's caption positions) into ``out_dir/prompt_embeddings``.
        prompt_indices: the prompt of each sample (length ``num_samples``), or None: drawn uniformly from (seed, i).
        cfg_scale, cfg_interval, top_k, top_p, temperature: the teacher's sampling settings (its official
            semantics); the flow map turns the resulting distribution into a deterministic choice.
        shard_size: samples per shard file (the unit of work, resumption and distribution).
        flow_kwargs: solver options for :func:`distilled_decoding.flow.noise_to_tokens` (default: its defaults).
        store_noise: store the fp16 noise in the shards (default) or regenerate it from (seed, i) when read.
        batch_size: samples per teacher forward (memory only; does not change the data).
        device: where the teacher runs (default: this process's accelerate device).

    Run under ``accelerate launch`` to split the shards across processes; every process must call this.
    """
    from distilled_decoding.distributed import process_state

    state = process_state()
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrajectoryError(f"out_dir: {out_dir} exists and is not a folder")
    if codebook is None:
        codebook = getattr(teacher, "codebook", None)
        if codebook is None:
            raise ValueError("codebook: this teacher carries no codebook; pass codebook=tokenizer.codebook")
    _check_args(teacher, codebook, num_samples, batch_size, shard_size)
    validate_sampling_args(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    for name, v in (("seed", seed), ("cfg_interval", cfg_interval)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else -1):
            raise ValueError(f"{name}={v!r}: expected an int >= {0 if name == 'seed' else -1}")
    for name, v in (("store_noise", store_noise), ("progress", progress)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}={v!r}: expected True or False")
    table = condition_table(teacher.condition, prompts, text_encoder, out_dir)
    labels_all = _check_ids(table, {"class_labels": class_labels, "prompt_indices": prompt_indices}, num_samples)
    device = torch.device(device) if device is not None else state.device
    teacher = teacher.to(device).eval()
    codebook = codebook.detach().to(device=device, dtype=torch.float32)
    flow_kwargs = _check_flow_kwargs(flow_kwargs, codebook)

    from distilled_decoding import flow

    settings = {
        "format_version": FORMAT_VERSION,
        "num_samples": num_samples,
        "seed": seed,
        "seq_len": teacher.seq_len,
        "condition": table.settings(),
        "codebook_dim": int(codebook.shape[1]),
        "shard_size": shard_size,
        "noise_dtype": "float16",
        "noise_storage": "stored" if store_noise else "regenerated",
        "condition_ids": "uniform"
        if labels_all is None
        else "given:" + hashlib.sha256(tensor_bytes(labels_all)).hexdigest(),
        "sampling": {
            "cfg_scale": cfg_scale,
            "cfg_interval": cfg_interval,
            "top_k": top_k,
            "top_p": top_p,
            "temperature": temperature,
        },
        "flow": {**getattr(flow, "DEFAULTS", {}), **flow_kwargs},
    }
    identity = teacher_fingerprint(teacher, codebook)
    settings_digest = json_digest({"settings": settings, "teacher": identity})
    plan = _Plan(num_samples, shard_size)

    # one job per folder; every process checks an existing manifest (so all raise together), the main one writes
    with job_lock(out_dir, state, what="trajectory build"):
        fresh = _manifest(settings, identity, settings_digest, plan, shards=None, noise_check=None)
        current = _open_folder(out_dir, settings, identity, fresh, state, table)
        built, elapsed = _build_shards(teacher, codebook, out_dir, plan, current, settings_digest, state, table,
                                       labels_all=labels_all, seed=seed, batch_size=batch_size, device=device,
                                       store_noise=store_noise, flow_kwargs=flow_kwargs, progress=progress,
                                       sampling=settings["sampling"])  # fmt: skip
        # the main process checks every shard and seals the manifest
        state.wait_for_everyone()
        if state.is_main_process:
            shards = []
            for k in range(plan.num_shards):
                path = out_dir / shard_name(k)
                sealed = current["shards"][k].get("sha256")
                digest = sha256_file(path) if path.is_file() else None
                intact = digest == sealed and _header_ok(path, current, k)
                if not intact and not shard_bytes_ok(path, fresh, k):
                    raise TrajectoryError(f"{path}: missing or invalid after all processes finished")
                a, b = plan.range(k)
                shards.append({"file": path.name, "start": a, "stop": b, "sha256": digest or sha256_file(path)})
            drawn = None if labels_all is not None else table.num_ids
            check = None if store_noise else noise_check(seed, num_samples, teacher.seq_len, codebook.shape[1], drawn)
            _write_manifest(out_dir, _manifest(settings, identity, settings_digest, plan, shards, check))
            rate = built / elapsed if elapsed > 0 and built else 0.0
            print(
                f"trajectories: {num_samples} pairs in {plan.num_shards} shard(s) at {out_dir}; this process built "
                f"{built} in {elapsed:.1f} s ({rate:.1f} pairs/s), {state.num_processes} process(es)"
            )
        state.wait_for_everyone()
    return out_dir


def _header_ok(path: Path, manifest: dict, k: int) -> bool:
    try:
        check_shard_header(path, manifest, k)
    except TrajectoryError:
        return False
    return True


def _open_folder(out_dir: Path, settings: dict, identity: dict, fresh: dict, state: Any, table: Any) -> dict[str, Any]:
    """Validate an existing manifest against this run (refusing other settings, another teacher or an edited
    file), or write a fresh one; returns the manifest in force (the same in every process)."""
    manifest_path = out_dir / MANIFEST
    old = None
    if manifest_path.exists():
        old = read_manifest(manifest_path)
        diffs = _diff(old["settings"], settings) + _diff(old["teacher"], identity, "teacher.")
        if diffs:
            raise TrajectoryError(
                f"{out_dir} holds trajectories built with other settings or another teacher; refusing to resume. "
                "Differences:\n  " + "\n  ".join(diffs[:20]) + "\nUse another out_dir or delete this one."
            )
        check_digest(old, str(manifest_path))
    state.wait_for_everyone()
    if state.is_main_process:
        make_dirs(out_dir)
        for pattern in ("shard-*.safetensors.tmp", "manifest.json.tmp", ".shard-*.safetensors.*.tmp",
                        f".{MANIFEST}.*.tmp"):  # fmt: skip
            for tmp in out_dir.glob(pattern):  # temporary files of a killed run (only the names we write)
                tmp.unlink()
        table.prepare(out_dir)  # the prompt list and each distinct prompt's features, once
        if old is None:
            _write_manifest(out_dir, fresh)
    state.wait_for_everyone()
    return old if old is not None else fresh


def _build_shards(teacher, codebook, out_dir, plan, current, digest, state, table, *, labels_all, seed, batch_size,
                  device, store_noise, flow_kwargs, progress, sampling) -> tuple[int, float]:  # fmt: skip
    """Build this process's shards (round-robin) that are missing or whose bytes fail their check."""
    mine = [k for k in range(plan.num_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not shard_bytes_ok(out_dir / shard_name(k), current, k)]
    for k in todo:
        if (out_dir / shard_name(k)).exists():
            print(f"trajectories: {out_dir / shard_name(k)} is incomplete or fails its checksum; rebuilding it")
    total = sum(plan.range(k)[1] - plan.range(k)[0] for k in mine)
    done_before = total - sum(plan.range(k)[1] - plan.range(k)[0] for k in todo)
    bar = tqdm(total=total, initial=done_before, unit="pair", desc="trajectories", dynamic_ncols=True,
               disable=not (progress and state.is_main_process), smoothing=0.1)  # fmt: skip
    t0 = time.perf_counter()
    built = 0
    for k in todo:
        a, b = plan.range(k)
        noise, labels, tokens = [], [], []
        for s in range(a, b, batch_size):
            idx = list(range(s, min(s + batch_size, b)))
            drawn = None if labels_all is not None else table.num_ids
            eps, lab = sample_noise(seed, idx, teacher.seq_len, codebook.shape[1], drawn)
            if labels_all is not None:
                lab = labels_all[idx[0] : idx[-1] + 1]
            chooser = FlowChooser(eps.to(device), codebook, **flow_kwargs)
            tok = sample_tokens(teacher, table.lookup(lab.to(device)), chooser=chooser, order="sequence", **sampling)
            noise.append(eps)
            labels.append(lab)
            tokens.append(tok.cpu())
            bar.update(len(idx))
        built += b - a
        _write_shard(out_dir, k, (a, b), torch.cat(noise) if store_noise else None, torch.cat(tokens),
                     torch.cat(labels), digest, teacher.vocab_size, table.num_ids)  # fmt: skip
    bar.close()
    return built, time.perf_counter() - t0


def _check_args(teacher: Any, codebook: Tensor, num_samples: int, batch_size: int, shard_size: int) -> None:
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive integer")
    if not isinstance(codebook, Tensor) or codebook.ndim != 2 or codebook.shape[0] != teacher.vocab_size:
        raise ValueError(
            f"codebook: expected a ({teacher.vocab_size}, D) tensor matching the teacher's vocab_size, "
            f"got {tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__}"
        )


def _check_flow_kwargs(flow_kwargs: Mapping[str, Any] | None, codebook: Tensor) -> dict[str, Any]:
    """Options of the flow map, checked on a one-row call before anything is written."""
    import inspect

    from distilled_decoding.flow import noise_to_tokens

    if flow_kwargs is not None and not isinstance(flow_kwargs, Mapping):
        raise TypeError(f"flow_kwargs: expected a mapping of noise_to_tokens options, got {type(flow_kwargs).__name__}")
    kwargs = dict(flow_kwargs or {})
    allowed = [n for n, p in inspect.signature(noise_to_tokens).parameters.items() if n not in ("noise", "logits",
               "codebook") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"flow_kwargs: unknown option(s) {unknown}; expected some of {allowed}")
    try:
        noise_to_tokens(torch.zeros(1, codebook.shape[1], device=codebook.device),
                        torch.zeros(1, codebook.shape[0], device=codebook.device), codebook, **kwargs)  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ValueError(f"flow_kwargs: {e}") from None
    return kwargs


def _check_ids(table: Any, given: dict[str, Any], n: int) -> Tensor | None:
    """The given condition ids (class labels or prompt indices, under the table's argument name), checked."""
    for name, value in given.items():
        if value is not None and name != table.ids_name:
            raise ValueError(f"{name}: this teacher is {table.kind}-conditional; give {table.ids_name} (one per "
                             "sample) instead")  # fmt: skip
    ids, name = given.get(table.ids_name), table.ids_name
    if ids is None:
        return None
    what = "class ids" if isinstance(table, ClassTable) else "prompt indices"
    labels = torch.as_tensor(ids)
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.is_complex():
        raise ValueError(f"{name}: expected integer {what}, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per sample), got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= table.num_ids:
        raise ValueError(f"{name}: {what} must lie in [0, {table.num_ids}); got min {int(labels.min())}, "
                         f"max {int(labels.max())}")  # fmt: skip
    return labels.long().cpu()


def _write_shard(
    out_dir: Path,
    k: int,
    rng: tuple[int, int],
    noise: Tensor | None,
    tokens: Tensor,
    labels: Tensor,
    digest: str,
    vocab: int,
    num_ids: int,
) -> None:
    tensors = {
        "tokens": tokens.to(_int_dtype(vocab - 1)).contiguous(),
        "condition_id": labels.to(_int_dtype(num_ids)).contiguous(),
        "index": torch.arange(rng[0], rng[1], dtype=torch.int64),
    }
    if noise is not None:
        tensors["noise"] = noise.to(torch.float16).contiguous()
    meta = {"start": rng[0], "stop": rng[1], "settings_digest": digest, "format_version": FORMAT_VERSION,
            "payload_sha256": payload_digest(tensors)}  # fmt: skip
    with atomic_path(out_dir / shard_name(k)) as tmp:  # one metadata key: byte-stable header
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def _manifest(
    settings: dict,
    identity: dict,
    digest: str,
    plan: _Plan,
    shards: list[dict] | None,
    noise_check: dict | None,
) -> dict[str, Any]:
    return {
        "noise_check": noise_check,
        "format": FORMAT,
        "complete": shards is not None,
        "settings": settings,
        "teacher": identity,
        "settings_digest": digest,
        "num_shards": plan.num_shards,
        "shards": shards
        if shards is not None
        else [
            {"file": shard_name(k), "start": plan.range(k)[0], "stop": plan.range(k)[1]} for k in range(plan.num_shards)
        ],
    }


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
