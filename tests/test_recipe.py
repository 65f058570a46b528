"""The end-to-end job on a tiny teacher: all stages, the evaluation table, the grid, the saved pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distilled_decoding import DistilledDecodingPipeline, LlamaGen, VQTokenizer
from distilled_decoding.configs import ConfigError
from distilled_decoding.recipe import load_recipe_config, run

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    randomize_(LlamaGen(**TINY_GPT), seed=21).save_pretrained(root / "t" / "gpt")
    VQTokenizer(**TINY_VQ).save_pretrained(root / "t" / "vq")  # fmt: skip
    overrides = [
        f"output_dir={root / 'run'}",
        f"teacher.model={root / 't' / 'gpt'}",
        f"teacher.tokenizer={root / 't' / 'vq'}",
        "trajectories.num_samples=64", "trajectories.batch_size=32", "trajectories.shard_size=32",
        "distill.max_steps=4", "distill.batch_size=16", "distill.timesteps=[0,6]", "distill.progress=false",
        "distill.sample_every=2",
        "evaluate.num_images=40", "evaluate.batch_size=20", "evaluate.skip=[2,4]",
    ]  # fmt: skip
    summary = run(load_recipe_config(None, overrides))
    return root / "run", summary


def test_all_stages_write_their_outputs(job):
    out, summary = job
    assert (out / "trajectories" / "manifest.json").is_file()
    assert (out / "student" / "final" / "config.json").is_file()
    assert (out / "student" / "samples" / "step_000002.png").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "samples_grid.png").stat().st_size > 0
    rows = summary["evaluation"]["rows"]
    names = ["teacher AR (multinomial)", "teacher AR (flow map)", "DD 1-step", "DD 2-step", "DD refined (5-6)",
             "onestep*", "skip-2", "skip-4"]  # fmt: skip
    assert list(rows) == names
    for r in rows.values():
        assert set(r) >= {"fid", "is", "precision", "recall", "class_acc", "steps", "images_per_s", "speedup",
                          "speedup_vs_flow_map"}  # fmt: skip
    assert rows["DD 1-step"]["steps"] == 1 and rows["DD 2-step"]["steps"] == 2 and rows["skip-4"]["steps"] == 13
    assert rows["teacher AR (flow map)"]["steps"] == 16 and rows["DD refined (5-6)"]["steps"] == 3
    assert (
        rows["teacher AR (multinomial)"]["speedup"] == 1.0
        and rows["teacher AR (flow map)"]["speedup_vs_flow_map"] == 1.0
    )
    assert rows["teacher AR (multinomial)"]["steps"] == 16
    table = (out / "evaluation.md").read_text()
    assert table.startswith("| sampler | FID |") and "| DD 1-step |" in table
    card = (out / "pipeline" / "README.md").read_text()
    assert "| DD 1-step |" in card  # the measured metrics reach the model card
    report = json.loads((out / "evaluation.json").read_text())
    assert report["ratios_to_teacher"]["teacher AR (flow map)"]["fid_ratio"] == 1.0


def test_saved_pipeline_reproduces_the_teacher_mapping_provenance(job):
    out, _ = job
    pipe = DistilledDecodingPipeline.from_pretrained(out / "pipeline")
    info = pipe.info
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert info["teacher"]["weights_sha256"] == manifest["teacher"]["weights_sha256"]
    assert info["teacher_sampling"] == manifest["settings"]["sampling"]
    assert info["training"]["max_steps"] == 4


def test_rerun_skips_finished_stages(job):
    out, _ = job
    mtime = (out / "trajectories" / "shard-00000.safetensors").stat().st_mtime_ns
    ckpts = sorted(p.name for p in (out / "student" / "checkpoints").iterdir())
    overrides = [f"output_dir={out}", f"teacher.model={out.parent / 't' / 'gpt'}",
                 f"teacher.tokenizer={out.parent / 't' / 'vq'}", "trajectories.num_samples=64",
                 "trajectories.batch_size=32", "trajectories.shard_size=32", "distill.max_steps=4",
                 "distill.batch_size=16", "distill.timesteps=[0,6]", "distill.progress=false",
                 "distill.sample_every=2", "stages=[trajectories,train]"]  # fmt: skip
    run(load_recipe_config(None, overrides))
    assert (out / "trajectories" / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (out / "student" / "checkpoints").iterdir()) == ckpts  # nothing retrained


def test_command_line_entry_points():
    res = subprocess.run([sys.executable, "-m", "distilled_decoding", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "distill" in res.stdout and "bench" in res.stdout and "evaluate" in res.stdout
    res = subprocess.run([sys.executable, "-m", "distilled_decoding", "bench", "--what", "nonsense"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert res.returncode != 0 and "--what: unknown ['nonsense']" in res.stderr


@pytest.mark.parametrize("name", ["llamagen_b", "llamagen_l", "var_d16", "var_d20", "var_d24"])
def test_official_configs_load(name):
    cfg = load_recipe_config(ROOT / "recipes" / "configs" / f"{name}.yaml", ["output_dir=/x"])
    assert cfg.distill.trajectories == "/x/trajectories" and "evaluate" not in cfg.stages
    assert cfg.evaluate.feature_extractor == "inception" and cfg.trajectories.store_noise == name.startswith("llamagen")
    expected = {"llamagen_b": (0, 80), "llamagen_l": (0, 80), "var_d16": (0, 5), "var_d20": (0, 4), "var_d24": (0, 4)}
    assert cfg.distill.timesteps == expected[name]


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; configs read it as the float YAML 1.2 and JSON mean — in files,
    in overrides, and in a job's config.json (which json.dumps writes as ``1e-06``)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("distill:\n  lr: 1e-4\ndd2:\n  csd:\n    lr_start: 1e-06\n")
    cfg = load_recipe_config(path, ["distill.weight_decay=5e-2"])
    assert (cfg.distill.lr, cfg.dd2.csd.lr_start, cfg.distill.weight_decay) == (1e-4, 1e-6, 0.05)
    with pytest.raises(ConfigError, match=r"^distill\.lr='1e-4x': expected a finite number"):
        load_recipe_config(path, ["distill.lr=1e-4x"])
