"""Image-quality metrics (FID, IS, precision / recall, KID) through torch-fidelity, with an offline extractor.

Two feature extractors:

* ``"digits-cnn"`` (default): :class:`DigitsClassifier`, a small CNN trained on the scikit-learn digits
  (``recipes/train_digits_classifier.py``), shipped at ``checkpoints/digits_classifier/``. Registered with
  torch-fidelity under that name (once per process, on first use). Features: ``"feat"`` — the 128-d
  penultimate vector (global average pool of the last conv block, after ReLU) for FID / KID / precision-recall —
  and ``"logits"`` (10 classes) for the Inception Score (``"logits_unbiased"``, the logits without the last
  bias as in torch-fidelity's Inception, is also provided). Numbers are only comparable with numbers from the
  same extractor: this is the metric of the embedded digits default, not ImageNet FID.
* ``"inception"`` (alias ``"inception-v3-compat"``): torch-fidelity's TF-compatible Inception-V3 (2048-d pool
  features, the standard FID / IS). Its weights file ``weights-inception-2015-12-05-6726825d.pth`` (~95 MB) is
  looked for at ``$TORCH_HOME/hub/checkpoints/`` (or passed as ``inception_weights=``) and downloaded there when
  absent, unless ``HF_HUB_OFFLINE=1``: then :class:`WeightsNotFoundError` says where to put it, before
  torch-fidelity is called (:func:`distilled_decoding.fid.inception_weights_path`). The file is checked with
  ``torch.load(..., weights_only=True)`` before torch-fidelity loads it. On a 2-core CPU Inception runs at
  ≈ 5 images/s: use a GPU for it. ImageNet FID can also be computed against the DD release's precomputed
  statistics (:mod:`distilled_decoding.fid`).

Inputs are image tensors ``(N, 3, H, W)``: ``uint8`` in [0, 255], or floating point in [0, 1] (the pipeline's
output; rounded to uint8 as torch-fidelity expects). One-channel images are repeated to three.
torch-fidelity is imported lazily, on first use (1.5 s on its own, ~0.1 s once diffusers is loaded); importing
this module costs ~1.8 s after torch, almost all of it diffusers (needed by :class:`DigitsClassifier`).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from distilled_decoding.fid import (
    INCEPTION_WEIGHTS_FILENAME,
    FIDStatistics,
    WeightsNotFoundError,
    check_inception_weights,
    fid_against_statistics,
    inception_weights_path,
    statistics_reference,
)

__all__ = [
    "DigitsClassifier",
    "DigitsFeatureExtractor",  # noqa: F822 - defined lazily by __getattr__
    "WeightsNotFoundError",
    "FEATURE_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "default_classifier",
    "default_checkpoints_dir",
    "register_digits_feature_extractor",
    "inception_weights_path",
    "compute_metrics",
    "class_accuracy",
]

FEATURE_EXTRACTOR_NAME = "digits-cnn"
_INCEPTION_NAMES = ("inception", "inception-v3-compat")
_CLASSIFIER_SUBDIR = "digits_classifier"


# --------------------------------------------------------------------------------------------- classifier


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Small CNN for 10-class digit images; also the feature network of the ``"digits-cnn"`` extractor.

    Input: ``(B, C, H, W)`` uint8 in [0, 255] or float in [0, 1] (C = ``in_channels``); resized to
    ``image_size`` (bilinear, antialiased) when H, W differ. Layout (for 32×32): a space-to-depth stem
    (2×2 pixel-unshuffle, lossless, 3×32×32 → 12×16×16 — much faster on CPU than a full-resolution conv), then
    conv3×3-BN-ReLU layers of ``widths`` = (w0, w1) at 16×16, max-pool, w2 at 8×8, max-pool, w3 at 4×4,
    global average pooling to the ``w3``-d feature vector, dropout and a linear classifier.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (32, 64, 128, 128),
        num_classes: int = 10,
        dropout: float = 0.2,
    ):
        super().__init__()
        if len(widths) != 4 or image_size % 8:
            raise ValueError(
                f"widths must have 4 entries and image_size be a multiple of 8, got {widths}, {image_size}"
            )
        w0, w1, w2, w3 = widths

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            nn.PixelUnshuffle(2),
            *conv(4 * in_channels, w0),
            *conv(w0, w1),
            nn.MaxPool2d(2),
            *conv(w1, w2),
            nn.MaxPool2d(2),
            *conv(w2, w3),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(w3, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] ``(B, C, H, W)`` → float ``(B, C, S, S)`` in [-1, 1] on this device."""
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = x * 2.0 - 1.0
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features ``(B, feature_dim)`` and class logits ``(B, num_classes)``, float32."""
        feat = self.body(self.preprocess(images)).mean(dim=(2, 3))
        return feat, self.head(self.drop(feat))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.features_and_logits(images)[1]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted classes, long ``(B,)`` on the CPU (eval mode, batched)."""
        was_training = self.training
        self.eval()
        try:
            out = [self(images[i : i + batch_size]).argmax(dim=1).cpu() for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def default_checkpoints_dir() -> Path:
    """The repository's ``checkpoints/`` folder (next to the ``distilled_decoding`` package)."""
    return Path(__file__).resolve().parents[1] / "checkpoints"


@functools.lru_cache(maxsize=4)
def _load_classifier(path: str) -> DigitsClassifier:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise WeightsNotFoundError(
            f"digits classifier not found at {p} (expected config.json and diffusion_pytorch_model.safetensors; "
            "create it with `python recipes/train_digits_classifier.py --out checkpoints/digits_classifier`)"
        )
    return DigitsClassifier.from_pretrained(str(p)).eval().requires_grad_(False)


def default_classifier(path: str | os.PathLike | None = None) -> DigitsClassifier:
    """Load the shipped classifier (``checkpoints/digits_classifier/``, or ``path``), in eval mode on the CPU.

    Each call returns a private copy (the files are read once per process).
    """
    p = Path(path) if path is not None else default_checkpoints_dir() / _CLASSIFIER_SUBDIR
    return copy.deepcopy(_load_classifier(str(p.resolve())))


def _resolve_classifier(classifier: DigitsClassifier | str | os.PathLike | None) -> DigitsClassifier:
    if classifier is None or isinstance(classifier, (str, os.PathLike)):
        return default_classifier(classifier)
    if not isinstance(classifier, DigitsClassifier):
        raise ValueError(f"classifier must be a DigitsClassifier, a folder path or None, got {type(classifier)}")
    return classifier


# ------------------------------------------------------------------------------------- torch-fidelity glue


@functools.lru_cache(maxsize=1)
def _extractor_class() -> type:
    from torch_fidelity import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper of :class:`DigitsClassifier` (uint8 ``(B, 3, H, W)`` in, float32 out).

        The network is, in order of preference: the ``digits_classifier`` keyword (a DigitsClassifier, copied),
        the folder ``feature_extractor_weights_path`` (``from_pretrained``), or :func:`default_classifier`.
        """

        _distilled_decoding_digits = True

        def __init__(self, name, features_list, feature_extractor_weights_path=None, digits_classifier=None, **kw):
            super().__init__(name, features_list)
            if digits_classifier is not None:
                net = copy.deepcopy(_resolve_classifier(digits_classifier))
            else:
                net = default_classifier(feature_extractor_weights_path)
            self.net = net.eval().requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"expected uint8 images (B, 3, H, W), got {_describe(x)}")
            feat, logits = self.net.features_and_logits(x)
            out = {"feat": feat, "logits": logits, "logits_unbiased": logits - self.net.head.bias}
            return tuple(out[k].float() for k in self.features_list)

    DigitsFeatureExtractor.__module__ = __name__
    return DigitsFeatureExtractor


def __getattr__(name: str):
    if name == "DigitsFeatureExtractor":  # defined on first access: torch-fidelity is imported lazily
        return _extractor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_digits_feature_extractor() -> None:
    """Register ``"digits-cnn"`` with torch-fidelity; idempotent (also across a reload of this module).

    Raises ``ValueError`` if a different extractor already holds the name.
    """
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = _extractor_class()
    existing = FEATURE_EXTRACTORS_REGISTRY.get(FEATURE_EXTRACTOR_NAME)
    if existing is cls:
        return
    if existing is not None:
        if not getattr(existing, "_distilled_decoding_digits", False):
            raise ValueError(
                f"feature extractor name {FEATURE_EXTRACTOR_NAME!r} is already registered with torch-fidelity "
                f"by {existing.__module__}.{existing.__qualname__}"
            )
        FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] = cls  # this module was reloaded
        return
    register_feature_extractor(FEATURE_EXTRACTOR_NAME, cls)


class _ImageDataset(torch.utils.data.Dataset):
    """The Dataset torch-fidelity expects: item ``i`` is a bare uint8 tensor ``(3, H, W)``."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _validate_images(x: object, name: str) -> torch.Tensor:
    """Check ``(N, C, H, W)`` uint8 / float-in-[0, 1] images (C ∈ {1, 3}); return them with 3 channels."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images (N, 3, H, W), got {_describe(x)}")
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0 or min(x.shape[2:]) < 1:
        raise ValueError(f"{name} must have shape (N, 3, H, W) with N >= 1, got {_describe(x)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got {_describe(x)}")
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise ValueError(
                f"{name}: float images must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
                "(convert [-1, 1] images with (x + 1) / 2)"
            )
    return x.detach().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.detach()


def _as_uint8_images(x: object, name: str) -> torch.Tensor:
    """Validated images as contiguous CPU uint8 ``(N, 3, H, W)`` (floats in [0, 1] are scaled and rounded)."""
    x = _validate_images(x, name)
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255.0).round_().to(torch.uint8)
    return x.cpu().contiguous()


def compute_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor | str | os.PathLike | FIDStatistics | None,
    *,
    feature_extractor: str = FEATURE_EXTRACTOR_NAME,
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    kid: bool = False,
    batch_size: int = 256,
    cuda: bool | None = None,
    classifier: DigitsClassifier | str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    kid_subset_size: int | None = None,
    rng_seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float]:
    """FID / IS / precision-recall (/ KID) of ``generated`` against ``reference`` with torch-fidelity.

    Args:
        generated: ``(N, 3, H, W)`` uint8, or float in [0, 1]. IS is computed on these alone.
        reference: ``(M, 3, H', W')`` real images, same conventions, or a folder of PNG/JPEG images (read by
            torch-fidelity, e.g. ImageNet validation images at the generated resolution), or precomputed FID
            statistics: :class:`~distilled_decoding.fid.FIDStatistics`, or any other path / Hub
            reference, read by :func:`~distilled_decoding.fid.load_fid_statistics` (e.g. the DD
            release's ImageNet-256 ``IMAGENET256_FID_STATISTICS`` with ``feature_extractor="inception"``; FID and
            IS only). May be ``None`` when only ``isc``.
        feature_extractor: ``"digits-cnn"`` (offline, default), ``"inception"`` / ``"inception-v3-compat"``
            (weights on disk or downloaded, see the module docstring), or the name of an extractor you registered
            with torch-fidelity yourself (torch-fidelity's other built-ins are refused: they download).
        fid, isc, prc, kid: which metrics.
        batch_size: images per forward pass.
        cuda: run the extractor on the GPU; ``None`` → ``torch.cuda.is_available()``.
        classifier: ``"digits-cnn"`` network (a DigitsClassifier or a ``save_pretrained`` folder);
            default :func:`default_classifier`.
        inception_weights: explicit path of the Inception-V3 weights file.
        isc_splits, prc_neighborhood, kid_subset_size, rng_seed: torch-fidelity's settings
            (``kid_subset_size`` defaults to ``min(1000, N, M)``).

    Returns:
        ``{"fid", "is", "precision", "recall", "kid"}``, only the keys asked for, as Python floats.

    Precision / recall use the k-th-nearest-neighbour balls (k = ``prc_neighborhood``) of each set, so a small
    ``reference`` makes the balls of its outliers large: with the 269 val digits as reference even uniform noise
    scores precision 0.74 (0.0 against the 1,528 train digits). Use ≥ ~1,500 reference images, e.g.
    ``load_digits_images(32, "all")``. FID is biased upwards for small sets too (compare equal sizes).
    """
    if not (fid or isc or prc or kid):
        raise ValueError("at least one of fid, isc, prc, kid must be True")
    gen = _as_uint8_images(generated, "generated")
    stats = statistics_reference(reference)
    ref_dir = Path(reference) if stats is None and isinstance(reference, (str, os.PathLike)) else None
    if stats is not None or ref_dir is not None:
        reference = None
    if stats is not None and (prc or kid):
        raise ValueError(
            f"reference: FID statistics ({stats.source}) give FID (and IS) only; pass prc=False, kid=False, or real "
            "images as the reference"
        )
    binary = (fid or prc or kid) and stats is None
    ref = _as_uint8_images(reference, "reference") if (binary and ref_dir is None) or reference is not None else None
    for name, x in (("generated", gen), ("reference", ref)):
        if x is None:
            continue
        need = max(2, isc_splits if isc and name == "generated" else 0, prc_neighborhood + 1 if prc else 0)
        if x.shape[0] < need:
            raise ValueError(f"{name} has {x.shape[0]} images; the requested metrics need at least {need}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    extra: dict[str, object] = {}
    if feature_extractor == FEATURE_EXTRACTOR_NAME:
        register_digits_feature_extractor()
        extra["digits_classifier"] = _resolve_classifier(classifier)
    elif feature_extractor in _INCEPTION_NAMES:
        weights = inception_weights_path(inception_weights)
        check_inception_weights(weights)
        feature_extractor = "inception-v3-compat"
        extra["feature_extractor_weights_path"] = str(weights)
    else:
        cls = FEATURE_EXTRACTORS_REGISTRY.get(feature_extractor)
        if cls is None or cls.__module__.startswith("torch_fidelity"):
            raise ValueError(
                f"feature_extractor must be 'digits-cnn', 'inception' or a name you registered with "
                f"torch-fidelity, got {feature_extractor!r}"
            )
    if stats is not None and fid:
        return fid_against_statistics(_ImageDataset(gen), stats, feature_extractor=feature_extractor, isc=isc,
                                      batch_size=batch_size, cuda=cuda, verbose=verbose, isc_splits=isc_splits,
                                      rng_seed=rng_seed, **extra)  # fmt: skip
    kw: dict[str, object] = {}
    if kid:
        n_ref = ref.shape[0] if ref is not None else 1000
        kw["kid_subset_size"] = kid_subset_size or min(1000, gen.shape[0], n_ref)
    out = torch_fidelity.calculate_metrics(
        input1=_ImageDataset(gen),
        input2=str(ref_dir) if ref_dir is not None else (_ImageDataset(ref) if ref is not None else None),
        fid=fid,
        isc=isc,
        prc=prc,
        kid=kid,
        feature_extractor=feature_extractor,
        batch_size=batch_size,
        cuda=cuda,
        isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood,
        rng_seed=rng_seed,
        save_cpu_ram=True,
        cache=False,
        verbose=verbose,
        **kw,
        **extra,
    )
    keys = {
        "fid": ("frechet_inception_distance", fid),
        "is": ("inception_score_mean", isc),
        "precision": ("precision", prc),
        "recall": ("recall", prc),
        "kid": ("kernel_inception_distance_mean", kid),
    }
    return {k: float(out[src]) for k, (src, asked) in keys.items() if asked}


@torch.no_grad()
def class_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    classifier: DigitsClassifier | str | os.PathLike | None = None,
    batch_size: int = 512,
) -> float:
    """Fraction in [0, 1] of ``images`` ``(N, 3, H, W)`` (uint8, or float in [0, 1]) that the digits
    classifier assigns to ``labels`` ``(N,)``."""
    x = _validate_images(images, "images")
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"labels must be integer class ids of shape ({x.shape[0]},), got {_describe(y)}")
    net = _resolve_classifier(classifier)
    return float((net.predict(x, batch_size=batch_size) == y.cpu()).float().mean())
