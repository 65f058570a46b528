"""VAR's configuration (the official ``VAR`` constructor names, validated) and the released sizes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distilled_decoding.configs import ValidatedConfig
from distilled_decoding.tokenizers.msvq import PATCH_NUMS_256, PATCH_NUMS_512

__all__ = ["VARBackbone", "VARConfig", "VAR_PRESETS", "var_depth_config"]


@dataclass
class VARBackbone(ValidatedConfig):
    """The official ``VAR`` constructor arguments that fix the transformer — shared by the teacher's config and by
    the configs of the students built on it. Defaults are VAR-d16 as ``build_vae_var`` builds it (note
    ``attn_l2_norm=True``; the official class default is False)."""

    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1 * 16 / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: Sequence[int] = PATCH_NUMS_256
    vocab_size: int = 4096


@dataclass
class VARConfig(VARBackbone):
    """The official ``VAR`` constructor arguments (without the VAE object): the backbone's plus ``cond_drop_rate``,
    ``Cvae`` (read from the VAE upstream) and ``vae_config`` (the owned VAE's config, or None)."""

    cond_drop_rate: float = 0.1
    Cvae: int = 32  # noqa: N815 - official name
    vae_config: Mapping[str, Any] | None = None

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"VAR config {name}={getattr(self, name)!r}: expected {expected}")

        for name in ("num_classes", "depth", "embed_dim", "num_heads", "vocab_size", "Cvae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "a positive int")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"a multiple of num_heads={self.num_heads}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise bad(name, "a probability in [0, 1)")
        for name in ("mlp_ratio", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise bad(name, "a finite number > 0")
        for name in ("shared_aln", "attn_l2_norm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        pns = self.patch_nums
        if (
            isinstance(pns, (str, bytes))
            or not isinstance(pns, Sequence)
            or len(pns) < 2
            or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in pns)
            or any(a >= b for a, b in zip(pns, pns[1:]))
        ):
            raise bad(
                "patch_nums", "at least 2 strictly increasing positive ints, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)"
            )
        self.patch_nums = tuple(int(p) for p in pns)
        if self.vae_config is not None and not isinstance(self.vae_config, Mapping):
            raise bad("vae_config", "None or a dict of MultiScaleVQVAE config fields")


def var_depth_config(depth: int) -> dict[str, Any]:
    """The official ``build_vae_var`` recipe for a depth: width 64·depth, depth heads (head_dim 64), mlp_ratio 4,
    drop_path 0.1·depth/24, norm_eps 1e-6, l2-normalised attention; depth 36 = shared AdaLN at 512px."""
    d36 = depth == 36
    return dict(
        depth=depth,
        embed_dim=depth * 64,
        num_heads=depth,
        mlp_ratio=4.0,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1 * depth / 24,
        norm_eps=1e-6,
        shared_aln=d36,
        cond_drop_rate=0.1,
        attn_l2_norm=True,
        patch_nums=PATCH_NUMS_512 if d36 else PATCH_NUMS_256,
    )


#: Released sizes (``var_d{16,20,24,30,36}.pth``); values are constructor arguments.
VAR_PRESETS: dict[str, dict[str, Any]] = {f"d{d}": var_depth_config(d) for d in (16, 20, 24, 30, 36)}
