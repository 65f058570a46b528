"""Distilled Decoding students: one forward pass from a noise sequence to the teacher's token sequence.

:class:`DDStudent` is the LlamaGen flavour (``microsoft/distilled_decoding`` ``LlamaGen/autoregressive/models/dd.py``
``DDTransformer``; module names and keys are the official ones, so released DD checkpoints load with
:meth:`DDStudent.from_official`):

* the teacher's backbone (RMSNorm, SwiGLU, 2-D RoPE), class table, final norm and logits head, copied by
  :meth:`DDStudent.from_teacher`;
* new: ``tok_embeddings = Linear(D, dim)`` reading D-dimensional noise/data vectors, the 2-entry
  ``n_d_embed`` indicator (1 for the class token and the first ``t`` positions, which hold data; 0 for noise),
  and ``final_layer_conti`` (class-modulated LayerNorm → Linear(dim, D)), the continuous head;
* causal attention over ``[class, x_1..x_N]``; outputs are *not* shifted: position i reads its own noise and
  everything before it, exactly the dependency of the flow-map trajectories.

Timestep ``t`` = number of leading positions that are data (t = 0: pure noise). Predictions are mixed as in the
official release: positions < t copy the input, positions < ``split`` take the codebook vector of the argmax
token, later positions the continuous head's vector.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import load_state_dict_file, load_strict
from distilled_decoding.teachers.llamagen import (
    LlamaGen,
    LlamaGenConfig,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)

__all__ = ["DDStudent", "FinalLayer", "perturb", "nearest_codes", "student_from_teacher"]


def perturb(x: Tensor, n_data: Tensor, noise: Tensor) -> Tensor:
    """The trajectory point: keep the first ``n_data`` positions of x (data), reset the rest to the original
    noise. x, noise (B, N, D); n_data (B,) long → (B, N, D)."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < n_data[:, None]
    return torch.where(keep[..., None], x, noise)


def student_from_teacher(teacher: Any, codebook: Tensor, **kwargs: Any) -> nn.Module:
    """The student flavour for ``teacher`` (LlamaGen → :class:`DDStudent`), initialised from it."""
    if isinstance(teacher, LlamaGen):
        return DDStudent.from_teacher(teacher, codebook, **kwargs)
    raise ValueError(f"teacher: no student flavour for {type(teacher).__name__}; expected a LlamaGen or VAR teacher")


