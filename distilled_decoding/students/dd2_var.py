"""Distilled Decoding 2 networks for VAR teachers: the teacher as an AR-diffusion model, and the one-step generator.

Both are the VAR teacher's transformer (class-conditioned AdaLN blocks, the class embedding as the AdaLN condition)
with continuous token inputs (``word_embed`` = :class:`~distilled_decoding.students.dd2_base.ContinuousInput`, its
``linear`` the teacher's ``word_embed``, which already reads Cvae-dimensional vectors) and the MAR-style
:class:`~distilled_decoding.students.dd2_base.DiffusionHead` in place of the logits head; features are the AdaLN-normed
``head_nm`` output, on which the posterior base reads the copied logits head ``output`` (see
:mod:`distilled_decoding.students.dd2`). Sequences are scale-major, N = Σ pn² tokens of D = Cvae; the decoding steps
(``starts``) are the scales.

:class:`VARARDiffusion` (GTS model, guidance network) keeps the teacher's layout: position 0 holds the class
embedding (+ ``pos_start``), the positions of scale k > 0 hold ``word_embed`` of the next-scale input built from the
clean tokens of scales < k — the VQVAE's cumulative f̂ (bicubic upsampling, Phi convs) area-downsampled to pn_k, by
a frozen copy of the teacher's multi-scale quantizer (:class:`~distilled_decoding.tokenizers.msvq_quant.
MultiScaleQuantizer`, ``quantize``, its weights stored as buffers: never trained) — and the teacher's block-causal
attention (a scale sees itself and earlier scales). So the features of scale k depend on the tokens of scales < k
only, and with the posterior base the untuned model is the (unguided) teacher exactly.

:class:`DD2VARGenerator` reads the noise as the DD1 VAR student does
(:class:`~distilled_decoding.students.var.DDVARStudent`): one extra position in front (the class token), every token
at its own position reading its own noise vector ``noise_scale · ε_i`` through ``word_embed``, attention to the
class, the earlier scales and itself (:func:`~distilled_decoding.students.var.attention_bias`). Its level / position
rows are the AR-diffusion model's shifted by one (:meth:`DD2VARGenerator.load_ar_diffusion`): the token of scale s
sits where the teacher predicts scale s (the class token and the first scale's token both take the teacher's
position 0 and level 0 — DD1 draws random rows for the extra level and position instead). So x_i = x̂0(f_i, ε_i,
generator_t) depends on ε_i and on the noise of earlier scales only — the dependency of the flow-map trajectories —
and all N token vectors come out of one forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.model_config import config_init
from distilled_decoding.provenance import teacher_fingerprint
from distilled_decoding.students.base import nearest_codes
from distilled_decoding.students.dd2_base import (
    ARDiffusionModel,
    ContinuousInput,
    DD2HeadFields,
    DiffusionHead,
    GeneratorFields,
    OneStepGenerator,
)
from distilled_decoding.students.var import SHARED_FIELDS, attention_bias
from distilled_decoding.teachers.var_config import VARBackbone, VARConfig
from distilled_decoding.teachers.var_layers import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from distilled_decoding.tokenizers.msvq_config import MSVQConfig
from distilled_decoding.tokenizers.msvq_quant import MultiScaleQuantizer

__all__ = ["DD2VARGenerator", "DD2VARGeneratorConfig", "VARARDiffusion", "VARARDiffusionConfig"]


@dataclass
class VARARDiffusionConfig(VARBackbone, DD2HeadFields):
    """The VAR teacher's backbone fields (official ``VAR`` names; dropout, drop-path and class dropout are not used),
    the :class:`~distilled_decoding.students.dd2_base.DD2HeadFields` (``codebook_dim`` = Cvae; ``input_hidden`` 0 by
    default: ``word_embed`` is the teacher's) and ``vae_config``: the teacher VAE's config (its quantizer builds the
    next-scale inputs; the defaults of ``MultiScaleVQVAE`` when empty)."""

    codebook_dim: int = 32
    input_hidden: int = 0
    vae_config: Mapping[str, Any] | None = None

    def validate(self) -> None:
        self.check_head_fields()
        req = self.require
        self.patch_nums = self.backbone().patch_nums
        req(self.patch_nums[0] == 1, "patch_nums", self.patch_nums, "a first scale of 1 (the class token's)")
        req(isinstance(self.vae_config, Mapping), "vae_config", self.vae_config,
            "the teacher VAE's config (a mapping of MultiScaleVQVAE fields)")  # fmt: skip
        q = self.quantizer_config()
        for name, want, got in (("vocab_size", self.vocab_size, q.vocab_size),
                                ("codebook_dim", self.codebook_dim, q.z_channels),
                                ("patch_nums", self.patch_nums, tuple(q.v_patch_nums))):  # fmt: skip
            req(want == got, name, want, f"the VAE's value {got!r} (vae_config)")

    def backbone(self) -> VARConfig:
        """The (validated) VAR configuration of the transformer, without dropout, drop-path or class dropout."""
        fields = {k: getattr(self, k) for k in SHARED_FIELDS}
        return VARConfig(**{**fields, "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0},
                         Cvae=self.codebook_dim, cond_drop_rate=0.0)  # fmt: skip

    def quantizer_config(self) -> MSVQConfig:
        """The VAE's configuration (what its quantizer is built from)."""
        return MSVQConfig(**dict(self.vae_config or {}))


@dataclass
class DD2VARGeneratorConfig(VARARDiffusionConfig, GeneratorFields):
    """:class:`VARARDiffusionConfig` plus the :class:`~distilled_decoding.students.dd2_base.GeneratorFields`
    (``noise_scale`` None = the codebook's per-dimension RMS, see :meth:`DD2VARGenerator.default_noise_scale`)."""

    def validate(self) -> None:
        super().validate()
        self.check_generator_fields()


def _frozen_quantizer(cfg: MSVQConfig) -> MultiScaleQuantizer:
    """A multi-scale quantizer whose parameters are buffers: saved with the network, never trained."""
    quantizer = MultiScaleQuantizer(cfg)
    for module in quantizer.modules():
        for name, p in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, None if p is None else p.detach())
    return quantizer


