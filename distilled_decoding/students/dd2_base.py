"""What every family's Distilled Decoding 2 networks share: the config fields of the diffusion head and of the
generator (:class:`DD2HeadFields`, :class:`GeneratorFields`), :class:`ContinuousInput`, the MAR-style
:class:`DiffusionHead`, the denoiser and per-token Euler solver (:class:`DD2Network`), the AR-diffusion and generator
bases (:class:`ARDiffusionModel`, :class:`OneStepGenerator`) and :func:`check_made_from`. The families' networks:
:mod:`distilled_decoding.students.dd2` (LlamaGen), :mod:`distilled_decoding.students.dd2_var` (VAR); see the former's
docstring for the denoiser and the generator's design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distilled_decoding.conditions import ClassCondition
from distilled_decoding.configs import ValidatedConfig
from distilled_decoding.flow import posterior_mean
from distilled_decoding.provenance import teacher_fingerprint
from distilled_decoding.students.base import (
    CheckedLoading,
    DecodingSteps,
    FewStepStudent,
    check_noise,
    nearest_codes,
)
from distilled_decoding.teachers.base import get_family

__all__ = [
    "HEAD_BASES",
    "ARDiffusionModel",
    "ContinuousInput",
    "DD2HeadFields",
    "DD2Network",
    "DiffusionHead",
    "GeneratorFields",
    "OneStepGenerator",
    "check_made_from",
    "network_settings",
]

HEAD_BASES = ("none", "posterior")


# ------------------------------------------------------------------------------------------------------------
# config fields every family's networks share
# ------------------------------------------------------------------------------------------------------------
@dataclass
class DD2HeadFields(ValidatedConfig):
    """``codebook_dim`` D, ``input_hidden`` (residual input MLP width; 0 = the Linear alone), ``head_width`` /
    ``head_depth`` (MLP head), ``head_base`` ("none" or "posterior"), ``teacher_sha256`` (the weights of the teacher
    the network was made from, checked by the trainers and the pipeline)."""

    codebook_dim: int = 8
    input_hidden: int = 512
    head_width: int = 256
    head_depth: int = 3
    head_base: str = "posterior"
    teacher_sha256: str = ""

    def check_head_fields(self) -> None:
        req = self.require
        for name in ("codebook_dim", "head_width", "head_depth"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        req(self.input_hidden >= 0, "input_hidden", self.input_hidden, "an int >= 0")
        req(self.head_base in HEAD_BASES, "head_base", self.head_base, f"one of {HEAD_BASES}")


@dataclass
class GeneratorFields(ValidatedConfig):
    """``noise_scale`` (the transformer reads ``noise_scale · ε``; None = the family's default, see
    :meth:`OneStepGenerator.default_noise_scale`) and ``generator_t`` (the time at which the head reads ε_i; 1 = DD2's
    x = ε − v; with the posterior head a smaller t makes the base a soft arg-max sampler ``softmax(ℓ + (1 − t)/t²
    ε·c)``). ``timesteps`` is fixed by the one-step design: (0,) (every token is the nearest code of the generated
    vector)."""

    noise_scale: float | None = None
    generator_t: float = 1.0
    timesteps: tuple[int, ...] = (0,)

    def check_generator_fields(self) -> None:
        req = self.require
        req(0.0 < self.generator_t <= 1.0, "generator_t", self.generator_t, "a number in (0, 1]")
        req(self.noise_scale is None or self.noise_scale > 0, "noise_scale", self.noise_scale, "null or > 0")
        req(tuple(self.timesteps) == (0,), "timesteps", self.timesteps, "(0,) (a DD2 generator samples in one step)")


def network_settings(model: Any) -> dict[str, Any]:
    """A saved network's config fields (its diffusers config without the ``_`` bookkeeping keys)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------------------
