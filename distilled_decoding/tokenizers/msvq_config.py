"""VAR's multi-scale VQVAE configuration (the official ``VQVAE`` constructor names plus the ``ddconfig`` fields,
validated) and the official patch-number schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distilled_decoding.configs import ValidatedConfig
from distilled_decoding.tokenizers.layers import check_group_widths

__all__ = ["MSVQConfig", "PATCH_NUMS_256", "PATCH_NUMS_512"]

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  #: official 256px schedule (L = 680)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  #: official 512px schedule (L = 2240, VAR-d36)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class MSVQConfig(ValidatedConfig):
    """The official ``VQVAE`` constructor names plus the ``ddconfig`` fields the official class hard-codes
    (``ch_mult``, ``num_res_blocks``, ``using_sa``, ``using_mid_sa``, ``in_channels``). Defaults are the released
    tokenizer ``vae_ch160v4096z32.pth`` (note ``ch=160``; the official class default is 128).

    Phi layout (``share_quant_resi``): 0 = one Phi per scale (``default_qresi_counts`` of them when > 0), 1 = one
    shared Phi, K > 1 = K Phi convs spread over the scales; ``quant_resi`` = 0 means no Phi convs at all."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: Sequence[int] = PATCH_NUMS_256
    test_mode: bool = True
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    in_channels: int = 3

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"MultiScaleVQVAE config {name}={getattr(self, name)!r}: expected {expected}")

        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "in_channels"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive int")
        for name in ("share_quant_resi", "default_qresi_counts"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an int >= 0")
        if not _is_int(self.quant_conv_ks) or self.quant_conv_ks < 1 or self.quant_conv_ks % 2 == 0:
            raise bad("quant_conv_ks", "a positive odd int (the conv keeps the latent size)")
        for name in ("using_znorm", "test_mode", "using_sa", "using_mid_sa"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name, lo, hi in (("dropout", 0.0, 1.0), ("beta", 0.0, math.inf), ("quant_resi", -1.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise bad(name, f"a float in [{lo}, {hi}]")
        for name in ("v_patch_nums", "ch_mult"):
            v = getattr(self, name)
            if (
                isinstance(v, (str, bytes))
                or not isinstance(v, Sequence)
                or not v
                or not all(_is_int(x) and x >= 1 for x in v)
            ):
                raise bad(name, "a non-empty sequence of positive ints")
            setattr(self, name, tuple(int(x) for x in v))
        pns = self.v_patch_nums
        if len(pns) < 2 or any(a >= b for a, b in zip(pns, pns[1:])):
            raise bad(
                "v_patch_nums", "at least 2 strictly increasing patch numbers, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)"
            )
        check_group_widths("MultiScaleVQVAE", self.ch, "ch_mult", self.ch_mult)

    @property
    def resnet_dropout(self) -> float:
        """The dropout rate the res blocks apply: ``dropout``, or 0 when it is ≤ 1e-6 (official threshold)."""
        return self.dropout if self.dropout > 1e-6 else 0.0
