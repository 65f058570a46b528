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

:class:`DDVARStudent` is the VAR flavour (``VAR/models/dd.py`` ``DD_Model``, official keys, :meth:`DDVARStudent.
from_official` for ``VAR-DD/var-d{16,20,24}.pth``): the teacher's VAR with an extra 1×1 level in front, every token
reading its own noise/data vector through the teacher's ``word_embed``, a scale-block mask (a token sees the class,
the earlier scales and itself), the indicator added at the input and layer-wise inside the blocks. Its timestep and
``split`` count *scales*; :meth:`DDVARStudent.data_positions` turns them into token counts. Both flavours share the
interface used by training and the pipeline: ``forward(x, labels, t) -> (logits, vectors)``, ``data_positions``,
``predict``, ``sample``, ``loss(..., forward=)``, ``check_inputs``, ``seq_len``, ``num_classes``, the ``codebook``
buffer and the config fields ``timesteps``, ``split``, ``codebook_dim``, ``vocab_size``.
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

from distilled_decoding.checkpoints import CheckpointError, load_state_dict_file, load_strict
from distilled_decoding.teachers.llamagen import (
    LlamaGen,
    LlamaGenConfig,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)
from distilled_decoding.teachers.var import VAR, _AdaLNBeforeHead, _AdaLNSelfAttn, _SharedAdaLin
from distilled_decoding.teachers.var import _validate as _validate_var
from distilled_decoding.tokenizers.msvq import PATCH_NUMS_256

__all__ = [
    "DDStudent",
    "DDVARStudent",
    "FinalLayer",
    "perturb",
    "nearest_codes",
    "student_from_teacher",
    "default_var_timesteps",
    "DD_VAR_TIMESTEPS",
]


def perturb(x: Tensor, n_data: Tensor, noise: Tensor) -> Tensor:
    """The trajectory point: keep the first ``n_data`` positions of x (data), reset the rest to the original
    noise. x, noise (B, N, D); n_data (B,) long → (B, N, D)."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < n_data[:, None]
    return torch.where(keep[..., None], x, noise)


def student_from_teacher(teacher: Any, codebook: Tensor, **kwargs: Any) -> nn.Module:
    """The student flavour for ``teacher`` (LlamaGen → :class:`DDStudent`, VAR → :class:`DDVARStudent`),
    initialised from it."""
    if not isinstance(codebook, Tensor) or codebook.ndim != 2 or not codebook.dtype.is_floating_point:
        got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
        raise ValueError(f"codebook: expected a (V, D) float tensor, got {got}")
    if isinstance(teacher, LlamaGen):
        return DDStudent.from_teacher(teacher, codebook, **kwargs)
    if isinstance(teacher, VAR):
        return DDVARStudent.from_teacher(teacher, codebook, **kwargs)
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


class _FewStepMixin:
    """Sampling and distillation losses shared by both student flavours. Needs ``check_inputs``,
    ``data_positions`` (timesteps → number of leading data positions), ``predict``, ``codebook`` and
    ``split_position`` (first position read from the continuous head)."""

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor, timesteps: Sequence[int] = (0,)) -> tuple[Tensor, Tensor]:
        """Few-step sampling (official ``sample.py``): for each t in ``timesteps`` re-noise the positions after
        the first t (LlamaGen: tokens; VAR: scales) with the *same* noise and run one step.
        noise (B, N, D) → (vectors (B, N, D), tokens (B, N))."""
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
        """Distillation losses for pairs (noise (B, N, D), tokens (B, N)) at timesteps t (B,) (the first
        ``data_positions(t)`` positions are data).

        The input X_t is assembled on the fly: codebook vectors of the data positions, original noise after.
        ``ce``: cross-entropy of the logits head at every noise position (≥ t) against the teacher's tokens;
        ``mse``: codebook-space squared error of the continuous head at noise positions ≥ ``split_position``;
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
        late = noisy * (pos >= self.split_position).float()
        mse = (((cont - data.float()).square().mean(-1) * late).sum(1) / late.sum(1).clamp_min(1)).mean()
        total = ce_weight * ce + cont_weight * mse
        return {"ce": ce, "mse": mse, "total": total, "logits": logits, "vectors": cont}


