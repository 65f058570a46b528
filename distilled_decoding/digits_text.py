"""Captions of the digits and the offline text encoder of the embedded text-to-image default.

The embedded T2I teacher (``checkpoints/digits_t2i``, made by ``recipes/train_digits_t2i_teacher.py``) is trained on
captions that name the digit of an image in varied templates: ``"a handwritten seven"``, ``"the number 7 in thick
strokes"``, ... Each template is instantiated with the digit's word and with its numeral. The templates of
:data:`TRAIN_TEMPLATES` are the training captions (and the prompts of the distillation trajectories);
:data:`EVAL_TEMPLATES` are *held out* — never seen in training — and make the evaluation prompts, so prompt
adherence measures whether the model reads the digit out of unseen wording.

Text encoder: :func:`tiny_text_encoder` — ``transformers.ByT5Tokenizer()`` (byte level, no vocabulary file) and a
tiny ``T5EncoderModel`` (d_model 64, 2 layers, 90k parameters) built from a config: no download. The recipe trains it
jointly with the teacher and ships its weights; the pipeline and the recipes load it like FLAN-T5-XL, through
:class:`~distilled_decoding.text.T5TextEncoder`. Captions are at most :data:`DIGITS_CAPTION_TOKENS` bytes (``</s>``
included): the teacher's ``cls_token_num``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "DIGIT_WORDS",
    "TRAIN_TEMPLATES",
    "EVAL_TEMPLATES",
    "DIGITS_CAPTION_TOKENS",
    "TEXT_ENCODER_CONFIG",
    "digit_prompts",
    "tiny_text_encoder",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: training captions ({d}: the digit's word or numeral)
TRAIN_TEMPLATES = (
    "a handwritten {d}",
    "the number {d}",
    "the digit {d}",
    "{d}",
    "a {d}",
    "number {d}",
    "digit {d}",
    "the numeral {d}",
    "a picture of a {d}",
    "an image of the digit {d}",
    "a drawing of the number {d}",
    "a scanned {d}",
    "handwriting: {d}",
    "the figure {d}",
    "a {d} written by hand",
    "the number {d} in thick strokes",
    "the number {d} in thin strokes",
    "a small {d}",
    "a large {d}",
    "a blurry {d}",
    "a tilted {d}",
    "a neat {d}",
    "a messy {d}",
    "{d}, handwritten",
)

#: held-out captions, for evaluation only
EVAL_TEMPLATES = (
    "a sketch of the digit {d}",
    "this is a {d}",
    "the handwritten number {d}",
    "a photo of a {d}",
    "a {d} drawn with a pen",
    "a bold {d}",
    "an image showing {d}",
    "digit: {d}",
)

#: caption positions of the embedded T2I teacher (ByT5 bytes + ``</s>``; the longest caption above has 33)
DIGITS_CAPTION_TOKENS = 40

#: the tiny T5 encoder (``transformers.T5Config`` fields); vocab 384 = ByT5's 256 bytes, 3 specials, 125 extra ids
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0
)


def digit_prompts(split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``(prompts, digits)``: every template of ``split`` (``"train"`` or ``"eval"``) with every digit, as word and
    as numeral, ordered template-major (prompt ``k`` names digit ``digits[k]``); digits (P,) long."""
    templates = {"train": TRAIN_TEMPLATES, "eval": EVAL_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    prompts, digits = [], []
    for template in templates:
        for form in ("word", "numeral"):
            for d in range(10):
                prompts.append(template.format(d=DIGIT_WORDS[d] if form == "word" else str(d)))
                digits.append(d)
    return prompts, torch.tensor(digits)


def tiny_text_encoder(seed: int = 0) -> tuple[Any, Any]:
    """``(T5EncoderModel, ByT5Tokenizer)`` of :data:`TEXT_ENCODER_CONFIG`, freshly initialised with ``seed``."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**TEXT_ENCODER_CONFIG))
    return model, transformers.ByT5Tokenizer()
