"""The text-to-image pipeline: text_encoder + text_tokenizer components, prompts / prompt embeddings, teacher-refined
sampling, save/load (folder and offline Hub cache) bit-identical, and every bad input named."""

from __future__ import annotations

import json
import warnings

import PIL.Image
import pytest
import torch

from distilled_decoding import DistilledDecodingPipeline, TextCondition
from distilled_decoding.provenance import teacher_fingerprint
from distilled_decoding.sampling import FlowChooser, sample_tokens
from distilled_decoding.students import DDStudent

from .conftest import randomize_
from .t2i_parts import tiny_encoder, tiny_t2i_teacher, tiny_vq

pytest.importorskip("transformers")
SAMPLING = {"cfg_scale": 2.0, "cfg_interval": -1, "top_k": 32, "top_p": 1.0, "temperature": 1.0}
PROMPTS = ["a red bus on a street", "a handwritten seven"]


@pytest.fixture(scope="module")
def parts():
    gpt, vq, enc = tiny_t2i_teacher(seed=11), tiny_vq(), tiny_encoder(seed=2)
    randomize_(vq.decoder, seed=4, scale=0.05)
    student = randomize_(DDStudent.from_teacher(gpt, vq.codebook, timesteps=(0, 6), split=9), seed=12).eval()
    with torch.no_grad():
        student.codebook.copy_(vq.codebook)
    info = {"teacher": teacher_fingerprint(gpt, vq.codebook), "teacher_sampling": SAMPLING, "flow": {}}
    pipe = DistilledDecodingPipeline(student=student, tokenizer=vq, text_encoder=enc.model,
                                     text_tokenizer=enc.tokenizer, info=info)  # fmt: skip
    return gpt, enc, pipe


def test_prompts_and_prompt_embeds(parts):
    _, enc, pipe = parts
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    embeds = pipe.encode_prompt(PROMPTS)
    assert torch.equal(embeds.features, enc.encode(PROMPTS).features)  # LlamaGen's T5 embedding, left-padded
    for steps in (1, 2):
        images, tokens = pipe.generate(noise, prompt=PROMPTS, steps=steps, return_tokens=True)
        assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
        assert torch.equal(pipe.generate(noise, prompt_embeds=embeds, steps=steps), images)
        x, tok = pipe.student.sample(noise, embeds, [0] if steps == 1 else [0, 6])
        assert torch.equal(tok, tokens) and torch.equal(pipe.decode(x), images)
    swapped = pipe.generate(noise, prompt=PROMPTS[::-1])
    assert not torch.equal(swapped, pipe.generate(noise, prompt=PROMPTS))


def test_call_is_diffusers_style(parts):
    _, _, pipe = parts
    out = pipe(prompt=["a red bus on a street"], num_inference_steps=1, generator=torch.Generator().manual_seed(5))
    assert len(out.images) == 1 and isinstance(out.images[0], PIL.Image.Image)
    pt = pipe(prompt=PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="pt")
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pt.images, pipe.generate(noise, prompt=PROMPTS, steps=2))
    single = pipe(prompt="a handwritten seven", output_type="pt", generator=torch.Generator().manual_seed(1)).images
    assert single.shape == (1, 3, 8, 8)


def test_teacher_refined_sampling_with_prompts(parts):
    gpt, _, pipe = parts
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    _, tokens = pipe.generate(noise, prompt=PROMPTS, teacher=gpt, teacher_tokens=(0, 6), return_tokens=True)
    cond = pipe.encode_prompt(PROMPTS)
    expected = sample_tokens(gpt, cond, chooser=FlowChooser(noise, pipe.student.codebook), stop=6, **SAMPLING)
    assert torch.equal(tokens[:, :6], expected)  # the teacher's flow-map tokens under the caption, then a student step


