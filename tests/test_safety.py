"""Nothing lost, nothing wrong in silence (issue 10): one regression test per data-loss / silent-wrong-result case.

1. ``save_pretrained`` replaces only its own files (job folder, ``"."``), atomically, with the user's umask;
2. a re-run over a trajectory folder with a corrupt shard rebuilds the shard instead of sealing its checksum;
3. a re-run with other distillation settings is refused, naming the fields; the model card shows what was used;
4. resuming reads JSON + safetensors only: a planted pickle never runs, and the resumed weights are bit-identical;
5. hand-edited manifests are refused, naming the file and the key;
plus the job lock, ``evaluate --output-dir``, and ``generate(noise, steps=1)`` drawing its classes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distilled_decoding import DistilledDecodingPipeline, LlamaGen, TrajectoryDataset, VQTokenizer, build_trajectories
from distilled_decoding.distill import DistillConfig, train_student
from distilled_decoding.fileio import LOCK_NAME, JobLock, JobLockError
from distilled_decoding.recipe import load_recipe_config, run
from distilled_decoding.students import DDStudent
from distilled_decoding.training_state import TrainingStateError
from distilled_decoding.trajectories import TrajectoryError

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    randomize_(LlamaGen(**TINY_GPT), seed=5).save_pretrained(root / "gpt")
    VQTokenizer(**TINY_VQ).save_pretrained(root / "vq")
    return root


def _overrides(saved: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"teacher.model={saved / 'gpt'}", f"teacher.tokenizer={saved / 'vq'}",
            "stages=[trajectories,train,save]", "trajectories.num_samples=32", "trajectories.batch_size=16",
            "trajectories.shard_size=16", "trajectories.cfg_scale=2.0", "distill.max_steps=4",
            "distill.batch_size=8", "distill.save_every=2", "distill.lr=0.003", "distill.warmup_steps=1",
            "distill.timesteps=[0,5]", "distill.loss=ce+mse", "distill.progress=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def job(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "run"
    run(load_recipe_config(None, _overrides(saved, out)))
    return out


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not str(p.relative_to(folder)).startswith(skip)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 1. saving replaces only its own files
# ----------------------------------------------------------------------------------------------------------
def test_save_pretrained_into_a_job_folder_keeps_everything_else(job, tmp_path):
    folder = tmp_path / "job"
    shutil.copytree(job, folder)
    before = _snapshot(folder, skip=("pipeline",))
    pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
    pipe.save_pretrained(folder)  # the mistake of the probe: saving into the job folder itself
    assert _snapshot(folder, skip=("pipeline", "model_index.json", "README.md", "student/config.json",
                                   "student/diffusion_pytorch_model", "tokenizer/")) == before  # fmt: skip
    assert (folder / "trajectories" / "manifest.json").is_file() and len(TrajectoryDataset(folder / "trajectories"))
    assert (folder / "student" / "final" / "config.json").is_file()  # the trained student survived
    back = DistilledDecodingPipeline.from_pretrained(folder)
    noise = torch.randn(1, 16, 8)
    assert torch.equal(back.generate(noise, [1]), pipe.generate(noise, [1]))


def test_save_pretrained_into_the_working_directory(job, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    (cwd / "data").mkdir()
    (cwd / "data" / "x.bin").write_bytes(b"1234")
    monkeypatch.chdir(cwd)
    pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
    pipe.save_pretrained(".")
    assert (cwd / "notes.txt").read_text() == "mine" and (cwd / "data" / "x.bin").read_bytes() == b"1234"
    assert (cwd / "model_index.json").is_file() and not list(cwd.glob(".staging-*"))
    assert torch.equal(DistilledDecodingPipeline.from_pretrained(".").student.codebook, pipe.student.codebook)


def test_save_removes_only_its_own_stale_staging_folders(job, tmp_path):
    """A staging folder a killed save left (the name mkdtemp makes) is removed; a user's folder that merely starts
    with ".staging-" is not."""
    out = tmp_path / "out"
    (out / ".staging-abcd_123").mkdir(parents=True)  # shaped like mkdtemp(prefix=".staging-")
    (out / ".staging-abcd_123" / "x.bin").write_bytes(b"stale")
    (out / ".staging-notes").mkdir()
    (out / ".staging-notes" / "mine.txt").write_text("mine")
    DistilledDecodingPipeline.from_pretrained(job / "pipeline").save_pretrained(out)
    assert not (out / ".staging-abcd_123").exists()
    assert (out / ".staging-notes" / "mine.txt").read_text() == "mine"


def test_checkpoint_store_deletes_only_its_partial_checkpoints(tmp_path):
    """Resuming drops the ``checkpoint_<n>.partial`` folders a killed save left; a numbered folder without
    COMPLETE was never written by the store (it renames a checkpoint into place once complete): it stays, is not
    read, and new checkpoints are numbered past it."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from distilled_decoding.distill import StepCounter
    from distilled_decoding.training_state import CheckpointStore

    root = tmp_path / "checkpoints"
    (root / "checkpoint_7").mkdir(parents=True)
    (root / "checkpoint_7" / "mine.txt").write_text("mine")
    (root / "checkpoint_3.partial").mkdir()
    (root / "checkpoint_notes.partial").mkdir()
    store = CheckpointStore(root, keep_last=1, settings_digest="d")
    store.drop_incomplete()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_7", "checkpoint_notes.partial"]
    assert store.latest() is None  # the foreign folder is never read
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    acc = Accelerator(cpu=True)
    states = {"model": model, "optimizer": opt, "scheduler": sched, "ema": EMAModel(model.parameters()),
              "counter": StepCounter()}  # fmt: skip
    first = store.save(acc, **states)
    second = store.save(acc, **states)  # keep_last=1 prunes the first, never the foreign folder
    assert (first.name, second.name) == ("checkpoint_8", "checkpoint_9") and not first.exists()
    assert (root / "checkpoint_7" / "mine.txt").read_text() == "mine" and store.latest() == second


