"""Reading official LlamaGen VQ tokenizer files: the configuration a state dict implies (its tensor shapes), and
what to say when a file does not fit (which preset its shapes fit instead)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from distilled_decoding.checkpoints import CheckpointError
from distilled_decoding.model_config import config_fields
from distilled_decoding.tokenizers.vq_config import VQ_PRESETS, VQConfig

__all__ = ["infer_vq_config", "official_vq_config", "describe_config", "matching_preset", "preset_hint"]

_ARCH_FIELDS = ("encoder_ch_mult", "decoder_ch_mult", "ch", "num_res_blocks", "z_channels")


def _level_widths(sd: Mapping[str, Tensor], part: str) -> tuple[list[int], int]:
    """Output widths of ``{part}.conv_blocks.{i}`` (module order) and the number of res blocks per level."""
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    pat = re.compile(rf"^{part}\.conv_blocks\.(\d+)\.res\.(\d+)\.conv2\.weight$")
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            blocks[i] = max(blocks.get(i, 0), j + 1)
            if j == 0:
                widths[i] = int(v.shape[0])
    if not widths or sorted(widths) != list(range(len(widths))):
        raise CheckpointError(f"no {part}.conv_blocks.{{i}}.res.{{j}}.conv2.weight keys found")
    return [widths[i] for i in range(len(widths))], blocks[0]


def infer_vq_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of a LlamaGen VQ state dict, read from its tensor shapes.

    Returns ``codebook_size``, ``codebook_embed_dim``, ``codebook_show_usage``, ``z_channels``, ``ch``,
    ``num_res_blocks``, ``encoder_ch_mult``, ``decoder_ch_mult``. The loss settings (``codebook_l2_norm``,
    ``commit_loss_beta``, ``entropy_loss_ratio``, ``dropout_p``) are not stored in the files. Raises
    :class:`~distilled_decoding.checkpoints.CheckpointError` when the keys are not those of a VQ tokenizer.
    """
    try:
        size, dim = state_dict["quantize.embedding.weight"].shape
        ch = int(state_dict["encoder.conv_in.weight"].shape[0])
        z_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            "not a LlamaGen VQ tokenizer state dict (needs quantize.embedding.weight (V, D), "
            f"encoder.conv_in.weight, encoder.conv_out.weight; problem with {e})"
        ) from e
    enc, n_res = _level_widths(state_dict, "encoder")
    dec, _ = _level_widths(state_dict, "decoder")
    if any(w % ch for w in enc + dec):
        raise CheckpointError(f"level widths {enc} / {dec} are not multiples of ch={ch}")
    return {
        "codebook_size": int(size),
        "codebook_embed_dim": int(dim),
        "codebook_show_usage": "quantize.codebook_used" in state_dict,
        "z_channels": z_channels,
        "ch": ch,
        "num_res_blocks": n_res,
        "encoder_ch_mult": tuple(w // ch for w in enc),
        "decoder_ch_mult": tuple(w // ch for w in reversed(dec)),
    }


def official_vq_config(state_dict: Mapping[str, Tensor], preset: str | None, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments for an official file: the architecture read from its shapes (``preset=None``) or the
    named preset, ``codebook_show_usage`` following the file (whether it has ``quantize.codebook_used``), then
    ``overrides`` (config fields)."""
    if preset is None:
        cfg = {**VQ_PRESETS["VQ-16"], **infer_vq_config(state_dict)}
    elif preset in VQ_PRESETS:
        cfg = dict(VQ_PRESETS[preset])
    else:
        raise ValueError(f"preset={preset!r}: expected None (infer from the file) or one of {sorted(VQ_PRESETS)}")
    cfg["codebook_show_usage"] = "quantize.codebook_used" in state_dict
    fields = config_fields(VQConfig)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown VQTokenizer config field(s) {unknown}; valid: {sorted(fields)}")
    return {**cfg, **overrides}


def describe_config(cfg: Mapping[str, Any]) -> str:
    """One line naming the architecture fields of a (complete) config mapping."""
    return (
        f"codebook {cfg['codebook_size']}x{cfg['codebook_embed_dim']}, ch={cfg['ch']}, "
        f"encoder_ch_mult={tuple(cfg['encoder_ch_mult'])}, decoder_ch_mult={tuple(cfg['decoder_ch_mult'])}, "
        f"num_res_blocks={cfg['num_res_blocks']}, z_channels={cfg['z_channels']}"
    )


def matching_preset(cfg: Mapping[str, Any]) -> str | None:
    """The name of the preset whose architecture fields equal those of ``cfg``, or None."""
    for name, p in VQ_PRESETS.items():
        if all(tuple(p[f]) == tuple(cfg[f]) if "mult" in f else p[f] == cfg[f] for f in _ARCH_FIELDS):
            return name
    return None


def preset_hint(state_dict: Mapping[str, Tensor]) -> str:
    """What the file's shapes say and which preset (if any) they fit: the hint of a failed strict load."""
    try:
        cfg = infer_vq_config(state_dict)
    except CheckpointError as e:
        return f"hint: {e}; is this a GPT/VAR checkpoint rather than a LlamaGen VQ tokenizer?"
    preset = matching_preset(cfg)
    fit = f"preset={preset!r}" if preset else "no preset"
    return (
        f"hint: the checkpoint's shapes say {describe_config(cfg)}; that fits {fit}. Pass preset=None to build the "
        "architecture from the checkpoint, or the matching preset / config overrides."
    )
