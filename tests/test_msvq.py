"""VAR's multi-scale VQVAE: equality with the official implementation, Phi tables, checkpoint loading, errors.

``tests/data/msvq_reference.safetensors`` holds a random-weight official ``VQVAE`` (FoundationVision/VAR
``models/vqvae.py`` with ddconfig ch=32, ch_mult (1, 1), num_res_blocks 1, z_channels 8, vocab 64, patch nums
(1, 2, 4, 8); fp16-representable weights stored as ``sd.*``), 16x16 input images and the official outputs (float32,
CPU): ``img_to_idxBl`` tokens, ``idxBl_to_img`` images, ``idxBl_to_var_input``, and the training ``forward``
(reconstruction, VQ loss, gradients of ``rec.square().mean() + vq_loss``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distilled_decoding import CheckpointError, MultiScaleVQVAE
from distilled_decoding.tokenizers.msvq import PATCH_NUMS_256, infer_msvq_config, phi_indices

REF = Path(__file__).parent / "data" / "msvq_reference.safetensors"
PN = (1, 2, 4, 8)
SMALL = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, v_patch_nums=PN)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def sd(ref) -> dict[str, torch.Tensor]:
    return {k[3:]: v.float() if v.is_floating_point() else v for k, v in ref.items() if k.startswith("sd.")}


@pytest.fixture(scope="module")
def vae_path(sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("msvq") / "vae.pth"
    torch.save(sd, path)  # the official format: a raw state dict
    return path


@pytest.fixture(scope="module")
def vae(vae_path) -> MultiScaleVQVAE:
    return MultiScaleVQVAE.from_official(vae_path, v_patch_nums=PN)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_from_official_reads_the_architecture(vae, sd):
    cfg = infer_msvq_config(sd)
    assert cfg == dict(
        vocab_size=64, z_channels=8, ch=32, in_channels=3, ch_mult=(1, 1), num_res_blocks=1, using_sa=True,
        using_mid_sa=True, quant_conv_ks=3, share_quant_resi=4,
    )  # fmt: skip
    assert set(vae.state_dict()) == set(sd)
    assert vae.seq_len == 85 and vae.image_size == 16 and vae.scale_slices[-1] == (21, 85)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())  # test_mode


def test_encode_equals_official(vae, ref):
    tokens = vae.encode(ref["images"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 85)
    assert torch.equal(tokens, ref["tokens"])
    assert tokens.unique().numel() > 20  # the reference exercises many codebook rows


def test_decode_equals_official(vae, ref):
    images = vae.decode_tokens(ref["tokens"])
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1.0  # clamped, as upstream
    assert rel_err(images, ref["decoded"]) <= 1e-5
    # one decode path: tokens are codebook rows
    assert torch.equal(vae.decode_vectors(vae.codebook[ref["tokens"]]), images)
    # decode_vectors on continuous vectors is smooth in its input (no hidden quantisation)
    vec = vae.codebook[ref["tokens"]]
    near = vae.decode_vectors(vec + 1e-4)
    assert 0 < (near - images).abs().max() < 1e-2


def test_teacher_forcing_input_equals_official(vae, ref):
    x = vae.tokens_to_var_input(ref["tokens"])
    assert x.shape == (2, 84, 8)
    assert rel_err(x, ref["var_input"]) <= 1e-5
    # a prefix of whole scales gives the leading inputs; vectors give the same as tokens
    pre = vae.tokens_to_var_input(ref["tokens"][:, :5])
    assert pre.shape == (2, 20, 8) and torch.allclose(pre, x[:, :20], atol=1e-6)
    assert torch.equal(vae.vectors_to_var_input(vae.codebook[ref["tokens"]]), x)
    assert vae.tokens_to_var_input(ref["tokens"][:, :1]).shape == (2, 4, 8)


def test_next_autoregressive_input_chain_matches(vae, ref):
    """Scale-by-scale accumulation (the VAR decoding step) reproduces the teacher-forcing inputs and f_hat."""
    tokens = ref["tokens"]
    f_hat = torch.zeros(2, 8, 8, 8)
    inputs = []
    for si, (a, b) in enumerate(vae.scale_slices):
        pn = PN[si]
        h = vae.codebook[tokens[:, a:b]].transpose(1, 2).reshape(2, 8, pn, pn)
        f_hat, nxt = vae.next_autoregressive_input(si, f_hat, h)
        if si < 3:
            inputs.append(nxt.flatten(2).transpose(1, 2))
    assert torch.allclose(torch.cat(inputs, 1), vae.tokens_to_var_input(tokens), atol=1e-6)
    assert torch.allclose(f_hat, vae.tokens_to_fhat(tokens), atol=1e-6)
    assert nxt is f_hat


def test_training_forward_equals_official(vae_path, ref):
    vae = MultiScaleVQVAE.from_official(vae_path, v_patch_nums=PN, test_mode=False).train()
    assert all(p.requires_grad for p in vae.parameters())
    rec, losses = vae(ref["images"])
    assert rel_err(rec, ref["train_rec"]) <= 1e-5
    assert abs(losses["vq_loss"].item() - ref["train_vq_loss"].item()) <= 1e-5 * ref["train_vq_loss"].item()
    assert torch.allclose(losses["rec_loss"], torch.mean((rec - ref["images"]) ** 2))
    (rec.square().mean() + losses["vq_loss"]).backward()
    assert rel_err(vae.quantize.embedding.weight.grad, ref["grad_codebook"]) <= 1e-4
    assert rel_err(vae.encoder.conv_in.weight.grad, ref["grad_conv_in"]) <= 1e-4
    assert rel_err(vae.quantize.quant_resi.qresi_ls[0].weight.grad, ref["grad_phi0"]) <= 1e-4
    # the usage EMA is recorded in training mode: the first call copies the hit counts
    hits = vae.quantize.ema_vocab_hit_SV
    assert torch.equal(hits.sum(1), torch.tensor([2.0 * p * p for p in PN]))
    assert len(vae.codebook_usage(2 * 64)) == 4


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(**SMALL, test_mode=False)
    x = torch.linspace(-1, 1, 16)
    images = torch.stack(
        [torch.stack([torch.sin(3 * (i + 1) * x[:, None] + c * x[None, :]) for c in range(3)]) for i in range(4)]
    )
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        _, losses = vae(images)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["rec_loss"] < 0.3 * history[0]["rec_loss"]
    assert history[-1]["total"] < 0.6 * history[0]["total"]
    vae.init_codebook_(-1.0)  # official eini < 0: U(-1/V, 1/V)
    assert vae.codebook.abs().max() <= 1 / 64


def test_phi_tables():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # official table (scales 2, 7 are float-broken ties)
    assert phi_indices(4, 4) == [0, 1, 2, 3]
    assert phi_indices(6, 4) == [0, 0, 1, 2, 3, 3]  # argmin |ticks - si/5| with ticks (1/12, 13/36, 23/36, 11/12)
    assert phi_indices(5, 2) == [0, 0, 0, 1, 1]  # K != 4: ticks linspace(1/4, 3/4, 2); 0.5 is a tie → first
    assert MultiScaleVQVAE(**SMALL).quantize.phi_index == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "layout, phis",
    [
        (dict(share_quant_resi=1), ["qresi"]),
        (dict(share_quant_resi=0), ["0", "1", "2", "3"]),
        (dict(share_quant_resi=0, default_qresi_counts=2), ["0", "1"]),
        (dict(quant_resi=0.0), []),
        (dict(using_sa=False, using_mid_sa=False, quant_conv_ks=1), [f"qresi_ls.{k}" for k in range(4)]),
    ],
)
def test_other_official_layouts_round_trip(layout, phis, tmp_path):
    """The Phi layouts of the official quantizer (shared, non-shared, none) keep their key names and load back."""
    vae = MultiScaleVQVAE(**SMALL, **layout)
    sd = vae.state_dict()
    expected = {f"quantize.quant_resi.{p}.{w}" for p in phis for w in ("weight", "bias")}
    assert {k for k in sd if k.startswith("quantize.quant_resi.")} == expected
    torch.save(sd, tmp_path / "v.pth")
    back = MultiScaleVQVAE.from_official(tmp_path / "v.pth", v_patch_nums=PN)
    for k, v in layout.items():
        assert back.config[k] == v
    assert back.quantize.phi_index == vae.quantize.phi_index
    tokens = torch.randint(0, 64, (1, 85), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.decode_tokens(tokens), vae.decode_tokens(tokens))


def test_usage_buffer_of_another_scale_count_is_replaced(sd, tmp_path):
    """Official ``VQVAE.load_state_dict``: the (S, V) usage EMA is dropped when S differs."""
    torch.save(sd, tmp_path / "v.pth")
    vae = MultiScaleVQVAE.from_official(tmp_path / "v.pth", v_patch_nums=(1, 2, 3, 4, 5, 6, 8))
    assert vae.quantize.ema_vocab_hit_SV.shape == (7, 64) and not vae.quantize.ema_vocab_hit_SV.any()
    same = MultiScaleVQVAE.from_official(tmp_path / "v.pth", v_patch_nums=PN)
    assert torch.equal(same.quantize.ema_vocab_hit_SV, sd["quantize.ema_vocab_hit_SV"])
    fresh = MultiScaleVQVAE(**{**SMALL, "v_patch_nums": (1, 2, 8)})
    fresh.load_state_dict(sd)  # plain load_state_dict too
    assert fresh.quantize.ema_vocab_hit_SV.shape == (3, 64)


def test_official_size_on_meta():
    with torch.device("meta"):
        vae = MultiScaleVQVAE()
    assert len(vae.state_dict()) == 324
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355
    assert vae.quantize.ema_vocab_hit_SV.shape == (10, 4096)
    assert vae.quantize.phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert vae.patch_nums == PATCH_NUMS_256 and vae.seq_len == 680 and vae.image_size == 256
    assert {k for k in vae.state_dict() if "nin_shortcut" in k} == {
        f"{p}.{i}.block.0.nin_shortcut.{w}"
        for p, i in (("encoder.down", 2), ("encoder.down", 4), ("decoder.up", 1), ("decoder.up", 3))
        for w in ("weight", "bias")
    }


def test_input_errors(vae):
    with pytest.raises(ValueError, match=r"images must be .*\(B, 3, 16, 16\).*got shape \(1, 3, 32, 32\)"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images must be .*got torch.int64"):
        vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens: expected 85 positions per image .*got 84"):
        vae.decode_tokens(torch.zeros(1, 84, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 64\).*max 64"):
        vae.decode_tokens(torch.full((1, 85), 64))
    with pytest.raises(ValueError, match="tokens: expected an integer dtype"):
        vae.decode_tokens(torch.zeros(1, 85))
    with pytest.raises(ValueError, match=r"tokens: 6 positions do not end a scale; expected one of \[1, 5, 21, 85\]"):
        vae.tokens_to_var_input(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vectors: expected a float tensor \(B, L, 8\)"):
        vae.decode_vectors(torch.zeros(1, 85, 4))
    with pytest.raises(ValueError, match=r"si=4: expected a scale index in \[0, 4\)"):
        vae.next_autoregressive_input(4, torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 8, 8))


def test_config_validation():
    with pytest.raises(ValueError, match=r"ch=40, ch_mult=\(1, 1\).*divisible by 32"):
        MultiScaleVQVAE(**{**SMALL, "ch": 40})
    with pytest.raises(ValueError, match="v_patch_nums=.*strictly increasing"):
        MultiScaleVQVAE(**{**SMALL, "v_patch_nums": (1, 4, 2, 8)})
    with pytest.raises(ValueError, match="v_patch_nums=.*at least 2"):
        MultiScaleVQVAE(**{**SMALL, "v_patch_nums": (8,)})
    with pytest.raises(ValueError, match="quant_conv_ks=2: expected a positive odd int"):
        MultiScaleVQVAE(**{**SMALL, "quant_conv_ks": 2})
    with pytest.raises(ValueError, match="unknown MultiScaleVQVAE config field"):
        MultiScaleVQVAE.from_official(REF, ch_mults=(1, 2))


def test_wrong_files_are_named(tmp_path, sd):
    torch.save({"head.weight": torch.zeros(4, 4)}, tmp_path / "var_d16.pth")
    with pytest.raises(CheckpointError, match="not a VAR multi-scale VQVAE state dict"):
        MultiScaleVQVAE.from_official(tmp_path / "var_d16.pth")
    bad = dict(sd)
    bad.pop("quant_conv.bias")
    torch.save(bad, tmp_path / "cut.pth")
    with pytest.raises(
        CheckpointError, match=r"(?s)cut\.pth does not fit MultiScaleVQVAE.*missing keys: quant_conv\.bias"
    ):
        MultiScaleVQVAE.from_official(tmp_path / "cut.pth", v_patch_nums=PN)


def test_save_pretrained_round_trip(vae, ref, tmp_path):
    vae.save_pretrained(tmp_path / "m")
    back = MultiScaleVQVAE.from_pretrained(tmp_path / "m")
    assert back.patch_nums == PN and list(back.config.ch_mult) == [1, 1]
    assert torch.equal(back.encode(ref["images"]), ref["tokens"])
    assert torch.equal(back.decode_tokens(ref["tokens"]), vae.decode_tokens(ref["tokens"]))
