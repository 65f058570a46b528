"""The LlamaGen Distilled Decoding student (``microsoft/distilled_decoding`` ``LlamaGen/autoregressive/models/dd.py``
``DDTransformer``; module names and keys are the official ones, so released checkpoints load with
:meth:`DDStudent.from_official`):

* the teacher's backbone (RMSNorm, SwiGLU, 2-D RoPE), class table, final norm and logits head, copied by
  :meth:`DDStudent.from_teacher`;
* new: ``tok_embeddings = Linear(D, dim)`` reading D-dimensional noise/data vectors, the 2-entry ``n_d_embed``
  indicator (1 for the class token and the first ``t`` positions, which hold data; 0 for noise), and
  ``final_layer_conti`` (class-modulated LayerNorm → Linear(dim, D)), the continuous head;
* causal attention over ``[class, x_1..x_N]`` (the teacher decodes one token a step, so "earlier steps and itself"
  is causal); outputs are *not* shifted: position i reads its own noise and everything before it.

Text-conditional teachers (``model_type="t2i"``): the student copies the teacher's caption projection
(:class:`~distilled_decoding.students.layers.CaptionTable`, official keys) and reads ``[caption positions P,
x_1..x_N]`` under the teacher's caption attention mask (padded caption positions hidden); the continuous head is
modulated by the mean of the projected caption over its real tokens. Everything that differs is behind the condition
table's interface (``spec``, ``key_mask``, ``pool``, ``copy_from``): the forward pass does not branch on the type.

Schedule, prediction and sampling: :class:`~distilled_decoding.students.base.FewStepStudent` (timesteps and split
count tokens).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import load_state_dict_file, load_strict
from distilled_decoding.conditions import ConditionSpec
from distilled_decoding.model_config import config_init
from distilled_decoding.students.base import FewStepStudent, resolve_schedule, validate_schedule
from distilled_decoding.students.layers import STUDENT_CONDITION_TABLES, FinalLayer
from distilled_decoding.teachers.base import get_family
from distilled_decoding.teachers.llamagen_config import LLAMAGEN_PRESETS, LlamaGenBackbone, LlamaGenConfig
from distilled_decoding.teachers.llamagen_layers import RMSNorm, TransformerBlock, precompute_freqs_cis_2d
from distilled_decoding.teachers.llamagen_t2i import caption_attention_mask

__all__ = ["DDStudent", "DDStudentConfig"]


@dataclass
class DDStudentConfig(LlamaGenBackbone):
    """The teacher's backbone fields (:class:`~distilled_decoding.teachers.llamagen_config.LlamaGenBackbone`: official
    ModelArgs names, including its condition: ``model_type`` / ``caption_dim`` / ``cls_token_num``), ``codebook_dim``
    D, ``split`` (positions < split are read from the logits head, the rest from the continuous head) and
    ``timesteps`` (the training / sampling schedule in decoding steps, e.g. (0, 80): 1-step sampling uses t=0, 2-step
    uses both)."""

    codebook_dim: int = 8
    split: int = 80
    timesteps: Sequence[int] = (0, 80)

    def validate(self) -> None:
        if isinstance(self.codebook_dim, bool) or not isinstance(self.codebook_dim, int) or self.codebook_dim < 1:
            raise ValueError(f"codebook_dim={self.codebook_dim!r}: expected a positive integer")
        self.timesteps, self.split = validate_schedule(self.timesteps, self.split, len(self.step_starts()) - 1)

    def step_starts(self) -> list[int]:
        """``[0, 1, ..., N]``: the teacher decodes one token a step (raster order)."""
        return list(range(self.backbone().block_size + 1))

    def backbone(self) -> LlamaGenConfig:
        """The (validated) LlamaGen configuration of the transformer, without dropout."""
        return LlamaGenConfig(**backbone_fields(self), token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              class_dropout_prob=0.0)  # fmt: skip


def backbone_fields(cfg: Any) -> dict[str, Any]:
    """The :class:`LlamaGenBackbone` fields of a teacher or student config."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LlamaGenBackbone)}


