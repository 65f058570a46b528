"""The ingredients of ImageNet FID outside torch-fidelity's metric call: precomputed reference statistics and the
Inception-V3 weights file.

**Reference statistics** (the mean and covariance of a feature network's activations on real images). The
Distilled Decoding release publishes the ImageNet-256 statistics its FIDs were computed against
(:data:`IMAGENET256_FID_STATISTICS`, ``statistic.pth`` = ``{"m": mu, "s": sigma}``, numpy arrays of pytorch-fid's
Inception-V3 pool features, 2048-d). :func:`load_fid_statistics` reads that file and the other common layouts;
:func:`distilled_decoding.metrics.compute_metrics` takes the result (or the file / Hub reference itself) as its
``reference`` and computes FID from the generated images' features with torch-fidelity's own helpers
(:func:`fid_against_statistics`). pytorch-fid and torch-fidelity's ``inception-v3-compat`` both port the TF FID
Inception (2015-12-05 weights, 2048-d pool features) but resize 256 px inputs to 299 differently, so FIDs against
these statistics may differ slightly from the official scripts'.

**Inception weights** (:func:`inception_weights_path`): ``weights-inception-2015-12-05-6726825d.pth`` (~95 MB,
release asset v0.2.0 of GitHub ``toshas/torch-fidelity``) at ``torch.hub.get_dir()/checkpoints/`` (i.e.
``$TORCH_HOME/hub/checkpoints/``, where torch-fidelity itself keeps it) or passed as ``inception_weights=``. When
absent it is downloaded there from torch-fidelity's URL, unless downloads are off (``HF_HUB_OFFLINE=1``, the
toolkit's one offline switch): then :class:`WeightsNotFoundError` names the file and where to put it. The file is
checked with ``torch.load(..., weights_only=True)`` before torch-fidelity (which unpickles it freely) reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGENET256_FID_STATISTICS",
    "INCEPTION_WEIGHTS_FILENAME",
    "FIDStatistics",
    "WeightsNotFoundError",
    "load_fid_statistics",
    "statistics_reference",
    "fid_against_statistics",
    "inception_weights_path",
    "check_inception_weights",
]

#: The ImageNet 256×256 reference statistics of the DD release (Hub reference, see :mod:`distilled_decoding.hub`).
IMAGENET256_FID_STATISTICS = "microsoft/distilled_decoding/ImageNet-256_FID_Statistic/statistic.pth"
_FOLDER_FILE = "statistic.pth"  # the official scripts' --fid_statistic is a folder holding this file
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
_INCEPTION_RELEASE = "https://github.com/toshas/torch-fidelity/releases/tag/v0.2.0"


class WeightsNotFoundError(ValueError):
    """A feature network's weights are not on disk and could not (or may not) be downloaded."""


