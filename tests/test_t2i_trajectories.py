"""Trajectories from prompts: prompt index per pair, each distinct prompt encoded once, per-index determinism, one vs
two processes and kill/resume byte-identical, refusal of other prompts / encoders, bad input."""

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
from safetensors import safe_open

from distilled_decoding import LlamaGen, TrajectoryDataset, build_trajectories
from distilled_decoding.condition_tables import EMBEDDINGS_DIR
from distilled_decoding.sampling import FlowChooser, sample_tokens
from distilled_decoding.trajectories import TrajectoryError, sample_noise

from .conftest import TINY_GPT, randomize_
from .t2i_parts import CAPTION_LEN, PROMPTS, tiny_encoder, tiny_t2i_teacher, tiny_vq

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(seed=3, cfg_scale=2.0, top_k=40)


@pytest.fixture(scope="module")
def parts():
    return tiny_t2i_teacher(), tiny_vq(), tiny_encoder()


def _build(parts, out, n=12, batch=5, shard=4, prompts=PROMPTS, **kw):
    gpt, vq, enc = parts
    kw = {"text_encoder": enc, **SETTINGS, **kw}
    return build_trajectories(gpt, out, num_samples=n, batch_size=batch, shard_size=shard, codebook=vq.codebook,
                              prompts=prompts, progress=False, **kw)  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_pairs_store_prompt_indices_and_features_once(parts, tmp_path):
    gpt, vq, enc = parts
    out = _build(parts, tmp_path / "t")
    manifest = json.loads((out / "manifest.json").read_text())
    cond = manifest["settings"]["condition"]
    assert cond["kind"] == "text" and cond["num_prompts"] == len(PROMPTS) and cond["encoder"] == enc.identity
    assert json.loads((out / "prompts.json").read_text()) == PROMPTS
    with safe_open(str(out / "shard-00000.safetensors"), "pt") as f:  # no caption features per pair
        assert sorted(f.keys()) == ["condition_id", "index", "noise", "tokens"]
    stored = {}
    for path in (out / EMBEDDINGS_DIR).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            stored.update({k: f.get_slice(k).get_shape() for k in f.keys()})  # noqa: SIM118
    assert len(stored) == len(set(PROMPTS))  # each distinct prompt once ("a red bus" is given twice)
    ds = TrajectoryDataset(out)
    idx = [0, 5, 11]
    items = [ds[i] for i in idx]
    ids = torch.stack([it["condition_id"] for it in items])
    _, drawn = sample_noise(3, idx, 16, 8, num_classes=len(PROMPTS))  # the prompt of sample i is drawn from (3, i)
    assert torch.equal(ids, drawn)
    features = torch.stack([it["caption_features"] for it in items])
    mask = torch.stack([it["caption_mask"] for it in items])
    direct = enc.encode([PROMPTS[int(i)] for i in ids])
    assert features.shape == (3, CAPTION_LEN, 32) and torch.equal(mask, direct.mask)
    assert torch.allclose(features, direct.features, atol=1e-6)
    # the teacher ran on these features and the stored fp16 noise: re-running it reproduces the tokens
    noise = torch.stack([it["noise"] for it in items])
    again = sample_tokens(gpt, ds.table.lookup(ids), chooser=FlowChooser(noise, vq.codebook), **{
        k: v for k, v in SETTINGS.items() if k != "seed"})  # fmt: skip
    assert torch.equal(again, torch.stack([it["tokens"] for it in items]))


def test_batch_size_and_given_prompts(parts, tmp_path):
    a = _files(_build(parts, tmp_path / "a", batch=3))
    b = _files(_build(parts, tmp_path / "b", batch=8))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    given = [i % 5 for i in range(12)]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:5]) + "\n")  # a prompt file, one a line
    out = _build(parts, tmp_path / "g", prompt_indices=given, prompts=tmp_path / "p.txt")
    assert [int(TrajectoryDataset(out)[i]["condition_id"]) for i in range(12)] == given


