"""The trajectory folder's ``manifest.json`` and shards: schema, validation, integrity checks.

A manifest is trusted only after :func:`load_manifest` checked it: every key present with its type, values in
range, the shard entries exactly the plan (in order, contiguous, covering ``num_samples``), and the recorded
``settings_digest`` equal to the digest of the recorded settings and teacher (so a hand edit of ``seq_len``,
``format_version`` or any other setting is caught). :func:`check_shard_header` compares a shard's header (its
metadata, tensor names, dtypes and shapes) with the manifest; :func:`shard_bytes_ok` decides whether a shard's
bytes can be trusted: the manifest's sha256 when the build was sealed, otherwise the payload digest the writer
stored in the shard's own header. Every message names the file and the key.

Format 2 stores each sample's condition as ``condition_id`` with ``settings.condition`` (the condition table:
``{"kind": "class", "num_classes": C}`` or ``{"kind": "text", "num_prompts": P, ...}``) and
``settings.condition_ids``; format 1 (still read) stored ``class_label`` with ``settings.num_classes`` and
``settings.class_labels``. :func:`shard_ids` gives a folder's id key, id count and id origin either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TrajectoryError",
    "MANIFEST",
    "META_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "shard_name",
    "plan_ranges",
    "json_digest",
    "sha256_file",
    "payload_digest",
    "read_manifest",
    "load_manifest",
    "check_digest",
    "validate_manifest",
    "check_shard_header",
    "shard_bytes_ok",
    "check_shard_values",
    "shard_ids",
]

MANIFEST = "manifest.json"
FORMAT = "distilled-decoding trajectories"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
META_KEY = "distilled_decoding"


class TrajectoryError(ValueError):
    """A trajectory folder is inconsistent, corrupt, or was built with other settings."""


# ----------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def plan_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: consecutive blocks of ``shard_size`` samples, the last one shorter."""
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def payload_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor in name order: stored in a shard's header so a
    shard can be verified before the manifest is sealed."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------------------
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INT, _NUM, _STR, _BOOL, _DICT = "int", "number", "str", "bool", "dict"

_SAMPLING = {"cfg_scale": _NUM, "cfg_interval": _INT, "top_k": _INT, "top_p": _NUM, "temperature": _NUM}
_COMMON = {
    "format_version": _INT,
    "num_samples": _INT,
    "seed": _INT,
    "seq_len": _INT,
    "codebook_dim": _INT,
    "shard_size": _INT,
    "noise_dtype": _STR,
    "noise_storage": _STR,
    "sampling": _SAMPLING,
    "flow": _DICT,
}
#: settings schema by format version (1: class ids only; 2: a condition table)
_SETTINGS = {
    1: {**_COMMON, "num_classes": _INT, "class_labels": _STR},
    2: {**_COMMON, "condition": _DICT, "condition_ids": _STR},
}
#: the condition table's id count key by kind (format 2)
_ID_COUNT = {"class": "num_classes", "text": "num_prompts"}


def shard_ids(settings: Mapping[str, Any]) -> tuple[str, int, str]:
    """``(shard key, number of ids, "uniform" | "given:<sha256>")`` of a validated manifest's settings."""
    if settings["format_version"] == 1:
        return "class_label", int(settings["num_classes"]), settings["class_labels"]
    cond = settings["condition"]
    return "condition_id", int(cond[_ID_COUNT[cond["kind"]]]), settings["condition_ids"]


_TEACHER = {"class": _STR, "config": _DICT, "weights_sha256": _STR, "codebook_sha256": _STR, "codebook_shape": "list"}
_TOP = {
    "format": _STR,
    "complete": _BOOL,
    "settings": _DICT,  # by format version: _SETTINGS
    "teacher": _TEACHER,
    "settings_digest": _STR,
    "num_shards": _INT,
    "shards": "list",
    "noise_check": "dict|null",
}
_SHARD = {"file": _STR, "start": _INT, "stop": _INT}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _DICT:
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "dict|null":
        return value is None or isinstance(value, dict)
    raise AssertionError(kind)


