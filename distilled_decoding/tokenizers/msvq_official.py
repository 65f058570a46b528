"""Reading official VAR VQVAE files: the configuration a state dict implies (its tensor shapes), and what to say
when a file does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from distilled_decoding.checkpoints import CheckpointError
from distilled_decoding.model_config import config_fields
from distilled_decoding.tokenizers.msvq_config import MSVQConfig

__all__ = ["infer_msvq_config", "official_msvq_config", "fit_usage_buffer", "describe_config", "config_hint"]


def _phi_keys(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    ls = {int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight")}
    if ls:
        return {"share_quant_resi": len(ls)}
    if "quantize.quant_resi.qresi.weight" in sd:
        return {"share_quant_resi": 1}
    own = {int(k.split(".")[2]) for k in sd if k.startswith("quantize.quant_resi.") and k.endswith(".weight")}
    if own:
        return {"share_quant_resi": 0, "default_qresi_counts": len(own)}
    return {"quant_resi": 0.0}


def infer_msvq_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of an official VQVAE state dict, read from its tensor shapes: ``vocab_size``,
    ``z_channels``, ``ch``, ``ch_mult``, ``num_res_blocks``, ``using_sa``, ``using_mid_sa``, ``quant_conv_ks``,
    ``in_channels`` and the Phi layout (``share_quant_resi`` / ``default_qresi_counts`` / ``quant_resi`` = 0).
    ``v_patch_nums`` is not stored (only the scale count, in ``quantize.ema_vocab_hit_SV``) and is not returned."""
    try:
        vocab, cvae = state_dict["quantize.embedding.weight"].shape
        ch, c_in = state_dict["encoder.conv_in.weight"].shape[:2]
        ks = state_dict["quant_conv.weight"].shape[-1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            "not a VAR multi-scale VQVAE state dict (needs quantize.embedding.weight (V, Cvae), "
            f"encoder.conv_in.weight, quant_conv.weight; problem with {e})"
        ) from e
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if len(parts) == 7 and parts[:2] == ["encoder", "down"] and parts[3] == "block" and parts[5] == "conv1":
            i, j = int(parts[2]), int(parts[4])
            blocks[i] = max(blocks.get(i, 0), j + 1)
            if j == 0 and parts[6] == "weight":
                widths[i] = int(v.shape[0])
    if not widths or sorted(widths) != list(range(len(widths))) or any(w % ch for w in widths.values()):
        raise CheckpointError(f"cannot read the encoder levels (encoder.down.{{i}}.block.0.conv1): widths {widths}")
    last = len(widths) - 1
    return {
        "vocab_size": int(vocab),
        "z_channels": int(cvae),
        "ch": int(ch),
        "in_channels": int(c_in),
        "ch_mult": tuple(widths[i] // ch for i in range(len(widths))),
        "num_res_blocks": blocks[0],
        "using_sa": f"encoder.down.{last}.attn.0.qkv.weight" in state_dict,
        "using_mid_sa": "encoder.mid.attn_1.qkv.weight" in state_dict,
        "quant_conv_ks": int(ks),
        **_phi_keys(state_dict),
    }


def describe_config(cfg: Mapping[str, Any]) -> str:
    """One line naming the architecture fields of a (complete) config mapping."""
    return (
        f"vocab {cfg['vocab_size']}, z_channels {cfg['z_channels']}, ch {cfg['ch']}, ch_mult "
        f"{tuple(cfg['ch_mult'])}, num_res_blocks {cfg['num_res_blocks']}, share_quant_resi "
        f"{cfg['share_quant_resi']}, quant_resi {cfg['quant_resi']}"
    )


def config_hint(state_dict: Mapping[str, Tensor]) -> str:
    """What the file's shapes say: the hint of a failed strict load."""
    try:
        cfg = {**asdict(MSVQConfig()), **infer_msvq_config(state_dict)}
    except CheckpointError as e:
        return f"hint: {e}; is this a VAR transformer or LlamaGen checkpoint rather than the VAR VQVAE?"
    return f"hint: the checkpoint's shapes say {describe_config(cfg)}"


def official_msvq_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> dict[str, Any]:
    """Constructor arguments for an official file: the architecture read from its shapes
    (:func:`infer_msvq_config`), then ``overrides`` (config fields; ``v_patch_nums`` is not stored in the files)."""
    fields = config_fields(MSVQConfig)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown MultiScaleVQVAE config field(s) {unknown}; valid: {sorted(fields)}")
    return {**infer_msvq_config(state_dict), **overrides}


def fit_usage_buffer(state_dict: Mapping[str, Tensor], num_scales: int) -> Mapping[str, Tensor]:
    """As the official ``VQVAE.load_state_dict``: a ``quantize.ema_vocab_hit_SV`` (S', V) usage buffer recorded for
    another scale count S' != ``num_scales`` is replaced by zeros (num_scales, V); otherwise ``state_dict`` as is."""
    hit = state_dict.get("quantize.ema_vocab_hit_SV")
    if hit is not None and hit.ndim == 2 and hit.shape[0] != num_scales:
        return {**state_dict, "quantize.ema_vocab_hit_SV": torch.zeros(num_scales, hit.shape[1], dtype=hit.dtype)}
    return state_dict
