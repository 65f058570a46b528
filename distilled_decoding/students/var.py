"""The VAR Distilled Decoding student (official ``VAR/models/dd.py`` ``DD_Model``; the state-dict keys are the official
ones, so the released ``VAR-DD/var-d{16,20,24}.pth`` load with :meth:`DDVARStudent.from_official`).

The teacher's VAR with one extra 1×1 level in front, every token reading its own noise/data vector through the
teacher's ``word_embed``, the attention of :func:`~distilled_decoding.students.base.group_attention_mask` (a token
sees the class, the earlier scales and itself), the indicator added at the input and layer-wise inside the blocks.
Timesteps and ``split`` count scales (the teacher's decoding steps); schedule, prediction and sampling:
:class:`~distilled_decoding.students.base.FewStepStudent`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distilled_decoding.checkpoints import CheckpointError, extract_state_dict, load_strict, read_checkpoint
from distilled_decoding.conditions import ClassCondition
from distilled_decoding.model_config import config_fields, config_init
from distilled_decoding.students.base import (
    FewStepStudent,
    group_attention_mask,
    resolve_schedule,
    validate_schedule,
)
from distilled_decoding.students.layers import FinalLayer
from distilled_decoding.teachers.base import get_family
from distilled_decoding.teachers.var_config import VARBackbone, VARConfig
from distilled_decoding.teachers.var_layers import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from distilled_decoding.teachers.var_official import official_var_config

__all__ = ["DDVARStudent", "DDVARStudentConfig", "DDVARBlock"]

#: config fields the student shares with its VAR teacher
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(VARBackbone))


@dataclass
class DDVARStudentConfig(VARBackbone):
    """The teacher's fields (:class:`~distilled_decoding.teachers.var_config.VARBackbone`, official ``VAR`` names;
    ``codebook_dim`` = Cvae), ``layerwise_n_d`` (the official ``layerwise_n_d_embed`` flag), ``timesteps`` (in
    scales, e.g. (0, 5)) and ``split`` (in scales: tokens of the first ``split`` scales are read from the logits head,
    the rest from the continuous head; official ``loss_split_t``)."""

    codebook_dim: int = 32
    layerwise_n_d: bool = True
    split: int = 5
    timesteps: Sequence[int] = (0, 5)

    def validate(self) -> None:
        if isinstance(self.codebook_dim, bool) or not isinstance(self.codebook_dim, int) or self.codebook_dim < 1:
            raise ValueError(f"codebook_dim={self.codebook_dim!r}: expected a positive int (the VAE's Cvae)")
        self.patch_nums = self.backbone().patch_nums
        self.timesteps, self.split = validate_schedule(self.timesteps, self.split, len(self.patch_nums))

    def backbone(self) -> VARConfig:
        """The (validated) VAR configuration of the transformer."""
        return VARConfig(**{k: getattr(self, k) for k in SHARED_FIELDS}, Cvae=self.codebook_dim, cond_drop_rate=0.0)


class DDVARBlock(AdaLNSelfAttn):
    """VAR's AdaLN block with Distilled Decoding's indicator term added to the residual stream between attention and
    FFN (official ``basic_var.AdaLNSelfAttn.forward(..., n_d_emb)``). Keys are the teacher block's."""

    def forward(self, x: Tensor, mod: Tensor, attn_bias: Tensor | None, n_d: Tensor | None = None) -> Tensor:  # type: ignore[override]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias)
        x = x + self.drop_path(h.mul_(gamma1))
        if n_d is not None:
            x = x + n_d
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))