def test_save_load_round_trip_and_offline_hub_cache(parts, tmp_path, monkeypatch):
    import huggingface_hub.constants

    gpt, _, pipe = parts
    pipe.save_pretrained(tmp_path / "dd")
    index = json.loads((tmp_path / "dd" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["text_tokenizer"][0] == "transformers"
    files = sorted(str(p.relative_to(tmp_path / "dd")) for p in (tmp_path / "dd").rglob("*") if p.is_file())
    assert any(f.startswith("text_encoder/") and f.endswith(".safetensors") for f in files)
    assert all(not f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert "pipeline_tag: text-to-image" in (tmp_path / "dd" / "README.md").read_text()
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    back = DistilledDecodingPipeline.from_pretrained(tmp_path / "dd")
    for kw in ({"steps": 1}, {"steps": 2}, {"teacher": gpt, "teacher_tokens": (3, 6)}):
        assert torch.equal(back.generate(noise, prompt=PROMPTS, **kw), pipe.generate(noise, prompt=PROMPTS, **kw))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--dd-t2i"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = DistilledDecodingPipeline.from_pretrained("someone/dd-t2i", cache_dir=tmp_path / "hub")
    assert torch.equal(hub.generate(noise, prompt=PROMPTS), pipe.generate(noise, prompt=PROMPTS))


def test_long_prompts_are_truncated_with_a_warning(parts):
    _, _, pipe = parts
    long = "a very long caption " * 10  # 200 bytes > the student's 24 caption positions
    with pytest.warns(UserWarning, match=r"longer than max_length=24 tokens are truncated to 24"):
        cond = pipe.encode_prompt([long])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(cond.features, pipe.encode_prompt([long[:60]]).features)  # the first 23 bytes + </s> kept


def test_bad_input_is_named(parts):
    gpt, enc, pipe = parts
    noise = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="prompt: expected at least one prompt, got an empty list"):
        pipe.generate(noise, prompt=[])
    with pytest.raises(ValueError, match=r"class_labels: this model is text-conditional .*- class labels\?"):
        pipe.generate(noise, [0, 1])
    with pytest.raises(ValueError, match="prompt_embeds: caption features of width 16, expected caption_dim=32"):
        pipe.generate(noise, prompt_embeds=tiny_encoder(d_model=16).encode(PROMPTS))
    with pytest.raises(ValueError, match="prompt_embeds: 120 caption positions, expected 24"):
        pipe.generate(noise, prompt_embeds=tiny_encoder(seed=2, max_length=120).encode(PROMPTS))
    with pytest.raises(ValueError, match=r"prompt: expected 2 rows \(the batch size\), got 1"):
        pipe.generate(noise, prompt=PROMPTS[:1])
    with pytest.raises(ValueError, match="give exactly one condition .* got prompt and prompt_embeds"):
        pipe.generate(noise, prompt=PROMPTS, prompt_embeds=pipe.encode_prompt(PROMPTS))
    with pytest.raises(ValueError, match="prompt \\(or prompt_embeds\\): give exactly one condition .* got none"):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="text_encoder: features of width 16, but the student reads .* width 32"):
        wrong = tiny_encoder(d_model=16)
        DistilledDecodingPipeline(student=pipe.student, tokenizer=pipe.tokenizer, text_encoder=wrong.model,
                                  text_tokenizer=wrong.tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="text_encoder, text_tokenizer: give both"):
        DistilledDecodingPipeline(student=pipe.student, tokenizer=pipe.tokenizer, text_encoder=enc.model)


def test_class_conditional_pipelines_refuse_prompts(parts):
    from distilled_decoding import LlamaGen

    from .conftest import TINY_GPT

    _, enc, pipe = parts
    c2i = randomize_(LlamaGen(**TINY_GPT), seed=1).eval()
    student = DDStudent.from_teacher(c2i, pipe.tokenizer.codebook, timesteps=(0, 6)).eval()
    dd = DistilledDecodingPipeline(student=student, tokenizer=pipe.tokenizer)
    noise = torch.randn(2, 16, 8)
    assert dd.generate(noise, [3, 4]).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="prompt: this pipeline's student is class-conditional .* pass class_labels"):
        dd.generate(noise, prompt=PROMPTS)
    with pytest.raises(TypeError, match="prompt_embeds: this model is class-conditional and takes class ids"):
        dd.generate(noise, prompt_embeds=enc.encode(PROMPTS))
    with pytest.raises(ValueError, match="text_encoder: the student is class-conditional and takes no text"):
        DistilledDecodingPipeline(student=student, tokenizer=pipe.tokenizer, text_encoder=enc.model,
                                  text_tokenizer=enc.tokenizer)  # fmt: skip
    assert isinstance(enc.encode(PROMPTS), TextCondition)