class DDStudent(_FewStepMixin, ModelMixin, ConfigMixin):
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
        ts = list(timesteps)
        if not ts or ts[0] != 0 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[-1] >= block_size:
            raise ValueError(f"timesteps={ts}: expected increasing ints starting at 0, each < block_size={block_size}")
        if not 0 <= split <= block_size:
            raise ValueError(f"split={split}: expected 0 <= split <= block_size={block_size}")
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
        if not isinstance(teacher, LlamaGen):
            raise TypeError(f"teacher: expected a LlamaGen teacher, got {type(teacher).__name__}")
        if not isinstance(codebook, Tensor):
            raise TypeError(f"codebook: expected a (V, D) tensor, got {type(codebook).__name__}")
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

    @property
    def split_position(self) -> int:
        """First position read from the continuous head (``config.split``: LlamaGen counts tokens)."""
        return self.config.split

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
        return torch.where((pos < self.split_position)[..., None], quant, cont), tokens


# ----------------------------------------------------------------------------------------------------------
# VAR flavour
# ----------------------------------------------------------------------------------------------------------
#: timesteps (in scales) of the released DD-VAR students, by teacher depth (``VAR/README.md`` commands; split = t2)
DD_VAR_TIMESTEPS: dict[int, tuple[int, int]] = {16: (0, 5), 20: (0, 4), 24: (0, 4)}

_VAR_FIELDS = ("num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate",
               "drop_path_rate", "norm_eps", "shared_aln", "attn_l2_norm", "patch_nums", "vocab_size")  # fmt: skip


def default_var_timesteps(num_scales: int, depth: int | None = None) -> tuple[int, int]:
    """The 2-step schedule (0, t2) in scales: the released one for the 256px d16/d20/d24 teachers (t2 = 5, 4, 4),
    else (0, S // 2) (= (0, 5) for 10 scales)."""
    if num_scales == 10 and depth in DD_VAR_TIMESTEPS:
        return DD_VAR_TIMESTEPS[depth]
    return (0, num_scales // 2)


class _DDVARBlock(_AdaLNSelfAttn):
    """VAR's AdaLN block with Distilled Decoding's indicator term added to the residual stream between attention and
    FFN (official ``basic_var.AdaLNSelfAttn.forward(..., n_d_emb)``). Keys are the teacher block's."""

    def forward(self, x: Tensor, mod: Tensor, attn_bias: Tensor | None, n_d: Tensor | None = None) -> Tensor:  # type: ignore[override]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias)
        x = x + self.drop_path(h.mul_(gamma1))
        if n_d is not None:
            x = x + n_d
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))


