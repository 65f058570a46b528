"""The text-to-image job end to end on a tiny teacher (trajectories from a prompt file, distillation, pipeline with
its text encoder, evaluation on held-out prompts with prompt adherence, batch-1 speedups, CLIP score, a grid labelled
with the prompts), the T2I configs, and the CLIP score's optional dependency."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distilled_decoding import DistilledDecodingPipeline
from distilled_decoding.clip import clip_score
from distilled_decoding.recipe import load_recipe_config, run

from .t2i_parts import tiny_encoder, tiny_t2i_teacher, tiny_vq

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = [("a handwritten seven", 7), ("the number 7", 7), ("a zero", 0), ("digit 1", 1)]
HELD_OUT = [("a sketch of a seven", 7), ("this is a zero", 0), ("a bold one", 1)]


def tiny_clip(folder: Path) -> Path:
    """A CLIP with random weights and a byte-level BPE vocabulary (no merges), saved as a transformers folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(folder)
    return folder


def _csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("prompt,digit\n" + "".join(f"{p},{d}\n" for p, d in rows))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_job")
    tiny_t2i_teacher(seed=21).save_pretrained(root / "t" / "gpt")
    tiny_vq().save_pretrained(root / "t" / "vq")
    tiny_encoder(seed=1).save_pretrained(root / "t" / "t5")
    overrides = [
        f"output_dir={root / 'run'}", f"teacher.model={root / 't' / 'gpt'}", f"teacher.tokenizer={root / 't' / 'vq'}",
        f"teacher.text_encoder={root / 't' / 't5'}", f"trajectories.prompts={_csv(root / 'train.csv', TRAIN)}",
        "trajectories.num_samples=32", "trajectories.batch_size=16", "trajectories.shard_size=16",
        "distill.max_steps=3", "distill.batch_size=8", "distill.timesteps=[0,6]", "distill.progress=false",
        "distill.sample_every=3", f"evaluate.prompts={_csv(root / 'eval.csv', HELD_OUT)}", "evaluate.num_images=12",
        "evaluate.batch_size=6", "evaluate.latency_repeats=1", f"evaluate.clip_model={tiny_clip(root / 'clip')}",
    ]  # fmt: skip
    summary = run(load_recipe_config(ROOT / "recipes" / "configs" / "digits_t2i.yaml", overrides))
    return root / "run", summary


def test_the_job_distils_and_evaluates_on_held_out_prompts(job):
    out, summary = job
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert manifest["settings"]["condition"]["num_prompts"] == len(TRAIN)
    assert json.loads((out / "trajectories" / "prompts.json").read_text()) == [p for p, _ in TRAIN]
    assert (out / "student" / "samples" / "step_000003.png").is_file()  # training grids with caption conditions
    rows = summary["evaluation"]["rows"]
    names = ["teacher AR (multinomial)", "teacher AR (flow map)", "DD 1-step", "DD 2-step", "DD refined (5-6)"]
    assert list(rows) == names  # no class baselines
    for r in rows.values():
        assert 0.0 <= r["class_acc"] <= 1.0 and r["clip"] is not None and r["ms_batch1"] > 0
    assert rows["teacher AR (multinomial)"]["speedup_batch1"] == 1.0 and rows["DD 1-step"]["steps"] == 1
    table = (out / "evaluation.md").read_text()
    assert "| class acc | CLIP |" in table and "speedup (batch 1)" in table
    from PIL import Image

    grid = Image.open(out / "samples_grid.png")
    assert grid.size[0] > 3 * 96 and grid.size[1] > 4 * 96  # 3 prompt columns, 4 sampler rows, labels around
    pipe = DistilledDecodingPipeline.from_pretrained(out / "pipeline")
    assert pipe.text_encoder is not None and type(pipe.text_tokenizer).__name__ == "ByT5Tokenizer"
    assert pipe.info["trajectories"]["condition"]["kind"] == "text"
    noise = torch.randn(1, 16, 8)
    assert pipe.generate(noise, prompt=["a seven"], steps=2).shape == (1, 3, 8, 8)


def test_clip_score_and_its_optional_dependency(tmp_path, monkeypatch):
    folder = tiny_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red bus", "a cat", "seven", "two dogs"]
    score = clip_score(images, prompts, folder, batch_size=3)
    assert 0.0 <= score <= 100.0
    assert clip_score(images, prompts, folder) == pytest.approx(score, abs=1e-4)  # batching does not change it
    assert clip_score(images, prompts[::-1], folder) != pytest.approx(score, abs=1e-6)  # it reads the prompts
    with pytest.raises(ValueError, match="prompts: expected 4 prompts"):
        clip_score(images, prompts[:3], folder)
    with pytest.raises(ValueError, match="clip_model: folder .*nowhere does not exist"):
        clip_score(images, prompts, tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "torchmetrics.multimodal.clip_score", None)
    with pytest.raises(ImportError, match="clip_model: the CLIP score needs torchmetrics"):
        clip_score(images, prompts, folder)


def test_t2i_configs_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded checkpoints are found from any working directory
    cfg = load_recipe_config(ROOT / "recipes" / "configs" / "digits_t2i.yaml", ["output_dir=/x"])
    assert cfg.teacher.model == str(ROOT / "checkpoints" / "digits_t2i" / "gpt")
    assert cfg.teacher.text_encoder == str(ROOT / "checkpoints" / "digits_t2i" / "text_encoder")
    assert cfg.trajectories.prompts == str(ROOT / "checkpoints" / "digits_t2i" / "prompts_train.csv")
    assert cfg.evaluate.label_column == "digit" and cfg.distill.trajectories == "/x/trajectories"
    xl = load_recipe_config(ROOT / "recipes" / "configs" / "llamagen_xl_t2i.yaml", ["output_dir=/x"])
    assert xl.teacher.model == "peizesun/llamagen_t2i/t2i_XL_stage1_256.pt"
    assert xl.teacher.tokenizer == "peizesun/llamagen_t2i/vq_ds16_t2i.pt"
    assert xl.teacher.text_encoder == "google/flan-t5-xl" and xl.teacher.preset == "GPT-XL"
    assert (xl.trajectories.cfg_scale, xl.trajectories.top_k, xl.distill.timesteps) == (7.5, 1000, (0, 80))
    assert xl.evaluate.prompt_delimiter == "\t" and "evaluate" not in xl.stages
