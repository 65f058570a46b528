"""Text encoder (T5 through transformers) and the prompt-embedding cache, on a tiny T5 that the tests build.

The tiny encoder is ``T5EncoderModel(T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2,
num_heads=4))`` with the byte-level ``ByT5Tokenizer()`` (no vocabulary file, no download): it goes through the
same code as FLAN-T5-XL (``google/flan-t5-xl``, d_model 2048), which cannot be downloaded here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distilled_decoding import LlamaGen, PromptEmbeddingCache, T5TextEncoder, TextCondition
from distilled_decoding.sampling import sample_tokens

transformers = pytest.importorskip("transformers")

PROMPTS = ["A red bus on a street", "  the number 7 in thick strokes ", "a handwritten seven"]


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(cfg).eval(), transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def encoder() -> T5TextEncoder:
    return T5TextEncoder(*tiny_t5())


@pytest.fixture(scope="module")
def saved(encoder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t5") / "tiny-t5"
    encoder.save_pretrained(path)
    return path


def official_embeddings(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's T5Embedder.get_text_embeddings (without caption clean-up) + sample_t2i.py's left padding."""
    texts = [p.lower().strip() for p in prompts]
    tm = tokenizer(
        texts,
        max_length=120,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        caption_embs = model(input_ids=tm["input_ids"], attention_mask=tm["attention_mask"])["last_hidden_state"]
    emb_masks = tm["attention_mask"]
    new_emb_masks = torch.flip(emb_masks, dims=[-1])
    new = []
    for caption_emb, emb_mask in zip(caption_embs, emb_masks):
        valid_num = int(emb_mask.sum().item())
        new.append(torch.cat([caption_emb[valid_num:], caption_emb[:valid_num]]))
    return torch.stack(new) * new_emb_masks[:, :, None], new_emb_masks.bool()


def test_encode_is_llamagen_t5_embedder_with_left_padding(encoder):
    cond = encoder.encode(PROMPTS)
    feats, mask = official_embeddings(encoder.model, encoder.tokenizer, PROMPTS)
    assert cond.features.shape == (3, 120, 64) and cond.features.dtype == torch.float32
    assert torch.equal(cond.mask, mask) and torch.allclose(cond.features, feats, atol=1e-6, rtol=0)
    # ByT5: one token per byte of the lower-cased, stripped prompt, plus </s>; real tokens at the end
    assert cond.mask.sum(1).tolist() == [len(p.strip()) + 1 for p in PROMPTS]
    assert bool(cond.mask[:, -1].all()) and not bool(cond.mask[:, 0].any())
    assert encoder.feature_dim == 64
    assert torch.equal(encoder.encode(PROMPTS[0]).features, cond.features[:1])  # a single string is a batch of one


def test_load_from_saved_folder(encoder, saved):
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in saved.iterdir()}
    loaded = T5TextEncoder.from_pretrained(saved)
    assert type(loaded.tokenizer).__name__ == "ByT5Tokenizer"
    assert torch.equal(loaded.encode(PROMPTS).features, encoder.encode(PROMPTS).features)
    assert loaded.identity == encoder.identity  # where the files came from does not matter
    other = T5TextEncoder.from_pretrained(saved, tokenizer=saved, torch_dtype=torch.bfloat16, max_length=32)
    cond = other.encode(PROMPTS)
    assert cond.features.shape == (3, 32, 64) and cond.features.dtype == torch.bfloat16
    assert other.identity != encoder.identity
    with pytest.raises(ValueError, match=r"name_or_path: folder .*missing-t5 does not exist"):
        T5TextEncoder.from_pretrained(saved.parent / "missing-t5")


def test_long_prompt_is_truncated_with_a_warning(encoder):
    long = "a very long prompt about buses " * 7  # 216 bytes once stripped, + </s>
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than max_length=120 tokens are truncated.*#1 \(217"):
        cond = encoder.encode([PROMPTS[0], long])
    assert cond.mask.sum(1).tolist() == [len(PROMPTS[0]) + 1, 120]
    # truncation keeps the first 119 tokens and the closing </s>, as the official tokenizer call does
    assert torch.equal(cond.features[1], encoder.encode(long.strip()[:119]).features[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(long.strip()[:119])  # 119 bytes + </s> = 120 tokens: no warning


def test_bad_prompts(encoder, tmp_path):
    with pytest.raises(ValueError, match="prompts: expected at least one prompt, got an empty list"):
        encoder.encode([])
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a string, got int"):
        encoder.encode(["a bus", 3])
    with pytest.raises(ValueError, match="prompts: expected a string or a list of strings, got NoneType"):
        encoder.encode(None)
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
        PromptEmbeddingCache(tmp_path / "cache", encoder).encode([])


def test_prompt_cache_round_trip(encoder, saved, tmp_path):
    cache = PromptEmbeddingCache(tmp_path / "cache", encoder)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    cond = cache.encode(prompts, batch_size=2)
    assert cache.computed == 3 and len(cache) == 3  # once per distinct prompt
    direct = encoder.encode(prompts)
    assert torch.equal(cond.mask, direct.mask) and torch.allclose(cond.features, direct.features, atol=1e-6, rtol=0)
    assert torch.equal(cache.encode(prompts[::-1]).features, cond.features.flip(0))
    assert cache.computed == 3  # nothing recomputed
    # the files hold the real tokens' features only, one entry per distinct prompt, and name the prompts
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    stored = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
            stored.update({k: (h.get_tensor(k).shape, json.loads(meta["prompts"])[k]) for k in h.keys()})  # noqa: SIM118
    assert sorted(p for _, p in stored.values()) == sorted(PROMPTS)
    assert all(shape == (len(p.strip()) + 1, 64) for shape, p in stored.values())
    # a new cache object on the same folder, with the encoder loaded from disk, reuses everything
    again = PromptEmbeddingCache(tmp_path / "cache", T5TextEncoder.from_pretrained(saved))
    assert len(again) == 3 and PROMPTS[2] in again and "unseen" not in again
    assert torch.equal(again.encode(prompts).features, cond.features) and again.computed == 0
    # another encoder in the same folder: its own entries, the others are kept
    other = PromptEmbeddingCache(tmp_path / "cache", T5TextEncoder(*tiny_t5(seed=1)))
    assert len(other) == 0
    assert not torch.allclose(other.encode(PROMPTS).features, encoder.encode(PROMPTS).features)
    assert other.computed == 3 and set(files) <= set((tmp_path / "cache").glob("*.safetensors"))


def test_features_drive_a_t2i_teacher(encoder):
    gpt = LlamaGen(
        dim=64, n_layer=1, n_head=4, multiple_of=32, vocab_size=32, block_size=4, model_type="t2i", caption_dim=64,
        cls_token_num=120,
    ).eval()  # fmt: skip
    cond = encoder.encode(PROMPTS)
    tokens = sample_tokens(gpt, cond, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 4) and int(tokens.max()) < 32
    narrow = LlamaGen(
        dim=64, n_layer=1, n_head=4, multiple_of=32, vocab_size=32, block_size=4, model_type="t2i", caption_dim=32,
        cls_token_num=120,
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match="condition: caption features of width 64, expected caption_dim=32"):
        sample_tokens(narrow, cond)
    with pytest.warns(UserWarning, match="3 prompt"):
        short = T5TextEncoder(encoder.model, encoder.tokenizer, max_length=16).encode(PROMPTS)
    with pytest.raises(ValueError, match="condition: 16 caption positions, expected 120"):
        gpt(torch.zeros(3, 4, dtype=torch.long), short)
    assert isinstance(short, TextCondition)
