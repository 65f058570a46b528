"""The PAR Distilled Decoding student and PAR as a distillation teacher: initialisation from the teacher, dependency
structure = the teacher's decode groups, RoPE of each position's raster cell, save/load, trajectories through PAR
(each position's flow map is exact inside a group), the pipeline's decode order and its samplers."""

from __future__ import annotations

import pytest
import torch

from distilled_decoding import DDPARStudent, DistilledDecodingPipeline, VQTokenizer
from distilled_decoding.flow import noise_to_tokens
from distilled_decoding.sampling import FlowChooser, guide, sample_tokens, to_tokenizer_order
from distilled_decoding.students import student_from_teacher
from distilled_decoding.teachers.base import step_starts
from distilled_decoding.teachers.llamagen_layers import precompute_freqs_cis_2d
from distilled_decoding.trajectories import TrajectoryDataset, build_trajectories

from .conftest import TINY_TEACHERS, TINY_VQ, randomize_


@pytest.fixture(scope="module")
def par_and_codebook():
    return TINY_TEACHERS["par"](seed=0)  # PAR-4x on 8x8: 4 anchors + 15 groups = 19 steps


@pytest.fixture(scope="module")
def student(par_and_codebook):
    par, codebook = par_and_codebook
    s = student_from_teacher(par, codebook, timesteps=(0, 6))
    randomize_(s.final_layer_conti, seed=3)
    randomize_(s.n_d_embed, seed=4)
    return s.eval()


def test_from_teacher_copies_and_follows_the_decode_groups(par_and_codebook, student):
    par, codebook = par_and_codebook
    assert isinstance(student, DDPARStudent) and student.config.ar_token_num == 4
    for (n1, p1), (n2, p2) in zip(par.layers.named_parameters(), student.layers.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(student.output.weight, par.output.weight) and torch.equal(student.norm.weight, par.norm.weight)
    assert torch.equal(student.cls_embedding.embedding_table.weight, par.cls_embedding.embedding_table.weight)
    assert torch.equal(student.codebook, codebook)
    assert "spe_tok_embeddings.special_embeddings.weight" not in student.state_dict()  # no transition tokens
    assert student.starts == step_starts(par.decode_groups()) and student.num_steps == 19
    assert torch.equal(student.token_order, par.token_order)
    assert (student.config.timesteps, student.config.split) == ((0, 6), 6)
    default = student_from_teacher(par, codebook)
    assert default.config.timesteps == (0, 5)  # the par family's fraction 80/256 of 19 steps


def test_each_position_sees_its_own_noise_and_earlier_groups_only(student):
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    labels, t = torch.tensor([3, 4]), torch.tensor([0, 6])
    logits, vec = student(x, labels, t)
    for p in (2, 13, 40):  # an anchor, a member of group [12, 16), one of group [40, 44)
        x2 = x.clone()
        x2[:, p] += 1.0
        logits2, vec2 = student(x2, labels, t)
        changed = (logits - logits2).abs().amax(-1).amax(0) > 0
        group_end = next(b for b in student.starts if b > p)
        expected = torch.zeros(64, dtype=torch.bool)
        expected[p] = True
        expected[group_end:] = True
        assert torch.equal(changed, expected), p
        assert torch.equal(vec[:, ~expected], vec2[:, ~expected])
    # the indicator: the same input read as data (t=6 steps → 8 positions) or as noise gives other outputs
    l0, _ = student(x, labels, torch.zeros(2, dtype=torch.long))
    assert torch.equal(l0[0], logits[0]) and not torch.allclose(l0[1], logits[1])


def test_rope_rows_are_the_raster_cells(student, par_and_codebook):
    par, _ = par_and_codebook
    a = student.args
    raster = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, 1)
    assert torch.equal(student.freqs_cis[0], torch.zeros_like(raster[0]))
    assert torch.equal(student.freqs_cis[1:], raster[1:][par.token_order])
    # the teacher's own stream: the same cells (it adds the M rows after the anchors)
    assert torch.equal(par.freqs_cis[1:5], student.freqs_cis[1:5])
    assert torch.equal(par.freqs_cis[8:], student.freqs_cis[5:])


