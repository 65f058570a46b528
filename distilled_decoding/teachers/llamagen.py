"""LlamaGen class-conditional GPT, numerically equal to the official ``autoregressive/models/gpt.py``.

Module names and state-dict keys are the official ones, so official checkpoints load unchanged::

    cls_embedding.embedding_table.weight   (num_classes + 1, dim)   row ``num_classes`` = null class (CFG)
    tok_embeddings.weight                  (vocab_size, dim)
    layers.{i}.attention.wqkv.weight       ((n_head + 2 n_kv_head) head_dim, dim)
    layers.{i}.attention.wo.weight         (dim, dim)
    layers.{i}.feed_forward.w{1,2,3}.weight
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight, norm.weight
    output.weight                          (vocab_size, dim)

The layers and the numerics that decide equality are in :mod:`~distilled_decoding.teachers.llamagen_layers`, the
configuration and official sizes in :mod:`~distilled_decoding.teachers.llamagen_config`, the reading of official
files in :mod:`~distilled_decoding.teachers.llamagen_official`.

Besides teacher forcing (``gpt(tokens, class_labels)``) the model implements the
:class:`~distilled_decoding.teachers.base.Teacher` interface — raster order, one token per decoding step — with a
statically allocated KV cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file, load_strict
from distilled_decoding.conditions import ClassCondition
from distilled_decoding.model_config import config_init
from distilled_decoding.teachers.base import check_token_ids
from distilled_decoding.teachers.llamagen_config import LLAMAGEN_PRESETS, LlamaGenConfig, find_multiple
from distilled_decoding.teachers.llamagen_layers import (
    LabelEmbedder,
    LlamaGenCache,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)
from distilled_decoding.teachers.llamagen_official import (
    PAR_TRANSITION_KEY,
    describe_config,
    official_config,
    preset_hint,
)

__all__ = ["LlamaGen", "LlamaGenConfig", "LLAMAGEN_PRESETS", "LlamaGenCache"]


class LlamaGen(ModelMixin, ConfigMixin):
    """Class-conditional LlamaGen GPT. Constructor arguments are the official ``ModelArgs`` field names
    (:class:`~distilled_decoding.teachers.llamagen_config.LlamaGenConfig`).

    ``gpt(tokens, class_labels)``: tokens (B, N) long with N ≤ block_size, class_labels (B,) long →
    logits (B, N, vocab_size) float32 where ``logits[:, i]`` is p(token i | tokens[:, :i], class).
    """

    family: ClassVar[str] = "llamagen"
    _supports_gradient_checkpointing = False

    @config_init(LlamaGenConfig)
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.args = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(cfg, dpr[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._freqs: Tensor | None = None  # fp32 RoPE table, built lazily on the weights' device
        self.initialize_weights()

    # -- construction -------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Official init: N(0, initializer_range) for Linear/Embedding, zero output head."""
        if self.output.weight.is_meta:
            return
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> LlamaGen:
        """Build an official size (``"GPT-B"``, ...) with random weights; overrides are ModelArgs fields."""
        if preset not in LLAMAGEN_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(LLAMAGEN_PRESETS)}")
        return cls(**{**LLAMAGEN_PRESETS[preset], **overrides})

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        preset: str | None = None,
        block_size: int | None = None,
        *,
        key: str | None = None,
        revision: str | None = None,
        **config: Any,
    ) -> LlamaGen:
        """Load an official c2i checkpoint (``c2i_B_256.pt``, FSDP ``c2i_XXL_384.pt``, ``.safetensors``, ...): a
        local path or a Hub reference (``"FoundationVision/LlamaGen/c2i_B_256.pt"``; ``revision`` pins it, see
        :mod:`distilled_decoding.hub`).

        ``preset`` names an official size; when omitted it is inferred from the tensor shapes. ``block_size``
        is not stored in the files: by default it is read from the file name (``_384`` → 576, else 256).
        ``key`` picks an entry (e.g. ``"ema"``); by default ``model`` / ``module`` / ``state_dict`` / raw.
        Extra keyword arguments are ModelArgs fields (e.g. ``num_classes``, ``vocab_size``).
        """
        sd = load_state_dict_file(path, key=key, revision=revision)
        if PAR_TRANSITION_KEY in sd:
            k = sd[PAR_TRANSITION_KEY].shape[0] + 1
            raise CheckpointError(
                f"{os.fspath(path)}: this is a PAR checkpoint (it has {PAR_TRANSITION_KEY!r}, {k - 1} transition "
                f"tokens: ar_token_num={k}); use PAR.from_official"
            )
        cfg = official_config(sd, filename=Path(path).name, preset=preset, block_size=block_size, **config)
        with torch.device("meta"):
            model = cls(**cfg)
        what = f"LlamaGen ({describe_config(cfg)})"
        load_strict(model, sd, source=os.fspath(path), what=what, ignore=("freqs_cis",), hint=preset_hint,
                    assign=True)  # fmt: skip
        return model.eval()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def freqs_cis(self) -> Tensor:
        """(1 + block_size, head_dim/2, 2) float32 RoPE table on the weights' device. Like the official model
        it is not a buffer: never saved, and never cast to the model dtype (rotation runs in fp32)."""
        device = self.output.weight.device
        if self._freqs is None or self._freqs.device != device:
            a = self.args
            self._freqs = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, a.cls_token_num).to(device)
        return self._freqs

    @property
    def num_classes(self) -> int:
        return self.args.num_classes

    @property
    def null_class(self) -> int | None:
        """Index of the unconditional (CFG) class, or None when the class table has no null row."""
        return self.args.num_classes if self.cls_embedding.embedding_table.num_embeddings > self.num_classes else None

    @property
    def condition(self) -> ClassCondition:
        return ClassCondition(self.num_classes, self.null_class)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def seq_len(self) -> int:
        return self.args.block_size

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    @property
    def token_order(self) -> None:
        """Raster order: the sequence is the tokenizer's grid order."""
        return None

    # -- teacher forcing -------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, class_labels: Tensor) -> Tensor:
        """tokens (B, N) long, class_labels (B,) long → logits (B, N, V) float32 (teacher forcing).

        In training mode class labels are dropped to the null class with probability ``class_dropout_prob``.
        """
        self.check_tokens(tokens, "tokens", max_len=self.seq_len)
        class_labels = self.condition.check(class_labels, tokens.shape[0])
        return self.logits_from_prefix(tokens[:, :-1], class_labels)

    def logits_from_prefix(self, tokens: Tensor | None, class_labels: Tensor) -> Tensor:
        """Unvalidated teacher forcing: input ``[class, tokens]`` (B, 1+T) → logits (B, 1+T, V) float32.
        ``class_labels`` may contain the null class; ``tokens`` None means T = 0."""
        h = self.cls_embedding(class_labels)
        if tokens is not None and tokens.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(tokens)], dim=1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        return self.output(self.norm(h)).float()

    def check_tokens(self, tokens: Tensor, name: str = "tokens", max_len: int | None = None) -> None:
        """ValueError naming ``name`` unless tokens is a (B, N) integer tensor of ids in [0, V), N ≤ max_len."""
        check_token_ids(tokens, self.vocab_size, name, max_len=max_len, max_len_name="block_size")

    # -- KV-cached decoding (the Teacher interface) -----------------------------------------------------------
    def decode_groups(self) -> list[tuple[int, int]]:
        """Positions produced by each decoding step: one token at a time, raster order."""
        return [(i, i + 1) for i in range(self.seq_len)]

    def guidance_scales(self, cfg_scale: float, cfg_interval: int = -1) -> list[float] | None:
        """Per-step CFG scale (official: guidance iff cfg_scale > 1; ``cfg_interval`` ≥ 0 switches it off for
        tokens after index cfg_interval + 1). None means no guidance (the batch is not doubled)."""
        if cfg_scale <= 1.0:
            return None
        return [cfg_scale if (cfg_interval < 0 or j <= cfg_interval + 1) else 1.0 for j in range(self.seq_len)]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LlamaGenCache:
        """Allocate a zeroed static KV cache for ``batch_size`` rows and ``max_len`` positions (class token
        included; default 1 + block_size rounded up to a multiple of 8, as the official sampler does)."""
        max_len = find_multiple(max_len or (self.args.cls_token_num + self.seq_len), 8)
        a = self.args
        p = self.output.weight
        shape = (a.n_layer, batch_size, a.kv_heads, max_len, a.head_dim)
        return LlamaGenCache(
            torch.zeros(shape, dtype=p.dtype, device=p.device),
            torch.zeros(shape, dtype=p.dtype, device=p.device),
        )

    def cached_forward(self, cache: LlamaGenCache, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Run embeddings h (B, S, dim) at positions cache.pos.. through the layers, filling the cache.
        Returns the final hidden states (B, S, dim) (before the norm); advances ``cache.pos``."""
        start, s = cache.pos, h.shape[1]
        if start + s > cache.k.shape[3]:
            raise ValueError(f"KV cache holds {cache.k.shape[3]} positions; cannot write up to {start + s}")
        freqs = self.freqs_cis[start : start + s]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, (cache.k[i], cache.v[i]), start, mask)
        cache.pos = start + s
        return h

    def begin(self, class_labels: Tensor, prefix: Tensor | None = None) -> tuple[LlamaGenCache, Tensor]:
        """Prefill [class, prefix]: class_labels (B,) (null class allowed), prefix (B, T) long or None.
        Returns (cache, logits (B, 1, V) float32 for token T)."""
        b = class_labels.shape[0]
        cache = self.new_cache(b)
        h = self.cls_embedding.embedding_table(class_labels).unsqueeze(1)
        if prefix is not None and prefix.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(prefix)], dim=1)
        h = self.cached_forward(cache, h)
        return cache, self.output(self.norm(h[:, -1:])).float()

    def advance(self, cache: LlamaGenCache, tokens: Tensor) -> Tensor:
        """Feed tokens (B, 1) at the next position; returns logits (B, 1, V) float32 for the following one."""
        h = self.cached_forward(cache, self.tok_embeddings(tokens))
        return self.output(self.norm(h)).float()


def load_llamagen(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    *,
    preset: str | None = None,
    block_size: int | None = None,
    **config: Any,
) -> tuple[LlamaGen, Any]:
    """``(gpt, vq)`` in eval mode for the ``llamagen`` family: a folder is read with ``from_pretrained`` (what
    ``save_pretrained`` wrote, e.g. the embedded default ``checkpoints/digits_llamagen/{gpt,vq}``), a file as an
    official checkpoint (``c2i_B_256.pt``, ``vq_ds16_c2i.pt``, or a Hub reference such as
    ``FoundationVision/LlamaGen/c2i_B_256.pt``) with ``from_official`` (``config``: ModelArgs fields for it)."""
    from distilled_decoding.hub import check_source
    from distilled_decoding.tokenizers.vq import VQTokenizer

    if tokenizer is None:
        raise ValueError("tokenizer: a LlamaGen teacher needs its VQ tokenizer (folder or vq_ds16_c2i.pt)")
    for name, p in (("model", model), ("tokenizer", tokenizer)):
        check_source(name, p, "a save_pretrained folder, an official file or a Hub reference")
    gpt = (
        LlamaGen.from_pretrained(model)
        if Path(model).is_dir()
        else LlamaGen.from_official(model, preset=preset, block_size=block_size, **config)
    )
    vq = VQTokenizer.from_pretrained(tokenizer) if Path(tokenizer).is_dir() else VQTokenizer.from_official(tokenizer)
    if vq.codebook_size != gpt.vocab_size:
        raise ValueError(
            f"tokenizer: codebook of {vq.codebook_size} entries does not match the GPT's vocab_size {gpt.vocab_size}"
        )
    return gpt.eval(), vq.eval()
