"""PAR (Parallelized Autoregressive Visual Generation), numerically equal to the official ``YuqingWang1029/PAR`` code.

PAR is LlamaGen's class-conditional GPT run over a *region order* of the L×L token grid, split into k = s² regions
(``ar_token_num`` = k, s = √k): sequence index ``q`` holds raster cell ``token_order[q]``, lexicographic in
(row in region, column in region, region row, region column). Decoding: the first k tokens (the top-left cell of
every region) one at a time, then k tokens per step, one per region. The first parallel step feeds the last anchor
and k−1 learned *transition tokens* M1..M(k−1) (the only parameters beyond LlamaGen's, key
``spe_tok_embeddings.special_embeddings.weight``); later steps feed the previous group. Input stream::

    position   0      1 .. k         k+1 .. 2k−1      2k ..
    input      class  z0 .. z(k−1)   M1 .. M(k−1)     z(k) ..          (position p predicts z_p)

Attention is causal across groups and full inside a group (groups: positions [k + i·k, k + (i+1)·k)). Every
image token keeps the 2-D RoPE of its raster cell; the class token and the M tokens get all-zero rows.
``par(tokens, class_labels)`` takes and returns raster order; the decoding protocol of
:class:`~distilled_decoding.teachers.base.Teacher` interface works in sequence order (``token_order`` maps back).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
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
from distilled_decoding.teachers.llamagen import LlamaGen
from distilled_decoding.teachers.llamagen_config import LLAMAGEN_PRESETS, LlamaGenConfig, find_multiple
from distilled_decoding.teachers.llamagen_layers import (
    LabelEmbedder,
    LlamaGenCache,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)
from distilled_decoding.teachers.llamagen_official import PAR_TRANSITION_KEY, official_config

__all__ = ["PAR", "PARConfig", "PAR_PRESETS", "TRANSITION_KEY", "region_order", "par_decode_groups"]

#: State-dict key of the k−1 transition embeddings; its presence marks a PAR checkpoint.
TRANSITION_KEY = PAR_TRANSITION_KEY

#: Official sizes × {4x, 16x}: LlamaGen's ``GPT-*`` sizes plus ``ar_token_num``; 384 px → 24×24 tokens.
#: Released: PAR-XL-4x, PAR-XXL-4x, PAR-3B-4x, PAR-3B-16x (Hugging Face ``Epiphqny/PAR``).
PAR_PRESETS: dict[str, dict[str, int]] = {
    f"PAR-{size}-{k}x": {**LLAMAGEN_PRESETS[f"GPT-{size}"], "ar_token_num": k, "block_size": 576}
    for size in ("L", "XL", "XXL", "3B")
    for k in (4, 16)
}


def region_order(grid: int, ar_token_num: int) -> Tensor:
    """(grid²,) long: the raster index of each PAR sequence position (official ``train_c2i.py`` reshape/permute)."""
    s = math.isqrt(ar_token_num) if isinstance(ar_token_num, int) and ar_token_num > 0 else 0
    why = f"{ar_token_num} is not a positive perfect square" if s * s != ar_token_num or s < 1 else None
    if why or grid % s:
        raise ValueError(
            f"ar_token_num={ar_token_num}: expected a perfect square k = s² whose root s divides the {grid}x{grid} "
            f"token grid, e.g. 4 or 16 for 24x24 ({why or f'its root {s} does not divide {grid}'})"
        )
    return torch.arange(grid * grid).view(s, grid // s, s, grid // s).permute(1, 3, 0, 2).reshape(-1)


def par_decode_groups(seq_len: int, ar_token_num: int) -> list[tuple[int, int]]:
    """PAR's decoding steps over ``seq_len`` positions in sequence order: k single anchor steps, then groups of k."""
    k = ar_token_num
    return [(i, i + 1) for i in range(k)] + [(s, s + k) for s in range(k, seq_len, k)]


@dataclass
class PARConfig(LlamaGenConfig):
    """The official PAR ``ModelArgs``: LlamaGen's fields plus ``spe_token_num`` (= k−1) and ``ar_token_num`` (= k);
    ``block_size`` defaults to the released 24×24 grid (384 px)."""

    block_size: int = 576
    spe_token_num: int = 3
    ar_token_num: int = 4

    def validate(self) -> None:
        super().validate()
        region_order(self.grid_size, self.ar_token_num)  # validates k against the grid
        if self.spe_token_num != self.ar_token_num - 1:
            raise ValueError(
                f"PAR config: spe_token_num={self.spe_token_num}, expected ar_token_num - 1 = {self.ar_token_num - 1}"
            )