def test_a_second_save_removes_only_what_the_previous_one_wrote(job, tmp_path):
    pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
    target = tmp_path / "dd"
    pipe.save_pretrained(target)
    record = json.loads((target / "model_index.json").read_text())
    listed = record["_distilled_decoding_files"]
    assert "student/config.json" in listed and "README.md" in listed
    # as if the previous save had also written a weight shard, next to a file of the user's
    record["_distilled_decoding_files"].append("student/diffusion_pytorch_model-00002-of-00002.safetensors")
    (target / "model_index.json").write_text(json.dumps(record))
    (target / "student" / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"stale")
    (target / "student" / "user-notes.txt").write_text("keep")
    pipe.save_pretrained(target)
    assert not (target / "student" / "diffusion_pytorch_model-00002-of-00002.safetensors").exists()
    assert (target / "student" / "user-notes.txt").read_text() == "keep"
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        pipe.save_pretrained(target / "README.md")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_follow_the_umask(job, saved, tmp_path, mask):
    old = os.umask(mask)
    try:
        pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
        pipe.save_pretrained(tmp_path / "dd")
        gpt = LlamaGen.from_pretrained(saved / "gpt")
        vq = VQTokenizer.from_pretrained(saved / "vq")
        build_trajectories(gpt, tmp_path / "traj", num_samples=4, batch_size=4, shard_size=4, codebook=vq.codebook,
                           progress=False)  # fmt: skip
    finally:
        os.umask(old)
    for root in (tmp_path / "dd", tmp_path / "traj"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------------------------------------
# 2. a corrupt shard is rebuilt, never sealed
# ----------------------------------------------------------------------------------------------------------
def _build(saved: Path, out: Path) -> Path:
    gpt = LlamaGen.from_pretrained(saved / "gpt").eval()
    vq = VQTokenizer.from_pretrained(saved / "vq")
    return build_trajectories(gpt, out, num_samples=24, batch_size=8, shard_size=8, codebook=vq.codebook, seed=3,
                              cfg_scale=2.0, progress=False)  # fmt: skip


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # inside the tensor data, past the header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("sealed", [True, False])
def test_a_corrupt_shard_is_rebuilt_on_rerun(saved, tmp_path, sealed):
    out = _build(saved, tmp_path / "t")
    good = _snapshot(out)
    shard = out / "shard-00001.safetensors"
    _corrupt(shard)
    if not sealed:  # as if killed before the manifest was sealed: no checksums recorded yet
        m = json.loads((out / "manifest.json").read_text())
        m["complete"] = False
        m["shards"] = [{k: v for k, v in s.items() if k != "sha256"} for s in m["shards"]]
        (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    if sealed:
        with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors: checksum mismatch"):
            TrajectoryDataset(out)[9]
    _build(saved, out)  # the re-run of the probe
    assert _snapshot(out) == good  # the shard was rebuilt byte for byte, the manifest sealed its true checksum
    assert TrajectoryDataset(out)[9]["tokens"].max() < TINY_GPT["vocab_size"]


def test_a_shard_with_out_of_range_tokens_is_named(saved, tmp_path):
    """A shard whose checksum was re-sealed by the old bug: the reader checks its values too."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = _build(saved, tmp_path / "t")
    shard = out / "shard-00002.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["tokens"][0, 0] = 9999
    save_file(tensors, str(shard), metadata=meta)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][2]["sha256"] = __import__("hashlib").sha256(shard.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    ds = TrajectoryDataset(out)
    with pytest.raises(TrajectoryError, match=r"shard-00002\.safetensors: token ids in \[\d+, 9999\], outside"):
        ds[17]


# ----------------------------------------------------------------------------------------------------------
# 3. other distillation settings are refused; the card shows the settings used
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("distill.lr=0.001", "distill.lr"),
        ("distill.loss=ce", "distill.loss.mse"),
        ("distill.seed=1", "distill.seed"),
        ("distill.split=3", "distill.split"),
        ("distill.timesteps=[0,4]", "distill.timesteps"),
        ("distill.max_steps=6", "distill.max_steps"),
    ],  # fmt: skip
)
def test_a_rerun_with_other_settings_is_refused(job, saved, override, field):
    before = _snapshot(job / "student")
    card = (job / "pipeline" / "README.md").read_text()
    with pytest.raises(TrainingStateError, match=rf"(?s)trained with other settings.*\n  {field}: folder has"):
        run(load_recipe_config(None, _overrides(saved, job, override)))
    with pytest.raises(TrainingStateError, match=rf"{field}: folder has"):  # packaging alone: refused too
        run(load_recipe_config(None, _overrides(saved, job, override, "stages=[save]")))
    assert _snapshot(job / "student") == before and (job / "pipeline" / "README.md").read_text() == card


def test_the_model_card_shows_the_settings_used(job, saved):
    card = (job / "pipeline" / "README.md").read_text()
    assert '"lr": 0.003' in card and '"timesteps": [0, 5]' in card and '"split": 5' in card
    training = json.loads((job / "student" / "training.json").read_text())["settings"]
    assert training["distill"]["lr"] == 0.003 and training["teacher"]["weights_sha256"]
    assert json.loads((job / "student" / "final" / "training.json").read_text())["settings"] == training
    run(load_recipe_config(None, _overrides(saved, job)))  # the same settings: everything is reused
    assert DistilledDecodingPipeline.from_pretrained(job / "pipeline").info["training"] == training["distill"]


def test_other_trajectories_are_refused(job, saved, tmp_path):
    other = tmp_path / "other"
    run(load_recipe_config(None, _overrides(saved, other, "trajectories.seed=9", "stages=[trajectories]")))
    with pytest.raises(TrainingStateError, match=r"trajectories\.settings_digest: folder has"):
        run(load_recipe_config(None, _overrides(saved, job, f"distill.trajectories={other / 'trajectories'}",
                                                "stages=[train]")))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 4. resume without pickle
# ----------------------------------------------------------------------------------------------------------
class _Planted:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(folder: Path, marker: Path) -> None:
    for name in ("pytorch_model.bin", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "model.pkl", "model.bin"):  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(_Planted(marker)))
        torch.save({"x": _Planted(marker)}, folder / f"torch_{name}")


def test_resume_reads_no_pickle_and_gives_the_same_weights(job, saved, tmp_path):
    gpt = LlamaGen.from_pretrained(saved / "gpt")
    vq = VQTokenizer.from_pretrained(saved / "vq")
    cfg = dict(trajectories=str(job / "trajectories"), max_steps=4, batch_size=8, save_every=2, lr=3e-3,
               warmup_steps=1, timesteps=(0, 5), progress=False)  # fmt: skip
    full = train_student(DistillConfig(output_dir=str(tmp_path / "a"), **cfg), teacher=gpt, codebook=vq.codebook)
    b = tmp_path / "b"
    train_student(DistillConfig(output_dir=str(b), **cfg), teacher=gpt, codebook=vq.codebook)
    ckpts = b / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert {p.suffix for p in ckpts.rglob("*") if p.is_file()} <= {".json", ".safetensors", ""}
    shutil.rmtree(ckpts / "checkpoint_1")  # as if killed after step 2
    marker = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Planted(probe)))
    assert probe.exists()  # the planted payload does run when unpickled
    _plant(ckpts / "checkpoint_0", marker)
    resumed = train_student(DistillConfig(output_dir=str(b), **cfg), teacher=gpt, codebook=vq.codebook)
    assert not marker.exists()
    a, r = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], r[k]) for k in a)  # bit-identical to the uninterrupted run
    # a checkpoint in Accelerate's pickle format (no checksums in COMPLETE) is refused, not loaded
    old = ckpts / "checkpoint_7"
    old.mkdir()
    _plant(old, marker)
    (old / "COMPLETE").touch()
    with pytest.raises(TrainingStateError, match=r"checkpoint_7: not a checkpoint of this version"):
        train_student(DistillConfig(output_dir=str(b), **cfg), teacher=gpt, codebook=vq.codebook)
    shutil.rmtree(old)
    model = ckpts / "checkpoint_1" / "model.safetensors"
    _corrupt(model)
    with pytest.raises(TrainingStateError, match=r"model\.safetensors: checksum mismatch"):
        train_student(DistillConfig(output_dir=str(b), **cfg), teacher=gpt, codebook=vq.codebook)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# 5. hand-edited manifests
# ----------------------------------------------------------------------------------------------------------
def _edit_seq_len(m):
    m["settings"]["seq_len"] = 17


def _reorder(m):
    m["shards"].reverse()


def _drop_key(m):
    del m["settings"]["seed"]


def _wrong_type(m):
    m["settings"]["num_samples"] = "24"


def _format(m):
    m["settings"]["format_version"] = 3


def _fewer(m):
    m["settings"]["num_samples"] = 16


def _codebook(m):
    m["settings"]["codebook_dim"] = 4
    m["teacher"]["codebook_shape"] = [64, 4]


def _teacher(m):
    m["teacher"]["weights_sha256"] = "0" * 64


def _as_list(m):
    return [m]


def _shard_entry(m):
    m["shards"][1] = "shard-00001.safetensors"


EDITS = {
    "seq_len": (
        _edit_seq_len,
        r"shard-00000\.safetensors: tensor 'tokens' has shape \(8, 16\), but manifest\.json "
        r"\(seq_len=17",
    ),
    "reordered": (
        _reorder,
        r"manifest\.json: shards\[0\]: shard-00002\.safetensors \[16, 24\): expected "
        r"shard-00000\.safetensors \[0, 8\)",
    ),
    "missing key": (_drop_key, r"manifest\.json: missing key\(s\) \['settings\.seed'\]"),
    "wrong type": (_wrong_type, r"manifest\.json: settings\.num_samples='24': expected a JSON int"),
    "format_version": (_format, r"manifest\.json: settings\.format_version: 3 is not supported"),
    "num_samples": (_fewer, r"manifest\.json: num_shards: 3, but num_samples=16"),
    "codebook_dim": (_codebook, r"tensor 'noise' has shape \(8, 16, 8\), but manifest\.json .*codebook_dim=4"),
    "teacher": (_teacher, r"manifest\.json: settings_digest: .* is not the digest of the recorded settings"),
    "list": (_as_list, r"manifest\.json: the manifest: expected a JSON object, got list"),
    "shard entry": (_shard_entry, r"manifest\.json: shards\[1\]: expected a JSON object, got str"),
}


@pytest.fixture(scope="module")
def built(saved, tmp_path_factory):
    return _build(saved, tmp_path_factory.mktemp("traj") / "t")


@pytest.mark.parametrize("case", sorted(EDITS))
def test_hand_edited_manifests_are_refused(built, saved, tmp_path, case):
    edit, message = EDITS[case]
    out = tmp_path / "t"
    shutil.copytree(built, out)
    m = json.loads((out / "manifest.json").read_text())
    m = edit(m) or m
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(TrajectoryError, match=message):
        TrajectoryDataset(out)
    with pytest.raises(TrajectoryError, match="manifest.json|folder has|shard-"):  # the builder refuses as well
        _build(saved, out)


# ----------------------------------------------------------------------------------------------------------
# the job lock
# ----------------------------------------------------------------------------------------------------------
def test_a_second_job_on_a_folder_is_refused_with_the_holder_pid(saved, job, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; from distilled_decoding.fileio import JobLock; JobLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JobLockError, match=rf"another distillation job \(pid {holder.pid}\) is writing"):
            run(load_recipe_config(None, _overrides(saved, out)))
        with pytest.raises(JobLockError, match=rf"pid {holder.pid}"):
            _build(saved, out)
        with pytest.raises(JobLockError, match=rf"another save \(pid {holder.pid}\)"):  # no save mid-job either
            DistilledDecodingPipeline.from_pretrained(job / "pipeline").save_pretrained(out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # a stale lock of a dead process ...
    with JobLock(out):  # ... is taken over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------------------
# evaluate --output-dir
# ----------------------------------------------------------------------------------------------------------
def test_evaluate_on_a_missing_folder_creates_nothing(tmp_path, capsys, monkeypatch):
    from distilled_decoding.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--output-dir", str(tmp_path / "missing" / "job")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output-dir" in err and "missing/job is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no config.json


def test_evaluate_uses_the_job_config_and_leaves_it_alone(job, monkeypatch):
    import distilled_decoding.evaluation as evaluation
    from distilled_decoding.cli import main

    config = (job / "config.json").read_bytes()
    seen = {}

    def fake_evaluate_job(cfg, teacher, tokenizer):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(evaluation, "evaluate_job", fake_evaluate_job)
    assert main(["evaluate", "--output-dir", str(job), "--num-images", "8"]) == 0
    assert (job / "config.json").read_bytes() == config
    cfg = seen["cfg"]
    assert cfg.stages == ("evaluate",) and cfg.evaluate.num_images == 8
    assert cfg.teacher.model == json.loads(config)["teacher"]["model"]  # the job's teacher, not the default one


# ----------------------------------------------------------------------------------------------------------
# generate(noise, steps=1): classes drawn with the generator; a teacher edited in place is noticed
# ----------------------------------------------------------------------------------------------------------
def test_generate_draws_classes_with_the_generator(job):
    pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
    noise = torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(0))
    images = pipe.generate(noise, steps=1)  # as users call it
    assert images.shape == (6, 3, 8, 8)
    a, la = pipe.generate(noise, steps=1, generator=torch.Generator().manual_seed(3), return_labels=True)
    b, lb = pipe.generate(noise, steps=1, generator=torch.Generator().manual_seed(3), return_labels=True)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(la, torch.randint(10, (6,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, pipe.generate(noise, la, steps=1))
    img, tok, lab = pipe.generate(noise, steps=2, return_tokens=True, return_labels=True)
    assert tok.shape == (6, 16) and lab.shape == (6,) and torch.equal(img, pipe.generate(noise, lab, steps=2))


def test_a_teacher_edited_in_place_is_refused(job, saved):
    pipe = DistilledDecodingPipeline.from_pretrained(job / "pipeline")
    gpt = LlamaGen.from_pretrained(saved / "gpt").eval()
    noise = torch.randn(2, 16, 8)
    pipe.generate(noise, [1, 2], teacher=gpt, teacher_tokens=(3, 5))  # fingerprinted once, then cached
    original = {k: v.clone() for k, v in gpt.state_dict().items()}
    next(gpt.parameters()).data.view(-1)[0] += 1.0  # through .data: no autograd version bump
    with pytest.raises(ValueError, match="teacher: its weights .* are not those of the teacher"):
        pipe.generate(noise, [1, 2], teacher=gpt, teacher_tokens=(3, 5))
    gpt.load_state_dict(original)
    pipe.generate(noise, [1, 2], teacher=gpt, teacher_tokens=(3, 5))  # restored: accepted again
    other = randomize_(LlamaGen(**TINY_GPT), seed=77).state_dict()
    gpt.load_state_dict(other)
    with pytest.raises(ValueError, match="teacher: its weights"):
        pipe.generate(noise, [1, 2], teacher=gpt, teacher_tokens=(3, 5))


def test_fingerprint_check_is_cheap(saved, monkeypatch):
    """The cached check does not hash the weights again when nothing changed (one reduction per tensor)."""
    import distilled_decoding.provenance as traj
    from distilled_decoding.provenance import teacher_weights_sha256

    gpt = LlamaGen.from_pretrained(saved / "gpt").eval()
    first = teacher_weights_sha256(gpt)
    calls = []
    orig = traj.teacher_fingerprint
    monkeypatch.setattr(traj, "teacher_fingerprint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    assert teacher_weights_sha256(gpt) == first and not calls
    with torch.no_grad():
        gpt.norm.weight.mul_(2)
    assert teacher_weights_sha256(gpt) != first and calls == [1]


def test_waiting_for_a_killed_build_does_not_block(saved, tmp_path):
    """A build killed while holding the lock leaves a lock file of a dead pid; the next build takes it over."""
    out = tmp_path / "t"
    script = ROOT / "recipes" / "build_trajectories.py"
    args = ["--model", str(saved / "gpt"), "--tokenizer", str(saved / "vq"), "--out", str(out), "--num-samples", "64",
            "--shard-size", "4", "--batch-size", "4", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, "PYTHONPATH": str(ROOT),
                            "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()
    from recipes.build_trajectories import main

    main(args)
    assert json.loads((out / "manifest.json").read_text())["complete"] and not (out / LOCK_NAME).exists()


def test_student_folder_of_unknown_provenance_is_not_reused(job, saved, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(job, folder)
    (folder / "student" / "training.json").unlink()
    with pytest.raises(TrainingStateError, match=r"holds checkpoints, final but no training\.json"):
        run(load_recipe_config(None, _overrides(saved, folder)))
    assert DDStudent.from_pretrained(folder / "student" / "final") is not None  # nothing was deleted


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    """On a file system without flock the lock file's pid decides: a live holder refuses, a dead one is replaced."""
    import errno
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    host = __import__("socket").gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(JobLockError, match=rf"pid {os.getppid()}"):
        JobLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": host}))
    with JobLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
