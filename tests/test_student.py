"""The LlamaGen DD student: official equality, initialisation from the teacher, dependency structure, losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from distilled_decoding import LlamaGen
from distilled_decoding.losses import distillation_losses, student_outputs
from distilled_decoding.students import DDStudent, nearest_codes, perturb

from .conftest import TINY_GPT, randomize_

REF = Path(__file__).parent / "data" / "dd_llamagen_reference.safetensors"


def _loss(student, noise, tokens, labels, t, forward=None):
    """The official DD losses (ce + mse, weight 1) of one batch, with the raw heads (distilled_decoding.losses)."""
    batch = {"noise": noise, "tokens": tokens, "class_label": labels}
    out = student_outputs(student, batch, t, forward)
    losses = distillation_losses(student, batch, t, {"ce": 1.0, "mse": 1.0}, forward=forward)
    return {**losses, "logits": out.logits, "vectors": out.vectors}


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture()
def student_pair():
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=2).eval()
    codebook = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    student = DDStudent.from_teacher(gpt, codebook, timesteps=(0, 5), split=7)
    randomize_(student.final_layer_conti, seed=3)
    return gpt, student.eval(), codebook


def test_released_checkpoint_format_and_sampling_equal_official(ref, tmp_path):
    """A DD checkpoint in the released format ({"ema": sd}) loads and samples exactly like the official code."""
    sd = {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}
    torch.save({"ema": sd}, tmp_path / "llamagen-dd.pt")
    cfg = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16, multiple_of=256)
    student = DDStudent.from_official(tmp_path / "llamagen-dd.pt", ref["codebook"], split=6, timesteps=(0, 5), **cfg)
    logits, vectors = student(ref["noise"], ref["labels"], torch.zeros(3, dtype=torch.long))
    assert torch.allclose(logits, ref["raw_logits_t0"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(vectors, ref["raw_vectors_t0"], rtol=1e-5, atol=1e-5)
    for name, steps in (("one_step", [0]), ("two_step", [0, 5]), ("two_step_late", [0, 10])):
        x, _ = student.sample(ref["noise"], ref["labels"], steps)
        assert torch.allclose(x, ref[name], rtol=1e-5, atol=1e-6), name


def test_from_teacher_copies_and_initialises(student_pair):
    gpt, student, codebook = student_pair
    for (n1, p1), (n2, p2) in zip(gpt.layers.named_parameters(), student.layers.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(student.output.weight, gpt.output.weight) and torch.equal(student.norm.weight, gpt.norm.weight)
    assert torch.equal(student.cls_embedding.embedding_table.weight, gpt.cls_embedding.embedding_table.weight)
    assert torch.equal(student.codebook, codebook)
    assert student.config.timesteps == (0, 5) and student.config.split == 7
    # least-squares input layer: codebook vectors map close to the teacher's token embeddings
    emb = gpt.tok_embeddings.weight
    fit = student.tok_embeddings(codebook)
    baseline = (emb - emb.mean(0)).square().sum()
    assert (fit - emb).square().sum() < 0.9 * baseline
    default = DDStudent.from_teacher(gpt, codebook)
    assert default.config.timesteps == (0, 5) and default.config.split == 5  # round(16 * 80 / 256)


def test_each_position_sees_only_its_own_noise_and_earlier_inputs(student_pair):
    _, student, _ = student_pair
    x = torch.randn(2, 16, 8)
    labels = torch.tensor([3, 4])
    t = torch.tensor([0, 5])
    logits, vec = student(x, labels, t)
    x2 = x.clone()
    x2[:, 9] += 1.0
    logits2, vec2 = student(x2, labels, t)
    assert torch.equal(logits[:, :9], logits2[:, :9]) and torch.equal(vec[:, :9], vec2[:, :9])
    assert not torch.allclose(logits[:, 9], logits2[:, 9])  # its own noise matters
    # the indicator: the same input read as data (t=5) or noise (t=0) gives other outputs
    l0, _ = student(x, labels, torch.zeros(2, dtype=torch.long))
    assert torch.equal(l0[0], logits[0]) and not torch.allclose(l0[1], logits[1])


def test_predict_mixes_heads_and_copies_known_prefix(student_pair):
    _, student, codebook = student_pair
    noise = torch.randn(2, 16, 8)
    data = codebook[torch.randint(0, 64, (2, 16))]
    t = torch.tensor([5, 5])
    x_t = perturb(data, t, noise)
    mixed, tokens = student.predict(x_t, torch.tensor([1, 2]), t)
    logits, cont = student(x_t, torch.tensor([1, 2]), t)
    assert torch.equal(mixed[:, :5], data[:, :5]) and torch.equal(tokens[:, :5], nearest_codes(data[:, :5], codebook))
    assert torch.equal(mixed[:, 5:7], codebook[logits[:, 5:7].argmax(-1)])  # before split: quantised
    assert torch.equal(mixed[:, 7:], cont[:, 7:])  # from split on: the continuous head
    assert torch.equal(tokens[:, 5:], logits[:, 5:].argmax(-1))


def test_two_step_sampling_keeps_first_step_prefix(student_pair):
    _, student, _ = student_pair
    noise = torch.randn(3, 16, 8)
    labels = torch.tensor([0, 1, 2])
    x1, t1 = student.sample(noise, labels, [0])
    x2, t2 = student.sample(noise, labels, [0, 5])
    assert torch.equal(t2[:, :5], t1[:, :5]) and torch.equal(x2[:, :5], x1[:, :5])
    assert torch.equal(student.sample(noise, labels, [0])[0], x1)  # deterministic


def test_loss_ignores_data_positions_and_learns(student_pair):
    _, student, codebook = student_pair
    noise = torch.randn(4, 16, 8)
    tokens = torch.randint(0, 64, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([5, 5, 5, 5])
    base = _loss(student, noise, tokens, labels, t)
    # CE only over the noise positions (>= t): the data positions' targets do not enter
    noisy_only = F.cross_entropy(base["logits"][:, 5:].transpose(1, 2), tokens[:, 5:])
    assert torch.allclose(base["ce"], noisy_only, atol=1e-6)
    late = (base["vectors"][:, 7:] - codebook[tokens[:, 7:]]).square().mean()
    assert torch.allclose(base["mse"], late, atol=1e-6)
    assert torch.allclose(base["total"], base["ce"] + base["mse"])
    # a few optimisation steps on one batch reduce the loss: gradients reach every new part
    student.train()
    zero = torch.zeros(4, dtype=torch.long)
    start = float(_loss(student, noise, tokens, labels, zero)["total"].detach())
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(15):
        loss = _loss(student, noise, tokens, labels, torch.zeros(4, dtype=torch.long))["total"]
        opt.zero_grad()
        loss.backward()
        assert (
            student.final_layer_conti.linear.weight.grad.abs().sum() > 0 and student.n_d_embed.weight.grad is not None
        )
        opt.step()
    assert float(_loss(student, noise, tokens, labels, zero)["total"].detach()) < 0.7 * start


def test_input_errors(student_pair):
    _, student, _ = student_pair
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 16, 8\) = \(B, N, D\), got \(2, 16, 4\)"):
        student.sample(torch.randn(2, 16, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise: expected a floating dtype"):
        student.sample(torch.zeros(2, 16, 8, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\)"):
        student.sample(torch.randn(2, 16, 8), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"class_labels: expected a \(2,\) integer tensor"):
        student.sample(torch.randn(2, 16, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="timesteps="):
        DDStudent(dim=64, n_layer=1, n_head=4, block_size=16, split=5, timesteps=(3, 5))
    with pytest.raises(ValueError, match="split=20"):
        DDStudent(dim=64, n_layer=1, n_head=4, block_size=16, split=20, timesteps=(0, 5))


@pytest.mark.parametrize("preset, params", [("GPT-B", 98_321_672), ("GPT-L", 326_155_272)])
def test_full_size_students_on_meta(preset, params):
    """The paper's student sizes (98.3M / 326M: the teacher minus its token table plus the new parts)."""
    with torch.device("meta"):
        gpt = LlamaGen.from_preset(preset)
        student = DDStudent.from_teacher(gpt, torch.zeros(16384, 8), init_input="random")
    assert sum(p.numel() for p in student.parameters()) == params
    assert student.config.timesteps == (0, 80) and student.config.split == 80