class TransitionEmbedding(nn.Module):
    """The official ``SpecialTokenEmbedding``: M1..M(k−1), a (k−1, dim) table."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num, dim)

    def forward(self, batch: int) -> Tensor:
        """→ (batch, k−1, dim)."""
        return self.special_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)


class PAR(ModelMixin, ConfigMixin):
    """Class-conditional PAR. Constructor arguments are the official ``ModelArgs`` field names.

    ``par(tokens, class_labels)``: tokens (B, N) long in the tokenizer's raster order, class_labels (B,) long →
    logits (B, N, V) float32 in raster order, ``logits[:, r]`` = p(token at cell r | the tokens decoded before its
    decode group, class).
    """

    family: ClassVar[str] = "par"
    _supports_gradient_checkpointing = False

    @config_init(PARConfig)
    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.args = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.spe_tok_embeddings = TransitionEmbedding(cfg.spe_token_num, cfg.dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(cfg, dpr[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._tables: dict[str, Tensor] = {}  # RoPE table, group mask, orders: built lazily, never saved
        self.initialize_weights()

    # -- construction -------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Official init: N(0, initializer_range) for Linear/Embedding (transition table included), zero head."""
        if self.output.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.args.initializer_range)
        nn.init.zeros_(self.output.weight)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> PAR:
        """Build an official size (``"PAR-XXL-4x"``, ...) with random weights; overrides are ModelArgs fields."""
        if preset not in PAR_PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(PAR_PRESETS)}")
        k = overrides.get("ar_token_num", PAR_PRESETS[preset]["ar_token_num"])
        return cls(**{**PAR_PRESETS[preset], "spe_token_num": k - 1, **overrides})

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
    ) -> PAR:
        """Load an official PAR checkpoint (``PAR-XXL-4x.pt``, ``.safetensors``, DDP/FSDP dicts): a local path or a Hub
        reference (``"Epiphqny/PAR/PAR-XXL-4x.pt"``; ``revision`` pins it, see :mod:`distilled_decoding.hub`).

        ``preset`` is a PAR preset (``"PAR-3B-16x"``) or a LlamaGen size (``"GPT-XL"``); when omitted the size is
        inferred from the shapes and ``ar_token_num`` from the transition table (k−1 rows). ``block_size``
        defaults to the file name's ``_256``/``_384``/``_512`` and otherwise to 576 (the 384 px releases, 24×24).
        Extra keyword arguments are ModelArgs fields (``ar_token_num``, ``num_classes``, ...).
        """
        sd = load_state_dict_file(path, key=key, revision=revision)
        source, path = os.fspath(path), Path(path)
        if TRANSITION_KEY not in sd and "tok_embeddings.weight" in sd:
            raise CheckpointError(
                f"{source}: this is a LlamaGen checkpoint, not PAR (it has no {TRANSITION_KEY!r} transition-token "
                "table); use LlamaGen.from_official, or PAR.from_llamagen to convert a loaded LlamaGen"
            )
        size, k, spe = None, config.pop("ar_token_num", None), config.pop("spe_token_num", None)
        if preset is not None and preset in PAR_PRESETS:
            size, k = f"GPT-{preset.split('-')[1]}", k or PAR_PRESETS[preset]["ar_token_num"]
        elif preset is not None and preset in LLAMAGEN_PRESETS:
            size = preset
        elif preset is not None:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(PAR_PRESETS)} or {sorted(LLAMAGEN_PRESETS)}")
        if k is None and spe is not None:
            k = spe + 1
        elif k is None:  # from the transition table (k−1 rows)
            k = int(sd[TRANSITION_KEY].shape[0]) + 1 if TRANSITION_KEY in sd else 4
        if block_size is None:
            m = re.search(r"_(256|384|512)(?:\D|$)", path.stem)
            block_size = (int(m.group(1)) // 16) ** 2 if m else 576
        cfg = official_config(sd, filename=path.name, preset=size, block_size=block_size, **config)
        cfg.update(ar_token_num=k, spe_token_num=k - 1 if spe is None else spe)
        with torch.device("meta"):
            model = cls(**cfg)
        a = model.args
        what = (
            f"PAR ({a.n_layer} layers, dim {a.dim}, ar_token_num {a.ar_token_num}, vocab {a.vocab_size}, "
            f"{a.num_classes} classes, block_size {a.block_size})"
        )
        load_strict(model, sd, source=source, what=what, ignore=("freqs_cis",), hint=_hint, assign=True)
        return model.eval()

    @classmethod
    def from_llamagen(cls, gpt: LlamaGen, ar_token_num: int = 4) -> PAR:
        """A PAR-k× teacher initialised from a (pretrained) LlamaGen: every LlamaGen weight is copied; the k−1
        transition embeddings, the only new parameters, all start at the mean token embedding (a position-free
        "some image token" input, like the M tokens themselves, which get no RoPE). Fine-tune before use: the
        LlamaGen was trained in raster order. Raises ValueError naming ``ar_token_num`` and the grid when k is not
        a perfect square whose root divides the grid."""
        if not isinstance(gpt, LlamaGen):
            raise ValueError(f"gpt: expected a LlamaGen teacher, got {type(gpt).__name__}")
        region_order(gpt.args.grid_size, ar_token_num)
        with torch.device("meta"):
            model = cls(**asdict(gpt.args), ar_token_num=ar_token_num, spe_token_num=ar_token_num - 1)
        sd = {k: v.detach().clone() for k, v in gpt.state_dict().items()}
        emb = sd["tok_embeddings.weight"]
        sd[TRANSITION_KEY] = emb.mean(0, keepdim=True).expand(ar_token_num - 1, -1).clone()
        model.load_state_dict(sd, strict=True, assign=True)
        return model.train(gpt.training)

    # -- properties -----------------------------------------------------------------------------------------
    def _table(self, name: str) -> Tensor:
        device = self.output.weight.device
        t = self._tables.get(name)
        if t is None or t.device != device:
            a, k, n = self.args, self.args.ar_token_num, self.seq_len
            order = region_order(a.grid_size, k)
            if name == "token_order":
                t = order
            elif name == "raster_to_sequence":
                t = torch.argsort(order)
            elif name == "freqs_cis":  # official precompute_freqs_cis_2d of PAR: reordered rows, zeros for M
                raster = precompute_freqs_cis_2d(a.grid_size, a.head_dim, a.rope_base, a.cls_token_num)
                cls_rows, cells = raster[: a.cls_token_num], raster[a.cls_token_num :][order]
                t = torch.cat([cls_rows, cells[:k], torch.zeros(k - 1, *cells.shape[1:]), cells[k:]])
            else:  # "group_mask": causal, plus full attention inside each group [k + i·k, k + (i+1)·k)
                t = torch.ones(n, n, dtype=torch.bool).tril()
                for start in range(k, n, k):
                    t[start : start + k, : start + k] = True
            t = t.to(device)
            self._tables[name] = t
        return t

    @property
    def token_order(self) -> Tensor:
        """(N,) long on the weights' device: the raster index of each sequence position."""
        return self._table("token_order")

    @property
    def freqs_cis(self) -> Tensor:
        """(N + k, head_dim/2, 2) float32 RoPE table of the input stream (class, anchors, M tokens, the rest)."""
        return self._table("freqs_cis")

    @property
    def group_mask(self) -> Tensor:
        """(N, N) bool attention mask of the input stream (True = attend)."""
        return self._table("group_mask")

    def from_raster(self, x: Tensor) -> Tensor:
        """(B, N, ...) in raster order → sequence (region) order."""
        return x[:, self.token_order.to(x.device)]

    def to_raster(self, x: Tensor) -> Tensor:
        """(B, N, ...) in sequence order → raster order (what ``VQTokenizer.decode_tokens`` expects)."""
        return x[:, self._table("raster_to_sequence").to(x.device)]

    @property
    def ar_token_num(self) -> int:
        return self.args.ar_token_num

    @property
    def num_classes(self) -> int:
        return self.args.num_classes

    @property
    def condition(self) -> ClassCondition:
        return ClassCondition(self.num_classes, self.null_class)

    @property
    def null_class(self) -> int | None:
        """Index of the unconditional (CFG) class, or None when the class table has no null row."""
        return self.args.num_classes if self.cls_embedding.embedding_table.num_embeddings > self.num_classes else None

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def seq_len(self) -> int:
        return self.args.block_size

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.args.grid_size, self.args.grid_size)

    # -- teacher forcing -------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, class_labels: Tensor) -> Tensor:
        """tokens (B, N) long raster order, class_labels (B,) long → logits (B, N, V) float32, raster order.
        In training mode class labels are dropped to the null class with probability ``class_dropout_prob``."""
        self.check_tokens(tokens, "tokens", exact=True)
        class_labels = self.condition.check(class_labels, tokens.shape[0])
        seq = self.from_raster(tokens)
        return self.to_raster(self.logits_from_prefix(seq[:, : self.decode_groups()[-1][0]], class_labels))

    def _stream(self, h: Tensor, tokens: Tensor | None) -> Tensor:
        """Input embeddings (B, P, dim) [class, z0..z(k−1), M, z(k)..] from the class embedding h (B, 1, dim) and
        ``tokens`` (B, T) in sequence order (P = the end of the decode group starting at T)."""
        k, t = self.ar_token_num, 0 if tokens is None else tokens.shape[1]
        if t > 0:
            h = torch.cat([h, self.tok_embeddings(tokens[:, :k])], dim=1)
        if t >= k:
            h = torch.cat([h, self.spe_tok_embeddings(h.shape[0]), self.tok_embeddings(tokens[:, k:])], dim=1)
        return h

    def _stream_len(self, t: int) -> int:
        """Inputs needed to predict the decode group that starts at sequence position t (= its end)."""
        return t + 1 if t < self.ar_token_num else t + self.ar_token_num

    def logits_from_prefix(self, tokens: Tensor | None, class_labels: Tensor) -> Tensor:
        """Teacher forcing in sequence order, unvalidated labels (the null class allowed): tokens (B, T) long, T a
        decode-group start → logits (B, E, V) float32 for sequence positions 0..E−1, E the end of that group."""
        t = 0 if tokens is None else tokens.shape[1]
        if t not in {s for s, _ in self.decode_groups()}:
            raise ValueError(f"tokens: length {t} does not end a decode group of PAR-{self.ar_token_num}x")
        h = self.tok_dropout(self._stream(self.cls_embedding(class_labels), tokens))
        s = h.shape[1]
        freqs, mask = self.freqs_cis[:s], self.group_mask[:s, :s]
        for layer in self.layers:
            h = layer(h, freqs, mask=mask)
        return self.output(self.norm(h)).float()

    def check_tokens(
        self, tokens: Tensor, name: str = "tokens", max_len: int | None = None, exact: bool = False
    ) -> None:
        """(B, N) integer ids in [0, vocab_size); N ≤ max_len, or N = seq_len (the whole grid) when ``exact``."""
        g = self.args.grid_size
        check_token_ids(tokens, self.vocab_size, name, length=self.seq_len if exact else None, max_len=max_len,
                        max_len_name="block_size", length_means=f"the {g}x{g} grid in raster order")  # fmt: skip

    # -- KV-cached decoding (the Teacher interface), sequence order -------------------------------------------
    def decode_groups(self) -> list[tuple[int, int]]:
        """k single anchor steps, then groups of k: 4 + 143 = 147 steps for PAR-4x on 24×24."""
        return par_decode_groups(self.seq_len, self.ar_token_num)

    def guidance_scales(self, cfg_scale: float, cfg_interval: float = -1) -> list[float] | None:
        """Per-step CFG scale as in the official ``generate``: guided iff cfg_scale > 1 (None otherwise); with
        ``cfg_interval`` > −1 guidance stops once a counter exceeds it, the counter being the step index among the
        k−1 single steps after the first token, then restarting as the token offset 0, k, 2k, … of the parallel
        steps (the first step is always guided)."""
        if cfg_scale <= 1.0:
            return None
        k, off = self.ar_token_num, (lambda i: cfg_interval > -1 and i > cfg_interval)
        counters = [0] + list(range(k - 1)) + [j * k for j in range(len(self.decode_groups()) - k)]
        return [1.0 if (g > 0 and off(i)) else float(cfg_scale) for g, i in enumerate(counters)]

    def new_cache(self, batch_size: int) -> LlamaGenCache:
        """Zeroed static KV cache for the N input positions (class token included), in the weights' dtype."""
        a, p = self.args, self.output.weight
        shape = (a.n_layer, batch_size, a.kv_heads, find_multiple(self.seq_len, 8), a.head_dim)
        return LlamaGenCache(
            torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)
        )

    def cached_forward(self, cache: LlamaGenCache, h: Tensor) -> Tensor:
        """Run embeddings h (B, S, dim) at positions cache.pos.. under the group mask, filling the cache. Returns
        the final hidden states (B, S, dim) (before the norm); advances ``cache.pos``."""
        start, s = cache.pos, h.shape[1]
        if start + s > cache.k.shape[3]:
            raise ValueError(f"KV cache holds {cache.k.shape[3]} positions; cannot write up to {start + s}")
        freqs = self.freqs_cis[start : start + s]
        mask = self.group_mask[start : start + s, : start + s] if s > 1 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, (cache.k[i], cache.v[i]), start, mask)
        cache.pos = start + s
        return h

    def begin(self, class_labels: Tensor, prefix: Tensor | None = None) -> tuple[LlamaGenCache, Tensor]:
        """Prefill [class, prefix]: class_labels (B,) (null class allowed), prefix (B, T) long in sequence order
        ending a decode group, or None. Returns (cache, logits (B, n, V) float32 of the group starting at T)."""
        t = 0 if prefix is None else prefix.shape[1]
        cache = self.new_cache(class_labels.shape[0])
        h = self.cls_embedding.embedding_table(class_labels).unsqueeze(1)
        h = self.cached_forward(cache, self._stream(h, prefix))
        return cache, self.output(self.norm(h[:, t - self._stream_len(t) :])).float()

    def advance(self, cache: LlamaGenCache, tokens: Tensor) -> Tensor:
        """Feed the tokens (B, n) just decoded; returns logits (B, n', V) float32 of the next group. After the last
        anchor the M tokens enter with it (the first parallel step)."""
        h = self.tok_embeddings(tokens)
        if cache.pos == self.ar_token_num:
            h = torch.cat([h, self.spe_tok_embeddings(h.shape[0])], dim=1)
        return self.output(self.norm(self.cached_forward(cache, h))).float()