class _VARNetwork:
    """What :class:`VARARDiffusion` and :class:`DD2VARGenerator` share: the VAR modules and the transformer."""

    family: ClassVar[str] = "var"

    def build(self, cfg: VARARDiffusionConfig, class_token: bool) -> None:
        """The modules; ``class_token``: the generator's layout (an extra position and level in front)."""
        var = cfg.backbone()
        c, extra = var.embed_dim, int(class_token)
        self.patch_nums: tuple[int, ...] = var.patch_nums
        self.starts = [0]
        for pn in self.patch_nums:
            self.starts.append(self.starts[-1] + pn * pn)
        levels = torch.tensor([s for s, pn in enumerate(self.patch_nums) for _ in range(pn * pn)])
        self.class_emb = nn.Embedding(var.num_classes, c)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, extra + self.starts[-1], c))
        self.lvl_embed = nn.Embedding(extra + len(self.patch_nums), c)
        self.word_embed = ContinuousInput(cfg.codebook_dim, c, cfg.input_hidden)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(c, 6 * c)) if var.shared_aln else nn.Identity()
        )
        self.blocks = nn.ModuleList(AdaLNSelfAttn(var, 0.0) for _ in range(var.depth))
        self.head_nm = AdaLNBeforeHead(c, c, var.norm_eps)
        self.output = nn.Linear(c, var.vocab_size) if cfg.head_base == "posterior" else None
        self.head = DiffusionHead(c, cfg.codebook_dim, cfg.head_width, cfg.head_depth)
        self.quantize = _frozen_quantizer(cfg.quantizer_config())
        if class_token:
            lvl, bias = torch.cat([levels.new_zeros(1), levels + 1]), attention_bias(self.starts)
        else:  # the teacher's block-causal mask: a scale sees itself and the earlier scales
            lvl = levels
            bias = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)[None, None]
        self.register_buffer("lvl_1L", lvl, persistent=False)
        self.register_buffer("attn_bias", bias.contiguous(), persistent=False)
        if not self.head_nm.ada_lin[-1].weight.is_meta:
            self.head.reset_parameters()

    @property
    def codebook(self) -> Tensor:
        """(V, D) the VAE's raw codebook (the frozen quantizer's)."""
        return self.quantize.embedding.weight

    def transformer(self, h: Tensor, cond: Tensor, bias: Tensor) -> Tensor:
        """Input embeddings h (B, l, C), class embeddings cond (B, C), additive attention bias (1, 1, l, l) →
        features (B, l, C) float32 (the blocks, then the class-modulated ``head_nm``)."""
        mod_in = self.shared_ada_lin(cond)
        for blk in self.blocks:
            h = blk(h, blk.modulation(mod_in), bias)
        return self.head_nm(h.float(), cond)


