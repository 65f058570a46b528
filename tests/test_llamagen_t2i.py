"""Text-to-image LlamaGen (``model_type="t2i"``): equality with the official implementation, formats, errors.

``tests/data/llamagen_t2i_reference.safetensors`` was made by a scratch script (outside the repo) that imports
FoundationVision/LlamaGen's ``autoregressive/models/gpt.py`` and ``generate.py``, float32, CPU:

* ``Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, block_size=16,
  caption_dim=32, cls_token_num=120, model_type="t2i", token/resid/ffn dropout 0))``, every parameter and the
  ``uncond_embedding`` buffer set to random values (seeded); its state dict is stored as ``sd.*``;
* ``raw_features`` (4, 120, 32) / ``raw_mask`` (4, 120): T5-like right-padded features of prompts with 5, 120, 37
  and 1 tokens; ``features`` / ``mask``: the same after ``sample_t2i.py``'s left padding (code copied verbatim:
  flip the mask, rotate the valid rows to the end, ``c_indices = embs * masks[:, :, None]``);
* ``logits_tf``: eval-mode ``model(idx=tokens[:, :-1], cond_idx=features, input_pos=arange(135), mask=...)`` with
  the attention mask built as ``dataset/t2i.py`` builds it (tril, caption columns times the emb mask, eye added),
  sliced ``[:, 119:]``; ``logits_tf_uncond``: the same with ``cond_idx = zeros_like(features) + uncond_embedding``;
* ``logits_cached``: ``setup_caches`` and the causal-mask set-up of ``generate()`` (no CFG), a prefill of the 120
  caption positions, then ``tokens[:, i]`` fed one at a time at positions 120 + i;
* ``sample_*``: ``torch.manual_seed(seed); generate(model, features, 16, mask, sample_logits=True, **kw)`` for
  the settings in the names (CFG with the uncond embedding, cfg_interval, top-k, top-p, temperature).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distilled_decoding import LlamaGen, TextCondition, VQTokenizer
from distilled_decoding.sampling import sample_tokens
from distilled_decoding.teachers import load_teacher
from distilled_decoding.teachers.llamagen_official import official_config
from distilled_decoding.teachers.llamagen_t2i import caption_attention_mask

from .conftest import TINY_GPT, TINY_VQ, randomize_

REF = Path(__file__).parent / "data" / "llamagen_t2i_reference.safetensors"
ARCH = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, block_size=16)
SAMPLES = [
    ("sample_seed123_cfg4_topk20_t09", 123, dict(cfg_scale=4.0, top_k=20, temperature=0.9)),
    ("sample_seed7_cfg15_topp08_int4", 7, dict(cfg_scale=1.5, top_p=0.8, cfg_interval=4)),
    ("sample_seed5_nocfg_topk10_t12", 5, dict(cfg_scale=1.0, top_k=10, temperature=1.2)),
    ("sample_seed9_cfg75_topk1000_topp09", 9, dict(cfg_scale=7.5, top_k=1000, top_p=0.9)),
]


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def sd(ref) -> dict[str, torch.Tensor]:
    return {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}


@pytest.fixture(scope="module")
def cond(ref) -> TextCondition:
    return TextCondition(ref["features"], ref["mask"])


@pytest.fixture(scope="module")
def official_file(sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t2i") / "t2i_tiny.pt"
    torch.save({"model": sd, "steps": 10}, path)
    return path


@pytest.fixture(scope="module")
def gpt(official_file) -> LlamaGen:
    return LlamaGen.from_official(official_file, **ARCH)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- equality with the official code ------------------------------------------------------------------------
def test_official_file_loads_unchanged(gpt, sd):
    """model_type, caption width and the 120 condition positions come from the tensors; keys are official."""
    assert gpt.config.model_type == "t2i" and gpt.config.caption_dim == 32 and gpt.config.cls_token_num == 120
    assert set(gpt.state_dict()) == set(sd)
    assert torch.equal(gpt.cls_embedding.uncond_embedding, sd["cls_embedding.uncond_embedding"])
    assert gpt.null_class is None and gpt.freqs_cis.shape == (136, 8, 2) and torch.all(gpt.freqs_cis[:120] == 0)


def test_left_padding_is_the_official_one(ref):
    cond = TextCondition.from_padded(ref["raw_features"], ref["raw_mask"])
    assert torch.equal(cond.features, ref["features"]) and torch.equal(cond.mask, ref["mask"])
    assert cond.mask.sum(1).tolist() == [5, 120, 37, 1]
    int_mask = TextCondition.from_padded(ref["raw_features"], ref["raw_mask"].long())  # tokenizer masks are long
    assert torch.equal(int_mask.features, ref["features"])


def test_teacher_forcing_equals_official(gpt, ref, cond):
    logits = gpt(ref["tokens"], cond)
    assert logits.dtype == torch.float32 and logits.shape == (4, 16, 64)
    assert rel_err(logits, ref["logits_tf"]) <= 1e-5
    assert (
        rel_err(gpt(ref["tokens"], gpt.condition.with_unconditional(cond)[cond.batch_size :]), ref["logits_tf_uncond"])
        <= 1e-5
    )


def test_kv_cached_decoding_equals_official(gpt, ref, cond):
    cache, first = gpt.begin(cond)
    k_ptr = cache.k.data_ptr()
    steps = [first] + [gpt.advance(cache, ref["tokens"][:, i : i + 1]) for i in range(15)]
    assert cache.k.data_ptr() == k_ptr and cache.pos == 135 and cache.k.shape[3] == 136
    assert rel_err(torch.cat(steps, 1), ref["logits_cached"]) <= 1e-5


def test_prefix_prefill_equals_teacher_forcing(gpt, ref, cond):
    _, logits = gpt.begin(cond, ref["tokens"][:, :7])
    assert rel_err(logits[:, 0], ref["logits_tf"][:, 7]) <= 1e-5


@pytest.mark.parametrize("name, seed, kwargs", SAMPLES)
def test_sampling_reproduces_official_generate(gpt, ref, cond, name, seed, kwargs):
    """Same global seed → the same tokens as the official ``generate()`` (uncond-embedding CFG, top-k/p, T)."""
    torch.manual_seed(seed)
    assert torch.equal(sample_tokens(gpt, cond, **kwargs), ref[name])


# -- the masks do what they claim ------------------------------------------------------------------------------
def test_caption_masks_matter_and_padding_is_inert(gpt, ref, cond):
    # attending to the padding (mask all True) changes the logits of the short prompts
    unmasked = gpt(ref["tokens"], TextCondition(cond.features, torch.ones_like(cond.mask)))
    assert rel_err(unmasked[[0, 2, 3]], ref["logits_tf"][[0, 2, 3]]) > 1e-3
    assert rel_err(unmasked[1], ref["logits_tf"][1]) <= 1e-5  # the 120-token prompt has no padding
    # what sits in the padded positions cannot leak
    junk = cond.features + 5.0 * (~cond.mask)[..., None] * torch.randn(cond.features.shape)
    assert rel_err(gpt(ref["tokens"], TextCondition(junk, cond.mask)), ref["logits_tf"]) <= 1e-6
    # a row alone equals the row in a batch of prompts of other lengths
    for i in range(4):
        assert rel_err(gpt(ref["tokens"][i : i + 1], cond[i]), ref["logits_tf"][i : i + 1]) <= 1e-5


def test_caption_attention_mask_layout():
    key = torch.tensor([[False, False, True]])  # 3 caption positions, the first two padding
    full = caption_attention_mask(key, 0, 5)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # a padded position attends to itself only
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],  # image tokens: the real caption token and the causal past
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(full, expected)
    assert torch.equal(caption_attention_mask(key, 3, 2)[0, 0], expected[3:])  # cached steps see the same rows


def test_caption_dropout_in_training(official_file, ref, cond):
    """Training mode drops a row's caption to the null caption w.p. class_dropout_prob (official token_drop)."""
    no_dropout = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = LlamaGen.from_official(official_file, **ARCH, **no_dropout, class_dropout_prob=0.5).train()
    kinds = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = model(ref["tokens"], cond)
        for i in range(4):
            is_cond = rel_err(out[i], ref["logits_tf"][i]) <= 1e-5
            is_null = rel_err(out[i], ref["logits_tf_uncond"][i]) <= 1e-5
            assert is_cond != is_null  # each row: its caption or the null caption, never a mixture
            kinds.append(is_null)
    assert 4 <= sum(kinds) <= 12  # 16 draws at p = 0.5


