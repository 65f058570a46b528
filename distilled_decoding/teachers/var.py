"""VAR (next-scale prediction) class-conditional transformer, numerically equal to the official ``models/var.py`` +
``models/basic_var.py`` (FoundationVision/VAR), with plain SDPA attention and a plain GELU(tanh) MLP.

State-dict keys are the official ones, buffers included (the official ``.pth`` files contain them)::

    pos_start (1, first_l, C)   pos_1LC (1, L, C)   lvl_1L (1, L) int64   attn_bias_for_masking (1, 1, L, L)
    word_embed (Cvae → C)   class_emb (num_classes + 1, C), row num_classes = null class   lvl_embed (S, C)
    blocks.{i}.attn.{scale_mul_1H11 (l2-norm models only), q_bias, v_bias, zero_k_bias, mat_qkv, proj}
    blocks.{i}.ffn.{fc1, fc2}   blocks.{i}.ada_lin.1 (6C)   |  shared_aln (d36): shared_ada_lin.1, blocks.{i}.ada_gss
    head_nm.ada_lin.1 (2C)   head (C → V)

Sequence layout: scale s (pn_s × pn_s, raster order) sits at ``begin_ends[s]``; L = Σ pn_s² (680 at 256px). Position 0
holds the class embedding (+ ``pos_start``); the positions of scale s > 0 hold ``word_embed`` of the cumulative
quantised latent f_hat of scales < s, area-downsampled to pn_s (built by the VAE, :class:`MultiScaleVQVAE`). The
attention is block-causal (a token sees its own and earlier scales). Numerics that decide equality: AdaLN chunk order
(γ1, γ2, s1, s2, b1, b2), non-affine LayerNorm (eps 1e-6), l2-normalised q/k times ``exp(min(scale_mul_1H11, log
100))`` with softmax scale 1 (``attn_l2_norm``; the older checkpoints use scale 0.25/sqrt(head_dim) instead), the
head conditioned on the raw class embedding, fp32 logits.

The VAE: a VAR teacher owns its :class:`~distilled_decoding.tokenizers.msvq.MultiScaleVQVAE` as the submodule
``vae`` (attached after the official keys are loaded strictly, so the VAR keys stay the official ones and the VAE
keys are the official VAE keys under ``vae.``). ``save_pretrained`` therefore writes both, with the VAE's config
stored in ``vae_config``, and ``VAR.from_pretrained`` gives back a self-contained teacher. The Distilled Decoding
pipeline can use ``var.vae`` as its tokenizer (the same module; save it there, not twice). A VAR without a VAE (built
from a config, or ``from_official(var_path)`` alone) supports :meth:`VAR.logits_from_inputs` only, until
:meth:`VAR.attach_vae`.

Decoding protocol (:func:`distilled_decoding.sampling.sample_tokens`): one step per scale, with a statically
allocated KV cache (depth, B, H, L, head_dim) written scale by scale. Guidance follows VAR's official **linear ramp**:
``cfg_scale`` here is the official ``cfg`` argument (default 1.5 in ``autoregressive_infer_cfg``), *not* LlamaGen's
scale: scale si of S uses ``logits = uncond + (cond − uncond)·(1 + cfg·si/(S − 1))`` (= the official
``(1 + t)·cond − t·uncond``, t = cfg·si/(S − 1)): no guidance at the first scale, guidance 1 + cfg at the last.
``cfg_scale=0`` means no guidance and the batch is not doubled (the official sampler always doubles it; the result is
the same, the conditional logits). Note that ``cfg_scale=1`` therefore *is* guidance here (ramping to 2), unlike
LlamaGen. With the same ``torch.Generator`` seed, ``sample_tokens(var, labels, cfg_scale=cfg, top_k=k, top_p=p,
generator=g)`` draws the same tokens as ``autoregressive_infer_cfg(B, labels, g_seed=seed, cfg=cfg, top_k=k,
top_p=p)`` (official ``top_p=0`` = our ``top_p=1``): the multinomial draws consume the generator identically; top-k
is the same filter; top-p differs only at exact ties of the cumulative mass (VAR removes a token when the mass
strictly before it is ≥ p, the shared LlamaGen filter when it is > p).

Layers: :mod:`~distilled_decoding.teachers.var_layers`; configuration and released sizes:
:mod:`~distilled_decoding.teachers.var_config`; reading official files:
:mod:`~distilled_decoding.teachers.var_official`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file, load_strict
from distilled_decoding.conditions import ClassCondition
from distilled_decoding.model_config import config_fields, config_init
from distilled_decoding.teachers.base import check_token_ids
from distilled_decoding.teachers.var_config import VAR_PRESETS, VARConfig, var_depth_config
from distilled_decoding.teachers.var_layers import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, VARCache
from distilled_decoding.teachers.var_official import config_hint, describe_config, official_var_config
from distilled_decoding.tokenizers.msvq import MultiScaleVQVAE

__all__ = ["VAR", "VARCache", "VARConfig", "VAR_PRESETS", "var_depth_config", "official_var_config"]


class VAR(ModelMixin, ConfigMixin):
    """Class-conditional VAR. Constructor arguments are the official ``VAR`` names (without the VAE object), plus
    ``vocab_size`` / ``Cvae`` (read from the VAE upstream) and ``vae_config`` (the owned VAE's config, or None).
    Defaults are VAR-d16 as ``build_vae_var`` builds it (note ``attn_l2_norm=True``; the official class default is
    False). See :data:`VAR_PRESETS` and :meth:`from_preset` for the released sizes.

    ``var(tokens, class_labels)``: tokens (B, L) long scale-major, class_labels (B,) long → teacher-forced logits
    (B, L, V) float32; ``logits[:, begin_ends[s]]`` are p(scale s | scales < s, class). In training mode labels are
    dropped to the null class with probability ``cond_drop_rate`` (official); in eval mode never (the official
    ``forward`` drops them in eval too).
    """

    _supports_gradient_checkpointing = False
    family: ClassVar[str] = "var"

    @config_init(VARConfig)
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = self.C = self.D = cfg.embed_dim
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.V, self.Cvae = cfg.vocab_size, cfg.Cvae
        self.patch_nums: tuple[int, ...] = cfg.patch_nums
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.L = cur
        self.cond_drop_rate = cfg.cond_drop_rate

        self.word_embed = nn.Linear(self.Cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, c))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), c)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        )
        dpr = torch.linspace(0, cfg.drop_path_rate, self.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, dpr[i]) for i in range(self.depth))
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dt = d.transpose(1, 2)
        self.register_buffer("lvl_1L", dt[:, 0].contiguous())
        self.register_buffer(
            "attn_bias_for_masking", torch.where(d >= dt, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous()
        )
        self.head_nm = AdaLNBeforeHead(c, c, cfg.norm_eps)
        self.head = nn.Linear(c, self.V)
        self.vae: MultiScaleVQVAE | None = None
        if cfg.vae_config is not None:
            vae = MultiScaleVQVAE(**cfg.vae_config)
            self._check_vae(vae, "vae_config")
            self.vae = vae
        self.init_weights()

    # -- construction -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1
    ) -> None:
        """Official initialisation (``VAR.__init__`` + ``init_weights`` with the ``build_vae_var`` arguments); the VAE
        is left alone. No-op on the meta device."""
        if self.head.weight.is_meta:
            return
        std = math.sqrt(1 / self.C / 3) if init_std < 0 else init_std
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, mean=0, std=std)
        vae_modules = set(self.vae.modules()) if self.vae is not None else set()
        for m in self.modules():
            if m in vae_modules:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if blk.shared_aln:
                blk.ada_gss[:, :, 2:].mul_(init_adaln)
                blk.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                blk.ada_lin[-1].weight[2 * self.C :].mul_(init_adaln)
                blk.ada_lin[-1].weight[: 2 * self.C].mul_(init_adaln_gamma)
                blk.ada_lin[-1].bias.zero_()

    @classmethod
    def from_preset(cls, preset: str | int, **overrides: Any) -> VAR:
        """A released size (``"d16"``, ``"d20"``, ``"d24"``, ``"d30"``, ``"d36"``, or the depth as an int) with the
        official random initialisation; ``overrides`` are constructor fields (e.g. ``vae_config={}`` to own a
        default VAE)."""
        name = f"d{preset}" if isinstance(preset, int) and not isinstance(preset, bool) else preset
        if name not in VAR_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(VAR_PRESETS)} (or the depth as an int)")
        unknown = sorted(set(overrides) - set(config_fields(VARConfig)))
        if unknown:
            raise ValueError(f"unknown VAR config field(s) {unknown}; valid: {sorted(config_fields(VARConfig))}")
        return cls(**{**VAR_PRESETS[name], **overrides})

    @classmethod
    def from_official(
        cls,
        var_path: str | os.PathLike,
        vae_path: str | os.PathLike | None = None,
        depth: int | None = None,
        *,
        key: str | None = None,
        revision: str | None = None,
        vae_overrides: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> VAR:
        """Load an official VAR checkpoint (``var_d16.pth`` ..., raw state dict; ``.safetensors``; trainer files via
        ``{"trainer": {"var_wo_ddp": ...}}``) and, with ``vae_path``, its VQVAE (``vae_ch160v4096z32.pth``).

        ``depth`` selects the ``build_vae_var`` recipe (:func:`var_depth_config`); when None it is read from the
        checkpoint. Read from the tensors in any case: ``vocab_size``, ``Cvae``, ``num_classes``, ``shared_aln``,
        ``attn_l2_norm`` (the l2-normalised attention has ``blocks.{i}.attn.scale_mul_1H11``) and the 256px / 512px
        ``patch_nums`` (from L). ``overrides`` are constructor fields and win over both (e.g. the sizes of a small
        VAR). The VAE is built with the VAR's ``patch_nums``; ``vae_overrides`` are its config fields.

        Both files may be Hub references (``"FoundationVision/var/var_d16.pth"``,
        ``"FoundationVision/var/vae_ch160v4096z32.pth"``); ``revision`` pins those without ``@<revision>``.
        """
        sd = load_state_dict_file(var_path, key=key, revision=revision)
        unknown = sorted(set(overrides) - set(config_fields(VARConfig)))
        if unknown:
            raise ValueError(f"unknown VAR config field(s) {unknown}; valid: {sorted(config_fields(VARConfig))}")
        cfg = official_var_config(sd, depth=depth, filename=Path(var_path).name, **overrides)
        cfg.pop("vae_config", None)
        with torch.device("meta"):
            model = cls(**cfg)
        what = f"VAR ({describe_config(cfg)})"
        load_strict(model, sd, source=os.fspath(var_path), what=what, hint=partial(config_hint, cfg), assign=True)
        model.requires_grad_(True)
        if vae_path is not None:
            vae = MultiScaleVQVAE.from_official(
                vae_path, revision=revision, **{"v_patch_nums": model.patch_nums, **dict(vae_overrides or {})}
            )
            try:
                model.attach_vae(vae)
            except ValueError as e:
                raise CheckpointError(f"{vae_path} does not fit the VAR {var_path}: {e}") from e
        return model.eval()

    def attach_vae(self, vae: MultiScaleVQVAE) -> VAR:
        """Own ``vae`` as the submodule ``vae`` (its config is recorded in ``vae_config`` so that ``save_pretrained``
        / ``from_pretrained`` keep the pair). Raises ValueError when its vocab / Cvae / patch_nums do not fit."""
        self._check_vae(vae, "vae")
        self.vae = vae
        vae_config = {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items() if not k.startswith("_")}
        self.register_to_config(vae_config=vae_config)
        return self

    def _check_vae(self, vae: Any, name: str) -> None:
        if not isinstance(vae, MultiScaleVQVAE):
            raise ValueError(f"{name}: expected a MultiScaleVQVAE, got {type(vae).__name__}")
        if vae.vocab_size != self.V:
            raise ValueError(
                f"{name}: the VAE codebook has {vae.vocab_size} entries but the VAR head predicts {self.V} token ids "
                "(vocab_size)"
            )
        if vae.Cvae != self.Cvae:
            raise ValueError(
                f"{name}: the VAE codebook vectors have {vae.Cvae} channels (z_channels) but the VAR word_embed takes "
                f"Cvae={self.Cvae}"
            )
        if tuple(vae.patch_nums) != tuple(self.patch_nums):
            raise ValueError(
                f"{name}: the VAE's v_patch_nums={tuple(vae.patch_nums)} differ from the VAR's patch_nums="
                f"{tuple(self.patch_nums)} (the VAE is convolutional: rebuild it with v_patch_nums=patch_nums)"
            )

    def _require_vae(self, what: str) -> MultiScaleVQVAE:
        if self.vae is None:
            raise ValueError(
                f"{what} needs the VAR's VQVAE: load it with VAR.from_official(var_path, vae_path) or call "
                "var.attach_vae(MultiScaleVQVAE.from_official(vae_path, v_patch_nums=var.patch_nums))"
            )
        return self.vae

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def null_class(self) -> int:
        """Index of the unconditional (CFG) class: the last row of ``class_emb``."""
        return int(self.config.num_classes)

    @property
    def condition(self) -> ClassCondition:
        return ClassCondition(self.num_classes, self.null_class)

    @property
    def vocab_size(self) -> int:
        return self.V

    @property
    def token_order(self) -> None:
        """Scale-major order is the multi-scale tokenizer's own order."""
        return None

    @property
    def seq_len(self) -> int:
        """L = Σ pn² (680 at 256px, 2240 at 512px)."""
        return self.L

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def codebook(self) -> Tensor | None:
        """(V, Cvae) raw codebook of the owned VAE (the flow map's targets), or None when no VAE is attached."""
        return None if self.vae is None else self.vae.codebook

    # -- teacher forcing -------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, class_labels: Tensor) -> Tensor:
        """tokens (B, L) long scale-major, class_labels (B,) long → logits (B, L, V) float32 (teacher forcing)."""
        self._require_vae("forward")
        self.check_tokens(tokens, "tokens", exact=True)
        class_labels = self.condition.check(class_labels, tokens.shape[0])
        return self.logits_from_prefix(tokens[:, : self.begin_ends[-1][0]], class_labels)

    def logits_from_prefix(self, prefix: Tensor | None, class_labels: Tensor) -> Tensor:
        """Per-scale teacher forcing, unvalidated labels (the null class allowed): ``prefix`` holds the first k < S
        whole scales, tokens (B, T_k) long or per-position vectors (B, T_k, Cvae) float (codebook rows or a student's
        continuous outputs), or None for k = 0 → logits (B, T_{k+1}, V) float32 for scales 0..k."""
        if prefix is None or prefix.shape[1] == 0:
            return self.logits_from_inputs(None, class_labels)
        vae = self._require_vae("logits_from_prefix")
        if prefix.shape[1] >= self.L:
            raise ValueError(f"prefix: expected fewer than all {self.num_scales} scales ({self.L} positions)")
        if prefix.is_floating_point():
            return self.logits_from_inputs(vae.vectors_to_var_input(prefix), class_labels)
        return self.logits_from_inputs(vae.tokens_to_var_input(prefix), class_labels)

    def logits_from_inputs(self, inputs: Tensor | None, class_labels: Tensor) -> Tensor:
        """The official ``VAR.forward``: next-scale inputs (B, T − first_l, Cvae) (``vae.tokens_to_var_input``) for
        scales 1..k, or None for k = 0, and class_labels (B,) (null class allowed) → logits (B, T, V) float32,
        T = end of scale k. Labels are dropped with ``cond_drop_rate`` in training mode only."""
        b = class_labels.shape[0]
        t = self.first_l + (0 if inputs is None else inputs.shape[1])
        if t not in [e for _, e in self.begin_ends]:
            raise ValueError(
                f"inputs: {t - self.first_l} positions do not make whole scales; expected one of "
                f"{[e - self.first_l for _, e in self.begin_ends]}"
            )
        if inputs is not None and (inputs.ndim != 3 or inputs.shape[0] != b or inputs.shape[2] != self.Cvae):
            raise ValueError(f"inputs: expected shape ({b}, T, {self.Cvae}), got {tuple(inputs.shape)}")
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(b, device=class_labels.device) < self.cond_drop_rate
            class_labels = torch.where(drop, self.null_class, class_labels)
        sos = cond = self.class_emb(class_labels)
        x = sos.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)
        if inputs is not None:
            x = torch.cat((x, self.word_embed(inputs.to(self.word_embed.weight.dtype))), dim=1)
        x = x + (self.lvl_embed(self.lvl_1L[:, :t].expand(b, -1)) + self.pos_1LC[:, :t])
        cond_gss = self.shared_ada_lin(cond)
        bias = self.attn_bias_for_masking[:, :, :t, :t]
        for blk in self.blocks:
            x = blk(x, blk.modulation(cond_gss), bias)
        return self.get_logits(x, cond)

    def get_logits(self, h: Tensor, cond: Tensor) -> Tensor:
        """h (B, l, C), cond (B, C) raw class embeddings → logits (B, l, V) float32 (AdaLN head on fp32 h)."""
        return self.head(self.head_nm(h.float(), cond).to(self.head.weight.dtype)).float()

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) → images (B, 3, H, W) in [-1, 1] through the owned VAE."""
        return self._require_vae("decode_tokens").decode_tokens(tokens)

    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """vectors (B, L, Cvae) scale-major → images (B, 3, H, W) in [-1, 1] through the owned VAE."""
        return self._require_vae("decode_vectors").decode_vectors(vectors)

    def check_tokens(
        self, tokens: Tensor, name: str = "tokens", max_len: int | None = None, exact: bool = False
    ) -> None:
        """ValueError naming ``name`` unless tokens is a (B, N) integer tensor of ids in [0, V); ``exact``: N = L
        (all scales, scale-major); ``max_len``: N ≤ max_len."""
        check_token_ids(tokens, self.V, name, length=self.L if exact else None, max_len=max_len,
                        length_means=f"all scales of patch_nums={self.patch_nums}, scale-major")  # fmt: skip

    # -- KV-cached decoding (the Teacher interface) -----------------------------------------------------------
    def decode_groups(self) -> list[tuple[int, int]]:
        """Positions produced by each decoding step: one whole scale per step."""
        return list(self.begin_ends)

    def guidance_scales(self, cfg_scale: float, cfg_interval: int = -1) -> list[float] | None:
        """Per-scale CFG scale s_si = 1 + cfg_scale·si/(S − 1) (VAR's linear ramp; ``cfg_scale`` is the official
        ``cfg``, see the module docstring). ``cfg_interval`` ≥ 0 (an extension, not in the official sampler) turns
        guidance off for the scales after index ``cfg_interval``. None (no doubled batch) when cfg_scale == 0."""
        if cfg_scale == 0:
            return None
        last = self.num_scales - 1
        return [
            1.0 + cfg_scale * (si / last) if (cfg_interval < 0 or si <= cfg_interval) else 1.0
            for si in range(self.num_scales)
        ]

    def new_cache(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Zeroed static key/value buffers (depth, batch_size, H, L, head_dim) in the weights' dtype/device."""
        p = self.head.weight
        shape = (self.depth, batch_size, self.num_heads, self.L, self.C // self.num_heads)
        return torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)

    def begin(self, class_labels: Tensor, prefix: Tensor | None = None) -> tuple[VARCache, Tensor]:
        """Prefill the class token and a prefix of k < S whole scales: tokens (B, T_k) long or per-position vectors
        (B, T_k, Cvae) float, or None. class_labels (B,) (null class allowed). Returns (state, logits
        (B, pn_k², V) float32 of scale k)."""
        vae = self._require_vae("begin")
        b = class_labels.shape[0]
        k = 0
        f_hat = None
        inputs = None
        if prefix is not None and prefix.shape[1] > 0:
            if prefix.shape[1] >= self.L:
                raise ValueError(f"prefix: expected fewer than all {self.num_scales} scales ({self.L} positions)")
            vectors = prefix if prefix.is_floating_point() else vae.codebook[prefix.long()]
            inputs, f_hat = vae.vectors_to_var_input(vectors, return_fhat=True)
            k = len(vae.split_scales(vectors))
        if f_hat is None:
            pn = self.patch_nums[-1]
            f_hat = vae.codebook.new_zeros(b, self.Cvae, pn, pn)
        t = self.begin_ends[k][1]
        cond = self.class_emb(class_labels)
        cond_gss = self.shared_ada_lin(cond)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = (
            cond.unsqueeze(1).expand(b, self.first_l, -1)
            + self.pos_start.expand(b, self.first_l, -1)
            + lvl_pos[:, : self.first_l]
        )
        if inputs is not None:
            x = torch.cat((x, self.word_embed(inputs.to(x.dtype)) + lvl_pos[:, self.first_l : t]), dim=1)
        k_buf, v_buf = self.new_cache(b)
        state = VARCache(k_buf, v_buf, f_hat, cond, [blk.modulation(cond_gss) for blk in self.blocks], lvl_pos)
        bias = self.attn_bias_for_masking[:, :, :t, :t] if k > 0 else None
        h = self._cached_forward(state, x, bias)
        state.scale = k
        return state, self.get_logits(h[:, self.begin_ends[k][0] :], cond)

    def advance(self, state: VARCache, tokens: Tensor) -> Tensor:
        """Feed the tokens (B, pn_s²) chosen for scale s = ``state.scale``: accumulate them into f_hat, build the
        next scale's input and run it through the cache. Returns logits (B, pn_{s+1}², V) float32 of scale s + 1."""
        vae = self._require_vae("advance")
        si = state.scale
        if si >= self.num_scales - 1:
            raise ValueError(f"advance: all {self.num_scales} scales are already decoded")
        pn = self.patch_nums[si]
        b = state.batch_size
        if tuple(tokens.shape) != (b, pn * pn):
            raise ValueError(f"tokens: expected shape ({b}, {pn * pn}) for scale {si}, got {tuple(tokens.shape)}")
        h = vae.codebook[tokens.long()].transpose(1, 2).reshape(b, self.Cvae, pn, pn)
        state.f_hat, nxt = vae.next_autoregressive_input(si, state.f_hat, h)
        start, end = self.begin_ends[si + 1]
        x = self.word_embed(nxt.view(b, self.Cvae, -1).transpose(1, 2).to(self.word_embed.weight.dtype))
        x = x + state.lvl_pos[:, start:end]
        h = self._cached_forward(state, x, None)
        state.scale = si + 1
        return self.get_logits(h, state.cond)

    def _cached_forward(self, state: VARCache, x: Tensor, bias: Tensor | None) -> Tensor:
        start = state.pos
        for i, blk in enumerate(self.blocks):
            x = blk(x, state.mods[i], bias, (state.k[i], state.v[i]), start)
        state.pos = start + x.shape[1]
        return x


