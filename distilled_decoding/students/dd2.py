"""Distilled Decoding 2 networks: the teacher as an AR-diffusion model, and the one-step generator.

The LlamaGen networks :class:`ARDiffusion` and :class:`DD2Generator`, on the family-independent parts in
:mod:`distilled_decoding.students.dd2_base` (config fields, :class:`ContinuousInput`, :class:`DiffusionHead`, the
denoiser and Euler solver, the AR-diffusion and generator bases); the VAR networks are in
:mod:`distilled_decoding.students.dd2_var`. A family's DD2 networks are found through the teacher-family registry
(``TeacherFamily.dd2_model`` / ``dd2_generator``).

An AR-diffusion model (the GTS model and the guidance ("fake score") network) is the teacher's backbone with

* continuous inputs: LlamaGen's ``tok_embeddings`` = :class:`ContinuousInput`, ``Linear(D, dim)`` fitted by least
  squares so that it maps each codebook vector c_j close to the teacher's embedding of token j, plus a residual MLP
  ``D → input_hidden → dim`` fitted (random features, ridge) to what the linear map misses — DD2's continuous-input
  adaptation, in closed form (VAR's ``word_embed`` already reads continuous vectors and is copied);
* its classification head replaced by :class:`DiffusionHead`, a MAR-style MLP (AdaLN residual blocks) conditioned on
  the transformer feature f_i, the noisy token x_t^i and t.

Shapes: ``features(x (B, N, D), condition)`` → f (B, N, dim), f_i depending on the tokens of earlier decoding steps
only (LlamaGen: the transformer reads ``[class, x_1 .. x_{N−1}]``, the teacher's shift). The head maps (f (..., dim),
x_t (..., D), t (...)) to a velocity u (..., D), and the denoiser is ``x̂0 = base − t·u`` (velocity parameterisation)
with ``base = x_t`` (``head_base="none"``) or, with ``head_base="posterior"``, the closed-form posterior mean under a
copy of the teacher's logits head ``output`` applied to f_i (:func:`~distilled_decoding.flow.posterior_mean`): a
categorical's exact denoiser plus an MLP correction.

A generator is the same network as a one-step student (a :class:`~distilled_decoding.students.base.FewStepStudent`
with timesteps (0,)): its transformer reads the noise sequence (scaled by ``noise_scale``; LlamaGen: shifted, f_i
depends on ε_<i), the head reads ε_i at t = ``generator_t``: ``x_i = x̂0(f_i, ε_i, t)`` (DD2's x = ε − v at t = 1);
the token is the nearest codebook vector.
"""

from __future__ import annotations

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
from distilled_decoding.students.llamagen import backbone_fields
from distilled_decoding.teachers.llamagen_config import LlamaGenBackbone, LlamaGenConfig
from distilled_decoding.teachers.llamagen_layers import (
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)

__all__ = ["ARDiffusion", "ARDiffusionConfig", "DD2Generator", "DD2GeneratorConfig"]


# ------------------------------------------------------------------------------------------------------------
# LlamaGen configs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ARDiffusionConfig(LlamaGenBackbone, DD2HeadFields):
    """The LlamaGen teacher's backbone fields and the :class:`DD2HeadFields`."""

    def validate(self) -> None:
        self.require(self.model_type == "c2i", "model_type", self.model_type,
                     "'c2i' (DD2 is implemented for class-conditional LlamaGen teachers)")  # fmt: skip
        self.check_head_fields()

    def backbone(self) -> LlamaGenConfig:
        """The LlamaGen configuration of the transformer, without dropout."""
        return LlamaGenConfig(**backbone_fields(self), token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              class_dropout_prob=0.0)  # fmt: skip


@dataclass
class DD2GeneratorConfig(ARDiffusionConfig, GeneratorFields):
    """:class:`ARDiffusionConfig` plus the :class:`GeneratorFields` (``noise_scale`` None = 1/√D, the unit-norm
    codebook's per-dimension scale, where the continuous input was fitted)."""

    def validate(self) -> None:
        super().validate()
        self.check_generator_fields()