# -- formats, sizes, round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "module_prefix", "safetensors", "freqs"])
def test_official_formats_load(sd, ref, cond, tmp_path, fmt):
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "raw":  # FSDP consolidated format
        torch.save(sd, path)
    elif fmt == "module_prefix":
        torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "freqs":
        torch.save({"model": {**sd, "freqs_cis": torch.zeros(136, 8, 2)}}, path)
    else:
        save_file(sd, str(path))
    model = LlamaGen.from_official(path, **ARCH)
    assert rel_err(model(ref["tokens"], cond), ref["logits_tf"]) <= 1e-5


def test_full_size_t2i_xl_on_meta(monkeypatch):
    """t2i_XL_stage1_256.pt's layout: GPT-XL with the caption MLP (2048 → 1280 → 1280) and a (120, 2048) null
    caption instead of the class table; everything else is read from the tensors and the file name."""
    with torch.device("meta"):
        xl = LlamaGen.from_preset("GPT-XL", model_type="t2i", cls_token_num=120)
    sd = xl.state_dict()
    assert len(sd) == 6 + 7 * 36
    assert sum(p.numel() for p in xl.parameters()) == 774_699_520 - 1001 * 1280 + 2048 * 1280 + 1280 * 1280
    assert tuple(sd["cls_embedding.uncond_embedding"].shape) == (120, 2048)
    cfg = official_config(sd, filename="t2i_XL_stage1_256.pt")
    assert (cfg["dim"], cfg["n_layer"], cfg["model_type"], cfg["caption_dim"], cfg["cls_token_num"]) == (
        1280,
        36,
        "t2i",
        2048,
        120,
    )
    assert cfg["block_size"] == 256 and official_config(sd, filename="t2i_XL_stage2_512.pt")["block_size"] == 1024
    monkeypatch.setattr("distilled_decoding.teachers.llamagen.load_state_dict_file", lambda *a, **k: sd)
    loaded = LlamaGen.from_official("t2i_XL_stage1_256.pt")
    assert loaded.config.model_type == "t2i" and loaded.seq_len == 256 and loaded.freqs_cis.shape == (376, 32, 2)


