"""Samplers as objects: the baselines (onestep*, skip-n) and the shared sampler interface."""

from __future__ import annotations

import pytest
import torch

from distilled_decoding import LlamaGen
from distilled_decoding.samplers import OneStepStar, SkipN, TeacherSampler, marginals
from distilled_decoding.sampling import FlowChooser, sample_tokens

from .conftest import TINY_GPT, randomize_


def test_baselines():
    tokens = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 3]])
    labels = torch.tensor([0, 0, 1, 1])
    p = marginals(tokens, labels, vocab_size=4, num_classes=2)
    assert torch.allclose(p[0, 0], torch.tensor([1.0, 0, 0, 0])) and torch.allclose(
        p[0, 1], torch.tensor([0, 0.5, 0.5, 0])
    )
    star = OneStepStar(p, torch.eye(4), torch.Generator().manual_seed(0))
    vectors, draws = star(torch.zeros(4000, 2, 4), torch.zeros(4000, dtype=torch.long))
    assert star.steps == 1 and torch.equal(vectors, torch.eye(4)[draws])
    assert (draws[:, 0] == 0).all() and abs((draws[:, 1] == 1).float().mean() - 0.5) < 0.03
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=3).eval()
    probs = torch.full((10, 16, 64), 1 / 64)
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, 16, 8)
    codebook = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    skip = SkipN(gpt, 4, probs, codebook, sampling={"cfg_scale": 2.0})
    _, out = skip(noise, labels)
    head = sample_tokens(gpt, labels, chooser=FlowChooser(noise, codebook), cfg_scale=2.0, stop=12)
    assert out.shape == (2, 16) and torch.equal(out[:, :12], head) and skip.steps == 16 - 4 + 1
    assert skip.name == "skip-4"
    with pytest.raises(ValueError, match="n_skip=16"):
        SkipN(gpt, 16, probs, codebook)


def test_teacher_sampler_is_the_flow_map_loop_and_the_multinomial_loop():
    gpt = randomize_(LlamaGen(**TINY_GPT), seed=3).eval()
    codebook = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    noise, labels = torch.randn(3, 16, 8), torch.tensor([0, 4, 9])
    flow = TeacherSampler(gpt, codebook, {"cfg_scale": 2.0})
    vectors, tokens = flow(noise, labels)
    assert flow.name == "teacher AR (flow map)" and flow.steps == 16
    assert torch.equal(tokens, sample_tokens(gpt, labels, chooser=FlowChooser(noise, codebook), cfg_scale=2.0))
    assert torch.equal(vectors, codebook[tokens])
    multi = TeacherSampler(gpt, codebook, {"cfg_scale": 2.0}, "multinomial", generator=torch.Generator().manual_seed(4))
    _, drawn = multi(noise, labels)
    expected = sample_tokens(gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    assert multi.name == "teacher AR (multinomial)" and torch.equal(drawn, expected)
    with pytest.raises(ValueError, match="chooser='bogus'"):
        TeacherSampler(gpt, codebook, chooser="bogus")(noise, labels)


class _Draw:
    """A sampler drawing uniform tokens from a generator it may share with others (as onestep* and skip-n do)."""

    steps = 1

    def __init__(self, name: str, generator: torch.Generator, codebook: torch.Tensor):
        self.name, self.generator, self.codebook = name, generator, codebook

    def __call__(self, noise: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(self.codebook.shape[0], noise.shape[:2], generator=self.generator)
        return self.codebook[tokens], tokens


def test_batch_1_timing_does_not_change_the_measured_images(monkeypatch, tmp_path):
    """The latency calls draw from the samplers' generators; the images (and so FID etc.) must not depend on them."""
    import distilled_decoding.metrics as metrics
    from distilled_decoding.evaluation import measure_samplers

    monkeypatch.setattr(metrics, "compute_metrics", lambda *a, **k: {"fid": 0.0, "is": 0.0})
    codebook = torch.randn(64, 8)
    decode = lambda v: torch.sigmoid(v[..., :3]).permute(0, 2, 1).reshape(v.shape[0], 3, 4, 4)  # noqa: E731
    noise, labels = torch.randn(6, 16, 8), torch.arange(6) % 3

    def images(latency_repeats: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        samplers = [_Draw("a", gen, codebook), _Draw("b", gen, codebook)]
        rows, imgs = measure_samplers(samplers, decode, noise, labels, str(tmp_path), batch_size=4,
                                      latency_repeats=latency_repeats, progress=False)  # fmt: skip
        assert all((r["ms_batch1"] is not None) == bool(latency_repeats) for r in rows.values())
        return imgs

    timed, untimed = images(2), images(0)
    assert all(torch.equal(timed[k], untimed[k]) for k in ("a", "b"))
