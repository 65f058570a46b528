"""Teacher AR models: LlamaGen (raster order), VAR (next-scale)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["load_llamagen_teacher", "load_var_teacher", "load_teacher"]


def load_llamagen_teacher(
    gpt: str | os.PathLike,
    vq: str | os.PathLike,
    *,
    preset: str | None = None,
    block_size: int | None = None,
    vq_preset: str | None = None,
    **gpt_config: Any,
):
    """Load a LlamaGen teacher and its VQ tokenizer from either kind of source.

    A folder is read with ``from_pretrained`` (what ``save_pretrained`` wrote, e.g. the embedded default in
    ``checkpoints/digits_llamagen/{gpt,vq}``); a file is an official checkpoint (``c2i_B_256.pt``,
    ``vq_ds16_c2i.pt``, or a Hub reference such as ``FoundationVision/LlamaGen/c2i_B_256.pt``) read with
    ``from_official``. Returns ``(gpt, vq)`` in eval mode.
    """
    from distilled_decoding.teachers.llamagen import LlamaGen
    from distilled_decoding.tokenizers.vq import VQTokenizer

    for name, p in (("gpt", gpt), ("vq", vq)):
        _check_source(name, p, "a save_pretrained folder, an official file or a Hub reference")
    if Path(gpt).is_dir():
        model = LlamaGen.from_pretrained(gpt)
    else:
        model = LlamaGen.from_official(gpt, preset=preset, block_size=block_size, **gpt_config)
    tok = VQTokenizer.from_pretrained(vq) if Path(vq).is_dir() else VQTokenizer.from_official(vq, preset=vq_preset)
    if tok.codebook_size != model.vocab_size:
        raise ValueError(
            f"vq: codebook of {tok.codebook_size} entries does not match the GPT's vocab_size {model.vocab_size}"
        )
    return model.eval(), tok.eval()


def load_var_teacher(
    var: str | os.PathLike, vae: str | os.PathLike | None = None, *, depth: int | str | None = None, **overrides: Any
):
    """Load a VAR teacher with its multi-scale VQVAE: a ``save_pretrained`` folder (which holds the VAE), or the
    official ``var_d16.pth`` + ``vae_ch160v4096z32.pth`` files (local paths or Hub references such as
    ``FoundationVision/var/var_d16.pth``). Returns ``(var, var.vae)`` in eval mode."""
    from distilled_decoding.teachers.var import VAR

    _check_source("var", var, "a save_pretrained folder, an official .pth file or a Hub reference")
    if Path(var).is_dir():
        model = VAR.from_pretrained(var)
    else:
        if vae is None:
            raise ValueError("vae: an official VAR checkpoint needs its VAE file (vae_ch160v4096z32.pth)")
        if isinstance(depth, str):
            depth = int(depth.lstrip("d"))
        model = VAR.from_official(var, vae, depth=depth, **overrides)
    if getattr(model, "vae", None) is None:
        raise ValueError(f"var: {var} carries no VAE; pass the VAE file as well")
    return model.eval(), model.vae.eval()


def _check_source(name: str, source: str | os.PathLike, expected: str) -> None:
    from distilled_decoding.hub import is_hub_reference

    if not (Path(source).exists() or is_hub_reference(source)):
        raise ValueError(f"{name}: {os.fspath(source)} does not exist (expected {expected})")


def load_teacher(kind: str, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **kwargs: Any):
    """``(teacher, tokenizer)`` for ``kind`` "llamagen" (GPT + VQ) or "var" (VAR + its VQVAE)."""
    if kind == "llamagen":
        if tokenizer is None:
            raise ValueError("tokenizer: a LlamaGen teacher needs its VQ tokenizer (folder or vq_ds16_c2i.pt)")
        preset = kwargs.pop("preset", None)
        return load_llamagen_teacher(model, tokenizer, preset=preset, **kwargs)
    if kind == "var":
        kwargs.pop("block_size", None)
        return load_var_teacher(model, tokenizer, depth=kwargs.pop("preset", None), **kwargs)
    raise ValueError(f"kind={kind!r}: expected 'llamagen' or 'var'")