def test_save_pretrained_round_trip(gpt, ref, cond, tmp_path):
    gpt.save_pretrained(tmp_path / "m")
    back = LlamaGen.from_pretrained(tmp_path / "m")
    assert torch.equal(back.cls_embedding.uncond_embedding, gpt.cls_embedding.uncond_embedding)
    assert torch.equal(back(ref["tokens"], cond), gpt(ref["tokens"], cond))


def test_bfloat16_decoding_runs_close(official_file, ref, cond):
    lo = LlamaGen.from_official(official_file, **ARCH).to(torch.bfloat16)
    cache, first = lo.begin(cond)  # float32 caption features, cast by the caption projection
    assert cache.k.dtype == torch.bfloat16 and first.dtype == torch.float32
    assert (first[:, 0] - ref["logits_tf"][:, 0]).abs().max() < 0.1 * ref["logits_tf"].abs().max()
    tokens = sample_tokens(lo, cond, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 16) and int(tokens.max()) < 64


def test_vq_ds16_t2i_is_the_c2i_vq16_architecture(monkeypatch, tmp_path, sd):
    """Official ``sample_t2i.py`` builds ``VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)``, the
    same class and config as for c2i: a ``vq_ds16_t2i.pt`` layout loads as the VQ-16 preset."""
    with torch.device("meta"):
        layout = VQTokenizer.from_preset("VQ-16").state_dict()
    monkeypatch.setattr("distilled_decoding.tokenizers.vq.load_state_dict_file", lambda *a, **k: layout)
    vq = VQTokenizer.from_official("vq_ds16_t2i.pt")
    assert vq.codebook_size == 16384 and vq.downsample_factor == 16
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == {k: tuple(v.shape) for k, v in layout.items()}
    monkeypatch.undo()
    # and a tiny T2I teacher loads with its tokenizer through the teacher loader
    tiny = VQTokenizer(**TINY_VQ)
    torch.save({"model": tiny.state_dict()}, tmp_path / "vq_ds16_t2i.pt")
    torch.save({"model": sd}, tmp_path / "t2i_tiny_256.pt")
    model, tok = load_teacher("llamagen", tmp_path / "t2i_tiny_256.pt", tmp_path / "vq_ds16_t2i.pt", **ARCH)
    assert model.config.model_type == "t2i" and model.seq_len == 16 and tok.codebook_size == 64