# ----------------------------------------------------------------------------------------------------------
# config and loading helpers


def load_var(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    preset: int | str | None = None,
    block_size: int | None = None,
    **overrides: Any,
) -> tuple[VAR, MultiScaleVQVAE]:
    """``(var, var.vae)`` in eval mode for the ``var`` family: a ``save_pretrained`` folder (which holds the VAE),
    or the official ``var_d16.pth`` + ``vae_ch160v4096z32.pth`` files (local or Hub references such as
    ``FoundationVision/var/var_d16.pth``). ``preset``: the depth (16 or ``"d16"``)."""
    if block_size is not None:
        raise ValueError(f"block_size={block_size!r}: VAR teachers have no block_size (patch_nums set the tokens)")
    from distilled_decoding.hub import check_source

    check_source("model", model, "a save_pretrained folder, an official .pth file or a Hub reference")
    if Path(model).is_dir():
        var = VAR.from_pretrained(model)
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: an official VAR checkpoint needs its VAE file (vae_ch160v4096z32.pth)")
        depth = int(preset.lstrip("d")) if isinstance(preset, str) else preset
        var = VAR.from_official(model, tokenizer, depth=depth, **overrides)
    if var.vae is None:
        raise ValueError(f"model: {os.fspath(model)} carries no VAE; pass the VAE file as tokenizer")
    return var.eval(), var.vae.eval()
