"""PAR jobs end to end on tiny models: the DD job on a PAR teacher (trajectories → train → save → evaluate, with the
raster teacher as an extra table row), the LlamaGen → PAR conversion recipe (stages, refusal of a k that does not
tile the grid, kill/resume determinism), and the configs of the released PAR models."""

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

from distilled_decoding import PAR, DDPARStudent, DistilledDecodingPipeline, LlamaGen, VQTokenizer
from distilled_decoding.recipe import load_recipe_config, run

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ROOT / "recipes" / "train_par_teacher.py"


def _convert_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_par_teacher", CONVERT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny PAR-4x (8x8 grid), a tiny raster LlamaGen of the same grid, a 4x4-grid LlamaGen, one VQ tokenizer."""
    root = tmp_path_factory.mktemp("par_models")
    grid8 = {**TINY_GPT, "block_size": 64}
    randomize_(PAR(**grid8, ar_token_num=4, spe_token_num=3), seed=31).save_pretrained(root / "par")
    randomize_(LlamaGen(**grid8), seed=32).save_pretrained(root / "gpt8")
    randomize_(LlamaGen(**TINY_GPT), seed=33).save_pretrained(root / "gpt4")
    VQTokenizer(**TINY_VQ).save_pretrained(root / "vq")
    return root


@pytest.fixture(scope="module")
def par_job(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("par_job") / "run"
    extra = [{"name": "raster teacher", "kind": "llamagen", "model": str(saved / "gpt8"),
              "tokenizer": str(saved / "vq")}]  # fmt: skip
    overrides = [
        f"output_dir={out}", f"teacher.model={saved / 'par'}", f"teacher.tokenizer={saved / 'vq'}",
        "trajectories.num_samples=48", "trajectories.batch_size=24", "trajectories.shard_size=24",
        "distill.max_steps=4", "distill.batch_size=16", "distill.timesteps=[0,6]", "distill.progress=false",
        "evaluate.num_images=40", "evaluate.batch_size=20", "evaluate.skip=[2,4]",
        f"evaluate.extra_teachers={json.dumps(extra)}",
    ]  # fmt: skip
    summary = run(load_recipe_config(ROOT / "recipes" / "configs" / "digits_par.yaml", overrides))
    return out, summary


def test_par_job_runs_every_stage_with_the_raster_row(par_job, saved):
    out, summary = par_job
    rows = summary["evaluation"]["rows"]
    names = ["teacher AR (multinomial)", "teacher AR (flow map)", "raster teacher", "DD 1-step", "DD 2-step",
             "DD refined (5-6)", "onestep*", "skip-2", "skip-4"]  # fmt: skip
    assert list(rows) == names
    steps = {n: r["steps"] for n, r in rows.items()}
    assert steps == {"teacher AR (multinomial)": 19, "teacher AR (flow map)": 19, "raster teacher": 64,
                     "DD 1-step": 1, "DD 2-step": 2, "DD refined (5-6)": 3, "onestep*": 1, "skip-2": 18,
                     "skip-4": 16}  # fmt: skip
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert manifest["teacher"]["class"] == "PAR" and manifest["settings"]["seq_len"] == 64
    pipe = DistilledDecodingPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe.student, DDPARStudent) and tuple(pipe.student.config.timesteps) == (0, 6)
    assert torch.equal(pipe.student.token_order, PAR.from_pretrained(saved / "par").token_order)
    noise = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    for kw in ({"steps": 1}, {"steps": 2}, {"teacher": PAR.from_pretrained(saved / "par"), "teacher_tokens": (4, 6)}):
        assert pipe.generate(noise, [1, 2], **kw).shape == (2, 3, 16, 16)
    assert (out / "samples_grid.png").stat().st_size > 0


def test_extra_teacher_rows_are_validated_and_left_out_when_unusable(saved, capsys):
    from distilled_decoding.evaluation import extra_teacher_samplers
    from distilled_decoding.recipe import EvalConfig

    with pytest.raises(ValueError, match=r"extra_teachers\[0\].*expected a mapping with a 'name'"):
        EvalConfig(extra_teachers=({"kind": "par"},))
    with pytest.raises(ValueError, match=r"extra_teachers\[0\].*teacher fields"):
        EvalConfig(extra_teachers=({"name": "x", "modle": "typo"},))
    vq = VQTokenizer.from_pretrained(saved / "vq")
    student = DDPARStudent.from_teacher(PAR.from_pretrained(saved / "par"), vq.codebook.detach(), timesteps=(0, 6))
    pipe = DistilledDecodingPipeline(student=student, tokenizer=vq)
    entries = [{"name": "missing", "kind": "llamagen", "model": str(saved / "nope"), "tokenizer": str(saved / "vq")},
               {"name": "digits PAR", "kind": "par"}]  # the embedded PAR: another tokenizer (256 codes)  # fmt: skip
    assert extra_teacher_samplers(entries, pipe) == []
    printed = capsys.readouterr().out
    assert "row 'missing' is left out" in printed and "row 'digits PAR' is left out" in printed


