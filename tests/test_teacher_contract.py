"""The teacher contract, run over every registered family (:func:`distilled_decoding.teachers.families`).

A family registered without a tiny teacher in ``conftest.TINY_TEACHERS`` fails here, so a new family gets these
properties checked by registering: its decode groups tile the sequence, greedy KV-cached decoding equals greedy
teacher forcing (with and without guidance), continuing from a prefix of whole steps equals decoding from scratch, and
the flow-map chooser is a deterministic, batch-invariant function of the noise.
"""

from __future__ import annotations

import pytest
import torch

from distilled_decoding.sampling import FlowChooser, GreedyChooser, guide, sample_tokens
from distilled_decoding.teachers import families, family_of
from distilled_decoding.teachers.base import Teacher, step_starts

from .conftest import TINY_TEACHERS

FAMILIES = sorted(families())


def test_every_family_has_a_tiny_teacher():
    missing = sorted(set(FAMILIES) - set(TINY_TEACHERS))
    assert not missing, f"register a tiny teacher for {missing} in tests/conftest.py::TINY_TEACHERS"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    teacher, codebook = TINY_TEACHERS[request.param](seed=0)
    return request.param, teacher, codebook


def _labels(teacher, b=3):
    return torch.arange(b) % teacher.condition.num_classes


def test_interface_and_registry(tiny):
    name, teacher, codebook = tiny
    assert isinstance(teacher, Teacher) and family_of(teacher).name == name
    assert isinstance(teacher, family_of(teacher).teacher_class)
    assert codebook.shape[0] == teacher.vocab_size
    order = teacher.token_order
    if order is not None:
        assert torch.equal(order.sort().values, torch.arange(teacher.seq_len))


def test_decode_groups_cover_every_position_once(tiny):
    _, teacher, _ = tiny
    groups = teacher.decode_groups()
    starts = step_starts(groups)
    assert starts[-1] == teacher.seq_len
    covered = torch.zeros(teacher.seq_len, dtype=torch.long)
    for a, b in groups:
        covered[a:b] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def _guided_teacher_forcing(teacher, tokens, labels, cfg_scale):
    """Argmax of the teacher-forced (guided) logits at every position, in sequence order."""
    groups = teacher.decode_groups()
    prefix = tokens[:, : groups[-1][0]]
    logits = teacher.logits_from_prefix(prefix, labels)
    scales = teacher.guidance_scales(cfg_scale)
    if scales is not None:
        null = teacher.condition.with_unconditional(labels)[labels.shape[0] :]
        uncond = teacher.logits_from_prefix(prefix, null)
        per_pos = torch.cat([torch.full((b - a,), scales[g]) for g, (a, b) in enumerate(groups)])
        logits = guide(logits, uncond, per_pos[None, :, None])
    return logits.argmax(-1)


@pytest.mark.parametrize("guided", [False, True])
def test_greedy_decoding_equals_teacher_forcing(tiny, guided):
    _, teacher, _ = tiny
    labels = _labels(teacher)
    # the cfg_scale that (does not) guide: LlamaGen guides iff > 1, VAR iff != 0
    cfg = next(c for c in (0.0, 1.0, 1.5) if (teacher.guidance_scales(c) is not None) == guided)
    tokens = sample_tokens(teacher, labels, chooser=GreedyChooser(), cfg_scale=cfg, order="sequence")
    with torch.no_grad():
        forced = _guided_teacher_forcing(teacher, tokens, labels, cfg)
    assert torch.equal(forced, tokens)


def test_continuing_from_a_prefix_equals_decoding_from_scratch(tiny):
    _, teacher, codebook = tiny
    labels = _labels(teacher)
    noise = torch.randn(3, teacher.seq_len, codebook.shape[1], generator=torch.Generator().manual_seed(1))
    kw = dict(chooser=FlowChooser(noise, codebook), cfg_scale=1.5, order="sequence")
    full = sample_tokens(teacher, labels, **kw)
    starts = step_starts(teacher.decode_groups())
    for t in sorted({starts[1], starts[len(starts) // 2], starts[-2]}):
        assert torch.equal(sample_tokens(teacher, labels, prefix=full[:, :t], **kw), full), t
        head = sample_tokens(teacher, labels, stop=t, **kw)
        assert torch.equal(head, full[:, :t]), t


def test_flow_chooser_is_a_deterministic_batch_invariant_function_of_the_noise(tiny):
    _, teacher, codebook = tiny
    labels = _labels(teacher, 4)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(4, teacher.seq_len, codebook.shape[1], generator=g)
    kw = dict(cfg_scale=1.5, top_k=16)
    a = sample_tokens(teacher, labels, chooser=FlowChooser(noise, codebook), **kw)
    b = sample_tokens(teacher, labels, chooser=FlowChooser(noise.clone(), codebook), **kw)
    assert torch.equal(a, b)
    perm = torch.tensor([2, 0, 3])  # another batch composition: rows in another order, one row left out
    c = sample_tokens(teacher, labels[perm], chooser=FlowChooser(noise[perm], codebook), **kw)
    assert torch.equal(c, a[perm])
    other = sample_tokens(teacher, labels, chooser=FlowChooser(-noise, codebook), **kw)
    assert not torch.equal(other, a)


def test_teacher_forcing_takes_the_tokenizer_order(tiny):
    _, teacher, codebook = tiny
    labels = _labels(teacher)
    noise = torch.randn(3, teacher.seq_len, codebook.shape[1], generator=torch.Generator().manual_seed(3))
    seq = sample_tokens(teacher, labels, chooser=FlowChooser(noise, codebook), order="sequence")
    tok = sample_tokens(teacher, labels, chooser=FlowChooser(noise, codebook))
    order = teacher.token_order
    assert torch.equal(tok, seq if order is None else seq[:, torch.argsort(order)])
    with torch.no_grad():
        logits = teacher(tok, labels)
        ref = teacher.logits_from_prefix(seq[:, : teacher.decode_groups()[-1][0]], labels)
    assert logits.shape == (3, teacher.seq_len, teacher.vocab_size)
    expected = ref if order is None else ref[:, torch.argsort(order)]
    assert torch.allclose(logits, expected, atol=1e-5)
