"""Digits data helper, shipped digits classifier and the torch-fidelity metrics (FID / IS / precision-recall)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from distilled_decoding import metrics as M
from distilled_decoding.digits import (
    NUM_CLASSES,
    load_digits_images,
    random_affine,
    split_indices,
    to_model_range,
    to_uint8,
)

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def train():
    return load_digits_images(32, "train")


@pytest.fixture(scope="module")
def val():
    return load_digits_images(32, "val")


@pytest.fixture(scope="module")
def clf():
    return M.default_classifier()


@pytest.fixture(scope="module")
def noise():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (269, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def real_vs_real(val, train, clf):
    return M.compute_metrics(val[0], train[0], classifier=clf)


def _block_blur(x: torch.Tensor) -> torch.Tensor:
    """Average 4×4 blocks: the 32×32 digit becomes a blocky 8×8 image."""
    y = F.avg_pool2d(x.float(), 4)
    return F.interpolate(y, scale_factor=4, mode="nearest").round().to(torch.uint8)


def _patch_shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Permute the 16 8×8 patches of each 32×32 image (same permutation for all)."""
    n = x.shape[0]
    p = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(n, 3, 16, 8, 8)[:, :, torch.randperm(16, generator=g)]
    return p.reshape(n, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, 32, 32).contiguous()


# ------------------------------------------------------------------------------------------------- digits


def test_digits_splits_are_disjoint_stratified_and_deterministic():
    idx = split_indices()
    tr, va = idx["train"], idx["val"]
    assert (len(tr), len(va), len(idx["all"])) == (1528, 269, 1797)
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(1797))
    _, labels = load_digits_images(8, "all")
    counts = torch.bincount(labels[va], minlength=NUM_CLASSES)
    assert counts.min() >= 26 and counts.max() <= 27
    x1, y1 = load_digits_images(32, "val")
    x2, y2 = load_digits_images(32, "val")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x1[0] = 0  # callers get fresh tensors
    assert not torch.equal(x1, load_digits_images(32, "val")[0])


def test_digits_images_format():
    from sklearn.datasets import load_digits

    d = load_digits()
    x8, y = load_digits_images(8)
    assert x8.shape == (1797, 3, 8, 8) and x8.dtype == torch.uint8 and y.dtype == torch.long
    expected = (torch.as_tensor(d.images) * 255 / 16).round().to(torch.uint8)
    assert torch.equal(x8[:, 0], expected) and torch.equal(x8[:, 1], x8[:, 2])
    assert torch.equal(y, torch.as_tensor(d.target))
    x32, _ = load_digits_images(32, "train")
    assert x32.shape == (1528, 3, 32, 32) and int(x32.max()) == 255 and int(x32.min()) == 0
    # bicubic upscaling keeps the mean intensity of each digit (within rounding and the [0, 255] clamp)
    x32_all, _ = load_digits_images(32)
    assert (x32_all.float().mean((1, 2, 3)) - x8.float().mean((1, 2, 3))).abs().max() < 6


@pytest.mark.parametrize(("kwargs", "word"), [({"size": 4}, "size"), ({"split": "test"}, "split")])
def test_digits_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_digits_images(**kwargs)


def test_range_helpers_round_trip(val):
    x = val[0]
    f = to_model_range(x)
    assert f.min() >= -1 and f.max() <= 1 and f.dtype == torch.float32
    assert torch.equal(to_uint8(f), x)
    assert torch.equal(to_uint8(x.float() / 255, value_range=(0, 1)), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(f)


def test_random_affine_identity_and_seed(val):
    x = val[0][:16]
    same = random_affine(x, max_rotation=0.0, max_translation=0.0, scale_range=(1.0, 1.0))
    assert torch.equal(same, x)
    a = random_affine(x, generator=torch.Generator().manual_seed(3))
    b = random_affine(x, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, x)


# --------------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy(clf, val, train):
    # measured: val 0.9963 (268/269), train 1.0
    assert M.class_accuracy(*val, classifier=clf) >= 0.985
    assert M.class_accuracy(*train, classifier=clf) >= 0.995
    # resized inputs (64×64 rendering, resized to 32 internally) and float [0, 1] inputs
    x64, y64 = load_digits_images(64, "val")
    assert M.class_accuracy(x64, y64, classifier=clf) >= 0.97
    assert M.class_accuracy(val[0].float() / 255, val[1], classifier=clf) >= 0.985


def test_classifier_uint8_float_equivalence_and_round_trip(tmp_path, clf, val):
    x = val[0][:32]
    with torch.no_grad():
        f1, l1 = clf.features_and_logits(x)
        _, l2 = clf.features_and_logits(x.float() / 255)
    assert f1.shape == (32, clf.feature_dim) == (32, 128) and l1.shape == (32, 10)
    torch.testing.assert_close(l1, l2)
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size < 2_000_000
    again = M.DigitsClassifier.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), l1)
    assert M.default_classifier() is not M.default_classifier()  # private copies