# ----------------------------------------------------------------------------------------------------------
# helpers for loading
# ----------------------------------------------------------------------------------------------------------
def _hint(sd: Mapping[str, Tensor]) -> str | None:
    """Which PAR preset the checkpoint's shapes fit (size from dim/layers, k from the transition table)."""
    emb, spe = sd.get("tok_embeddings.weight"), sd.get(TRANSITION_KEY)
    if emb is None:
        return None
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.") and k.endswith("attention_norm.weight")})
    k = None if spe is None else int(spe.shape[0]) + 1
    size = next((n for n, p in LLAMAGEN_PRESETS.items() if (p["dim"], p["n_layer"]) == (emb.shape[1], n_layer)), None)
    desc = f"{n_layer} layers, dim {emb.shape[1]}, vocab {emb.shape[0]}" + (f", ar_token_num {k}" if k else "")
    name = f"PAR-{size[4:]}-{k}x" if size and k else None
    if name in PAR_PRESETS:
        return f"the checkpoint's shapes ({desc}) fit preset {name!r}"
    fit = size or "no official size"
    return f"the checkpoint's shapes ({desc}) fit {fit}; pass dim=/n_layer=/n_head=/ar_token_num="


def load_par(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    *,
    preset: str | None = None,
    block_size: int | None = None,
    **config: Any,
) -> tuple[PAR, Any]:
    """``(par, vq)`` in eval mode for the ``par`` family: a folder is read with ``from_pretrained``, a file as an
    official checkpoint (``PAR-XXL-4x.pt``) with ``from_official``; the tokenizer is LlamaGen's VQ (a folder or
    ``vq_ds16_c2i.pt``)."""
    from distilled_decoding.teachers.llamagen import load_with_vq

    return load_with_vq(PAR, model, tokenizer, preset=preset, block_size=block_size, **config)
