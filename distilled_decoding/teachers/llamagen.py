"""LlamaGen GPT (class- and text-conditional), numerically equal to the official ``autoregressive/models/gpt.py``.

Module names and state-dict keys are the official ones, so official checkpoints load unchanged::

    cls_embedding.embedding_table.weight   (num_classes + 1, dim)   c2i: row ``num_classes`` = null class (CFG)
    cls_embedding.cap_proj.fc{1,2}.weight, cls_embedding.uncond_embedding     t2i: see ``llamagen_t2i.py``
    tok_embeddings.weight                  (vocab_size, dim)
    layers.{i}.attention.wqkv.weight       ((n_head + 2 n_kv_head) head_dim, dim)
    layers.{i}.attention.wo.weight         (dim, dim)
    layers.{i}.feed_forward.w{1,2,3}.weight
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight, norm.weight
    output.weight                          (vocab_size, dim)

The layers and the numerics that decide equality are in :mod:`~distilled_decoding.teachers.llamagen_layers`, the
configuration and official sizes in :mod:`~distilled_decoding.teachers.llamagen_config`, the reading of official
files in :mod:`~distilled_decoding.teachers.llamagen_official`.

The condition (``model_type``) is one module, ``cls_embedding``: :class:`LabelEmbedder` (c2i, one position, class
labels (B,) long) or :class:`~distilled_decoding.teachers.llamagen_t2i.CaptionEmbedder` (t2i, ``cls_token_num``
positions, a :class:`~distilled_decoding.conditions.TextCondition`). Both give the condition spec (``spec``), embed
(``embed``) and the key mask of the condition positions (``key_mask``: None = plain causal attention); the model
never branches on the type.

Besides teacher forcing (``gpt(tokens, condition)``) the model implements the
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
from distilled_decoding.conditions import ConditionSpec
from distilled_decoding.model_config import config_init
from distilled_decoding.teachers.base import check_token_ids
from distilled_decoding.teachers.llamagen_config import LLAMAGEN_PRESETS, LlamaGenConfig, find_multiple
from distilled_decoding.teachers.llamagen_layers import (
    CONDITION_EMBEDDERS,
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
from distilled_decoding.teachers.llamagen_t2i import caption_attention_mask

__all__ = ["LlamaGen", "LlamaGenConfig", "LLAMAGEN_PRESETS", "LlamaGenCache"]


class LlamaGen(ModelMixin, ConfigMixin):
    """LlamaGen GPT. Constructor arguments are the official ``ModelArgs`` field names
    (:class:`~distilled_decoding.teachers.llamagen_config.LlamaGenConfig`).

    ``gpt(tokens, condition)``: tokens (B, N) long with N ≤ block_size, condition = class labels (B,) long
    (``model_type="c2i"``) or a :class:`~distilled_decoding.conditions.TextCondition` (``"t2i"``: caption features
    (B, cls_token_num, caption_dim), left-padded, + mask) → logits (B, N, vocab_size) float32 where
    ``logits[:, i]`` is p(token i | tokens[:, :i], condition).
    """

    family: ClassVar[str] = "llamagen"
    _supports_gradient_checkpointing = False

    @config_init(LlamaGenConfig)
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.args = cfg
        self.cls_embedding: LabelEmbedder | Any = CONDITION_EMBEDDERS[cfg.model_type](cfg)
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
        """(cls_token_num + block_size, head_dim/2, 2) float32 RoPE table on the weights' device. Like the official
        model it is not a buffer: never saved, and never cast to the model dtype (rotation runs in fp32)."""
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
        """Index of the unconditional (CFG) class, or None when the class table has no null row (and for t2i)."""
        return self.cls_embedding.null_class

    @property
    def condition(self) -> ConditionSpec:
        """Class ids (c2i) or caption features (t2i): the spec of :mod:`distilled_decoding.conditions`."""
        return self.cls_embedding.spec

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
    def forward(self, tokens: Tensor, condition: Any) -> Tensor:
        """tokens (B, N) long, condition: class labels (B,) long or a TextCondition → logits (B, N, V) float32
        (teacher forcing). In training mode the condition is dropped (null class / null caption) with probability
        ``class_dropout_prob``."""
        self.check_tokens(tokens, "tokens", max_len=self.seq_len)
        condition = self.condition.check(condition, tokens.shape[0])
        return self.logits_from_prefix(tokens[:, :-1], condition)

    def logits_from_prefix(self, tokens: Tensor | None, condition: Any) -> Tensor:
        """Unvalidated teacher forcing: input ``[condition positions P, tokens]`` (B, P+T) → logits (B, 1+T, V)
        float32 of the last condition position and the T tokens (``[:, i]`` predicts token i; P = cls_token_num).
        The condition may be the null condition; ``tokens`` None means T = 0."""
        h = self.cls_embedding(condition)
        if tokens is not None and tokens.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(tokens)], dim=1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[: h.shape[1]]
        key_mask = self.cls_embedding.key_mask(condition)
        mask = None if key_mask is None else caption_attention_mask(key_mask, 0, h.shape[1])
        for layer in self.layers:
            h = layer(h, freqs, mask=mask)
        return self.output(self.norm(h[:, self.cls_embedding.num_positions - 1 :])).float()

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
        """Allocate a zeroed static KV cache for ``batch_size`` rows and ``max_len`` positions (condition positions
        included; default cls_token_num + block_size rounded up to a multiple of 8, as the official sampler does)."""
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
        if mask is None and cache.key_mask is not None:
            mask = caption_attention_mask(cache.key_mask, start, s)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, (cache.k[i], cache.v[i]), start, mask)
        cache.pos = start + s
        return h

    def begin(self, condition: Any, prefix: Tensor | None = None) -> tuple[LlamaGenCache, Tensor]:
        """Prefill [condition, prefix]: class labels (B,) (null class allowed) or a TextCondition (null caption
        allowed), prefix (B, T) long or None. Returns (cache, logits (B, 1, V) float32 for token T)."""
        cache = self.new_cache(self.condition.batch_size(condition))
        cache.key_mask = self.cls_embedding.key_mask(condition)
        h = self.cls_embedding.embed(condition)
        if prefix is not None and prefix.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(prefix)], dim=1)
        h = self.cached_forward(cache, h)
        return cache, self.output(self.norm(h[:, -1:])).float()

    def advance(self, cache: LlamaGenCache, tokens: Tensor) -> Tensor:
        """Feed tokens (B, 1) at the next position; returns logits (B, 1, V) float32 for the following one."""
        h = self.cached_forward(cache, self.tok_embeddings(tokens))
        return self.output(self.norm(h)).float()


def load_with_vq(
    cls: type, model: str | os.PathLike, tokenizer: str | os.PathLike | None, **official: Any
) -> tuple[Any, Any]:
    """``(model, vq)`` in eval mode for a GPT family that decodes with LlamaGen's VQ tokenizer (LlamaGen, PAR): a
    folder is read with ``cls.from_pretrained``, a file or Hub reference with ``cls.from_official(model,
    **official)``; the tokenizer likewise (a folder, or ``vq_ds16_c2i.pt``). ValueError naming ``tokenizer`` when
    it is missing or its codebook size is not the model's vocab_size."""
    from distilled_decoding.hub import check_source
    from distilled_decoding.tokenizers.vq import VQTokenizer

    if tokenizer is None:
        raise ValueError(f"tokenizer: a {cls.__name__} teacher needs its VQ tokenizer (folder or vq_ds16_c2i.pt)")
    for name, p in (("model", model), ("tokenizer", tokenizer)):
        check_source(name, p, "a save_pretrained folder, an official file or a Hub reference")
    gpt = cls.from_pretrained(model) if Path(model).is_dir() else cls.from_official(model, **official)
    vq = VQTokenizer.from_pretrained(tokenizer) if Path(tokenizer).is_dir() else VQTokenizer.from_official(tokenizer)
    if vq.codebook_size != gpt.vocab_size:
        raise ValueError(
            f"tokenizer: codebook of {vq.codebook_size} entries does not match the {cls.__name__}'s vocab_size "
            f"{gpt.vocab_size}"
        )
    return gpt.eval(), vq.eval()


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
    return load_with_vq(LlamaGen, model, tokenizer, preset=preset, block_size=block_size, **config)
