"""Tiny text-to-image parts for the T2I tests: a random-weight LlamaGen T2I teacher (16 tokens, 24 caption
positions of width 32), a tiny T5 encoder with the byte-level ByT5 tokenizer (no download), the tiny VQ."""

from __future__ import annotations

import torch

from distilled_decoding import LlamaGen, T5TextEncoder, VQTokenizer

from .conftest import TINY_GPT, TINY_VQ, randomize_

CAPTION_LEN, CAPTION_DIM = 24, 32
T2I_GPT = {**TINY_GPT, "model_type": "t2i", "caption_dim": CAPTION_DIM, "cls_token_num": CAPTION_LEN,
           "class_dropout_prob": 0.1}  # fmt: skip
PROMPTS = ["a red bus", "a handwritten seven", "the number 7", "a cat on a mat", "two", "a red bus"]


def tiny_t5(seed: int = 0, d_model: int = CAPTION_DIM):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                dropout_rate=0.0)  # fmt: skip
    return transformers.T5EncoderModel(cfg).eval(), transformers.ByT5Tokenizer()


def tiny_encoder(seed: int = 0, d_model: int = CAPTION_DIM, max_length: int = CAPTION_LEN) -> T5TextEncoder:
    return T5TextEncoder(*tiny_t5(seed, d_model), max_length=max_length)


def tiny_t2i_teacher(seed: int = 3) -> LlamaGen:
    return randomize_(LlamaGen(**T2I_GPT), seed=seed).eval()


def tiny_vq() -> VQTokenizer:
    return VQTokenizer(**TINY_VQ).eval()