class DDVARStudent(FewStepStudent, ModelMixin, ConfigMixin):
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

    Config: :class:`DDVARStudentConfig`. The (V, D) codebook is a buffer, so a saved student is self-contained.
    """

    family: ClassVar[str] = "var"

    @config_init(DDVARStudentConfig)
    def __init__(self, cfg: DDVARStudentConfig):
        super().__init__()
        var = cfg.backbone()
        codebook_dim = cfg.codebook_dim
        self.patch_nums: tuple[int, ...] = var.patch_nums
        n_scales = len(self.patch_nums)
        c = self.C = self.D = var.embed_dim
        self.depth, self.V, self.Cvae = var.depth, var.vocab_size, codebook_dim
        self.starts = [0]  # one decoding step per scale
        for pn in self.patch_nums:
            self.starts.append(self.starts[-1] + pn * pn)
        self.L = 1 + self.starts[-1]  # class token + tokens

        self.word_embed = nn.Linear(codebook_dim, c)
        self.class_emb = nn.Embedding(var.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, c))
        self.lvl_embed = nn.Embedding(n_scales + 1, c)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(c, 6 * c)) if var.shared_aln else nn.Identity()
        )
        dpr = torch.linspace(0, var.drop_path_rate, self.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(DDVARBlock(var, dpr[i]) for i in range(self.depth))
        lvl = torch.tensor([0] + [s + 1 for s, pn in enumerate(self.patch_nums) for _ in range(pn * pn)])
        self.register_buffer("lvl_1L", lvl[None].contiguous())
        self.register_buffer("attn_bias_for_masking", attention_bias(self.starts))
        self.head_nm = AdaLNBeforeHead(c, c, var.norm_eps)
        self.head = nn.Linear(c, self.V)
        self.n_d_embed = nn.Embedding(2, c)
        self.layerwise_n_d_embed = (
            nn.ModuleList(nn.Linear(c, c) for _ in range(self.depth + 1)) if cfg.layerwise_n_d else None
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
        released schedule (the ``var`` family's); ``overrides`` are config fields."""
        from distilled_decoding.teachers.var import VAR_PRESETS

        name = f"d{preset}" if isinstance(preset, int) and not isinstance(preset, bool) else preset
        if name not in VAR_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(VAR_PRESETS)} (or the depth as an int)")
        base = {k: v for k, v in VAR_PRESETS[name].items() if k in SHARED_FIELDS}
        ts, split = resolve_schedule(get_family(cls.family), len(base["patch_nums"]),
                                     (base["depth"], len(base["patch_nums"])))  # fmt: skip
        return cls(**{**base, "timesteps": ts, "split": split, **overrides})

    @classmethod
    def from_teacher(
        cls,
        teacher: Any,
        codebook: Tensor,
        split: int | None = None,
        timesteps: Sequence[int] | None = None,
        init_input: str = "copy",
        *,
        continuous_head: bool = True,
    ) -> DDVARStudent:
        """A student initialised from the VAR ``teacher`` as the official ``init_with_teacher``: ``word_embed``,
        ``class_emb``, ``pos_start``, all blocks, ``shared_ada_lin``, ``head_nm`` and ``head`` copied;
        ``lvl_embed`` / ``pos_1LC`` copied with teacher level / position 0 → 0 and 1.. → 2..; the new level-1 row
        and position-1 row, ``n_d_embed``, the layer-wise projections and ``final_layer_conti`` are new (the
        release's re-initialisation of ``class_emb`` row 1, a typo for ``lvl_embed`` row 1, is not reproduced).

        ``codebook`` (V, Cvae): the VAE's raw codebook. Schedule defaults: :func:`~distilled_decoding.students.base.
        resolve_schedule` ((0, 5) for d16, (0, 4) for d20/d24, (0, S // 2) otherwise; split = the last timestep, or
        S with ``continuous_head=False``).
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
        timesteps, split = resolve_schedule(get_family(cls.family), teacher.num_scales, (tc.depth, teacher.num_scales),
                                            timesteps, split, continuous_head=continuous_head)  # fmt: skip
        student = cls(**{k: tc[k] for k in SHARED_FIELDS}, codebook_dim=teacher.Cvae, split=split,
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
        revision: str | None = None,
        **config: Any,
    ) -> DDVARStudent:
        """Load a released DD-VAR checkpoint (``VAR-DD/var-d16.pth``: ``{"trainer": {"ema_parameters": sd,
        "var_wo_ddp": sd, ...}}``; the EMA weights by default as the official ``--ema``, ``key="var_wo_ddp"`` for the
        raw ones; a raw state dict or ``.safetensors`` also works).

        ``codebook``: the VAE's (V, Cvae) codebook, or the :class:`MultiScaleVQVAE` itself. ``depth`` selects the
        ``build_vae_dd`` recipe (read from the file when None); the vocabulary, Cvae, classes, attention variant and
        the 256px/512px ``patch_nums`` (from L − 1) are read from the tensors; ``config`` fields win (e.g. the sizes
        of a small model, ``patch_nums``). Defaults: ``timesteps`` the family's released schedule, ``split`` = the
        last timestep (official ``loss_split_t`` 5 for d16, 4 for d20/d24). Buffers the file lacks (an EMA dict of
        parameters only) are computed. ``path`` may be a Hub reference
        (``"microsoft/distilled_decoding/VAR-DD/var-d16.pth"``; ``revision`` pins it).
        """
        sd = _read_dd_var_state(path, key, revision)
        source, name = os.fspath(path), Path(path).name
        cb = codebook.codebook if hasattr(codebook, "codebook") and not isinstance(codebook, Tensor) else codebook
        if not isinstance(cb, Tensor) or cb.ndim != 2:
            got = type(codebook).__name__
            raise ValueError(f"codebook: expected a (V, Cvae) tensor or a MultiScaleVQVAE, got {got}")
        unknown = sorted(set(config) - set(SHARED_FIELDS) - {"codebook_dim", "layerwise_n_d"})
        if unknown:
            raise ValueError(f"unknown DDVARStudent config field(s) {unknown}; valid: {sorted(SHARED_FIELDS)}")
        pos = sd.get("pos_1LC")
        if pos is None or pos.ndim != 3 or "head.weight" not in sd:
            raise CheckpointError(f"{source}: not a DD-VAR state dict (no pos_1LC / head.weight)")
        view = {**sd, "pos_1LC": torch.empty(1, pos.shape[1] - 1, pos.shape[2], device="meta")}
        over = {k: v for k, v in config.items() if k in config_fields(VARConfig)}
        var_cfg = official_var_config(view, depth=depth, filename=name, **over)
        cfg = {k: var_cfg[k] for k in SHARED_FIELDS}
        cfg["codebook_dim"] = int(config.get("codebook_dim", var_cfg["Cvae"]))
        cfg["layerwise_n_d"] = bool(config.get("layerwise_n_d", "layerwise_n_d_embed.0.weight" in sd))
        n_scales = len(cfg["patch_nums"])
        cfg["timesteps"], cfg["split"] = resolve_schedule(get_family(cls.family), n_scales, (cfg["depth"], n_scales),
                                                          timesteps, split)  # fmt: skip
        if tuple(cb.shape) != (cfg["vocab_size"], cfg["codebook_dim"]):
            raise ValueError(
                f"codebook: expected ({cfg['vocab_size']}, {cfg['codebook_dim']}) for {name}, got {tuple(cb.shape)}"
            )
        with torch.device("meta"):
            student = cls(**cfg)
        lvl = torch.tensor([0] + [s + 1 for s, pn in enumerate(cfg["patch_nums"]) for _ in range(pn * pn)])
        starts = [0]
        for pn in cfg["patch_nums"]:
            starts.append(starts[-1] + pn * pn)
        derived = {"lvl_1L": lvl[None], "attn_bias_for_masking": attention_bias(starts)}
        derived.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(var_cfg["embed_dim"]) for i in range(cfg["depth"])})
        sd = {**derived, **sd, "codebook": cb.detach().float().cpu()}
        what = (f"DD-VAR student (depth {cfg['depth']}, embed_dim {var_cfg['embed_dim']}, {cfg['num_heads']} heads, "
                f"vocab {cfg['vocab_size']}, patch_nums {tuple(cfg['patch_nums'])})")  # fmt: skip
        load_strict(student, sd, source=source, what=what, assign=True)
        return student.eval()

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def condition(self) -> ClassCondition:
        return ClassCondition(int(self.config.num_classes))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

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


def attention_bias(starts: Sequence[int]) -> Tensor:
    """(1, 1, 1 + N, 1 + N) additive attention bias (0 = attend, −inf = masked) of
    :func:`~distilled_decoding.students.base.group_attention_mask` with the class token in front: the values of the
    official ``DD_Model.attn_bias_for_masking``."""
    mask = group_attention_mask(starts, n_prefix=1)
    return torch.zeros(mask.shape).masked_fill_(~mask, -torch.inf)[None, None].contiguous()


def _read_dd_var_state(path: str | os.PathLike, key: str | None, revision: str | None) -> dict[str, Tensor]:
    """State dict of a DD-VAR file (local or Hub reference): ``trainer.ema_parameters`` when present (or
    ``trainer.<key>``), else the usual formats of :func:`~distilled_decoding.checkpoints.extract_state_dict`."""
    obj = read_checkpoint(path, revision=revision)
    path = os.fspath(path)
    trainer = obj.get("trainer") if isinstance(obj, Mapping) else None
    if isinstance(trainer, Mapping):
        k = key if key is not None else ("ema_parameters" if "ema_parameters" in trainer else None)
        if k is not None and k in trainer:
            return extract_state_dict(trainer, key=k, source=f"{path} [trainer.{k}]")
    return extract_state_dict(obj, key=key, source=str(path))
