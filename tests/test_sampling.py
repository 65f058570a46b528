"""The shared KV-cache sampling loop: filtering semantics, choosers, prefix continuation, errors."""

from __future__ import annotations

import pytest
import torch

from distilled_decoding.sampling import GreedyChooser, MultinomialChooser, filter_logits, sample_tokens


def test_top_k_keeps_ties_and_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0, 4.0]])
    out = filter_logits(logits, top_k=3)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, True, True, False, True]]))
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # survivors untouched


def test_top_p_keeps_first_token_past_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.7)
    # cumulative 0.5, 0.8 (> 0.7 but kept: the first past p), 0.95, 1.0
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, True, False, False]]))
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.4)).sum() == 1  # never empty


def test_generator_makes_sampling_reproducible(tiny_gpt):
    labels = torch.tensor([0, 3, 7, 7])
    a = sample_tokens(tiny_gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    b = sample_tokens(tiny_gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    c = sample_tokens(tiny_gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == (4, 16)


def test_greedy_sample_is_argmax_of_teacher_forcing(tiny_gpt):
    labels = torch.tensor([1, 2])
    tokens = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser())
    assert torch.equal(tiny_gpt(tokens, labels).argmax(-1), tokens)


def test_guided_greedy_matches_guided_teacher_forcing(tiny_gpt):
    labels = torch.tensor([4, 5, 6])
    tokens = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser(), cfg_scale=3.0)
    cond = tiny_gpt(tokens, labels)
    uncond = tiny_gpt.logits_from_prefix(tokens[:, :-1], torch.full_like(labels, 10))
    assert torch.equal((uncond + (cond - uncond) * 3.0).argmax(-1), tokens)


def test_prefix_continuation(tiny_gpt):
    labels = torch.tensor([1, 8])
    full = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser(), cfg_scale=1.5)
    for t in (1, 7, 15, 16):
        cont = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=full[:, :t])
        assert torch.equal(cont, full)
    head = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=full[:, :3], stop=9)
    assert torch.equal(head, full[:, :9])
    forced = full[:, :5].clone()
    forced[:, 4] = (forced[:, 4] + 1) % 64  # a different prefix changes the continuation's conditioning
    cont = sample_tokens(tiny_gpt, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=forced)
    assert torch.equal(cont[:, :5], forced)


def test_custom_chooser_sees_every_position_once_in_order(tiny_gpt):
    seen = []

    def chooser(logits, positions):
        assert logits.dtype == torch.float32 and logits.shape == (3, 1, 64)
        seen.append((positions.start, positions.stop))
        return torch.full((3, 1), positions.start, dtype=torch.long)

    tokens = sample_tokens(tiny_gpt, torch.tensor([0, 1, 2]), chooser=chooser, cfg_scale=2.0, prefix=None)
    assert seen == [(i, i + 1) for i in range(16)]
    assert torch.equal(tokens, torch.arange(16).expand(3, 16))


def test_top_k_one_equals_greedy(tiny_gpt):
    labels = torch.tensor([3, 3])
    a = sample_tokens(tiny_gpt, labels, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_tokens(tiny_gpt, labels, chooser=GreedyChooser()))


def test_multinomial_chooser_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(20000, 1, 4)
    toks = MultinomialChooser(torch.Generator().manual_seed(0))(logits, slice(0, 1))
    freq = torch.bincount(toks.flatten(), minlength=4).float() / 20000
    assert (freq - torch.softmax(logits[0, 0], -1)).abs().max() < 0.015


def test_errors(tiny_gpt):
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\)"):
        sample_tokens(tiny_gpt, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="class_labels: expected"):
        sample_tokens(tiny_gpt, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="top_p=0"):
        sample_tokens(tiny_gpt, labels, top_p=0.0)
    with pytest.raises(ValueError, match="temperature=0"):
        sample_tokens(tiny_gpt, labels, temperature=0)
    with pytest.raises(ValueError, match="top_k=-1"):
        sample_tokens(tiny_gpt, labels, top_k=-1)
    with pytest.raises(ValueError, match="prefix: token ids must lie"):
        sample_tokens(tiny_gpt, labels, prefix=torch.full((2, 3), 99))
    with pytest.raises(ValueError, match="prefix: expected batch size 2"):
        sample_tokens(tiny_gpt, labels, prefix=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=16"):
        sample_tokens(tiny_gpt, labels, prefix=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="stop=2: expected a decoding-step boundary >= the prefix length 3"):
        sample_tokens(tiny_gpt, labels, prefix=torch.zeros(2, 3, dtype=torch.long), stop=2)


def test_cfg_without_null_row_is_refused():
    from distilled_decoding import LlamaGen

    from .conftest import TINY_GPT

    gpt = LlamaGen(**{**TINY_GPT, "class_dropout_prob": 0.0}).eval()
    assert gpt.null_class is None
    with pytest.raises(ValueError, match="cfg_scale: this model has no null class"):
        sample_tokens(gpt, torch.tensor([0]), cfg_scale=2.0)
    assert sample_tokens(gpt, torch.tensor([0])).shape == (1, 16)