# shared modules
# ------------------------------------------------------------------------------------------------------------
class ContinuousInput(nn.Module):
    """Reads D-dimensional token vectors: ``linear(x) + mlp(x)`` (x (..., D) → (..., dim)); no MLP when hidden=0."""

    def __init__(self, d: int, dim: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(d, dim)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, dim)) if hidden > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.linear.weight.dtype)
        return self.linear(x) if self.mlp is None else self.linear(x) + self.mlp(x)

    @torch.no_grad()
    def fit(
        self, codebook: Tensor, embeddings: Tensor, scale: float = 3.0, ridge: float = 1e-4, seed: int = 0
    ) -> float:
        """Fit to the teacher's token table in closed form: least squares for ``linear``; then the MLP's first layer
        random (weights N(0, scale²), biases N(0, scale²/4), seeded) and its second layer the ridge solution (float64)
        for the residual. codebook (V, D), embeddings (V, dim). Returns ‖fit − emb‖ / ‖emb‖ (Frobenius)."""
        cb, emb = codebook.detach().double().cpu(), embeddings.detach().double().cpu()
        design = torch.cat([cb, torch.ones(cb.shape[0], 1, dtype=cb.dtype)], 1)
        sol = torch.linalg.lstsq(design, emb).solution  # (D + 1, dim)
        res = emb - design @ sol
        self.linear.weight.copy_(sol[:-1].T)
        self.linear.bias.copy_(sol[-1])
        if self.mlp is not None:
            first, last = self.mlp[0], self.mlp[2]
            w, b = self._random_features(scale, seed)
            h = torch.nn.functional.silu(cb @ w.T + b)  # (V, hidden)
            w2 = torch.linalg.solve(h.T @ h + ridge * torch.eye(h.shape[1], dtype=h.dtype), h.T @ res)
            first.weight.copy_(w)
            first.bias.copy_(b)
            last.weight.copy_(w2.T)
            last.bias.zero_()
        fit = self(codebook.detach().to(self.linear.weight)).double().cpu()
        return float((fit - emb).norm() / emb.norm())

    @torch.no_grad()
    def copy_linear(self, linear: nn.Linear, scale: float = 3.0, seed: int = 0) -> None:
        """``linear`` copied (a teacher that already reads D-dimensional vectors, e.g. VAR's ``word_embed``); the MLP,
        if any, starts at zero output (first layer random as in :meth:`fit`, second layer zero)."""
        self.linear.load_state_dict(linear.state_dict())
        if self.mlp is not None:
            w, b = self._random_features(scale, seed)
            self.mlp[0].weight.copy_(w)
            self.mlp[0].bias.copy_(b)
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def _random_features(self, scale: float, seed: int) -> tuple[Tensor, Tensor]:
        first = self.mlp[0]
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(first.out_features, first.in_features, generator=g, dtype=torch.float64) * scale
        return w, torch.randn(first.out_features, generator=g, dtype=torch.float64) * (scale / 2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of 1000·t: t (...) → (..., dim) float32 (MAR / DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float()).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNResBlock(nn.Module):
    """MAR ResBlock: LayerNorm → AdaLN (shift, scale) → Linear–SiLU–Linear → gated residual. x, c (..., width)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """MAR-style denoising MLP: (f (..., dim), x_t (..., D), t (...)) → u (..., D). ``f`` may have size-1 dims that
    broadcast over several noise draws. AdaLN modulations and the output layer start at zero (u = 0)."""

    def __init__(self, dim: int, d: int, width: int, depth: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(dim, width)
        self.input_proj = nn.Linear(d, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, d)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform Linear weights (MAR), zero biases, zero AdaLN modulations and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.zero_()
        for m in [blk.ada[-1] for blk in self.blocks] + [self.final_ada[-1], self.final]:
            m.weight.zero_()
            m.bias.zero_()

    def forward(self, f: Tensor, x: Tensor, t: Tensor) -> Tensor:
        c = self.cond_embed(f) + self.time_embed(timestep_embedding(t, self.freq_dim).to(f.dtype))
        h = self.input_proj(x.to(f.dtype))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.final(self.final_norm(h) * (1 + scale) + shift)


# ------------------------------------------------------------------------------------------------------------
# the bases every family's networks build on
# ------------------------------------------------------------------------------------------------------------
class DD2Network(DecodingSteps):
    """What every DD2 network shares (AR-diffusion models and generators of every family): the denoiser, the
    per-token Euler solver and the sequence properties. A family's network provides ``family``, ``starts`` (the
    teacher's decoding steps, see :mod:`~distilled_decoding.students.base`), ``config`` (with the
    :class:`DD2HeadFields` and ``num_classes``), the ``codebook`` (V, D), ``head`` (:class:`DiffusionHead`) and
    ``output`` (the copied logits head for the posterior base, or None)."""

    family: ClassVar[str]
    codebook: Tensor
    config: Any
    head: DiffusionHead
    output: nn.Module | None

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def condition(self) -> ClassCondition:
        return ClassCondition(self.num_classes)

    def denoise(self, f: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """x̂0 (..., D) float32 of noisy tokens x_t (..., D) at t (broadcastable to x_t.shape[:-1]) given features
        f (..., dim) (size-1 dims broadcast over draws): ``base − t·u`` (see the module docstring)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[:-1])
        u = self.head(f, x_t, t).float()
        base = x_t.float() if self.output is None else posterior_mean(x_t, t, self.output(f).float(), self.codebook)
        return base - t.unsqueeze(-1) * u

    def euler(self, f: Tensor, noise: Tensor, steps: int) -> Tensor:
        """Tokens of one decoding step from their noise (..., D) given their features f (..., dim): ``steps`` Euler
        steps of dx/dt = (x − x̂0)/t on the uniform grid 1 → 0 (the last lands on x̂0) → x̂0 (..., D) float32."""
        x = noise.float()
        grid = [1.0 - k / steps for k in range(steps)] + [0.0]
        for t, s in zip(grid[:-1], grid[1:]):
            x0 = self.denoise(f, x, t)
            x = x0 if s == 0.0 else x + (x0 - x) * ((t - s) / t)
        return x

    def check_sample_args(self, noise: Tensor, class_labels: Any, steps: int) -> Tensor:
        """ValueErrors naming ``steps`` / ``noise`` / ``class_labels``; returns the labels in canonical form."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: expected an integer >= 1")
        check_noise(noise, self.seq_len, int(self.config.codebook_dim))
        return self.condition.check(class_labels, noise.shape[0])


class ARDiffusionModel(DD2Network, CheckedLoading):
    """Base of the AR-diffusion models (GTS model, guidance network) of every family:
    ``model(x_prefix (B, N, D), class_labels (B,), x_t (B, N, m, D), t (B, N, m))`` → x̂0 (B, N, m, D). A family's
    class adds ``from_teacher(teacher, codebook, *, input_hidden, head_width, head_depth, head_base, seed)`` and
    ``sample(noise, class_labels, steps)`` (autoregressive, ``steps`` Euler steps per token, DD2 App. B.3)."""

    def features(self, x: Tensor, class_labels: Tensor) -> Tensor:
        """x (B, N, D) clean token vectors, class_labels (B,) → features (B, N, dim): f_i depends on the tokens of
        earlier decoding steps only."""
        raise NotImplementedError

    def forward(self, x_prefix: Tensor, class_labels: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 of x_t (B, N, m, D) at t (B, N, m) given the clean sequence x_prefix (B, N, D); the m noise draws of a
        position share one transformer pass → (B, N, m, D)."""
        return self.denoise(self.features(x_prefix, class_labels).unsqueeze(2), x_t, t)

    def replica(self) -> ARDiffusionModel:
        """A new model of the same class, config and weights (e.g. the guidance network made from the GTS model)."""
        twin = type(self)(**network_settings(self))
        twin.load_state_dict(self.state_dict())
        return twin.to(self.codebook.device)