def test_save_load_round_trip_and_errors(student, tmp_path):
    student.save_pretrained(tmp_path / "s")
    loaded = DDPARStudent.from_pretrained(tmp_path / "s").eval()
    noise = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    for steps in ([0], [0, 6]):
        assert torch.equal(loaded.sample(noise, torch.tensor([1, 2]), steps)[0],
                           student.sample(noise, torch.tensor([1, 2]), steps)[0])  # fmt: skip
    assert torch.equal(loaded.token_order, student.token_order)
    with pytest.raises(ValueError, match=r"timesteps=\[0, 19\].*< 19"):
        DDPARStudent(dim=64, n_layer=1, n_head=4, vocab_size=64, block_size=64, split=4, timesteps=(0, 19))
    with pytest.raises(ValueError, match=r"ar_token_num=9: .*8x8 token grid"):
        DDPARStudent(dim=64, n_layer=1, n_head=4, vocab_size=64, block_size=64, ar_token_num=9)
    with pytest.raises(ValueError, match="no official DD checkpoint exists for PAR"):
        DDPARStudent.from_official(tmp_path / "x.pt", student.codebook)


def test_two_step_sampling_keeps_the_first_steps(student):
    noise = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    x1, t1 = student.sample(noise, labels, [0])
    x2, t2 = student.sample(noise, labels, [0, 6])
    assert torch.equal(t2[:, :8], t1[:, :8]) and torch.equal(x2[:, :8], x1[:, :8])  # 6 steps = 4 anchors + 1 group


def test_trajectories_through_par_are_exact_flow_maps(par_and_codebook, tmp_path):
    """build_trajectories runs unchanged through PAR (sequence order), and every token — each member of a group
    included — is the flow map of its own noise under the guided conditional given the earlier groups."""
    par, codebook = par_and_codebook
    out = build_trajectories(par, tmp_path / "traj", num_samples=6, batch_size=4, seed=3, cfg_scale=1.5,
                             codebook=codebook, shard_size=4, progress=False)  # fmt: skip
    ds = TrajectoryDataset(out)
    noise = torch.stack([ds[i]["noise"] for i in range(6)])
    tokens = torch.stack([ds[i]["tokens"] for i in range(6)])
    labels = torch.stack([ds[i]["class_label"] for i in range(6)])
    again = sample_tokens(par, labels, chooser=FlowChooser(noise, codebook), cfg_scale=1.5, order="sequence")
    assert torch.equal(again, tokens)
    with torch.no_grad():
        prefix = tokens[:, : par.decode_groups()[-1][0]]
        null = torch.full_like(labels, par.null_class)
        logits = guide(par.logits_from_prefix(prefix, labels), par.logits_from_prefix(prefix, null), 1.5)
    assert torch.equal(noise_to_tokens(noise, logits, codebook), tokens)


def test_pipeline_decodes_through_the_token_order(par_and_codebook):
    par, _ = par_and_codebook
    vq = VQTokenizer(**TINY_VQ).eval()
    student = student_from_teacher(par, vq.codebook.detach(), timesteps=(0, 6), continuous_head=False).eval()
    pipe = DistilledDecodingPipeline(student=student, tokenizer=vq)
    noise = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([5, 6])
    for steps in (1, 2):
        images, tokens = pipe.generate(noise, labels, steps=steps, return_tokens=True)
        raster = to_tokenizer_order(tokens, par.token_order)
        expected = vq.decode_tokens(raster, grid=(8, 8)).float().clamp(-1, 1).add(1).div(2)
        assert images.shape == (2, 3, 16, 16) and torch.allclose(images, expected, atol=1e-6)
    images, tokens = pipe.generate(noise, labels, steps=2, teacher=par, teacher_tokens=(4, 6), return_tokens=True)
    # teacher-refined: the teacher regenerates steps 4..5 (positions 4..7, one parallel group) through the flow map
    head = student.sample(noise, labels, [0])[1][:, :4]
    teacher_part = sample_tokens(par, labels, chooser=FlowChooser(noise, vq.codebook), prefix=head, stop=8,
                                 order="sequence")  # fmt: skip
    assert torch.equal(tokens[:, :8], teacher_part)