def nearest_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector. x (..., D), codebook (V, D) → long (...)."""
    d = (x.float().unsqueeze(-2) - codebook.float()).square().sum(-1)
    return d.argmin(-1)


class FinalLayer(nn.Module):
    """PixArt-style final layer: LayerNorm (no affine) modulated by the class embedding, then Linear(dim, D)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (B, S, dim), cond (B, 1, dim) → (B, S, out_dim)."""
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class LabelTable(nn.Module):
    """The class table (``cls_embedding.embedding_table``, num_classes + 1 rows as in the official student)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class DDStudent(ModelMixin, ConfigMixin):
    """LlamaGen DD student. ``student(x, class_labels, t)`` → (logits (B, N, V) fp32, vectors (B, N, D) fp32).

    Config: the teacher's backbone fields (official ModelArgs names), ``codebook_dim`` D, ``split`` (positions
    < split are read from the logits head, the rest from the continuous head) and ``timesteps`` (the
    training/sampling schedule, e.g. (0, 80): 1-step sampling uses t=0, 2-step uses both).
    The (V, D) codebook is a buffer of the student, so a saved student is self-contained.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_kv_head: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000,
        norm_eps: float = 1e-5,
        num_classes: int = 1000,
        vocab_size: int = 16384,
        block_size: int = 256,
        codebook_dim: int = 8,
        split: int = 80,
        timesteps: Sequence[int] = (0, 80),
    ):
        super().__init__()
        cfg = LlamaGenConfig(
            dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, multiple_of=multiple_of,
            ffn_dim_multiplier=ffn_dim_multiplier, rope_base=rope_base, norm_eps=norm_eps, num_classes=num_classes,
            vocab_size=vocab_size, block_size=block_size, token_dropout_p=0.0, resid_dropout_p=0.0,
            ffn_dropout_p=0.0, class_dropout_prob=0.0,
        )  # fmt: skip
        if not 0 <= split <= block_size:
            raise ValueError(f"split={split}: expected 0 <= split <= block_size={block_size}")
        ts = list(timesteps)
        if not ts or ts[0] != 0 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[-1] >= block_size:
            raise ValueError(f"timesteps={ts}: expected increasing ints starting at 0, each < block_size={block_size}")
        if codebook_dim < 1:
            raise ValueError(f"codebook_dim={codebook_dim}: expected a positive integer")
        self.args = cfg
        self.cls_embedding = LabelTable(num_classes, dim)
        self.tok_embeddings = nn.Linear(codebook_dim, dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, 0.0) for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.final_layer_conti = FinalLayer(dim, codebook_dim)
        self.n_d_embed = nn.Embedding(2, dim)
        self.register_buffer("codebook", torch.zeros(vocab_size, codebook_dim))
        self._freqs: Tensor | None = None
        if not self.output.weight.is_meta:
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_teacher(
        cls,
        teacher: LlamaGen,
        codebook: Tensor,
        split: int | None = None,
        timesteps: Sequence[int] | None = None,
        init_input: str = "lstsq",
    ) -> DDStudent:
        """A student initialised from ``teacher`` (class table, all layers, norm, logits head copied) for the
        tokenizer ``codebook`` (V, D). Defaults: ``timesteps=(0, round(0.3125 N))`` (80 of 256, the official
        LlamaGen schedule) and ``split`` = the second timestep.

        ``init_input="lstsq"`` initialises the new ``Linear(D, dim)`` input by least squares so that it maps each
        codebook vector as close as possible to the teacher's embedding of that token (DD2's continuous-input
        adaptation, closed form); ``"random"`` keeps N(0, 0.02) as the official code.
        """
        a = teacher.args
        if codebook.ndim != 2 or codebook.shape[0] != a.vocab_size:
            raise ValueError(f"codebook: expected ({a.vocab_size}, D) for this teacher, got {tuple(codebook.shape)}")
        n = a.block_size
        timesteps = list(timesteps) if timesteps is not None else [0, round(n * 80 / 256)]
        split = timesteps[-1] if split is None else split
        student = cls(
            dim=a.dim, n_layer=a.n_layer, n_head=a.n_head, n_kv_head=a.n_kv_head, multiple_of=a.multiple_of,
            ffn_dim_multiplier=a.ffn_dim_multiplier, rope_base=a.rope_base, norm_eps=a.norm_eps,
            num_classes=a.num_classes, vocab_size=a.vocab_size, block_size=n, codebook_dim=int(codebook.shape[1]),
            split=split, timesteps=tuple(timesteps),
        )  # fmt: skip
        student.to(device=teacher.output.weight.device)
        with torch.no_grad():
            table = teacher.cls_embedding.embedding_table.weight
            student.cls_embedding.embedding_table.weight[: table.shape[0]].copy_(table)
            student.layers.load_state_dict(teacher.layers.state_dict())
            student.norm.load_state_dict(teacher.norm.state_dict())
            student.output.load_state_dict(teacher.output.state_dict())
            student.codebook.copy_(codebook)
            if init_input == "lstsq":
                emb = teacher.tok_embeddings.weight.float()
                design = torch.cat([codebook.float(), torch.ones(codebook.shape[0], 1, device=codebook.device)], 1)
                sol = torch.linalg.lstsq(design.cpu(), emb.cpu()).solution.to(emb.device)  # (D + 1, dim)
                student.tok_embeddings.weight.copy_(sol[:-1].T)
                student.tok_embeddings.bias.copy_(sol[-1])
            elif init_input != "random":
                raise ValueError(f"init_input={init_input!r}: expected 'lstsq' or 'random'")
        return student

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        codebook: Tensor,
        teacher_preset: str = "GPT-B",
        split: int = 80,
        timesteps: Sequence[int] = (0, 80),
        *,
        key: str | None = "ema",
        **config: Any,
    ) -> DDStudent:
        """Load a released DD LlamaGen checkpoint (``LlamaGen-DD/llamagen-B.pt``: ``{"ema": state_dict}``).
        ``codebook`` is the tokenizer's (l2-normalised) codebook; ``split`` 80 (B) or 130 (L) as in the release."""
        from distilled_decoding.teachers.llamagen import LLAMAGEN_PRESETS

        sd = load_state_dict_file(path, key=key)
        base = dict(LLAMAGEN_PRESETS[teacher_preset])
        emb = sd.get("tok_embeddings.weight")
        cfg = {**base, "codebook_dim": int(emb.shape[1]) if emb is not None else 8, "split": split,
               "timesteps": tuple(timesteps), **config}  # fmt: skip
        with torch.device("meta"):
            student = cls(**cfg)
        sd = {**sd, "codebook": codebook.float()}
        load_strict(student, sd, source=str(Path(path)), what=f"DD LlamaGen student ({teacher_preset})",
                    ignore=("freqs_cis",), assign=True)  # fmt: skip
        return student.eval()

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def freqs_cis(self) -> Tensor:
        device = self.output.weight.device
        if self._freqs is None or self._freqs.device != device:
            a = self.args
            self._freqs = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, 1).to(device)
        return self._freqs

    @property
    def seq_len(self) -> int:
        return self.args.block_size

    @property
    def num_classes(self) -> int:
        return self.args.num_classes

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    def data_positions(self, t: Tensor) -> Tensor:
        """Number of leading data positions at timestep t (B,): for LlamaGen the timestep counts tokens."""
        return t

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, class_labels: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, D) noise/data vectors, class_labels (B,) long, t (B,) long (leading data positions)
        → logits (B, N, V) float32 and continuous vectors (B, N, D) float32 (raw heads, no mixing)."""
        b, n, _ = x.shape
        cond = self.cls_embedding(class_labels)
        flags = (torch.arange(n + 1, device=x.device)[None, :] <= t[:, None]).long()
        h = torch.cat([cond, self.tok_embeddings(x.to(self.tok_embeddings.weight.dtype))], dim=1)
        h = h + self.n_d_embed(flags)
        freqs = self.freqs_cis[: n + 1]
        for layer in self.layers:
            h = layer(h, freqs)
        logits = self.output(self.norm(h[:, 1:])).float()
        vectors = self.final_layer_conti(h, cond)[:, 1:].float()
        return logits, vectors

    def check_inputs(self, noise: Tensor, class_labels: Tensor) -> None:
        """ValueErrors naming the argument for noise that is not (B, N, D) float and bad class ids."""
        n, d = self.seq_len, self.config.codebook_dim
        if not isinstance(noise, Tensor) or noise.ndim != 3 or tuple(noise.shape[1:]) != (n, d):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise: expected shape (B, {n}, {d}) = (B, N, D), got {got}")
        if not noise.dtype.is_floating_point:
            raise ValueError(f"noise: expected a floating dtype (standard normal values), got {noise.dtype}")
        b = noise.shape[0]
        if not isinstance(class_labels, Tensor) or class_labels.shape != (b,) or class_labels.dtype.is_floating_point:
            got = tuple(class_labels.shape) if isinstance(class_labels, Tensor) else type(class_labels).__name__
            raise ValueError(f"class_labels: expected a ({b},) integer tensor (one per noise row), got {got}")
        if b and (int(class_labels.min()) < 0 or int(class_labels.max()) >= self.num_classes):
            raise ValueError(
                f"class_labels: class ids must lie in [0, {self.num_classes}); got min {int(class_labels.min())}, "
                f"max {int(class_labels.max())}"
            )

    @torch.no_grad()
    def predict(self, x_t: Tensor, class_labels: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One DD step from the trajectory point x_t (B, N, D) at t (B,) → (mixed vectors (B, N, D), tokens (B, N)).

        Positions < t are copied from the input (tokens = their nearest codes); positions in [t, split) become
        the codebook vector of the argmax token; positions ≥ split take the continuous head's vector (their
        token is still the argmax)."""
        logits, cont = self(x_t, class_labels, t)
        tokens = logits.argmax(-1)
        pos = torch.arange(x_t.shape[1], device=x_t.device)[None, :]
        known = pos < self.data_positions(t)[:, None]
        tokens = torch.where(known, nearest_codes(x_t, self.codebook), tokens)
        quant = self.codebook[tokens]
        cont = torch.where(known[..., None], x_t.to(quant.dtype), cont.to(quant.dtype))
        return torch.where((pos < self.config.split)[..., None], quant, cont), tokens

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor, timesteps: Sequence[int] = (0,)) -> tuple[Tensor, Tensor]:
        """Few-step sampling: for each t in ``timesteps`` re-noise positions ≥ t with the *same* noise and run one
        step. noise (B, N, D) → (vectors (B, N, D), tokens (B, N))."""
        self.check_inputs(noise, class_labels)
        noise = noise.to(self.codebook.dtype)
        x, tokens = noise, None
        for step in timesteps:
            t = torch.full((noise.shape[0],), int(step), dtype=torch.long, device=noise.device)
            x, tokens = self.predict(perturb(x, self.data_positions(t), noise), class_labels, t)
        return x, tokens

    # -- training -------------------------------------------------------------------------------------------------
    def loss(
        self,
        noise: Tensor,
        tokens: Tensor,
        class_labels: Tensor,
        t: Tensor,
        *,
        cont_weight: float = 1.0,
        ce_weight: float = 1.0,
        forward: Any = None,
    ) -> dict[str, Tensor]:
        """Distillation losses for pairs (noise (B, N, D), tokens (B, N)) at timesteps t (B,).

        The input X_t is assembled on the fly: codebook vectors of the first t tokens, original noise after.
        ``ce``: cross-entropy of the logits head at every noise position (≥ t) against the teacher's tokens;
        ``mse``: codebook-space squared error of the continuous head at noise positions ≥ split (mean over D);
        both averaged per sample first, then over the batch (so a batch split across processes gives the same
        loss). ``total`` = ce_weight·ce + cont_weight·mse. ``logits`` / ``vectors`` are the raw head outputs
        (for extra terms such as an image-space loss). ``forward`` replaces ``self`` for the network call (a
        DistributedDataParallel wrapper of this module).
        """
        data = self.codebook[tokens]
        n_data = self.data_positions(t)
        x_t = perturb(data, n_data, noise.to(data.dtype))
        logits, cont = (forward or self)(x_t, class_labels, t)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        noisy = (pos >= n_data[:, None]).float()
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        ce = ((ce * noisy).sum(1) / noisy.sum(1).clamp_min(1)).mean()
        late = noisy * (pos >= self.config.split).float()
        mse = (((cont - data.float()).square().mean(-1) * late).sum(1) / late.sum(1).clamp_min(1)).mean()
        total = ce_weight * ce + cont_weight * mse
        return {"ce": ce, "mse": mse, "total": total, "logits": logits, "vectors": cont}
