"""Reading official LlamaGen checkpoints: the model configuration a state dict implies, and what to say when a
file does not fit (which preset its shapes fit instead).

The files do not store ``ModelArgs``: the sizes come from a preset (named, or inferred from the tensor shapes),
vocab and class counts from the tensors, ``block_size`` from the file name (``c2i_L_384.pt`` → 24×24 = 576).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from distilled_decoding.teachers.llamagen_config import LLAMAGEN_PRESETS, LlamaGenConfig

__all__ = ["official_config", "infer_preset", "preset_hint", "describe_config", "PAR_TRANSITION_KEY"]

#: State-dict key of PAR's k−1 transition embeddings: its presence marks a PAR checkpoint (LlamaGen has none).
PAR_TRANSITION_KEY = "spe_tok_embeddings.special_embeddings.weight"


def official_config(
    sd: Mapping[str, Tensor],
    *,
    filename: str = "",
    preset: str | None = None,
    block_size: int | None = None,
    **config: Any,
) -> dict[str, Any]:
    """The constructor arguments for an official checkpoint: preset sizes (inferred from the shapes when
    ``preset`` is None), vocab size and class count read from the tensors, ``block_size`` from the file name
    (``_384`` → 576, otherwise 256) unless given, then explicit ``config`` overrides."""
    if preset is not None and preset not in LLAMAGEN_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(LLAMAGEN_PRESETS)}")
    if preset is None and not {"dim", "n_layer", "n_head"} <= config.keys():
        preset = infer_preset(sd)
        if preset is None:
            raise ValueError(
                f"{filename}: its shapes fit no official preset ({_describe(sd)}); pass preset= or "
                "dim=/n_layer=/n_head= explicitly"
            )
    if block_size is None:
        m = re.search(r"_(\d{3})(?:\D|$)", Path(filename).stem)
        block_size = (int(m.group(1)) // 16) ** 2 if m and int(m.group(1)) in (256, 384, 512) else 256
    base = dict(LLAMAGEN_PRESETS[preset]) if preset is not None else {}
    return {**base, "block_size": block_size, **_shape_fields(sd), **config}


def _shape_fields(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Config fields that the tensors determine unambiguously (vocab, classes, null row; t2i: model type, caption
    width, number of caption positions)."""
    out: dict[str, Any] = {}
    if "tok_embeddings.weight" in sd:
        out["vocab_size"] = int(sd["tok_embeddings.weight"].shape[0])
    if "cls_embedding.embedding_table.weight" in sd:  # official tables carry the null row
        out["num_classes"] = int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        out["model_type"] = "t2i"
        out["caption_dim"] = int(sd["cls_embedding.cap_proj.fc1.weight"].shape[1])
        if "cls_embedding.uncond_embedding" in sd:
            out["cls_token_num"] = int(sd["cls_embedding.uncond_embedding"].shape[0])
    return out


def _layers(sd: Mapping[str, Tensor]) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("layers.") and k.endswith("attention_norm.weight")})


def _describe(sd: Mapping[str, Tensor]) -> str:
    emb = sd.get("tok_embeddings.weight")
    cls = sd.get("cls_embedding.embedding_table.weight")
    parts = [f"{_layers(sd)} layers"]
    if emb is not None:
        parts += [f"dim {emb.shape[1]}", f"vocab {emb.shape[0]}"]
    if cls is not None:
        parts.append(f"class table {cls.shape[0]} rows")
    cap = sd.get("cls_embedding.cap_proj.fc1.weight")
    if cap is not None:
        parts.append(f"caption width {cap.shape[1]} (t2i)")
    return ", ".join(parts)


def describe_config(cfg: Mapping[str, Any]) -> str:
    c = {**asdict(LlamaGenConfig()), **cfg}
    cond = f"{c['num_classes']} classes"
    if c["model_type"] == "t2i":
        cond = f"t2i, {c['cls_token_num']} caption positions of width {c['caption_dim']}"
    return (
        f"dim {c['dim']}, {c['n_layer']} layers, {c['n_head']} heads, vocab {c['vocab_size']}, "
        f"{cond}, block_size {c['block_size']}"
    )


def infer_preset(sd: Mapping[str, Tensor]) -> str | None:
    emb = sd.get("tok_embeddings.weight")
    if emb is None:
        return None
    n_layer, dim = _layers(sd), int(emb.shape[1])
    for name, p in LLAMAGEN_PRESETS.items():
        if p["dim"] == dim and p["n_layer"] == n_layer:
            return name
    return None


def preset_hint(sd: Mapping[str, Tensor]) -> str | None:
    name = infer_preset(sd)
    desc = _describe(sd)
    cls = sd.get("cls_embedding.embedding_table.weight")
    classes = f", num_classes={cls.shape[0] - 1}" if cls is not None else ""
    if name is not None:
        return f"the checkpoint's shapes ({desc}) fit preset {name!r}{classes}"
    return f"the checkpoint's shapes ({desc}) fit no official preset; pass dim=/n_layer=/n_head={classes}"
