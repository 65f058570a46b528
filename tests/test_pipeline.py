"""DistilledDecodingPipeline: generation modes, refinement, save/load (folder and offline Hub cache), errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from distilled_decoding import DistilledDecodingPipeline, LlamaGen, VQTokenizer
from distilled_decoding.provenance import teacher_fingerprint
from distilled_decoding.sampling import FlowChooser, sample_tokens
from distilled_decoding.students import DDStudent

from .conftest import TINY_GPT, TINY_VQ, randomize_

SAMPLING = {"cfg_scale": 2.0, "cfg_interval": -1, "top_k": 32, "top_p": 1.0, "temperature": 1.0}


@pytest.fixture(scope="module")
def parts():
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=11).eval()
    vq = VQTokenizer(**TINY_VQ).eval()  # fmt: skip
    randomize_(vq.decoder, seed=4, scale=0.05)
    student = randomize_(DDStudent.from_teacher(gpt, vq.codebook, timesteps=(0, 6), split=9), seed=12).eval()
    with torch.no_grad():
        student.codebook.copy_(vq.codebook)
    info = {"teacher": teacher_fingerprint(gpt, vq.codebook), "teacher_sampling": SAMPLING, "flow": {},
            "metrics": {"DD 1-step": {"fid": 1.5, "steps": 1}}}  # fmt: skip
    return gpt, vq, DistilledDecodingPipeline(student=student, tokenizer=vq, info=info)


def test_generate_modes(parts):
    gpt, vq, pipe = parts
    noise = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 9])
    one = pipe.generate(noise, labels, steps=1)
    assert one.shape == (3, 3, 8, 8) and one.dtype == torch.float32 and one.min() >= 0 and one.max() <= 1
    two, tokens = pipe.generate(noise, labels, steps=2, return_tokens=True)
    assert not torch.equal(one, two) and tokens.shape == (3, 16)
    assert torch.equal(pipe.generate(noise, labels, steps=2), two)  # a deterministic function of the noise
    x, _ = pipe.student.sample(noise, labels, [0, 6])
    assert torch.equal(two, pipe.decode(x))


def test_refined_sampling_runs_the_teacher_through_the_flow_map(parts):
    gpt, vq, pipe = parts
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    images, tokens = pipe.generate(noise, labels, teacher=gpt, teacher_tokens=(0, 6), return_tokens=True)
    expected = sample_tokens(gpt, labels, chooser=FlowChooser(noise, vq.codebook), stop=6, **SAMPLING)
    assert torch.equal(tokens[:, :6], expected)  # the teacher's flow-map tokens, then one student step
    again = pipe.generate(noise, labels, teacher=gpt, teacher_tokens=(0, 6))
    assert torch.equal(images, again)
    # T > 0: the first T tokens come from a student step, the teacher continues from them
    _, tok0 = pipe.student.predict(noise, labels, torch.zeros(2, dtype=torch.long))
    _, tokens = pipe.generate(noise, labels, teacher=gpt, teacher_tokens=(4, 6), return_tokens=True)
    assert torch.equal(tokens[:, :4], tok0[:, :4])
    cont = sample_tokens(gpt, labels, chooser=FlowChooser(noise, vq.codebook), prefix=tok0[:, :4], stop=6, **SAMPLING)
    assert torch.equal(tokens[:, :6], cont)
    rnd = pipe.generate(noise, labels, teacher=gpt, teacher_tokens=(4, 6), teacher_sampling="random",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert rnd.shape == images.shape


def test_call_returns_diffusers_output(parts):
    _, _, pipe = parts
    out = pipe(class_labels=[1, 2], num_inference_steps=1, generator=torch.Generator().manual_seed(5))
    assert len(out.images) == 2 and isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (8, 8)
    arr = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 8, 8, 3)
    pt = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.allclose(torch.from_numpy(arr).permute(0, 3, 1, 2), pt)
    (tup,) = pipe([1], return_dict=False, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert tup.shape == (1, 3, 8, 8)


def test_save_load_round_trip_is_bit_identical(parts, tmp_path):
    gpt, _, pipe = parts
    pipe.save_pretrained(tmp_path / "dd")
    files = sorted(str(p.relative_to(tmp_path / "dd")) for p in (tmp_path / "dd").rglob("*") if p.is_file())
    assert "model_index.json" in files and "README.md" in files
    assert all(not f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert any(f.startswith("student/") and f.endswith(".safetensors") for f in files)
    back = DistilledDecodingPipeline.from_pretrained(tmp_path / "dd")
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    for kw in ({"steps": 1}, {"steps": 2}, {"teacher": gpt, "teacher_tokens": (3, 6)}):
        assert torch.equal(back.generate(noise, [5, 6], **kw), pipe.generate(noise, [5, 6], **kw))
    card = (tmp_path / "dd" / "README.md").read_text()
    assert pipe.info["teacher"]["weights_sha256"][:16] in card and "| DD 1-step | 1.5 | 1 |" in card


def test_offline_hub_cache_load(parts, tmp_path, monkeypatch):
    """Loading by repo id resolves from a Hugging Face cache layout with the network off."""
    import huggingface_hub.constants

    _, _, pipe = parts
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--dd-digits"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    back = DistilledDecodingPipeline.from_pretrained("someone/dd-digits", cache_dir=tmp_path / "hub")
    noise = torch.randn(1, 16, 8)
    assert torch.equal(back.generate(noise, [2]), pipe.generate(noise, [2]))
    with pytest.raises(Exception, match="(?i)offline|cannot find|not found|local"):
        DistilledDecodingPipeline.from_pretrained("someone/missing", cache_dir=tmp_path / "hub")


def test_push_to_hub_uploads_one_safetensors_folder(parts, monkeypatch):
    import huggingface_hub

    _, _, pipe = parts
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, exist_ok, private):
            calls["create"] = (repo_id, exist_ok, private)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())
            return "https://huggingface.co/someone/dd/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = pipe.push_to_hub("someone/dd", private=True, token="t")
    assert calls["create"] == ("someone/dd", True, True) and calls["token"] == "t" and url.endswith("abc")
    assert "model_index.json" in calls["files"] and "README.md" in calls["files"]
    assert all(not f.endswith((".bin", ".pt")) for f in calls["files"])


def test_interrupted_save_leaves_previous_pipeline(parts, tmp_path, monkeypatch):
    _, _, pipe = parts
    pipe.save_pretrained(tmp_path / "dd")
    before = (tmp_path / "dd" / "model_index.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("diffusers.DiffusionPipeline.save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(tmp_path / "dd")
    assert (tmp_path / "dd" / "model_index.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dd"]  # no half-written temporary folder left


def test_errors(parts):
    gpt, vq, pipe = parts
    noise = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 16, 8\) = \(B, N, D\), got \(2, 15, 8\)"):
        pipe.generate(torch.randn(2, 15, 8), [0, 1])
    with pytest.raises(ValueError, match="noise: expected a floating dtype"):
        pipe.generate(noise.long(), [0, 1])
    with pytest.raises(ValueError, match=r"steps=3: this student supports 1 or 2 steps"):
        pipe.generate(noise, [0, 1], steps=3)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
        pipe.generate(noise, [0, 10])
    with pytest.raises(ValueError, match=r"teacher_tokens=\(2, 5\): expected \(T, t2\) with t2 one of"):
        pipe.generate(noise, [0, 1], teacher=gpt, teacher_tokens=(2, 5))
    with pytest.raises(ValueError, match="teacher_tokens: given without a teacher"):
        pipe.generate(noise, [0, 1], teacher_tokens=(2, 6))
    other = randomize_(LlamaGen(**TINY_GPT), seed=99).eval()
    with pytest.raises(ValueError, match="teacher: its weights .* are not those of the teacher"):
        pipe.generate(noise, [0, 1], teacher=other, teacher_tokens=(2, 6))
    bigger = LlamaGen(**{**TINY_GPT, "vocab_size": 128}).eval()
    with pytest.raises(ValueError, match=r"teacher: does not match the student it would refine: vocab_size 128"):
        pipe.generate(noise, [0, 1], teacher=bigger, teacher_tokens=(2, 6))
    with pytest.raises(ValueError, match="output_type='jpg'"):
        pipe([0], output_type="jpg")
    wrong = VQTokenizer(**TINY_VQ)
    with torch.no_grad():
        wrong.quantize.embedding.weight.mul_(-1)
    with pytest.raises(ValueError, match="tokenizer: its codebook"):
        DistilledDecodingPipeline(student=pipe.student, tokenizer=wrong)
