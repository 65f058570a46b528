"""The LlamaGen VQ tokenizer's configuration (the official ``ModelArgs`` fields, validated) and its official sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from distilled_decoding.configs import ValidatedConfig
from distilled_decoding.tokenizers.layers import check_group_widths

__all__ = ["VQConfig", "VQ_PRESETS"]


def _positive_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


@dataclass
class VQConfig(ValidatedConfig):
    """The official ``ModelArgs`` fields plus ``ch`` and ``num_res_blocks`` (hard-coded 128 and 2 upstream; exposed
    for small tokenizers). Defaults are VQ-16. The loss settings (``codebook_l2_norm``, ``commit_loss_beta``,
    ``entropy_loss_ratio``, ``dropout_p``) are not stored in the official files."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"VQTokenizer config {name}={getattr(self, name)!r}: expected {expected}")

        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
            if not _positive_int(getattr(self, name)):
                raise bad(name, "a positive int")
        for name in ("codebook_l2_norm", "codebook_show_usage"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name in ("commit_loss_beta", "entropy_loss_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite float >= 0")
        p = self.dropout_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise bad("dropout_p", "a float in [0, 1)")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            m = getattr(self, name)
            if isinstance(m, (str, bytes)) or not isinstance(m, Sequence) or not m or not all(map(_positive_int, m)):
                raise bad(name, "a non-empty sequence of positive ints, e.g. (1, 1, 2, 2, 4)")
            check_group_widths("VQTokenizer", self.ch, name, m)
            setattr(self, name, tuple(int(x) for x in m))
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"VQTokenizer config encoder_ch_mult={self.encoder_ch_mult} and decoder_ch_mult={self.decoder_ch_mult} "
                "must have the same length (the decoder must upsample by the factor the encoder downsamples)"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: 2 ** (len(encoder_ch_mult) - 1)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


#: Official LlamaGen tokenizer sizes (``VQ_models`` in ``vq_model.py``); values are all constructor arguments.
VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": asdict(VQConfig()),
    "VQ-8": asdict(VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))),
}