# ------------------------------------------------------------------------------------------------------------
# LlamaGen
# ------------------------------------------------------------------------------------------------------------
class _LlamaGenNetwork:
    """What :class:`ARDiffusion` and :class:`DD2Generator` share: the LlamaGen modules and features."""

    family: ClassVar[str] = "llamagen"
    codebook: Tensor

    def build(self, cfg: ARDiffusionConfig) -> None:
        a = self.args = cfg.backbone()
        self.cls_embedding = LabelEmbedder(a.num_classes, a.dim, 0.0)
        self.tok_embeddings = ContinuousInput(cfg.codebook_dim, a.dim, cfg.input_hidden)
        self.layers = nn.ModuleList(TransformerBlock(a, 0.0) for _ in range(a.n_layer))
        self.norm = RMSNorm(a.dim, eps=a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False) if cfg.head_base == "posterior" else None
        self.head = DiffusionHead(a.dim, cfg.codebook_dim, cfg.head_width, cfg.head_depth)
        self.register_buffer("codebook", torch.zeros(a.vocab_size, cfg.codebook_dim))
        self.starts = list(range(a.block_size + 1))
        self._freqs: Tensor | None = None
        if not self.norm.weight.is_meta:
            self.head.reset_parameters()

    @property
    def freqs_cis(self) -> Tensor:
        device = self.norm.weight.device
        if self._freqs is None or self._freqs.device != device:
            a = self.args
            self._freqs = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, 1).to(device)
        return self._freqs

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    def features(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """x (B, N, D) token vectors (clean codes, or scaled noise for the generator), class_labels (B,) → features
        (B, N, dim): the transformer over ``[class, x_1 .. x_{N−1}]``, final norm applied; f_i depends on x_<i."""
        n = x.shape[1]
        h = torch.cat([self.cls_embedding.embed(class_labels), self.tok_embeddings(x[:, : n - 1])], dim=1)
        freqs = self.freqs_cis[:n]
        for layer in self.layers:
            h = layer(h, freqs)
        return self.norm(h)

    def copy_teacher(self, teacher: Any, codebook: Tensor, input_scale: float, seed: int) -> float:
        """Copy the teacher's conditional class rows, layers, final norm (and logits head for the posterior base);
        fit the continuous input; a fresh head seeded by ``seed``. Returns the input fit's relative error."""
        a = self.args
        self.head.reset_parameters(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.cls_embedding.embedding_table.weight.copy_(
                teacher.cls_embedding.embedding_table.weight[: a.num_classes]
            )
            self.layers.load_state_dict(teacher.layers.state_dict())
            self.norm.load_state_dict(teacher.norm.state_dict())
            if self.output is not None:
                self.output.load_state_dict(teacher.output.state_dict())
            self.codebook.copy_(codebook)
        return self.tok_embeddings.fit(codebook, teacher.tok_embeddings.weight, input_scale, seed=seed)


class ARDiffusion(_LlamaGenNetwork, ARDiffusionModel, ModelMixin, ConfigMixin):
    """The LlamaGen teacher as an AR-diffusion model (GTS model, guidance network); see the module docstring.
    ``model(x_prefix (B, N, D), class_labels (B,), x_t (B, N, m, D), t (B, N, m))`` → x̂0 (B, N, m, D)."""

    @config_init(ARDiffusionConfig)
    def __init__(self, cfg: ARDiffusionConfig):
        super().__init__()
        self.build(cfg)

    @classmethod
    def from_teacher(
        cls,
        teacher: Any,
        codebook: Tensor,
        *,
        input_hidden: int = 512,
        input_scale: float = 3.0,
        head_width: int = 256,
        head_depth: int = 3,
        head_base: str = "posterior",
        seed: int = 0,
    ) -> ARDiffusion:
        """An AR-diffusion model made from the class-conditional LlamaGen ``teacher`` for the tokenizer ``codebook``
        (V, D) (the vectors the teacher's tokens decode from): class rows, layers, final norm (and logits head)
        copied, continuous input fitted, fresh head. TypeError / ValueError naming the argument otherwise."""
        from distilled_decoding.teachers.llamagen import LlamaGen

        if not isinstance(teacher, LlamaGen):
            raise TypeError(f"teacher: DD2 needs a LlamaGen teacher, got {type(teacher).__name__}")
        a = teacher.args
        if not isinstance(codebook, Tensor) or codebook.ndim != 2 or codebook.shape[0] != a.vocab_size:
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ValueError(f"codebook: expected ({a.vocab_size}, D) for this teacher, got {got}")
        model = cls(**backbone_fields(a), codebook_dim=int(codebook.shape[1]), input_hidden=input_hidden,
                    head_width=head_width, head_depth=head_depth, head_base=head_base,
                    teacher_sha256=teacher_fingerprint(teacher, codebook)["weights_sha256"])  # fmt: skip
        model.input_fit_error = model.copy_teacher(teacher, codebook.detach().float().cpu(), input_scale, seed)
        return model.to(teacher.output.weight.device)

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor, steps: int = 10) -> tuple[Tensor, Tensor]:
        """Autoregressive sampling (DD2 App. B.3): each token from its noise ε_i (noise (B, N, D)) by ``steps`` Euler
        steps (:meth:`~DD2Network.euler`), snapped to the nearest code, which is fed back through a KV cache.
        → (code vectors (B, N, D), tokens (B, N) long)."""
        class_labels = self.check_sample_args(noise, class_labels, steps)
        b, n, _ = noise.shape
        a, p = self.args, self.norm.weight
        cache = [tuple(torch.zeros(b, a.kv_heads, n, a.head_dim, dtype=p.dtype, device=p.device) for _ in range(2))
                 for _ in self.layers]  # fmt: skip
        tokens = torch.empty(b, n, dtype=torch.long, device=noise.device)
        f = self._cached(cache, self.cls_embedding.embed(class_labels), 0)[:, -1]
        for i in range(n):
            tokens[:, i] = nearest_codes(self.euler(f, noise[:, i], steps), self.codebook)
            if i + 1 < n:
                f = self._cached(cache, self.tok_embeddings(self.codebook[tokens[:, i : i + 1]]), i + 1)[:, -1]
        return self.codebook[tokens], tokens

    def _cached(self, cache: list, h: Tensor, start: int) -> Tensor:
        freqs = self.freqs_cis[start : start + h.shape[1]]
        for layer, kv in zip(self.layers, cache):
            h = layer(h, freqs, kv, start)
        return self.norm(h)


class DD2Generator(_LlamaGenNetwork, OneStepGenerator, ModelMixin, ConfigMixin):
    """The LlamaGen DD2 one-step generator (:class:`OneStepGenerator`): the transformer reads the noise sequence
    shifted like the teacher's tokens (``[class, s·ε_1 .. s·ε_{N−1}]``: f_i depends on ε_<i), the head reads ε_i."""

    @config_init(DD2GeneratorConfig)
    def __init__(self, cfg: DD2GeneratorConfig):
        super().__init__()
        self.build(cfg)

    def default_noise_scale(self) -> float:
        """1/√D: the unit-norm codebook's per-dimension scale, where the continuous input was fitted."""
        return self.config.codebook_dim**-0.5

    def noise_features(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        return self.features(noise, class_labels)
