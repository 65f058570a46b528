"""LlamaGen's configuration (the official ``ModelArgs`` fields, validated) and the official model sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distilled_decoding.configs import ValidatedConfig

__all__ = ["LlamaGenBackbone", "LlamaGenConfig", "LLAMAGEN_PRESETS", "MODEL_TYPES", "find_multiple"]


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class LlamaGenBackbone(ValidatedConfig):
    """The ``ModelArgs`` fields that fix LlamaGen's transformer and its condition — shared by the teacher's config
    and by the configs of the students built on it (official names and defaults). ``block_size`` = number of image
    tokens (a square). ``model_type`` "c2i" (class labels, ``cls_token_num`` = 1) or "t2i" (caption features of
    width ``caption_dim`` in ``cls_token_num`` positions: 120 for the official models)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    num_classes: int = 1000
    caption_dim: int = 2048
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256


@dataclass
class LlamaGenConfig(LlamaGenBackbone):
    """The official ``ModelArgs`` fields: the backbone's plus initialisation, dropout and cache sizes."""

    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    class_dropout_prob: float = 0.1
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def validate(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"LlamaGen config: {field}={getattr(self, field)!r}, expected {expected}")

        if self.model_type not in MODEL_TYPES:
            raise bad("model_type", f"one of {MODEL_TYPES} (class- or text-conditional)")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise bad("cls_token_num", "1 for class-conditional models")
        ints = ["dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size", "multiple_of", "cls_token_num"]
        for f in ints + ["caption_dim"] * (self.model_type == "t2i"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "a positive integer")
        if self.dim % self.n_head:
            raise bad("dim", f"a multiple of n_head={self.n_head}")
        if self.head_dim % 4:
            raise bad("dim", f"dim / n_head divisible by 4 for the 2-D RoPE (head_dim is {self.head_dim})")
        kv = self.n_kv_head if self.n_kv_head is not None else self.n_head
        if kv < 1 or self.n_head % kv:
            raise bad("n_kv_head", f"a divisor of n_head={self.n_head}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise bad("block_size", "a perfect square (the token grid is square: 256 = 16x16, 576 = 24x24)")
        for f in (
            "token_dropout_p",
            "attn_dropout_p",
            "resid_dropout_p",
            "ffn_dropout_p",
            "drop_path_rate",
            "class_dropout_prob",
        ):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise bad(f, "a probability in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


#: The condition types of LlamaGen (the embedders: ``llamagen_layers.CONDITION_EMBEDDERS``).
MODEL_TYPES = ("c2i", "t2i")

#: Official sizes (``GPT_models`` in gpt.py). Values are ModelArgs overrides. The released T2I models are GPT-XL
#: (``t2i_XL_stage1_256.pt``, ``t2i_XL_stage2_512.pt``); GPT-1B / GPT-7B are the official "text-conditional" sizes.
LLAMAGEN_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}