def _convert_args(saved: Path, work: Path, out: Path, *extra: str) -> list[str]:
    return ["--gpt", str(saved / "gpt4"), "--tokenizer", str(saved / "vq"), "--work", str(work), "--out", str(out),
            "--num-samples", "48", "--sample-batch", "16", "--steps", "10", "--batch-size", "8", "--save-every", "2",
            "--warmup", "2", "--lr", "3e-3", "--ema-decay", "0.9", "--no-progress", *extra]  # fmt: skip


def test_conversion_recipe_refuses_a_k_that_does_not_tile_the_grid(saved, tmp_path):
    with pytest.raises(ValueError, match=r"ar_token_num=9: .*4x4 token grid.*its root 3 does not divide 4"):
        _convert_main()(_convert_args(saved, tmp_path / "w", tmp_path / "o", "--ar-token-num", "9"))
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()  # refused before any work


def test_conversion_recipe_fine_tunes_saves_and_evaluates(saved, tmp_path):
    main = _convert_main()
    args = _convert_args(saved, tmp_path / "w", tmp_path / "o", "--eval-images", "20", "--eval-batch", "20",
                         "--bench-batches", "1", "2", "--bench-repeat", "1")  # fmt: skip
    record = main(args)
    par = PAR.from_pretrained(tmp_path / "o")
    gpt = LlamaGen.from_pretrained(saved / "gpt4")
    assert par.ar_token_num == 4 and len(par.decode_groups()) == 7  # 4x4 grid: 4 anchors + 3 groups
    key = "layers.0.attention.wqkv.weight"
    assert (par.state_dict()[key] - gpt.state_dict()[key]).abs().max() > 1e-3  # it trained
    info = json.loads((tmp_path / "o" / "training.json").read_text())
    assert info["samples"]["sampling"]["cfg_scale"] == 1.0 and info["finetune"]["steps"] == 10
    rows = info["evaluation"]["rows"]
    assert list(rows) == ["LlamaGen raster teacher", "PAR-4× (converted)"] and rows == record["evaluation"]["rows"]
    assert rows["PAR-4× (converted)"]["steps"] == 7 and rows["LlamaGen raster teacher"]["steps"] == 16
    keys = {"fid", "class_acc", "images_per_s_batch_1", "speedup_batch_2", "fid_ratio"}
    assert keys <= set(rows["PAR-4× (converted)"])
    speed = info["evaluation"]["speed"]["results"]["batch_1"]["PAR-4× (converted)"]
    assert speed["pairs_per_s"] > 0 and speed["steps"] == 7
    # run again: every stage is resumed or skipped, the weights do not change
    main([*args, "--stages", "samples", "finetune", "save"])
    again = PAR.from_pretrained(tmp_path / "o").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in par.state_dict().items())


@pytest.mark.slow
def test_killed_conversion_resumes_to_the_same_weights(saved, tmp_path):
    """SIGKILL the conversion recipe mid-fine-tuning; started again it resumes from the last complete checkpoint
    (model, optimizer, EMA, RNG of the dropouts) and ends with exactly the weights of an uninterrupted run."""
    main = _convert_main()
    # 40 steps, checkpoints every 2: killed at the second checkpoint (step 4), 36 steps are left to interrupt
    stages = ["--stages", "samples", "finetune", "save", "--threads", "1", "--steps", "40"]
    main(_convert_args(saved, tmp_path / "w1", tmp_path / "o1", *stages))
    args = _convert_args(saved, tmp_path / "w2", tmp_path / "o2", *stages)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(CONVERT), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "w2" / "finetune" / "checkpoints" / "checkpoint_1" / "COMPLETE"
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (tmp_path / "o2").exists(), "the run was not killed mid-training"
    main(args)
    a, b = PAR.from_pretrained(tmp_path / "o1").state_dict(), PAR.from_pretrained(tmp_path / "o2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name, preset, cfg, t2",
    [("par_xl_4x", "PAR-XL-4x", 1.5, 48), ("par_xxl_4x", "PAR-XXL-4x", 1.435, 48),
     ("par_3b_4x", "PAR-3B-4x", 1.345, 48), ("par_3b_16x", "PAR-3B-16x", 1.5, 26)],
)  # fmt: skip
def test_released_par_configs(name, preset, cfg, t2):
    c = load_recipe_config(ROOT / "recipes" / "configs" / f"{name}.yaml", ["output_dir=/x"])
    assert (c.teacher.kind, c.teacher.model, c.teacher.preset) == ("par", f"Epiphqny/PAR/{preset}.pt", preset)
    assert c.teacher.tokenizer == "FoundationVision/LlamaGen/vq_ds16_c2i.pt" and c.teacher.block_size == 576
    assert c.trajectories.cfg_scale == cfg and c.trajectories.top_k == 0 and c.distill.timesteps == (0, t2)
    k = int(preset.split("-")[-1][:-1])
    with torch.device("meta"):
        student = DDPARStudent(dim=64, n_layer=1, n_head=4, block_size=576, ar_token_num=k, timesteps=(0, t2), split=t2)
    tokens_at_t2 = student.starts[t2]
    assert abs(tokens_at_t2 / 576 - 80 / 256) < 0.02  # the second step where the LlamaGen students put theirs