# -- bad input --------------------------------------------------------------------------------------------------
def test_class_labels_to_a_t2i_teacher(gpt, ref):
    with pytest.raises(ValueError, match=r"condition: this model is text-conditional.*class labels\?"):
        gpt(ref["tokens"], torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"condition: this model is text-conditional"):
        sample_tokens(gpt, torch.tensor([1, 2, 3, 4]), cfg_scale=2.0)


def test_text_to_a_class_conditional_teacher(ref, cond):
    from distilled_decoding import VAR

    c2i = randomize_(LlamaGen(**TINY_GPT)).eval()
    with pytest.raises(TypeError, match=r"class_labels: this model is class-conditional .*TextCondition"):
        c2i(ref["tokens"], cond)
    with pytest.raises(TypeError, match=r"class_labels: this model is class-conditional"):
        sample_tokens(c2i, cond)
    with torch.device("meta"):
        var = VAR.from_preset(16)
    with pytest.raises(TypeError, match=r"class_labels: this model is class-conditional"):
        sample_tokens(var, cond)


def test_wrong_caption_shapes(gpt, ref, cond):
    with pytest.raises(ValueError, match=r"condition: caption features of width 16, expected caption_dim=32"):
        gpt(ref["tokens"], TextCondition(cond.features[..., :16], cond.mask))
    with pytest.raises(ValueError, match=r"condition: 100 caption positions, expected 120"):
        gpt(ref["tokens"], TextCondition(cond.features[:, 20:], cond.mask[:, 20:]))
    with pytest.raises(ValueError, match=r"condition: expected 4 rows \(the batch size\), got 2"):
        gpt(ref["tokens"], cond[:2])
    with pytest.raises(ValueError, match=r"features: expected a \(B, L, C\) floating-point tensor"):
        TextCondition(cond.features[0], cond.mask)
    with pytest.raises(ValueError, match=r"mask: shape \(4, 100\) does not match"):
        TextCondition(cond.features, cond.mask[:, :100])
    with pytest.raises(ValueError, match=r"mask: expected a bool \(or 0/1 integer\) tensor"):
        TextCondition(cond.features, cond.mask.float())


def test_config_validation():
    with pytest.raises(ValueError, match=r"caption_dim=0, expected a positive integer"):
        LlamaGen(**ARCH, vocab_size=64, model_type="t2i", caption_dim=0, cls_token_num=8)
    with pytest.raises(ValueError, match=r"cls_token_num=8, expected 1 for class-conditional"):
        LlamaGen(**ARCH, vocab_size=64, cls_token_num=8)