class DDVARStudent(_FewStepMixin, ModelMixin, ConfigMixin):
    """VAR DD student (official ``VAR/models/dd.py`` ``DD_Model``; the state-dict keys are the official ones, so the
    released ``VAR-DD/var-d{16,20,24}.pth`` load with :meth:`from_official`).

    ``student(x, class_labels, t)`` → (logits (B, N, V) fp32, vectors (B, N, D) fp32), N = Σ pn² tokens of the
    teacher's scales, D = Cvae. Layout: the teacher's VAR with one extra level in front, ``(1,) + patch_nums``, so
    the sequence has L = 1 + N positions: position 0 = class token (+ ``pos_start``), positions 1..N = each token's
    own noise/data vector through ``word_embed``. ``lvl_embed`` / ``pos_1LC`` are the teacher's shifted by one level /
    one position (:meth:`from_teacher`): a token of scale s sits where the teacher *predicts* scale s, and the teacher's
    head there is reused. Attention is block-causal by scale and excludes the token's own scale except itself: token
    i sees the class, every token of earlier scales and its own vector — the dependency of the flow-map trajectories.

    Timestep t (B,) = number of completed scales (0 .. S−1): :meth:`data_positions` = Σ_{s<t} pn_s² tokens are data
    (codebook vectors), the rest noise. The indicator ``n_d_embed`` (1 for the class and data positions) is added at
    the input and, through ``layerwise_n_d_embed`` (Linear(C, C) × (depth + 1)), inside every block and before the
    heads; it is the only timestep signal. Heads: the teacher's logits head (AdaLN ``head_nm`` + ``head``) and the
    continuous ``final_layer_conti`` (class-modulated LayerNorm → Linear(C, D)).

    Config: the teacher's fields (official ``VAR`` names; ``codebook_dim`` = Cvae), ``layerwise_n_d`` (the official
    ``layerwise_n_d_embed`` flag), ``timesteps`` (in scales, e.g. (0, 5)) and ``split`` (in scales: tokens of the
    first ``split`` scales are read from the logits head, the rest from the continuous head; official
    ``loss_split_t``). The (V, D) codebook is a buffer, so a saved student is self-contained.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1 * 16 / 24,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
        vocab_size: int = 4096,
        codebook_dim: int = 32,
        layerwise_n_d: bool = True,
        split: int = 5,
        timesteps: Sequence[int] = (0, 5),
    ):
        super().__init__()
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"codebook_dim={codebook_dim!r}: expected a positive int (the VAE's Cvae)")
        local = dict(locals())
        cfg = _validate_var({**{k: local[k] for k in _VAR_FIELDS}, "Cvae": codebook_dim, "cond_drop_rate": 0.0,
                             "vae_config": None})  # fmt: skip
        self.patch_nums: tuple[int, ...] = cfg["patch_nums"]
        n_scales = len(self.patch_nums)
        if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= n_scales:
            raise ValueError(f"split={split!r}: expected a number of scales in [0, {n_scales}] (len(patch_nums))")
        ts = list(timesteps)
        if (
            not ts
            or ts[0] != 0
            or any(isinstance(v, bool) or not isinstance(v, int) for v in ts)
            or any(b <= a for a, b in zip(ts, ts[1:]))
            or ts[-1] >= n_scales
        ):
            raise ValueError(
                f"timesteps={ts}: expected increasing numbers of completed scales starting at 0, each < "
                f"{n_scales} (len(patch_nums))"
            )
        c = self.C = self.D = cfg["embed_dim"]
        self.depth, self.V, self.Cvae = cfg["depth"], cfg["vocab_size"], codebook_dim
        ends = [0]
        for pn in self.patch_nums:
            ends.append(ends[-1] + pn * pn)
        self._starts = ends  # data positions after t completed scales, t = 0..S
        self._starts_t: dict[torch.device, Tensor] = {}
        self.L = 1 + ends[-1]  # class token + tokens

        self.word_embed = nn.Linear(codebook_dim, c)
        self.class_emb = nn.Embedding(cfg["num_classes"] + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, c))
        self.lvl_embed = nn.Embedding(n_scales + 1, c)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), _SharedAdaLin(c, 6 * c)) if cfg["shared_aln"] else nn.Identity()
        )
        dpr = torch.linspace(0, cfg["drop_path_rate"], self.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(_DDVARBlock(cfg, dpr[i]) for i in range(self.depth))
        lvl = torch.tensor([0] + [s + 1 for s, pn in enumerate(self.patch_nums) for _ in range(pn * pn)])
        self.register_buffer("lvl_1L", lvl[None].contiguous())
        self.register_buffer("attn_bias_for_masking", _dd_var_mask(lvl))
        self.head_nm = _AdaLNBeforeHead(c, c, cfg["norm_eps"])
        self.head = nn.Linear(c, self.V)
        self.n_d_embed = nn.Embedding(2, c)
        self.layerwise_n_d_embed = (
            nn.ModuleList(nn.Linear(c, c) for _ in range(self.depth + 1)) if layerwise_n_d else None
        )
        self.final_layer_conti = FinalLayer(c, codebook_dim)
        self.register_buffer("codebook", torch.zeros(self.V, codebook_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """Official initialisation (``build_vae_dd``: VAR ``init_weights`` over the whole DD model, then the indicator
        embedding trunc-normal(0.02) as ``init_with_teacher``). No-op on the meta device."""
        if self.head.weight.is_meta:
            return
        std = (1 / self.C / 3) ** 0.5
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, mean=0, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for blk in self.blocks:
            blk.attn.proj.weight.div_((2 * self.depth) ** 0.5)
            blk.ffn.fc2.weight.div_((2 * self.depth) ** 0.5)
            if blk.shared_aln:
                blk.ada_gss[:, :, 2:].mul_(init_adaln)
                blk.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                blk.ada_lin[-1].weight[2 * self.C :].mul_(init_adaln)
                blk.ada_lin[-1].weight[: 2 * self.C].mul_(init_adaln_gamma)
        nn.init.trunc_normal_(self.n_d_embed.weight, mean=0, std=0.02)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str | int, **overrides: Any) -> DDVARStudent:
        """The student of a released VAR size (``"d16"``, ``"d20"``, ... or the depth), official init, with the
        released schedule (:func:`default_var_timesteps`); ``overrides`` are config fields."""
        from distilled_decoding.teachers.var import VAR_PRESETS

        name = f"d{preset}" if isinstance(preset, int) and not isinstance(preset, bool) else preset
        if name not in VAR_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(VAR_PRESETS)} (or the depth as an int)")
        base = {k: v for k, v in VAR_PRESETS[name].items() if k in _VAR_FIELDS}
        ts = default_var_timesteps(len(base["patch_nums"]), base["depth"])
        return cls(**{**base, "timesteps": ts, "split": ts[-1], **overrides})

    @classmethod
    def from_teacher(
        cls,
        teacher: VAR,
        codebook: Tensor,
        split: int | None = None,
        timesteps: Sequence[int] | None = None,
        init_input: str = "copy",
    ) -> DDVARStudent:
        """A student initialised from the VAR ``teacher`` as the official ``init_with_teacher``: ``word_embed``,
        ``class_emb``, ``pos_start``, all blocks, ``shared_ada_lin``, ``head_nm`` and ``head`` copied;
        ``lvl_embed`` / ``pos_1LC`` copied with teacher level / position 0 → 0 and 1.. → 2..; the new level-1 row
        and position-1 row, ``n_d_embed``, the layer-wise projections and ``final_layer_conti`` are new (the
        release's re-initialisation of ``class_emb`` row 1, a typo for ``lvl_embed`` row 1, is not reproduced).

        ``codebook`` (V, Cvae): the VAE's raw codebook. Defaults: ``timesteps`` :func:`default_var_timesteps`
        ((0, 5) for d16, (0, 4) for d20/d24, (0, S // 2) otherwise), ``split`` = the last timestep.
        ``init_input``: ``"copy"`` (default) or ``"lstsq"`` copy the teacher's ``word_embed`` — it already reads
        Cvae vectors, so the least-squares fit of DDStudent is exactly this copy; ``"random"`` keeps a fresh init.
        """
        from distilled_decoding.teachers.var import VAR

        if not isinstance(teacher, VAR):
            raise ValueError(f"teacher: expected a VAR, got {type(teacher).__name__}")
        if not isinstance(codebook, Tensor) or tuple(codebook.shape) != (teacher.V, teacher.Cvae):
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ValueError(f"codebook: expected ({teacher.V}, {teacher.Cvae}) for this teacher, got {got}")
        if init_input not in ("copy", "lstsq", "random"):
            raise ValueError(f"init_input={init_input!r}: expected 'copy', 'lstsq' or 'random'")
        tc = teacher.config
        timesteps = tuple(timesteps) if timesteps is not None else default_var_timesteps(teacher.num_scales, tc.depth)
        split = timesteps[-1] if split is None else split
        student = cls(**{k: tc[k] for k in _VAR_FIELDS}, codebook_dim=teacher.Cvae, split=split,
                      timesteps=timesteps)  # fmt: skip
        student.to(device=teacher.head.weight.device)
        with torch.no_grad():
            if init_input != "random":
                student.word_embed.load_state_dict(teacher.word_embed.state_dict())
            student.class_emb.load_state_dict(teacher.class_emb.state_dict())
            student.pos_start.copy_(teacher.pos_start)
            student.lvl_embed.weight[0].copy_(teacher.lvl_embed.weight[0])
            student.lvl_embed.weight[2:].copy_(teacher.lvl_embed.weight[1:])
            student.pos_1LC[:, 0].copy_(teacher.pos_1LC[:, 0])
            student.pos_1LC[:, 2:].copy_(teacher.pos_1LC[:, 1:])
            nn.init.trunc_normal_(student.lvl_embed.weight[1], mean=0, std=0.02)
            nn.init.trunc_normal_(student.pos_1LC[:, 1], mean=0, std=0.02)
            student.blocks.load_state_dict(teacher.blocks.state_dict())  # the same block modules and keys
            student.shared_ada_lin.load_state_dict(teacher.shared_ada_lin.state_dict())
            student.head_nm.load_state_dict(teacher.head_nm.state_dict())
            student.head.load_state_dict(teacher.head.state_dict())
            student.codebook.copy_(codebook)
        return student

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        codebook: Any,
        depth: int | None = None,
        split: int | None = None,
        timesteps: Sequence[int] | None = None,
        *,
        key: str | None = None,
        **config: Any,
    ) -> DDVARStudent:
        """Load a released DD-VAR checkpoint (``VAR-DD/var-d16.pth``: ``{"trainer": {"ema_parameters": sd,
        "var_wo_ddp": sd, ...}}``; the EMA weights by default as the official ``--ema``, ``key="var_wo_ddp"`` for the
        raw ones; a raw state dict or ``.safetensors`` also works).

        ``codebook``: the VAE's (V, Cvae) codebook, or the :class:`MultiScaleVQVAE` itself. ``depth`` selects the
        ``build_vae_dd`` recipe (read from the file when None); the vocabulary, Cvae, classes, attention variant and
        the 256px/512px ``patch_nums`` (from L − 1) are read from the tensors; ``config`` fields win (e.g. the sizes
        of a small model, ``patch_nums``). Defaults: ``timesteps`` :func:`default_var_timesteps`, ``split`` = the
        last timestep (official ``loss_split_t`` 5 for d16, 4 for d20/d24). Buffers the file lacks (an EMA dict of
        parameters only) are computed.
        """
        from distilled_decoding.teachers.var import _FIELDS as VAR_FIELDS
        from distilled_decoding.teachers.var import official_var_config

        path = Path(path)
        sd = _read_dd_var_state(path, key)
        cb = codebook.codebook if hasattr(codebook, "codebook") and not isinstance(codebook, Tensor) else codebook
        if not isinstance(cb, Tensor) or cb.ndim != 2:
            got = type(codebook).__name__
            raise ValueError(f"codebook: expected a (V, Cvae) tensor or a MultiScaleVQVAE, got {got}")
        unknown = sorted(set(config) - set(_VAR_FIELDS) - {"codebook_dim", "layerwise_n_d"})
        if unknown:
            raise ValueError(f"unknown DDVARStudent config field(s) {unknown}; valid: {sorted(_VAR_FIELDS)}")
        pos = sd.get("pos_1LC")
        if pos is None or pos.ndim != 3 or "head.weight" not in sd:
            raise CheckpointError(f"{path}: not a DD-VAR state dict (no pos_1LC / head.weight)")
        view = {**sd, "pos_1LC": torch.empty(1, pos.shape[1] - 1, pos.shape[2], device="meta")}
        over = {k: v for k, v in config.items() if k in VAR_FIELDS}
        var_cfg = official_var_config(view, depth=depth, filename=path.name, **over)
        cfg = {k: var_cfg[k] for k in _VAR_FIELDS}
        cfg["codebook_dim"] = int(config.get("codebook_dim", var_cfg["Cvae"]))
        cfg["layerwise_n_d"] = bool(config.get("layerwise_n_d", "layerwise_n_d_embed.0.weight" in sd))
        ts = tuple(timesteps) if timesteps is not None else default_var_timesteps(len(cfg["patch_nums"]), cfg["depth"])
        cfg["timesteps"], cfg["split"] = ts, ts[-1] if split is None else split
        if tuple(cb.shape) != (cfg["vocab_size"], cfg["codebook_dim"]):
            raise ValueError(
                f"codebook: expected ({cfg['vocab_size']}, {cfg['codebook_dim']}) for {path.name}, "
                f"got {tuple(cb.shape)}"
            )
        with torch.device("meta"):
            student = cls(**cfg)
        lvl = torch.tensor([0] + [s + 1 for s, pn in enumerate(cfg["patch_nums"]) for _ in range(pn * pn)])
        derived = {"lvl_1L": lvl[None], "attn_bias_for_masking": _dd_var_mask(lvl)}
        derived.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(var_cfg["embed_dim"]) for i in range(cfg["depth"])})
        sd = {**derived, **sd, "codebook": cb.detach().float().cpu()}
        what = (f"DD-VAR student (depth {cfg['depth']}, embed_dim {var_cfg['embed_dim']}, {cfg['num_heads']} heads, "
                f"vocab {cfg['vocab_size']}, patch_nums {tuple(cfg['patch_nums'])})")  # fmt: skip
        load_strict(student, sd, source=str(path), what=what, assign=True)
        return student.eval()

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """N = Σ pn² tokens (680 for the 256px schedule); the network's sequence is N + 1 with the class token."""
        return self.L - 1

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def split_position(self) -> int:
        """Tokens read from the logits head: those of the first ``split`` scales."""
        return self._starts[self.config.split]

    def data_positions(self, t: Tensor) -> Tensor:
        """Number of leading data tokens after t completed scales: Σ_{s<t} pn_s². t (B,) long → (B,) long."""
        starts = self._starts_t.get(t.device)
        if starts is None:
            starts = self._starts_t[t.device] = torch.tensor(self._starts, device=t.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(self._starts)):
            raise ValueError(f"t: expected numbers of completed scales in [0, {self.num_scales}], got {t.tolist()}")
        return starts[t.long()]

    # -- forward ------------------------------------------------------------------------------------------------
    def _indicator(self, i: int, n_d: Tensor) -> Tensor:
        return n_d if self.layerwise_n_d_embed is None else self.layerwise_n_d_embed[i](n_d)

    def forward(self, x: Tensor, class_labels: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, D) noise/data vectors (scale-major), class_labels (B,) long, t (B,) long (completed scales)
        → logits (B, N, V) float32 and continuous vectors (B, N, D) float32 (raw heads, no mixing)."""
        b = x.shape[0]
        cond = self.class_emb(class_labels)
        sos = cond.unsqueeze(1) + self.pos_start.expand(b, 1, -1)
        h = torch.cat((sos, self.word_embed(x.to(self.word_embed.weight.dtype))), dim=1)
        h = h + (self.lvl_embed(self.lvl_1L.expand(b, -1)) + self.pos_1LC)
        flags = torch.arange(self.L, device=x.device)[None, :] < 1 + self.data_positions(t)[:, None]
        n_d = self.n_d_embed(flags.long())
        h = h + n_d
        mod_in = self.shared_ada_lin(cond)
        bias = self.attn_bias_for_masking
        for i, blk in enumerate(self.blocks):
            h = blk(h, blk.modulation(mod_in), bias, self._indicator(i, n_d))
        h = (h.float() + self._indicator(self.depth, n_d))[:, 1:]
        logits = self.head(self.head_nm(h, cond).to(self.head.weight.dtype)).float()
        vectors = self.final_layer_conti(h, cond.unsqueeze(1)).float()
        return logits, vectors

    def check_inputs(self, noise: Tensor, class_labels: Tensor) -> None:
        """ValueErrors naming the argument for noise that is not (B, N, D) float and bad class ids."""
        DDStudent.check_inputs(self, noise, class_labels)  # type: ignore[arg-type]

    @torch.no_grad()
    def predict(self, x_t: Tensor, class_labels: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One DD step from the trajectory point x_t (B, N, D) at t (B,) completed scales → (mixed vectors (B, N, D),
        tokens (B, N)) (official ``final_predict`` + ``get_final_sequence``).

        Data positions (< ``data_positions(t)``) are copied from the input (tokens = their nearest codes); positions
        < ``split_position`` become the codebook vector of the argmax token (data positions there: their nearest
        code); later positions take the continuous head's vector (their token is still the argmax)."""
        logits, cont = self(x_t, class_labels, t)
        tokens = logits.argmax(-1)
        pos = torch.arange(x_t.shape[1], device=x_t.device)[None, :]
        known = pos < self.data_positions(t)[:, None]
        tokens = torch.where(known, nearest_codes(x_t, self.codebook), tokens)
        quant = self.codebook[tokens]
        cont = torch.where(known[..., None], x_t.to(quant.dtype), cont.to(quant.dtype))
        return torch.where((pos < self.split_position)[..., None], quant, cont), tokens


def _dd_var_mask(lvl: Tensor) -> Tensor:
    """(1, 1, L, L) additive attention bias of the DD-VAR student: 0 where the key's level is strictly lower than the
    query's, or on the diagonal; −inf elsewhere (official ``DD_Model.attn_bias_for_masking``)."""
    d = lvl.view(1, -1, 1)
    bias = torch.where(d >= d.transpose(1, 2) + 1, 0.0, -torch.inf).reshape(1, 1, lvl.numel(), lvl.numel())
    bias[0, 0].fill_diagonal_(0)
    return bias.contiguous()


def _read_dd_var_state(path: Path, key: str | None) -> dict[str, Tensor]:
    """State dict of a DD-VAR file: ``trainer.ema_parameters`` when present (or ``trainer.<key>``), else the usual
    formats of :func:`~distilled_decoding.checkpoints.extract_state_dict`."""
    from collections.abc import Mapping

    from distilled_decoding.checkpoints import _read_file, extract_state_dict

    obj = _read_file(path)
    trainer = obj.get("trainer") if isinstance(obj, Mapping) else None
    if isinstance(trainer, Mapping):
        k = key if key is not None else ("ema_parameters" if "ema_parameters" in trainer else None)
        if k is not None and k in trainer:
            return extract_state_dict(trainer, key=k, source=f"{path} [trainer.{k}]")
    return extract_state_dict(obj, key=key, source=str(path))