def test_missing_classifier_names_path(tmp_path):
    with pytest.raises(M.WeightsNotFoundError, match="nothere"):
        M.default_classifier(tmp_path / "nothere")


# ------------------------------------------------------------------------------------------------ metrics


def test_real_vs_real(real_vs_real):
    # measured: fid 0.363, is 8.29, precision 0.881, recall 0.902
    r = real_vs_real
    assert set(r) == {"fid", "is", "precision", "recall"}
    assert 0 < r["fid"] < 1.0
    assert r["is"] > 7.5
    assert r["precision"] > 0.8 and r["recall"] > 0.8


def test_inception_score_of_real_digits(clf, train):
    # 10 splits of ~153 confident, balanced predictions: close to the maximum of 10 (measured 9.74)
    r = M.compute_metrics(train[0], None, fid=False, prc=False, classifier=clf)
    assert set(r) == {"is"} and 9.0 < r["is"] <= 10.0


def test_noise_is_far_from_real(real_vs_real, noise, train, clf):
    # measured: fid 95.2, is 1.12, precision 0, recall 0
    r = M.compute_metrics(noise, train[0], classifier=clf)
    assert r["fid"] > 50 * real_vs_real["fid"]
    assert r["precision"] < 0.05 and r["recall"] < 0.05
    assert r["is"] < 2.0 and r["is"] < real_vs_real["is"] / 3


def test_degraded_digits_rank_between(real_vs_real, val, train, clf):
    g = torch.Generator().manual_seed(0)
    blurred = M.compute_metrics(_block_blur(val[0]), train[0], isc=False, prc=False, classifier=clf)
    shuffled = M.compute_metrics(_patch_shuffle(val[0], g), train[0], classifier=clf)
    gray_fid = M.compute_metrics(torch.full_like(val[0], 128), train[0], fid=True, isc=False, prc=False)["fid"]
    # measured: blurred 12.0, shuffled 53.9, constant gray 110.5
    assert 10 * real_vs_real["fid"] < blurred["fid"] < gray_fid
    assert 10 * real_vs_real["fid"] < shuffled["fid"] < gray_fid
    assert shuffled["recall"] < 0.2 and shuffled["is"] < real_vs_real["is"] / 2


def test_float_input_matches_uint8(real_vs_real, val, train, clf):
    r = M.compute_metrics(val[0].float() / 255, train[0].double() / 255, classifier=clf)
    assert r == real_vs_real


def test_kid_and_one_channel_input(val, train, noise, clf):
    real = M.compute_metrics(val[0][:, :1], train[0], fid=False, isc=False, prc=False, kid=True, classifier=clf)
    fake = M.compute_metrics(noise, train[0], fid=False, isc=False, prc=False, kid=True, classifier=clf)
    assert set(real) == {"kid"} and abs(real["kid"]) < 0.05 and fake["kid"] > 1.0


