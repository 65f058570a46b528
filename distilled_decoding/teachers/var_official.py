"""Reading official VAR checkpoints: the configuration a state dict implies, and what to say when a file does not
fit (depth, attention variant, shared AdaLN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from distilled_decoding.checkpoints import CheckpointError
from distilled_decoding.teachers.var_config import var_depth_config
from distilled_decoding.tokenizers.msvq import PATCH_NUMS_256, PATCH_NUMS_512

__all__ = ["official_var_config", "file_facts", "describe_config", "config_hint"]


def file_facts(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """What a VAR state dict says about its architecture (only the entries it determines)."""
    out: dict[str, Any] = {}
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        out["depth"] = max(blocks) + 1
    if "pos_1LC" in sd and sd["pos_1LC"].ndim == 3:
        out["L"], out["embed_dim"] = int(sd["pos_1LC"].shape[1]), int(sd["pos_1LC"].shape[2])
    if "head.weight" in sd:
        out["vocab_size"] = int(sd["head.weight"].shape[0])
    if "word_embed.weight" in sd:
        out["Cvae"] = int(sd["word_embed.weight"].shape[1])
    if "class_emb.weight" in sd:
        out["num_classes"] = int(sd["class_emb.weight"].shape[0]) - 1
    if blocks:
        out["attn_l2_norm"] = "blocks.0.attn.scale_mul_1H11" in sd
        out["shared_aln"] = "shared_ada_lin.1.weight" in sd
        if out["attn_l2_norm"]:
            out["num_heads"] = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1])
    return out


def official_var_config(
    sd: Mapping[str, Tensor], *, depth: int | None = None, filename: str = "", **overrides: Any
) -> dict[str, Any]:
    """Constructor arguments for an official VAR state dict: the ``build_vae_var`` recipe of ``depth`` (read from the
    checkpoint when None), then the fields the tensors determine (vocab, Cvae, classes, shared_aln, attn_l2_norm,
    256/512px patch_nums), then ``overrides``."""
    facts = file_facts(sd)
    if "depth" not in facts or "embed_dim" not in facts:
        raise CheckpointError(
            f"{filename}: not a VAR transformer state dict (no blocks.{{i}} / pos_1LC keys); "
            "is it the VQVAE file? pass that as vae_path"
        )
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r}: expected a positive int (16, 20, 24, 30 or 36 for the released models)")
        base = var_depth_config(depth)
    elif facts["embed_dim"] == 64 * facts["depth"]:
        base = var_depth_config(facts["depth"])
    else:
        base = {**var_depth_config(facts["depth"]), "embed_dim": facts["embed_dim"]}
        base["num_heads"] = facts.get("num_heads", max(1, facts["embed_dim"] // 64))
    file_cfg = {k: facts[k] for k in ("vocab_size", "Cvae", "num_classes", "attn_l2_norm", "shared_aln") if k in facts}
    if depth is None and "num_heads" in facts:
        file_cfg["num_heads"] = facts["num_heads"]
    pn_by_len = {sum(p * p for p in pns): pns for pns in (PATCH_NUMS_256, PATCH_NUMS_512)}
    if facts.get("L") in pn_by_len:
        file_cfg["patch_nums"] = pn_by_len[facts["L"]]
    elif "patch_nums" not in overrides:
        raise ValueError(
            f"{filename}: L={facts.get('L')} positions fit neither official schedule (680 for {PATCH_NUMS_256}, 2240 "
            f"for {PATCH_NUMS_512}); pass patch_nums="
        )
    return {**base, **file_cfg, **overrides}


def describe_config(cfg: Mapping[str, Any]) -> str:
    return (
        f"depth {cfg['depth']}, embed_dim {cfg['embed_dim']}, {cfg['num_heads']} heads, vocab {cfg.get('vocab_size')}, "
        f"{cfg.get('num_classes')} classes, attn_l2_norm={cfg.get('attn_l2_norm')}, shared_aln={cfg.get('shared_aln')}"
    )


def config_hint(cfg: Mapping[str, Any], sd: Mapping[str, Tensor]) -> str | None:
    facts = file_facts(sd)
    if "depth" not in facts:
        return "hint: this is not a VAR transformer state dict; is it the VQVAE file? pass that as vae_path"
    parts = []
    d, c = facts["depth"], facts.get("embed_dim")
    if d != cfg["depth"] or c != cfg["embed_dim"]:
        recipe = " (the build_vae_var recipe: embed_dim = 64·depth)" if c == 64 * d else ""
        parts.append(f"the checkpoint has {d} blocks of width {c}: it fits depth={d}{recipe}, not depth={cfg['depth']}")
    l2 = facts.get("attn_l2_norm")
    if l2 is not None and l2 != cfg["attn_l2_norm"]:
        parts.append(
            "the checkpoint was trained "
            + ("with" if l2 else "without")
            + " l2-normalised attention (attn_l2_norm="
            + str(l2)
            + ": q and k l2-normalised, q scaled by exp(min(scale_mul_1H11, log 100)) per head, softmax scale 1; "
            "without it the softmax scale is 0.25/sqrt(head_dim) and there is no scale_mul_1H11). Early uploads of "
            "var_d16/d20 lack scale_mul_1H11; omit attn_l2_norm= to read it from the file"
        )
    sh = facts.get("shared_aln")
    if sh is not None and sh != cfg["shared_aln"]:
        parts.append(f"the checkpoint has shared_aln={sh} (shared_ada_lin + blocks.{{i}}.ada_gss, as VAR-d36)")
    return ("hint: " + "; ".join(parts)) if parts else None
