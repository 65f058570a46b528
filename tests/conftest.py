"""Shared fixtures: tiny random-weight models that build in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_GPT = dict(
    dim=64,
    n_layer=2,
    n_head=4,
    multiple_of=32,
    vocab_size=64,
    num_classes=10,
    block_size=16,
    token_dropout_p=0.0,
    resid_dropout_p=0.0,
    ffn_dropout_p=0.0,
)

TINY_VQ = dict(
    codebook_size=64,
    codebook_embed_dim=8,
    ch=32,
    encoder_ch_mult=(1, 2),
    decoder_ch_mult=(1, 2),
    z_channels=32,
    num_res_blocks=1,
    codebook_show_usage=False,
)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.08) -> torch.nn.Module:
    """Give every parameter non-trivial random values (official init zeroes the output head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * (scale if p.ndim > 1 else 0.3)
            p.copy_(noise + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


@pytest.fixture()
def tiny_gpt():
    from distilled_decoding import LlamaGen

    return randomize_(LlamaGen(**TINY_GPT)).eval()


TINY_VAR = dict(num_classes=10, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3), vocab_size=64, Cvae=8,
                drop_path_rate=0.0)  # fmt: skip
TINY_VAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                using_mid_sa=False, v_patch_nums=(1, 2, 3))  # fmt: skip


def _tiny_llamagen(seed: int):
    from distilled_decoding import LlamaGen

    gpt = randomize_(LlamaGen(**TINY_GPT), seed=seed).eval()
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return gpt, codebook


def _tiny_var(seed: int):
    from distilled_decoding import VAR

    torch.manual_seed(seed)
    var = randomize_(VAR(**TINY_VAR, vae_config=TINY_VAE), seed=seed).eval()
    return var, var.vae.codebook


#: A tiny random-weight teacher and its codebook for every registered family: the shared teacher contract
#: (tests/test_teacher_contract.py) runs over all of them, and fails for a family registered without one.
def _tiny_par(seed: int):
    from distilled_decoding import PAR

    par = randomize_(PAR(**{**TINY_GPT, "block_size": 64, "ar_token_num": 4, "spe_token_num": 3}), seed=seed).eval()
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return par, codebook


TINY_TEACHERS = {"llamagen": _tiny_llamagen, "var": _tiny_var, "par": _tiny_par}


@pytest.fixture()
def one_thread():
    """One torch thread for the test (many small ops: faster than two on a shared 2-core CPU, stable times)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