@dataclass(frozen=True)
class FIDStatistics:
    """``mu`` (F,) and ``sigma`` (F, F) float64 numpy arrays; ``source`` names where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str = "statistics"

    def __post_init__(self) -> None:
        mu, sigma = np.asarray(self.mu, dtype=np.float64), np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{self.source}: expected mu (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{self.source}: mu / sigma hold non-finite values")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)


def _numpy_safe_globals() -> list[Any]:
    # What a pickled float numpy array needs (numpy 2 and numpy 1 module paths); nothing callable beyond the
    # array constructor, so weights_only stays closed to arbitrary code.
    rebuild = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy(._core).multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]  # numpy.dtypes.Float32DType, ...
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def _read(path: Path, source: str) -> Any:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = [ln for ln in lines if "GLOBAL" in ln or "but got" in ln] or lines[:1] or [type(e).__name__]
        raise ValueError(f"{source}: not readable as FID statistics with weights_only=True ({why[0]})") from e


def load_fid_statistics(
    ref: str | os.PathLike = IMAGENET256_FID_STATISTICS,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> FIDStatistics:
    """Read FID reference statistics: a local file, a folder holding ``statistic.pth`` (the official
    ``--fid_statistic`` layout) or a Hub reference (default: the DD release's ImageNet-256 file).

    Layouts: ``{"m", "s"}`` (DD / pytorch-fid ``statistic.pth``) or ``{"mu", "sigma"}`` (torch-fidelity's cache,
    ``.npz`` files), numpy arrays or tensors; ``.pth`` is read with ``torch.load(..., weights_only=True)`` (numpy
    arrays allowed), ``.npz`` with ``allow_pickle=False``.
    """
    from distilled_decoding.hub import resolve_file

    source = os.fspath(ref)
    path = resolve_file(ref, revision=revision, local_files_only=local_files_only)
    if path.is_dir():
        if not (path / _FOLDER_FILE).is_file():
            raise ValueError(f"{source}: a folder without {_FOLDER_FILE}; expected a statistics file or such a folder")
        path, source = path / _FOLDER_FILE, os.path.join(source, _FOLDER_FILE)
    obj = _read(path, source)
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict with m/s or mu/sigma, found {type(obj).__name__}")
    for mu_key, sigma_key in (("mu", "sigma"), ("m", "s")):
        if mu_key in obj and sigma_key in obj:
            mu, sigma = (obj[k].numpy() if torch.is_tensor(obj[k]) else obj[k] for k in (mu_key, sigma_key))
            return FIDStatistics(mu, sigma, source)
    raise ValueError(f"{source}: expected keys m/s or mu/sigma, found {sorted(map(str, obj))}")


def statistics_reference(reference: Any) -> FIDStatistics | None:
    """The statistics an evaluation ``reference`` names, or None when it holds real images (a tensor, or a folder
    of images): :class:`FIDStatistics` as is, any other path or Hub reference read by :func:`load_fid_statistics`
    (a local folder counts as statistics only when it holds ``statistic.pth``)."""
    if isinstance(reference, FIDStatistics):
        return reference
    if not isinstance(reference, (str, os.PathLike)):
        return None
    folder = Path(reference)
    if folder.is_dir() and not (folder / _FOLDER_FILE).is_file():
        return None
    return load_fid_statistics(reference)


def fid_against_statistics(
    dataset: torch.utils.data.Dataset,
    stats: FIDStatistics,
    *,
    feature_extractor: str,
    isc: bool,
    batch_size: int,
    cuda: bool,
    verbose: bool = False,
    **kwargs: Any,
) -> dict[str, float]:
    """FID of the images in ``dataset`` (items uint8 (3, H, W)) against ``stats``, and their Inception Score when
    ``isc``, from one pass of torch-fidelity's feature extractor ``feature_extractor`` (registered, constructed
    with ``kwargs``, e.g. its weights path). Returns ``{"fid"[, "is"]}``. ``kwargs`` also carry torch-fidelity's
    ``isc_splits`` / ``rng_seed``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    layer_fid = cls.get_default_feature_layer_for_metric("fid")
    layer_isc = cls.get_default_feature_layer_for_metric("isc")
    layers = [layer_fid] + ([layer_isc] if isc and layer_isc != layer_fid else [])
    extractor = create_feature_extractor(feature_extractor, layers, cuda=cuda, verbose=verbose, **kwargs)
    feats = get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, True, verbose)
    gen = fid_features_to_statistics(feats[layer_fid].double())
    if gen["mu"].shape != stats.mu.shape:
        raise ValueError(
            f"reference: {stats.source} has {stats.mu.shape[0]}-d statistics but {feature_extractor!r} gives "
            f"{gen['mu'].shape[0]}-d features; statistics only compare with the network that made them (ImageNet "
            "statistics: feature_extractor='inception')"
        )
    ref = {"mu": stats.mu, "sigma": stats.sigma}
    out = {"fid": float(fid_statistics_to_metric(gen, ref, verbose)["frechet_inception_distance"])}
    if isc:
        isc_out = isc_featuresdict_to_metric(feats, layer_isc, verbose=verbose, **kwargs)
        out["is"] = float(isc_out["inception_score_mean"])
    return out


# ------------------------------------------------------------------------------------------ Inception weights
def inception_weights_path(path: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """Locate torch-fidelity's Inception-V3 weights: ``path`` if given (never downloaded), else
    ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``, downloaded there from
    torch-fidelity's URL when absent and ``download`` (None: unless ``HF_HUB_OFFLINE=1``). Raises
    :class:`WeightsNotFoundError` naming the expected location when the file is absent and not downloaded."""
    from distilled_decoding.hub import offline_mode

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WeightsNotFoundError(
                f"Inception-V3 weights not found: expected the file passed as inception_weights={str(path)!r}. "
                f"Copy {INCEPTION_WEIGHTS_FILENAME} (from {_INCEPTION_RELEASE}) there, or use "
                "feature_extractor='digits-cnn'."
            )
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    if p.is_file():
        return p
    where = f"{p} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it)"
    todo = (f"copy {INCEPTION_WEIGHTS_FILENAME} (from {_INCEPTION_RELEASE}) to that location or pass "
            "inception_weights=<file>, or use feature_extractor='digits-cnn'.")  # fmt: skip
    if download is False or (download is None and offline_mode()):
        raise WeightsNotFoundError(
            f"Inception-V3 weights not found: expected {where}. Downloads are off (HF_HUB_OFFLINE=1 or "
            f"download=False): {todo}"
        )
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(p), progress=True)
    except OSError as e:  # URLError, HTTPError, connection and disk errors
        raise WeightsNotFoundError(
            f"Inception-V3 weights not found: expected {where}, and the download from {URL_INCEPTION_V3} "
            f"failed ({e}): {todo}"
        ) from e
    return p


def check_inception_weights(p: Path) -> None:
    """Refuse a weights file that a ``weights_only`` load rejects or that is not the Inception-V3 state dict
    (torch-fidelity reads it with ``weights_only=False``)."""
    from distilled_decoding.checkpoints import load_state_dict_file

    sd = load_state_dict_file(p)
    missing = [k for k in ("Conv2d_1a_3x3.conv.weight", "fc.weight") if k not in sd]
    if missing:
        raise WeightsNotFoundError(f"{p} is not torch-fidelity's Inception-V3 state dict (missing {missing})")