def _check_keys(where: str, obj: Any, spec: Mapping[str, Any], prefix: str = "") -> None:
    if not isinstance(obj, dict):
        what = prefix.rstrip(".") or "the manifest"
        raise TrajectoryError(f"{where}: {what}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise TrajectoryError(f"{where}: missing key(s) {[prefix + k for k in missing]}")
    unknown = sorted(k for k in obj if k not in spec)
    if unknown:
        raise TrajectoryError(f"{where}: unknown key(s) {[prefix + k for k in unknown]} (not written by this toolkit)")
    for k, kind in spec.items():
        if isinstance(kind, Mapping):
            _check_keys(where, obj[k], kind, f"{prefix}{k}.")
        elif not _type_ok(obj[k], kind):
            want = {"number": "a finite number", "dict|null": "an object or null"}.get(kind, f"a JSON {kind}")
            raise TrajectoryError(f"{where}: {prefix}{k}={obj[k]!r}: expected {want}")


def _fail(where: str, key: str, msg: str) -> TrajectoryError:
    return TrajectoryError(f"{where}: {key}: {msg}")


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest (see the module docstring); returns it. ``where`` names the file in messages."""
    _check_keys(where, manifest, _TOP)
    m, s, t = manifest, manifest["settings"], manifest["teacher"]
    if m["format"] != FORMAT:
        raise _fail(where, "format", f"{m['format']!r} is not {FORMAT!r}")
    version = s.get("format_version")
    if not _type_ok(version, _INT) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(where, "settings.format_version", f"{version!r} is not supported by this version "
                    f"(reads {list(SUPPORTED_FORMAT_VERSIONS)})")  # fmt: skip
    _check_keys(where, s, _SETTINGS[version], "settings.")
    if version >= 2:
        cond = s["condition"]
        count = _ID_COUNT.get(cond.get("kind"))
        if count is None:
            raise _fail(where, "settings.condition.kind", f"{cond.get('kind')!r}: expected one of {sorted(_ID_COUNT)}")
        if not (_type_ok(cond.get(count), _INT) and cond[count] >= 1):
            raise _fail(where, f"settings.condition.{count}", f"{cond.get(count)!r}: expected an int >= 1")
    for key in ("num_samples", "seq_len", "codebook_dim", "shard_size"):
        if s[key] < 1:
            raise _fail(where, f"settings.{key}", f"{s[key]} must be >= 1")
    if s["noise_dtype"] != "float16":
        raise _fail(where, "settings.noise_dtype", f"{s['noise_dtype']!r}: expected 'float16'")
    if s["noise_storage"] not in ("stored", "regenerated"):
        raise _fail(where, "settings.noise_storage", f"{s['noise_storage']!r}: expected 'stored' or 'regenerated'")
    id_key, num_ids, labels = shard_ids(s)
    if num_ids < 1:
        raise _fail(where, "settings.num_classes", f"{num_ids} must be >= 1")
    if labels != "uniform" and not (labels.startswith("given:") and _HEX64.match(labels[6:])):
        name = "class_labels" if version == 1 else "condition_ids"
        raise _fail(where, f"settings.{name}", f"{labels!r}: expected 'uniform' or 'given:<sha256>'")
    for key in ("weights_sha256", "codebook_sha256"):
        if not _HEX64.match(t[key]):
            raise _fail(where, f"teacher.{key}", f"{t[key]!r} is not a sha256 hex digest")
    shape = t["codebook_shape"]
    if not (len(shape) == 2 and all(_type_ok(v, _INT) and v >= 1 for v in shape)):
        raise _fail(where, "teacher.codebook_shape", f"{shape!r}: expected [V, D] positive ints")
    if shape[1] != s["codebook_dim"]:
        raise _fail(where, "teacher.codebook_shape", f"{shape} disagrees with codebook_dim={s['codebook_dim']}")
    if not _HEX64.match(m["settings_digest"]):
        raise _fail(where, "settings_digest", f"{m['settings_digest']!r} is not a sha256 hex digest")
    # shard entries: exactly the plan
    plan = plan_ranges(s["num_samples"], s["shard_size"])
    if m["num_shards"] != len(plan):
        raise _fail(where, "num_shards", f"{m['num_shards']}, but num_samples={s['num_samples']} in shards of "
                    f"{s['shard_size']} makes {len(plan)}")  # fmt: skip
    if len(m["shards"]) != len(plan):
        raise _fail(where, "shards", f"{len(m['shards'])} entries, expected {len(plan)} (num_shards)")
    for k, (entry, (a, b)) in enumerate(zip(m["shards"], plan)):
        spec = {**_SHARD, "sha256": _STR} if m["complete"] else _SHARD
        if isinstance(entry, dict) and not m["complete"] and "sha256" in entry:
            spec = {**_SHARD, "sha256": _STR}
        _check_keys(where, entry, spec, f"shards[{k}].")
        if (entry["file"], entry["start"], entry["stop"]) != (shard_name(k), a, b):
            raise _fail(where, f"shards[{k}]", f"{entry['file']} [{entry['start']}, {entry['stop']}): expected "
                        f"{shard_name(k)} [{a}, {b}) — entries must be in order, contiguous and cover "
                        f"num_samples={s['num_samples']}")  # fmt: skip
        if "sha256" in entry and not _HEX64.match(entry["sha256"]):
            raise _fail(where, f"shards[{k}].sha256", f"{entry['sha256']!r} is not a sha256 hex digest")
    check = m["noise_check"]
    if s["noise_storage"] == "regenerated" and m["complete"]:
        if check is None:
            raise _fail(where, "noise_check", "missing: regenerated noise needs its check")
        _check_keys(where, check, {"indices": "list", "sha256": _STR}, "noise_check.")
    elif check is not None:
        raise _fail(where, "noise_check", "expected null (the noise is stored in the shards)")
    return manifest


def check_digest(manifest: Mapping[str, Any], where: str) -> None:
    """The recorded settings digest must be the digest of the recorded settings and teacher."""
    now = json_digest({"settings": manifest["settings"], "teacher": manifest["teacher"]})
    if now != manifest["settings_digest"]:
        raise _fail(where, "settings_digest", f"{manifest['settings_digest'][:12]}... is not the digest of the "
                    f"recorded settings and teacher ({now[:12]}...): the file was edited; rebuild the folder or "
                    "restore its manifest")  # fmt: skip


def read_manifest(path: Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check its schema, values and shard plan (not yet the digest: callers first
    compare what they can name key by key); raises :class:`TrajectoryError` naming the file and the key."""
    if not path.is_file():
        raise TrajectoryError(f"{path}: no manifest; is {path.parent} a trajectory folder?")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"{path}: corrupt manifest, not JSON ({e})") from e
    return validate_manifest(manifest, str(path))