class VARARDiffusion(_VARNetwork, ARDiffusionModel, ModelMixin, ConfigMixin):
    """The VAR teacher as an AR-diffusion model (GTS model, guidance network); see the module docstring.
    ``model(x_prefix (B, N, D), class_labels (B,), x_t (B, N, m, D), t (B, N, m))`` → x̂0 (B, N, m, D)."""

    @config_init(VARARDiffusionConfig)
    def __init__(self, cfg: VARARDiffusionConfig):
        super().__init__()
        self.build(cfg, class_token=False)

    @classmethod
    def from_teacher(
        cls,
        teacher: Any,
        codebook: Tensor,
        *,
        input_hidden: int = 0,
        input_scale: float = 3.0,
        head_width: int = 256,
        head_depth: int = 3,
        head_base: str = "posterior",
        seed: int = 0,
    ) -> VARARDiffusion:
        """An AR-diffusion model made from the VAR ``teacher`` (with its VQVAE) for ``codebook`` (V, Cvae), the VAE's
        codebook: the conditional class rows, ``pos_start``, ``pos_1LC``, ``lvl_embed``, ``word_embed`` (the input's
        ``linear``; an ``input_hidden`` MLP starts at zero output, its first layer seeded by ``seed`` with scale
        ``input_scale``), all blocks, ``shared_ada_lin``, ``head_nm`` (and ``head`` as the posterior base's
        ``output``) and the VAE's quantizer copied; a fresh head seeded by ``seed``. TypeError / ValueError naming the
        argument otherwise."""
        from distilled_decoding.teachers.var import VAR

        if not isinstance(teacher, VAR):
            raise TypeError(f"teacher: expected a VAR here (DD2's VAR networks), got {type(teacher).__name__}")
        if teacher.vae is None:
            raise ValueError("teacher: the VAR carries no VQVAE (its quantizer builds the next-scale inputs); load it "
                             "with VAR.from_official(var_path, vae_path) or call var.attach_vae(vae)")  # fmt: skip
        want = (teacher.V, teacher.Cvae)
        if not isinstance(codebook, Tensor) or tuple(codebook.shape) != want:
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ValueError(f"codebook: expected {want} for this teacher, got {got}")
        if not torch.equal(codebook.detach().float().cpu(), teacher.vae.codebook.detach().float().cpu()):
            raise ValueError("codebook: differs from the VAR teacher's VQVAE codebook (the vectors its tokens decode "
                             "from and its next-scale inputs are built from)")  # fmt: skip
        tc = teacher.config
        model = cls(**{k: tc[k] for k in SHARED_FIELDS}, codebook_dim=teacher.Cvae, vae_config=dict(tc["vae_config"]),
                    input_hidden=input_hidden, head_width=head_width, head_depth=head_depth, head_base=head_base,
                    teacher_sha256=teacher_fingerprint(teacher, codebook)["weights_sha256"])  # fmt: skip
        model.copy_teacher(teacher, input_scale, seed)
        return model.to(teacher.head.weight.device)

    @torch.no_grad()
    def copy_teacher(self, teacher: Any, input_scale: float, seed: int) -> None:
        """Copy the teacher's weights (see :meth:`from_teacher`) and reset the head, seeded by ``seed``."""
        self.head.reset_parameters(torch.Generator().manual_seed(seed))
        self.class_emb.weight.copy_(teacher.class_emb.weight[: self.num_classes])
        self.pos_start.copy_(teacher.pos_start)
        self.pos_1LC.copy_(teacher.pos_1LC)
        self.lvl_embed.load_state_dict(teacher.lvl_embed.state_dict())
        self.word_embed.copy_linear(teacher.word_embed, input_scale, seed)
        self.shared_ada_lin.load_state_dict(teacher.shared_ada_lin.state_dict())
        self.blocks.load_state_dict(teacher.blocks.state_dict())
        self.head_nm.load_state_dict(teacher.head_nm.state_dict())
        if self.output is not None:
            self.output.load_state_dict(teacher.head.state_dict())
        self.quantize.load_state_dict(teacher.vae.quantize.state_dict())

    def features(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """x (B, T, D) clean token vectors of the first scales (T = the end of scale k: N for whole sequences),
        class_labels (B,) → features (B, T, C) float32. The features of scale j depend on the vectors of scales < j
        only (the vectors of scale k are not read): the teacher's inputs (next-scale f̂ of scales < j) and its
        block-causal attention."""
        b, t = x.shape[:2]
        if t not in self.starts[1:]:
            raise ValueError(f"x: {t} positions do not make whole scales; expected one of {self.starts[1:]}")
        k = self.starts.index(t) - 1
        cond = self.class_emb(class_labels)
        h = cond.unsqueeze(1) + self.pos_start.expand(b, 1, -1)
        if k > 0:
            per_scale = [x[:, a:e] for a, e in zip(self.starts[:k], self.starts[1 : k + 1])]
            inputs, _ = self.quantize.var_inputs(per_scale)  # (B, T − 1, D): scale j's input from scales < j
            h = torch.cat([h, self.word_embed(inputs)], dim=1)
        h = h + (self.lvl_embed(self.lvl_1L[:t]) + self.pos_1LC[:, :t])
        return self.transformer(h, cond, self.attn_bias[:, :, :t, :t])

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor, steps: int = 10) -> tuple[Tensor, Tensor]:
        """Autoregressive sampling scale by scale (DD2 App. B.3): the tokens of scale k from their noise (noise
        (B, N, D)) by ``steps`` Euler steps each (:meth:`~distilled_decoding.students.dd2_base.DD2Network.euler`) given
        the features of the scales decoded so far, snapped to the nearest codes. → (code vectors (B, N, D), tokens
        (B, N) long)."""
        class_labels = self.check_sample_args(noise, class_labels, steps)
        cb = self.codebook
        vectors = cb.new_zeros(noise.shape)
        tokens = torch.zeros(noise.shape[:2], dtype=torch.long, device=cb.device)
        for a, e in zip(self.starts[:-1], self.starts[1:]):
            f = self.features(vectors[:, :e], class_labels)[:, a:]
            tokens[:, a:e] = nearest_codes(self.euler(f, noise[:, a:e].to(cb.device), steps), cb)
            vectors[:, a:e] = cb[tokens[:, a:e]]
        return vectors, tokens


