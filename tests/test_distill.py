"""Distillation training: configuration, resumption after a kill, two processes = one, teacher checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distilled_decoding import LlamaGen, VQTokenizer
from distilled_decoding.distill import DistillConfig, load_config, train_student
from distilled_decoding.recipe import load_recipe_config, run
from distilled_decoding.students import DDStudent

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "distill_llamagen.py"


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    randomize_(LlamaGen(**TINY_GPT), seed=5).save_pretrained(root / "gpt")
    VQTokenizer(**TINY_VQ).save_pretrained(root / "vq")  # fmt: skip
    return root


def _config(saved: Path, out: Path, steps: int = 8, **distill) -> Path:
    cfg = {
        "output_dir": str(out),
        "stages": ["trajectories", "train", "save"],
        "teacher": {"kind": "llamagen", "model": str(saved / "gpt"), "tokenizer": str(saved / "vq")},
        "trajectories": {"num_samples": 48, "batch_size": 16, "shard_size": 16, "cfg_scale": 2.0, "top_k": 32},
        "distill": {"max_steps": steps, "batch_size": 8, "save_every": 2, "keep_last": 2, "lr": 3e-3,
                    "warmup_steps": 2, "timesteps": [0, 5], "progress": False, **distill},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return DDStudent.from_pretrained(out / "student" / "final").state_dict()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def test_config_validation_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="loss='l1'"):
        DistillConfig(loss="l1")
    with pytest.raises(ValueError, match="batch_size=0"):
        DistillConfig(batch_size=0)
    cfg = load_config(None, ["lr=0.01", "timesteps=[0, 80]", "--max-steps=7"])
    assert cfg.lr == 0.01 and cfg.timesteps == (0, 80) and cfg.max_steps == 7
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['nope'\]"):
        load_config(None, ["nope=1"])
    rc = load_recipe_config(None, ["distill.max_steps=5", "output_dir=/x/y", "teacher.kind=var"])
    assert rc.distill.max_steps == 5 and rc.distill.trajectories == "/x/y/trajectories"
    assert rc.distill.output_dir == "/x/y/student" and rc.teacher.kind == "var"
    with pytest.raises(ValueError, match=r"distill: unknown field\(s\) \['foo'\]"):
        load_recipe_config(None, ["distill.foo=1"])
    with pytest.raises(ValueError, match="teacher.kind='pixelcnn'"):
        load_recipe_config(None, ["teacher.kind=pixelcnn"])


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(saved_teacher, tmp_path):
    """SIGKILL the recipe mid-training; started again, it resumes from the last complete checkpoint and ends with
    exactly the weights of an uninterrupted run."""
    full = tmp_path / "full"
    run(load_recipe_config(_config(saved_teacher, full, steps=10)))
    killed = tmp_path / "killed"
    cfg = _config(saved_teacher, killed, steps=10)
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--config", str(cfg)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = killed / "student" / "checkpoints" / "checkpoint_1" / "COMPLETE"
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "student" / "final").exists(), "the run was not killed mid-training"
    run(load_recipe_config(cfg))
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpts = sorted(p.name for p in (killed / "student" / "checkpoints").iterdir())
    assert len(ckpts) == 2  # keep_last, numbering continued after the resume


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_train_the_same_model(saved_teacher, tmp_path):
    one = tmp_path / "one"
    run(load_recipe_config(_config(saved_teacher, one, steps=6)))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
           str(RECIPE), "--config", str(_config(saved_teacher, two, steps=6))]  # fmt: skip
    res = subprocess.run(cmd, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    gpt = LlamaGen.from_pretrained(saved_teacher / "gpt")
    init = DDStudent.from_teacher(gpt, VQTokenizer.from_pretrained(saved_teacher / "vq").codebook, timesteps=(0, 5))
    key = "layers.0.attention.wqkv.weight"
    assert (a[key] - init.state_dict()[key]).abs().max() > 1e-3  # it trained
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff


def test_trajectories_of_another_teacher_are_refused(saved_teacher, tmp_path):
    out = tmp_path / "job"
    run(load_recipe_config(_config(saved_teacher, out, steps=1), ["stages=[trajectories]"]))
    other = randomize_(LlamaGen(**TINY_GPT), seed=77).eval()
    vq = VQTokenizer.from_pretrained(saved_teacher / "vq")
    cfg = DistillConfig(trajectories=str(out / "trajectories"), output_dir=str(tmp_path / "s"), max_steps=1)
    with pytest.raises(ValueError, match="built by another teacher"):
        train_student(cfg, teacher=other, codebook=vq.codebook)


def test_ce_loss_reads_every_position_from_the_logits_head(saved_teacher, tmp_path):
    """loss='ce' trains no continuous head: an unset split becomes N, and a split that would use the untrained
    head is refused; the embedded job's defaults apply only without a config file."""
    run(load_recipe_config(_config(saved_teacher, tmp_path / "ce", steps=1, loss="ce")))
    student = DDStudent.from_pretrained(tmp_path / "ce" / "student" / "final")
    assert student.config.split == student.seq_len == TINY_GPT["block_size"]
    with pytest.raises(ValueError, match=r"loss=\{'ce': 1.0\}: no loss trains the continuous head, but split=5"):
        run(load_recipe_config(_config(saved_teacher, tmp_path / "bad", steps=1, loss="ce", split=5)))
    assert load_recipe_config(None, []).distill.loss == {"ce": 1.0}
    assert load_recipe_config(_config(saved_teacher, tmp_path / "y"), []).distill.loss == DistillConfig().loss