class DDStudent(FewStepStudent, ModelMixin, ConfigMixin):
    """LlamaGen DD student. ``student(x, condition, t)`` → (logits (B, N, V) fp32, vectors (B, N, D) fp32); the
    condition is class labels (B,) long, or a TextCondition for a text-conditional teacher's student.

    Config: :class:`DDStudentConfig`. The (V, D) codebook is a buffer of the student, so a saved student is
    self-contained.
    """

    family: ClassVar[str] = "llamagen"

    @config_init(DDStudentConfig)
    def __init__(self, cfg: DDStudentConfig):
        super().__init__()
        self.init_modules(cfg)

    def init_modules(self, cfg: DDStudentConfig) -> None:
        """Build the network for ``cfg`` (a subclass with its own config calls this from its constructor)."""
        a = self.args = cfg.backbone()
        self.starts = cfg.step_starts()
        self.cls_embedding = STUDENT_CONDITION_TABLES[a.model_type](a)
        self.tok_embeddings = nn.Linear(cfg.codebook_dim, a.dim)
        self.layers = nn.ModuleList(TransformerBlock(a, 0.0) for _ in range(a.n_layer))
        self.norm = RMSNorm(a.dim, eps=a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.final_layer_conti = FinalLayer(a.dim, cfg.codebook_dim)
        self.n_d_embed = nn.Embedding(2, a.dim)
        self.register_buffer("codebook", torch.zeros(a.vocab_size, cfg.codebook_dim))
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
        teacher: Any,
        codebook: Tensor,
        split: int | None = None,
        timesteps: Sequence[int] | None = None,
        init_input: str = "lstsq",
        *,
        continuous_head: bool = True,
    ) -> DDStudent:
        """A student initialised from the LlamaGen ``teacher`` (class table or caption projection, all layers, norm,
        logits head copied)
        for the tokenizer ``codebook`` (V, D). Schedule defaults: :func:`~distilled_decoding.students.base.
        resolve_schedule` (timesteps (0, 80) of 256 tokens, the released schedule; split = the last timestep, or N
        with ``continuous_head=False``).

        ``init_input="lstsq"`` initialises the new ``Linear(D, dim)`` input by least squares so that it maps each
        codebook vector as close as possible to the teacher's embedding of that token (DD2's continuous-input
        adaptation, closed form); ``"random"`` keeps N(0, 0.02) as the official code.
        """
        expected = get_family(cls.family).teacher_class
        if not isinstance(teacher, expected):
            raise TypeError(f"teacher: expected a {expected.__name__} teacher, got {type(teacher).__name__}")
        if not isinstance(codebook, Tensor) or not codebook.dtype.is_floating_point:
            raise TypeError(f"codebook: expected a (V, D) float tensor, got {type(codebook).__name__}")
        a = teacher.args
        if codebook.ndim != 2 or codebook.shape[0] != a.vocab_size:
            raise ValueError(f"codebook: expected ({a.vocab_size}, D) for this teacher, got {tuple(codebook.shape)}")
        if init_input not in ("lstsq", "random"):
            raise ValueError(f"init_input={init_input!r}: expected 'lstsq' or 'random'")
        num_steps = len(teacher.decode_groups())
        timesteps, split = resolve_schedule(get_family(cls.family), num_steps, None, timesteps, split,
                                            continuous_head=continuous_head)  # fmt: skip
        student = cls(**backbone_fields(a), codebook_dim=int(codebook.shape[1]), split=split,
                      timesteps=timesteps, **cls.teacher_fields(teacher))  # fmt: skip
        student.to(device=teacher.output.weight.device)
        with torch.no_grad():
            student.cls_embedding.copy_from(teacher.cls_embedding)
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
        return student

    @classmethod
    def teacher_fields(cls, teacher: Any) -> dict[str, Any]:
        """Config fields :meth:`from_teacher` reads from the teacher beyond the backbone's (none for LlamaGen)."""
        return {}

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
        revision: str | None = None,
        **config: Any,
    ) -> DDStudent:
        """Load a released DD LlamaGen checkpoint (``LlamaGen-DD/llamagen-B.pt``: ``{"ema": state_dict}``), a local
        path or a Hub reference (``"microsoft/distilled_decoding/LlamaGen-DD/llamagen-B.pt"``; ``revision`` pins it).
        ``codebook`` is the tokenizer's (l2-normalised) codebook; ``split`` 80 (B) or 130 (L) as in the release
        (:func:`distilled_decoding.releases.load_release` fills these in)."""
        if teacher_preset not in LLAMAGEN_PRESETS:
            raise ValueError(f"teacher_preset={teacher_preset!r}: expected one of {sorted(LLAMAGEN_PRESETS)}")
        sd = load_state_dict_file(path, key=key, revision=revision)
        emb = sd.get("tok_embeddings.weight")
        cfg = {**LLAMAGEN_PRESETS[teacher_preset], "codebook_dim": int(emb.shape[1]) if emb is not None else 8,
               "split": split, "timesteps": tuple(timesteps), **config}  # fmt: skip
        with torch.device("meta"):
            student = cls(**cfg)
        sd = {**sd, "codebook": codebook.float()}
        load_strict(student, sd, source=os.fspath(path), what=f"DD LlamaGen student ({teacher_preset})",
                    ignore=("freqs_cis",), assign=True)  # fmt: skip
        return student.eval()

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def freqs_cis(self) -> Tensor:
        device = self.output.weight.device
        if self._freqs is None or self._freqs.device != device:
            a = self.args
            self._freqs = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, a.cls_token_num).to(device)
        return self._freqs

    @property
    def attention_mask(self) -> Tensor | None:
        """(N + 1, N + 1) bool attention mask over [class, x_1..x_N] (True = attend), or None for causal."""
        return None

    @property
    def condition(self) -> ConditionSpec:
        """Class ids (c2i) or caption features (t2i), as the teacher's."""
        return self.cls_embedding.spec

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, condition: Any, t: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, D) noise/data vectors, condition (class labels (B,) long or a TextCondition), t (B,) long
        (completed decoding steps: the first ``data_positions(t)`` positions hold data) → logits (B, N, V) float32
        and continuous vectors (B, N, D) float32 (raw heads, no mixing). Input: [P condition positions, x]; the
        condition positions and the data positions are flagged as data."""
        b, n, _ = x.shape
        table = self.cls_embedding
        cond = table(condition)  # (B, P, dim)
        p = cond.shape[1]
        key_mask = table.key_mask(condition)
        flags = (torch.arange(n + p, device=x.device)[None, :] < p + self.data_positions(t)[:, None]).long()
        h = torch.cat([cond, self.tok_embeddings(x.to(self.tok_embeddings.weight.dtype))], dim=1)
        h = h + self.n_d_embed(flags)
        freqs = self.freqs_cis[: n + p]
        # captions: causal with the padding keys masked; classes: the student's mask (None: causal)
        mask = self.attention_mask if key_mask is None else caption_attention_mask(key_mask, 0, n + p)
        for layer in self.layers:
            h = layer(h, freqs, mask=mask)
        logits = self.output(self.norm(h[:, p:])).float()
        vectors = self.final_layer_conti(h, table.pool(cond, key_mask))[:, p:].float()
        return logits, vectors