class DD2VARGenerator(_VARNetwork, OneStepGenerator, ModelMixin, ConfigMixin):
    """The VAR DD2 one-step generator (:class:`~distilled_decoding.students.dd2_base.OneStepGenerator`): the noise read
    as the DD1 VAR student reads it (see the module docstring); ``generator(noise (B, N, D), class_labels (B,))`` →
    x (B, N, D) float32. It keeps the AR-diffusion model's frozen quantizer as the holder of its codebook (the
    pipeline's decoder is the tokenizer's)."""

    @config_init(DD2VARGeneratorConfig)
    def __init__(self, cfg: DD2VARGeneratorConfig):
        super().__init__()
        self.build(cfg, class_token=True)

    def load_ar_diffusion(self, model: VARARDiffusion) -> None:
        """``model``'s weights, its level and position rows shifted by one: the class token takes the teacher's
        position 0 / level 0, the token at sequence index j the teacher's position j and its scale's level."""
        sd = model.state_dict()
        sd["pos_1LC"] = torch.cat([sd["pos_1LC"][:, :1], sd["pos_1LC"]], dim=1)
        sd["lvl_embed.weight"] = torch.cat([sd["lvl_embed.weight"][:1], sd["lvl_embed.weight"]])
        self.load_state_dict(sd)

    def default_noise_scale(self) -> float:
        """The codebook's per-dimension RMS: noise read at the scale of the code vectors (1/√D for a unit-norm
        codebook, LlamaGen's default)."""
        return float(self.codebook.detach().float().square().mean().sqrt())

    def noise_features(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        """Scaled noise (B, N, D), class_labels (B,) → features (B, N, C): the class token in front, every token's
        own noise at its own position, attention to the class, earlier scales and itself."""
        b = noise.shape[0]
        cond = self.class_emb(class_labels)
        sos = cond.unsqueeze(1) + self.pos_start.expand(b, 1, -1)
        h = torch.cat([sos, self.word_embed(noise)], dim=1)
        h = h + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)
        return self.transformer(h, cond, self.attn_bias)[:, 1:]
