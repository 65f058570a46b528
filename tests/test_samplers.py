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