def test_resume_with_other_prompts_or_encoder_is_refused(parts, tmp_path):
    gpt, vq, enc = parts
    out = _build(parts, tmp_path / "t")
    with pytest.raises(TrajectoryError, match=r"condition\.prompts_sha256: folder has"):
        _build(parts, out, prompts=PROMPTS[:-1] + ["a blue bus"])
    with pytest.raises(TrajectoryError, match=r"condition\.encoder: folder has"):
        _build(parts, out, text_encoder=tiny_encoder(seed=5))
    with pytest.raises(TrajectoryError, match=r"condition\.num_prompts: folder has 6, this run has 5"):
        _build(parts, out, prompts=PROMPTS[:5])


def test_bad_input_is_named(parts, tmp_path):
    gpt, vq, enc = parts
    with pytest.raises(ValueError, match="prompts: the teacher is text-conditional; give prompts"):
        _build(parts, tmp_path / "x", prompts=None)
    with pytest.raises(ValueError, match="prompts: expected at least one prompt, got an empty list"):
        _build(parts, tmp_path / "x", prompts=[])
    with pytest.raises(ValueError, match="text_encoder: the teacher is text-conditional"):
        _build(parts, tmp_path / "x", text_encoder=None)
    with pytest.raises(ValueError, match="text_encoder: features of width 16, but the teacher's caption_dim is 32"):
        _build(parts, tmp_path / "x", text_encoder=tiny_encoder(d_model=16))
    with pytest.raises(ValueError, match="text_encoder: max_length=120 caption tokens, but the teacher has 24"):
        _build(parts, tmp_path / "x", text_encoder=tiny_encoder(max_length=120))
    with pytest.raises(ValueError, match="class_labels: this teacher is text-conditional; give prompt_indices"):
        _build(parts, tmp_path / "x", class_labels=[0] * 12)
    with pytest.raises(ValueError, match=r"prompt_indices: prompt indices must lie in \[0, 6\)"):
        _build(parts, tmp_path / "x", prompt_indices=[6] * 12)
    c2i = randomize_(LlamaGen(**TINY_GPT), seed=1).eval()
    with pytest.raises(ValueError, match="prompts: the teacher is class-conditional"):
        build_trajectories(c2i, tmp_path / "y", 4, codebook=vq.codebook, prompts=PROMPTS, text_encoder=enc)
    with pytest.raises(ValueError, match="prompt_indices: this teacher is class-conditional; give class_labels"):
        build_trajectories(c2i, tmp_path / "y", 4, codebook=vq.codebook, prompt_indices=[0] * 4)


# -- processes -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    gpt, vq, enc = parts
    root = tmp_path_factory.mktemp("t2i_teacher")
    gpt.save_pretrained(root / "gpt")
    vq.save_pretrained(root / "vq")
    enc.save_pretrained(root / "t5")
    (root / "prompts.csv").write_text("prompt,digit\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(PROMPTS)))
    return root


def _args(saved: Path, out: Path, n: int, shard: int) -> list[str]:
    return ["--model", str(saved / "gpt"), "--tokenizer", str(saved / "vq"), "--text-encoder", str(saved / "t5"),
            "--prompts", str(saved / "prompts.csv"), "--out", str(out), "--num-samples", str(n), "--shard-size",
            str(shard), "--batch-size", "4", "--seed", "3", "--cfg-scale", "2.0", "--top-k", "40",
            "--no-progress"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_write_the_same_shards(saved, tmp_path):
    """``accelerate launch`` with two CPU processes: byte-identical shards, manifest and prompt table."""
    script = ROOT / "recipes" / "build_trajectories.py"
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           str(script), *_args(saved, two, 16, 4)]  # fmt: skip
    res = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    from recipes.build_trajectories import main

    one = main(_args(saved, tmp_path / "one", 16, 4))
    a, b = _files(two), _files(one)
    assert len(a) == 4 and a == b
    for name in ("manifest.json", "prompts.json"):
        assert (two / name).read_text() == (one / name).read_text()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(saved, tmp_path):
    n, shard = 96, 4
    script = ROOT / "recipes" / "build_trajectories.py"
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), *_args(saved, out, n, shard)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("shard-*.safetensors"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 2 <= len(done_before) < n // shard, "the run was not interrupted mid-way"
    from recipes.build_trajectories import main

    main(_args(saved, out, n, shard))
    fresh = main(_args(saved, tmp_path / "fresh", n, shard))
    assert _files(out) == _files(fresh) and len(_files(out)) == n // shard
    assert (out / "manifest.json").read_text() == (fresh / "manifest.json").read_text()