def load_manifest(path: Path) -> dict[str, Any]:
    """:func:`read_manifest`, then the digest check: a manifest that can be trusted as a whole."""
    manifest = read_manifest(path)
    check_digest(manifest, str(path))
    return manifest


# ----------------------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------------------
def _int_dtypes() -> tuple[torch.dtype, ...]:
    return (torch.int16, torch.int32, torch.int64)


def check_shard_header(path: Path, manifest: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Compare shard ``k``'s header with the manifest: metadata (range, digest, format version), tensor names,
    dtypes and shapes (seq_len, codebook_dim, row count). Returns the header metadata."""
    from safetensors import safe_open

    s = manifest["settings"]
    entry = manifest["shards"][k]
    a, b = entry["start"], entry["stop"]
    if not path.is_file():
        raise TrajectoryError(f"{path}: shard missing")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            shapes = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise TrajectoryError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise TrajectoryError(f"{path}: header metadata {META_KEY!r} missing: not a shard of this toolkit")
    want_meta = {"start": a, "stop": b, "settings_digest": manifest["settings_digest"],
                 "format_version": s["format_version"]}  # fmt: skip
    for key, want in want_meta.items():
        if meta.get(key) != want:
            raise TrajectoryError(f"{path}: header {key}={meta.get(key)!r}, but {MANIFEST} expects {want!r}")
    n, seq, dim = b - a, s["seq_len"], s["codebook_dim"]
    want = {"tokens": ((n, seq), ("I16", "I32", "I64")), shard_ids(s)[0]: ((n,), ("I16", "I32", "I64")),
            "index": ((n,), ("I64",))}  # fmt: skip
    if s["noise_storage"] == "stored":
        want["noise"] = ((n, seq, dim), ("F16",))
    if set(shapes) != set(want):
        raise TrajectoryError(f"{path}: holds tensors {sorted(shapes)}, expected {sorted(want)}")
    for key, (shape, dtypes) in want.items():
        got_shape, got_dtype = shapes[key]
        if got_shape != shape:
            raise TrajectoryError(
                f"{path}: tensor {key!r} has shape {got_shape}, but {MANIFEST} (seq_len={seq}, codebook_dim={dim}, "
                f"[{a}, {b})) expects {shape}"
            )
        if got_dtype not in dtypes:
            raise TrajectoryError(f"{path}: tensor {key!r} has dtype {got_dtype}, expected one of {list(dtypes)}")
    return meta


def shard_bytes_ok(path: Path, manifest: Mapping[str, Any], k: int) -> bool:
    """Whether shard ``k`` is complete and intact: header consistent with the manifest, and its bytes equal to
    the manifest's sha256 (sealed build) or, before sealing, its tensors equal to the payload digest its writer
    stored in the header. False instead of an error: the builder rebuilds such a shard."""
    try:
        meta = check_shard_header(path, manifest, k)
    except TrajectoryError:
        return False
    entry = manifest["shards"][k]
    if "sha256" in entry:
        return sha256_file(path) == entry["sha256"]
    want = meta.get("payload_sha256")
    if not isinstance(want, str):
        return False  # written by a version that stored no payload digest: cannot be trusted unsealed
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - unreadable means not complete
        return False
    return payload_digest(tensors) == want


def check_shard_values(path: Path, manifest: Mapping[str, Any], k: int, tensors: Mapping[str, Tensor]) -> None:
    """Value checks of an opened shard: token ids < V, condition ids < their count, index = start..stop−1,
    finite noise. Catches a folder whose checksums agree with wrong contents (e.g. both edited)."""
    s, t = manifest["settings"], manifest["teacher"]
    entry = manifest["shards"][k]
    vocab = t["codebook_shape"][0]
    id_key, num_ids, _ = shard_ids(s)
    tok, lab = tensors["tokens"], tensors[id_key]
    if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= vocab):
        raise TrajectoryError(f"{path}: token ids in [{int(tok.min())}, {int(tok.max())}], outside [0, {vocab}) "
                              "(teacher.codebook_shape[0])")  # fmt: skip
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_ids):
        where = "settings.num_classes" if s["format_version"] == 1 else "settings.condition"
        raise TrajectoryError(f"{path}: {id_key} values in [{int(lab.min())}, {int(lab.max())}], outside "
                              f"[0, {num_ids}) ({where})")  # fmt: skip
    if not torch.equal(tensors["index"], torch.arange(entry["start"], entry["stop"], dtype=torch.int64)):
        raise TrajectoryError(f"{path}: index is not {entry['start']}..{entry['stop'] - 1}")
    if "noise" in tensors and not bool(torch.isfinite(tensors["noise"]).all()):
        raise TrajectoryError(f"{path}: noise holds NaN or inf values")
