"""Trajectory builder and reader: determinism, resumption after a kill, distribution, refusal, corruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distilled_decoding import LlamaGen, TrajectoryDataset, VQTokenizer, build_trajectories
from distilled_decoding.sampling import FlowChooser, sample_tokens
from distilled_decoding.trajectories import TrajectoryError, sample_noise

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(seed=3, cfg_scale=2.0, top_k=40, temperature=0.9)


@pytest.fixture(scope="module")
def teacher():
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=1).eval()
    vq = VQTokenizer(**TINY_VQ).eval()  # fmt: skip
    return gpt, vq


@pytest.fixture(scope="module")
def saved_teacher(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    teacher[0].save_pretrained(root / "gpt")
    teacher[1].save_pretrained(root / "vq")
    return root


def _build(teacher, out, n=24, batch=5, shard=8, **kw):
    gpt, vq = teacher
    return build_trajectories(gpt, out, num_samples=n, batch_size=batch, shard_size=shard, codebook=vq.codebook,
                              progress=False, **{**SETTINGS, **kw})  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_noise_is_a_function_of_seed_and_index():
    a, la = sample_noise(7, [0, 1, 2, 3], 16, 8, num_classes=10)
    b, lb = sample_noise(7, [3, 1], 16, 8, num_classes=10)
    assert a.dtype == torch.float16 and a.shape == (4, 16, 8)
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1]) and la[3] == lb[0]
    c, _ = sample_noise(8, [0], 16, 8)
    assert not torch.equal(a[0], c[0])
    big, labels = sample_noise(0, range(2000), 4, 8, num_classes=10)
    assert abs(big.float().mean()) < 0.02 and abs(big.float().std() - 1) < 0.02
    assert torch.bincount(labels, minlength=10).min() > 150  # uniform classes


def test_build_and_read(teacher, tmp_path):
    gpt, vq = teacher
    out = _build(teacher, tmp_path / "t")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 8), (8, 16), (16, 24)]
    assert manifest["settings"]["sampling"]["cfg_scale"] == 2.0 and manifest["settings"]["flow"]
    ds = TrajectoryDataset(out)
    assert len(ds) == 24 and ds.seq_len == 16 and ds.codebook_dim == 8
    item = ds[13]
    assert item["noise"].shape == (16, 8) and item["noise"].dtype == torch.float32
    assert item["tokens"].dtype == torch.long and item["class_label"].shape == ()
    # the teacher ran on exactly the stored fp16 noise: re-running it reproduces the tokens
    idx = [0, 9, 13, 23]
    noise = torch.stack([ds[i]["noise"] for i in idx])
    labels = torch.stack([ds[i]["class_label"] for i in idx])
    again = sample_tokens(gpt, labels, chooser=FlowChooser(noise, vq.codebook), cfg_scale=2.0, top_k=40,
                          temperature=0.9)  # fmt: skip
    assert torch.equal(again, torch.stack([ds[i]["tokens"] for i in idx]))
    # noise and labels are the per-index draws
    ref, ref_labels = sample_noise(3, idx, 16, 8, num_classes=10)
    assert torch.equal(noise, ref.float()) and torch.equal(labels, ref_labels)


def test_batch_size_does_not_change_the_data(teacher, tmp_path):
    a = _files(_build(teacher, tmp_path / "a", batch=3))
    b = _files(_build(teacher, tmp_path / "b", batch=8))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_given_labels_and_resume_refusal(teacher, tmp_path):
    labels = [i % 10 for i in range(24)]
    out = _build(teacher, tmp_path / "t", class_labels=labels)
    assert [int(TrajectoryDataset(out)[i]["class_label"]) for i in range(24)] == labels
    with pytest.raises(TrajectoryError, match=r"sampling\.cfg_scale: folder has 2\.0, this run has 3\.0"):
        _build(teacher, out, class_labels=labels, cfg_scale=3.0)
    other = (randomize_(LlamaGen(**TINY_GPT), seed=99).eval(), teacher[1])
    with pytest.raises(TrajectoryError, match=r"teacher\.weights_sha256"):
        _build(other, out, class_labels=labels)
    with pytest.raises(ValueError, match=r"class_labels: expected 24 labels"):
        _build(teacher, tmp_path / "u", class_labels=labels[:5])
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
        _build(teacher, tmp_path / "u", class_labels=[10] * 24)


def test_corrupt_and_truncated_shards_are_named(teacher, tmp_path):
    out = _build(teacher, tmp_path / "t")
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = TrajectoryDataset(out)
    assert ds[0]["tokens"].shape == (16,)  # other shards still readable
    with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors: checksum mismatch"):
        ds[9]
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors"):
        TrajectoryDataset(out)[9]
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="corrupt manifest"):
        TrajectoryDataset(out)


def _recipe_args(saved: Path, out: Path, n: int, shard: int) -> list[str]:
    return ["--model", str(saved / "gpt"), "--tokenizer", str(saved / "vq"), "--out", str(out), "--num-samples", str(n),
            "--shard-size", str(shard), "--batch-size", "4", "--seed", "3", "--cfg-scale", "2.0", "--top-k", "40",
            "--temperature", "0.9", "--no-progress"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(teacher, saved_teacher, tmp_path):
    """SIGKILL a running build, restart it: only the missing shards are built and the result equals an
    uninterrupted run byte for byte."""
    n, shard = 160, 4
    script = ROOT / "recipes" / "build_trajectories.py"
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), *_recipe_args(saved_teacher, out, n, shard)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 3 <= len(done_before) < n // shard, "the run was not interrupted mid-way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    mtimes = {p: (out / p).stat().st_mtime_ns for p in done_before}
    from recipes.build_trajectories import main

    main(_recipe_args(saved_teacher, out, n, shard))
    assert all((out / p).stat().st_mtime_ns == t for p, t in mtimes.items())  # finished shards were kept
    fresh = main(_recipe_args(saved_teacher, tmp_path / "fresh", n, shard))
    a, b = _files(out), _files(fresh)
    assert len(a) == n // shard and a == b
    assert (out / "manifest.json").read_text() == (fresh / "manifest.json").read_text()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_write_the_same_shards(saved_teacher, tmp_path):
    """``accelerate launch`` with two CPU processes produces byte-identical shards to one process."""
    script = ROOT / "recipes" / "build_trajectories.py"
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(script), *_recipe_args(saved_teacher, two, 24, 4)]  # fmt: skip
    res = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    from recipes.build_trajectories import main

    one = main(_recipe_args(saved_teacher, tmp_path / "one", 24, 4))
    a, b = _files(two), _files(one)
    assert len(a) == 6 and a == b
    assert (two / "manifest.json").read_text() == (one / "manifest.json").read_text()


def test_regenerated_noise_storage(teacher, tmp_path):
    """store_noise=False keeps only tokens; the reader regenerates the identical noise and checks its checksum."""
    stored = _build(teacher, tmp_path / "stored")
    regen = _build(teacher, tmp_path / "regen", store_noise=False)
    a, b = TrajectoryDataset(stored), TrajectoryDataset(regen)
    for i in (0, 7, 8, 23):
        assert torch.equal(a[i]["noise"], b[i]["noise"]) and torch.equal(a[i]["tokens"], b[i]["tokens"])
    size = lambda d: sum(p.stat().st_size for p in d.glob("shard-*"))  # noqa: E731
    assert size(regen) < size(stored) / 3
    manifest = json.loads((regen / "manifest.json").read_text())
    manifest["noise_check"]["sha256"] = "0" * 64  # as if another torch generated other noise
    (regen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match="this torch's generator gives other noise"):
        TrajectoryDataset(regen)


def _as_format_1(folder: Path) -> None:
    """Rewrite a class-conditional folder the way version 1 stored it: ``class_label`` shards, ``num_classes`` and
    ``class_labels`` settings, digests and checksums recomputed."""
    from safetensors.torch import load_file, save_file

    from distilled_decoding.manifest import META_KEY, json_digest, payload_digest, sha256_file

    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    s = m["settings"]
    s["format_version"] = 1
    s["num_classes"] = s.pop("condition")["num_classes"]
    s["class_labels"] = s.pop("condition_ids")
    m["settings_digest"] = json_digest({"settings": s, "teacher": m["teacher"]})
    for entry in m["shards"]:
        tensors = load_file(str(folder / entry["file"]))
        tensors["class_label"] = tensors.pop("condition_id")
        meta = {"start": entry["start"], "stop": entry["stop"], "settings_digest": m["settings_digest"],
                "format_version": 1, "payload_sha256": payload_digest(tensors)}  # fmt: skip
        save_file(tensors, str(folder / entry["file"]), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        entry["sha256"] = sha256_file(folder / entry["file"])
    path.write_text(json.dumps(m, indent=2, sort_keys=True))


def test_format_1_folders_are_still_read(teacher, tmp_path):
    """Folders written before condition tables (format 1: class labels only) read as the same samples."""
    new = _build(teacher, tmp_path / "v2", n=10, shard=4)
    before = [TrajectoryDataset(new)[i] for i in range(10)]
    _as_format_1(new)
    ds = TrajectoryDataset(new)
    assert ds.settings["format_version"] == 1
    for i in range(10):
        item = ds[i]
        for key in ("noise", "tokens", "condition_id", "class_label"):
            assert torch.equal(item[key], before[i][key]), (i, key)
    with pytest.raises(TrajectoryError, match="refusing to resume"):  # a v2 build does not mix into it
        _build(teacher, new, n=10, shard=4)
