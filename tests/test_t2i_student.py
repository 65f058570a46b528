"""The text-conditioned DD student: the teacher's caption projection copied, caption masks through the condition
table, losses on prompt trajectories, save/load, and the official class-conditional layout unchanged."""

from __future__ import annotations

import pytest
import torch

from distilled_decoding import TextCondition, TrajectoryDataset, build_trajectories
from distilled_decoding.conditions import ClassCondition, TextConditionSpec
from distilled_decoding.distill import DistillConfig, train_student
from distilled_decoding.losses import distillation_losses
from distilled_decoding.students import DDStudent, student_from_teacher

from .conftest import randomize_
from .t2i_parts import CAPTION_DIM, CAPTION_LEN, PROMPTS, tiny_encoder, tiny_t2i_teacher, tiny_vq

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def parts():
    gpt, vq, enc = tiny_t2i_teacher(), tiny_vq(), tiny_encoder()
    student = randomize_(DDStudent.from_teacher(gpt, vq.codebook, timesteps=(0, 6)), seed=7).eval()
    with torch.no_grad():
        student.codebook.copy_(vq.codebook)
    return gpt, vq, enc, student


def test_from_teacher_copies_the_caption_projection(parts):
    gpt, vq, _, _ = parts
    student = student_from_teacher(gpt, vq.codebook, timesteps=(0, 6))
    assert student.config.model_type == "t2i" and student.config.cls_token_num == CAPTION_LEN
    t_sd, s_sd = gpt.state_dict(), student.state_dict()
    for k in ("cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
              "cls_embedding.uncond_embedding", "layers.1.attention.wqkv.weight", "output.weight"):  # fmt: skip
        assert torch.equal(s_sd[k], t_sd[k]), k
    assert isinstance(student.condition, TextConditionSpec) and student.condition.describe() == {
        "kind": "text", "length": CAPTION_LEN, "width": CAPTION_DIM}  # fmt: skip
    assert student.freqs_cis.shape[0] == CAPTION_LEN + 16 and not student.freqs_cis[:CAPTION_LEN].any()


def test_caption_masks_hide_padding_and_matter(parts):
    _, _, enc, student = parts
    cond = enc.encode(["a red bus", "the number 7, thick"])
    x = torch.randn(2, 16, 8)
    t = torch.tensor([0, 6])
    logits, vectors = student(x, cond, t)
    assert logits.shape == (2, 16, 64) and vectors.shape == (2, 16, 8)
    noisy = torch.where(cond.mask[..., None], cond.features, torch.randn_like(cond.features))
    garbage = TextCondition(noisy, cond.mask)
    l2, v2 = student(x, garbage, t)
    assert torch.allclose(l2, logits, atol=1e-5) and torch.allclose(v2, vectors, atol=1e-5)  # padding is inert
    unmasked = TextCondition(garbage.features, torch.ones_like(cond.mask))
    assert not torch.allclose(student(x, unmasked, t)[0], logits, atol=1e-3)  # the mask is what hides it
    other = enc.encode(["a cat", "two"])
    assert not torch.allclose(student(x, other, t)[0], logits, atol=1e-3)  # the caption conditions the output


def test_wrong_conditions_are_named(parts):
    _, _, enc, student = parts
    noise = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match=r"this model is text-conditional .* got shape \(2,\) torch\.int64 - class"):
        student.sample(noise, torch.tensor([1, 2]))
    narrow = tiny_encoder(d_model=16).encode(["a", "b"])
    with pytest.raises(ValueError, match="caption features of width 16, expected caption_dim=32"):
        student.sample(noise, narrow)
    with pytest.raises(ValueError, match="expected 2 rows"):
        student.sample(noise, enc.encode(["a"]))
    c2i = DDStudent(dim=64, n_layer=1, n_head=4, multiple_of=32, vocab_size=64, num_classes=10, block_size=16,
                    timesteps=(0, 6), split=6)  # fmt: skip
    assert isinstance(c2i.condition, ClassCondition)
    with pytest.raises(TypeError, match=r"model is class-conditional .*\(prompts need a text-conditional model\)"):
        c2i.sample(noise, enc.encode(["a", "b"]))


def test_losses_and_training_on_prompt_trajectories(parts, tmp_path):
    gpt, vq, enc, _ = parts
    out = build_trajectories(gpt, tmp_path / "traj", num_samples=16, batch_size=8, shard_size=8, codebook=vq.codebook,
                             prompts=PROMPTS, text_encoder=enc, cfg_scale=2.0, progress=False)  # fmt: skip
    cfg = DistillConfig(trajectories=str(out), output_dir=str(tmp_path / "student"), timesteps=(0, 6), max_steps=3,
                        batch_size=8, save_every=0, progress=False, loss="ce+mse", warmup_steps=0)  # fmt: skip
    student = train_student(cfg, teacher=gpt, codebook=vq.codebook)
    assert student.config.model_type == "t2i"
    ds = TrajectoryDataset(out)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["caption_features"].shape == (4, CAPTION_LEN, CAPTION_DIM)
    assert batch["caption_mask"].dtype == torch.bool
    losses = distillation_losses(student, batch, torch.tensor([0, 6, 0, 6]), {"ce": 1.0, "mse": 1.0})
    assert torch.isfinite(losses["total"]) and losses["ce"] > 0
    student.save_pretrained(tmp_path / "saved")
    back = DDStudent.from_pretrained(tmp_path / "saved").eval()
    noise, cond = torch.randn(2, 16, 8), enc.encode(["a red bus", "two"])
    assert torch.equal(back.sample(noise, cond, [0, 6])[1], student.sample(noise, cond, [0, 6])[1])