def test_registration_is_idempotent_and_usable_directly(val, train):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    M.register_digits_feature_extractor()
    M.register_digits_feature_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is M.DigitsFeatureExtractor
    out = torch_fidelity.calculate_metrics(
        input1=M._ImageDataset(val[0]),
        input2=M._ImageDataset(train[0]),
        fid=True,
        feature_extractor="digits-cnn",
        cuda=False,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert 0 < out["frechet_inception_distance"] < 1.0


def test_registration_refuses_a_foreign_extractor(monkeypatch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Foreign:
        pass

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "digits-cnn", Foreign)
    with pytest.raises(ValueError, match="already registered"):
        M.register_digits_feature_extractor()

    class Stale:  # the same extractor from an earlier import of this module
        _distilled_decoding_digits = True

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "digits-cnn", Stale)
    M.register_digits_feature_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is M.DigitsFeatureExtractor


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty torch hub dir, and a record of any download attempt."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    calls = []

    def no_download(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a download was attempted")

    def no_socket(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return calls


def test_inception_without_weights_raises_offline(offline, val, tmp_path):
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(M.WeightsNotFoundError, match="Downloads are off") as e:
        M.compute_metrics(val[0], val[0], feature_extractor="inception")
    assert str(expected) in str(e.value)
    with pytest.raises(M.WeightsNotFoundError, match="inception_weights="):
        M.compute_metrics(val[0], val[0], feature_extractor="inception-v3-compat", inception_weights=tmp_path / "x")
    assert offline == []


def test_inception_weights_are_downloaded_online_into_the_torch_hub_dir(monkeypatch, tmp_path):
    """Online (HF_HUB_OFFLINE unset) the missing file is fetched from torch-fidelity's URL to torch-fidelity's own
    location; a failed download names the file, the location and the URL."""
    import huggingface_hub.constants
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_FILENAME
    seen = []

    def fake_download(url, dst, progress=True):
        seen.append((url, dst))
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert M.inception_weights_path() == expected and seen == [(URL_INCEPTION_V3, str(expected))]
    assert M.inception_weights_path() == expected and len(seen) == 1  # found: not downloaded again
    expected.unlink()

    def failing_download(url, dst, progress=True):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    with pytest.raises(M.WeightsNotFoundError, match="download from .* failed") as e:
        M.inception_weights_path()
    assert str(expected) in str(e.value) and M.INCEPTION_WEIGHTS_FILENAME in str(e.value)
    with pytest.raises(M.WeightsNotFoundError, match="Downloads are off"):  # explicit opt-out
        M.inception_weights_path(download=False)


def test_inception_weights_are_checked_and_passed_on(offline, monkeypatch, val, tmp_path):
    import torch_fidelity
    from safetensors.torch import save_file

    path = tmp_path / "torch_home" / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save({"something.else": torch.zeros(2)}, path)
    with pytest.raises(M.WeightsNotFoundError, match="not torch-fidelity's Inception"):
        M.compute_metrics(val[0], val[0], feature_extractor="inception")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, path)
    seen = {}

    def fake_calculate_metrics(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 1.5}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake_calculate_metrics)
    assert M.compute_metrics(val[0], val[0], feature_extractor="inception", isc=False, prc=False) == {"fid": 1.5}
    assert seen["feature_extractor"] == "inception-v3-compat"
    assert seen["feature_extractor_weights_path"] == str(path)
    assert seen["cache"] is False and seen["save_cpu_ram"] is True and seen["cuda"] is torch.cuda.is_available()
    other = tmp_path / "weights.safetensors"  # an explicit path wins over the hub location
    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, str(other))
    M.compute_metrics(val[0], val[0], feature_extractor="inception", inception_weights=other, isc=False, prc=False)
    assert seen["feature_extractor_weights_path"] == str(other)
    assert offline == []


@pytest.mark.parametrize(
    ("generated", "reference", "kwargs", "match"),
    [
        ("numpy", "ok", {}, "generated must be a torch.Tensor"),
        (torch.zeros(20, 32, 32, dtype=torch.uint8), "ok", {}, r"generated must have shape \(N, 3, H, W\)"),
        ("ok", torch.zeros(20, 2, 32, 32, dtype=torch.uint8), {}, r"reference must have shape \(N, 3, H, W\)"),
        (torch.zeros(20, 3, 32, 32, dtype=torch.int64), "ok", {}, "generated must be uint8 .* or float"),
        ("ok", torch.full((20, 3, 32, 32), -1.0), {}, r"reference: float images must lie in \[0, 1\]"),
        (torch.full((20, 3, 8, 8), float("nan")), "ok", {}, r"generated: float images must lie in \[0, 1\]"),
        ("ok", None, {"isc": False}, "reference must be a torch.Tensor"),
        (torch.zeros(3, 3, 32, 32, dtype=torch.uint8), "ok", {"isc": False}, "generated has 3 images"),
        ("ok", "ok", {"feature_extractor": "vgg16"}, "feature_extractor must be"),
        ("ok", "ok", {"fid": False, "isc": False, "prc": False}, "at least one"),
        ("ok", "ok", {"batch_size": 0}, "batch_size"),
    ],
)
def test_input_validation(generated, reference, kwargs, match, val):
    ok = val[0][:20]
    generated = {"ok": ok, "numpy": ok.numpy()}.get(generated, generated) if isinstance(generated, str) else generated
    reference = ok if isinstance(reference, str) else reference
    with pytest.raises(ValueError, match=match):
        M.compute_metrics(generated, reference, **kwargs)


def test_class_accuracy_validation(val):
    with pytest.raises(ValueError, match="labels"):
        M.class_accuracy(val[0], val[1][:-1])
    with pytest.raises(ValueError, match="images must"):
        M.class_accuracy(val[0][0], val[1][:1])
    with pytest.raises(ValueError, match="classifier must"):
        M.class_accuracy(val[0], val[1], classifier=torch.nn.Linear(2, 2))