def _article(name: str) -> str:
    return "an" if name[:1] in "AEIOU" else "a"


class OneStepGenerator(DD2Network, FewStepStudent):
    """Base of the DD2 one-step generators of every family: ``generator(noise (B, N, D), class_labels (B,))`` →
    continuous x (B, N, D) float32 (differentiable, for training). As a student (pipeline, samplers) it has no logits
    head: :meth:`predict` returns the nearest codes of x, from pure noise only (t = 0); ``sample(noise, labels)`` →
    (codes, tokens). A family's class adds ``noise_features`` and :meth:`load_ar_diffusion`."""

    method_name = "DD2"

    @classmethod
    def from_ar_diffusion(cls, model: ARDiffusionModel, **settings: Any) -> OneStepGenerator:
        """A generator with ``model``'s weights (the family's AR-diffusion model, e.g. the GTS model);
        ``settings``: ``noise_scale`` / ``generator_t``."""
        want = get_family(cls.family).dd2_model_class
        if not isinstance(model, want):
            raise TypeError(f"model: expected {_article(want.__name__)} {want.__name__} (the GTS model), got "
                            f"{type(model).__name__}")  # fmt: skip
        unknown = sorted(set(settings) - {"noise_scale", "generator_t"})
        if unknown:
            raise ValueError(f"unknown generator setting(s) {unknown}; expected noise_scale, generator_t")
        gen = cls(**network_settings(model), **settings)
        gen.load_ar_diffusion(model)
        return gen.to(model.codebook.device)

    def load_ar_diffusion(self, model: ARDiffusionModel) -> None:
        """Take ``model``'s weights (same config): by default its state dict as is."""
        self.load_state_dict(model.state_dict())

    def default_noise_scale(self) -> float:
        """The scale of the transformer's noise input when ``noise_scale`` is None."""
        raise NotImplementedError

    def noise_features(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        """Scaled noise (B, N, D), class_labels (B,) → features (B, N, dim) of the generator's transformer."""
        raise NotImplementedError

    @property
    def split_position(self) -> int:
        """Every position's vector is the code of its token (the nearest code of the generated vector)."""
        return self.seq_len

    def forward(self, noise: Tensor, class_labels: Tensor) -> Tensor:
        """noise (B, N, D), class_labels (B,) → x (B, N, D) float32: continuous, differentiable (training)."""
        s = self.config.noise_scale
        s = self.default_noise_scale() if s is None else float(s)
        noise = noise.to(self.codebook.dtype)
        return self.denoise(self.noise_features(noise * s, class_labels), noise, float(self.config.generator_t))

    @torch.no_grad()
    def predict(self, x_t: Tensor, condition: Any, t: Tensor) -> tuple[Tensor, Tensor]:
        """The student step (see :meth:`FewStepStudent.predict`): only from pure noise (t = 0); tokens are the
        nearest codes of the generated vectors → (their codes (B, N, D), tokens (B, N))."""
        if bool((t != 0).any()):
            raise ValueError(f"t: a DD2 generator samples from pure noise only (t = 0), got {t.tolist()}")
        tokens = nearest_codes(self(x_t, condition), self.codebook)
        return self.codebook[tokens], tokens


def check_made_from(model: Any, teacher: Any, codebook: Tensor, what: str) -> None:
    """ValueError when ``teacher`` (with ``codebook``) is not the teacher ``model`` was initialised from (the weights
    sha256 in its config)."""
    want = model.config.teacher_sha256
    got = teacher_fingerprint(teacher, codebook)["weights_sha256"]
    if want and want != got:
        raise ValueError(
            f"teacher: its weights (sha256 {got[:12]}) are not those of the teacher the {what} was initialised from "
            f"(sha256 {want[:12]})"
        )
