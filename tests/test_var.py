"""VAR teacher: equality with the official implementation, the decoding protocol, checkpoints, presets, errors.

``tests/data/var_{l2,shared}_reference.safetensors`` each hold a random-weight official ``VAR`` (FoundationVision/VAR
``models/var.py``; depth 2, embed_dim 64, 2 heads, 10 classes, patch nums (1, 2, 4, 8), fp16-representable weights
stored as ``sd.*``) on top of the VQVAE of ``msvq_reference.safetensors``, and the official outputs (float32, CPU,
``cond_drop_rate=0``): teacher-forced logits, ``autoregressive_infer_cfg`` with the sampler replaced by a recording
argmax (guided per-scale logits, tokens, images), and token sequences of the real official sampler with fixed seeds.
``l2``: ``attn_l2_norm=True`` (one head's ``scale_mul_1H11`` above log 100, so the clamp matters). ``shared``: the
older attention (scale 0.25/sqrt(head_dim)) with ``shared_aln=True`` (the VAR-d36 AdaLN layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distilled_decoding import VAR, CheckpointError, MultiScaleVQVAE
from distilled_decoding.sampling import GreedyChooser, sample_tokens
from distilled_decoding.teachers.var import VAR_PRESETS, official_var_config

DATA = Path(__file__).parent / "data"
PN = (1, 2, 4, 8)
CASES = ("l2", "shared")


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _sd(ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[3:]: v.float() if v.is_floating_point() else v for k, v in ref.items() if k.startswith("sd.")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The official-format ``.pth`` files (raw state dicts) of the reference VQVAE and both VARs."""
    d = tmp_path_factory.mktemp("var")
    out = {"vae": d / "vae.pth"}
    torch.save(_sd(_read(DATA / "msvq_reference.safetensors")), out["vae"])
    for case in CASES:
        out[case] = d / f"var_{case}.pth"
        torch.save(_sd(_read(DATA / f"var_{case}_reference.safetensors")), out[case])
    return out


@pytest.fixture(scope="module")
def refs() -> dict[str, dict[str, torch.Tensor]]:
    return {case: _read(DATA / f"var_{case}_reference.safetensors") for case in CASES}


def load(files: dict[str, Path], case: str, **kw) -> VAR:
    # the l2 file tells its head count (scale_mul_1H11); the old attention needs num_heads; L = 85 needs patch_nums
    extra = {"num_heads": 2} if case == "shared" else {}
    return VAR.from_official(files[case], files["vae"], patch_nums=PN, **extra, **kw)


@pytest.fixture(scope="module")
def models(files) -> dict[str, VAR]:
    return {case: load(files, case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_teacher_forcing_equals_official(models, refs, case):
    var, ref = models[case], refs[case]
    assert var.config.attn_l2_norm == (case == "l2") and var.config.shared_aln == (case == "shared")
    logits = var(ref["tokens"], ref["labels"])
    assert logits.dtype == torch.float32 and logits.shape == (3, 85, 64)
    assert rel_err(logits, ref["logits_tf"]) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_equals_official(models, refs, case):
    """``sample_tokens`` with an argmax chooser = ``autoregressive_infer_cfg(cfg=1.5)`` with an argmax sampler:
    the guided logits of every scale, the tokens, and the decoded images."""
    var, ref = models[case], refs[case]
    seen, logits = [], []

    def chooser(lg, positions):
        seen.append((positions.start, positions.stop))
        logits.append(lg)
        return lg.argmax(-1)

    tokens = sample_tokens(var, ref["labels"], chooser=chooser, cfg_scale=1.5)
    assert seen == [(0, 1), (1, 5), (5, 21), (21, 85)]
    assert rel_err(torch.cat(logits, 1), ref["greedy_cfg15_logits"]) <= 1e-5
    assert torch.equal(tokens, ref["greedy_cfg15_tokens"])
    images = var.decode_tokens(tokens).add(1).mul(0.5)
    assert rel_err(images, ref["greedy_cfg15_images"]) <= 1e-5


@pytest.mark.parametrize(
    "case, name",
    [("l2", "sample_seed7_cfg4.0_topk20_topp0.95"), ("l2", "sample_seed3_cfg1.5_topk0_topp0.0"),
     ("shared", "sample_seed5_cfg2.0_topk0_topp0.8")],
)  # fmt: skip
def test_sampling_reproduces_official_sampler(models, refs, case, name):
    """Same seed → the same tokens as the official sampler (``torch.multinomial(..., generator=rng)``; top-k equal,
    top-p equal except at exact ties of the cumulative mass: VAR removes a token when the mass before it is ≥ p,
    the shared LlamaGen filter when it is > p)."""
    seed, cfg, top_k, top_p = re.fullmatch(r"sample_seed(\d+)_cfg([\d.]+)_topk(\d+)_topp([\d.]+)", name).groups()
    tokens = sample_tokens(
        models[case],
        refs[case]["labels"],
        cfg_scale=float(cfg),
        top_k=int(top_k),
        top_p=float(top_p) if float(top_p) > 0 else 1.0,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    assert torch.equal(tokens, refs[case][name])


def test_static_cache_and_teacher_forcing_agree(models, refs):
    var, ref = models["l2"], refs["l2"]
    tokens, labels = ref["tokens"], ref["labels"]
    state, first = var.begin(labels)
    k_ptr = state.k.data_ptr()
    assert state.k.shape == (2, 3, 2, 85, 32)  # (depth, B, H, L, head_dim), allocated once
    steps = [first] + [var.advance(state, tokens[:, a:b]) for a, b in var.decode_groups()[:-1]]
    assert state.k.data_ptr() == k_ptr and state.pos == 85 and state.scale == 3
    assert rel_err(torch.cat(steps, 1), ref["logits_tf"]) <= 1e-5
    assert torch.allclose(state.f_hat, var.vae.tokens_to_fhat(tokens) - _last_scale(var, tokens), atol=1e-5)
    with pytest.raises(ValueError, match="advance: all 4 scales are already decoded"):
        var.advance(state, tokens[:, 21:85])
    with pytest.raises(ValueError, match=r"tokens: expected shape \(3, 1\) for scale 0, got \(3, 5\)"):
        var.advance(var.begin(labels)[0], tokens[:, :5])


def _last_scale(var: VAR, tokens: torch.Tensor) -> torch.Tensor:
    """Contribution of the last scale to f_hat (advance never adds it: the loop stops after choosing it)."""
    vec = var.vae.codebook[tokens[:, 21:]].transpose(1, 2).reshape(3, 8, 8, 8)
    return var.vae.quantize.phi(3)(vec)


@pytest.mark.parametrize("case", CASES)
def test_prefix_of_scales(models, refs, case):
    var, ref = models[case], refs[case]
    tokens, labels = ref["tokens"], ref["labels"]
    for k, (start, end) in enumerate(var.decode_groups()):
        _, logits = var.begin(labels, tokens[:, :start] if start else None)
        assert logits.shape == (3, end - start, 64)
        assert rel_err(logits, ref["logits_tf"][:, start:end]) <= 1e-5, k
        per_scale = var.logits_from_prefix(tokens[:, :start], labels)
        assert rel_err(per_scale, ref["logits_tf"][:, :end]) <= 1e-5
    # vectors (e.g. a student's continuous outputs) in place of tokens: codebook rows give the same logits
    vec = var.codebook[tokens[:, :21]]
    assert torch.allclose(var.logits_from_prefix(vec, labels), var.logits_from_prefix(tokens[:, :21], labels))
    assert torch.allclose(var.begin(labels, vec)[1], var.begin(labels, tokens[:, :21])[1])
    # continuing a greedy run from any scale boundary reproduces it
    full = sample_tokens(var, labels, chooser=GreedyChooser(), cfg_scale=2.0)
    for t in (1, 5, 21, 85):
        assert torch.equal(sample_tokens(var, labels, chooser=GreedyChooser(), cfg_scale=2.0, prefix=full[:, :t]), full)
    # regenerate only some scales (DD's teacher-involved sampling): prefix of 1 scale, stop after scale 2
    part = sample_tokens(var, labels, chooser=GreedyChooser(), cfg_scale=2.0, prefix=full[:, :1], stop=21)
    assert torch.equal(part, full[:, :21])
    with pytest.raises(ValueError, match="prefix: length 6 does not end a decoding step"):
        sample_tokens(var, labels, prefix=full[:, :6])


def test_guidance_ramp_and_no_doubling_without_guidance(models, refs):
    var, labels = models["l2"], refs["l2"]["labels"]
    assert var.guidance_scales(1.5) == [1.0, 1.5, 2.0, 2.5]  # 1 + cfg * si / (S - 1): the official ramp
    assert var.guidance_scales(3.0, cfg_interval=1) == [1.0, 2.0, 1.0, 1.0]
    assert var.guidance_scales(0.0) is None
    batches = []

    def chooser(lg, positions):
        batches.append(lg.shape[0])
        return lg.argmax(-1)

    real_begin = var.begin

    def spy_begin(class_labels, prefix=None):
        batches.append(("begin", class_labels.shape[0]))
        return real_begin(class_labels, prefix)

    var.begin = spy_begin
    try:
        tokens = sample_tokens(var, labels, chooser=chooser, cfg_scale=0.0)
        assert batches[0] == ("begin", 3)  # not doubled
        batches.clear()
        sample_tokens(var, labels, chooser=chooser, cfg_scale=0.5)
        assert batches[0] == ("begin", 6)
    finally:
        del var.begin
    # cfg 0 = the conditional model: greedy tokens are the argmax of the teacher-forced logits
    assert torch.equal(var(tokens, labels).argmax(-1), tokens)


def test_official_file_formats(files, refs, tmp_path):
    sd = _sd(refs["l2"])
    torch.save({"epoch": 3, "trainer": {"var_wo_ddp": sd, "config": {}}, "args": {}}, tmp_path / "ar-ckpt-last.pth")
    save_file(sd, str(tmp_path / "var.safetensors"))
    for path in (tmp_path / "ar-ckpt-last.pth", tmp_path / "var.safetensors"):
        var = VAR.from_official(path, files["vae"], patch_nums=PN)
        assert rel_err(var(refs["l2"]["tokens"], refs["l2"]["labels"]), refs["l2"]["logits_tf"]) <= 1e-5


@pytest.mark.parametrize(
    "preset, params, keys",
    [("d16", 310_283_520, 220), ("d20", 600_917_136, 272), ("d24", 1_033_399_360, 324),
     ("d30", 2_010_020_356, 402), ("d36", 2_353_893_904, 446)],
)  # fmt: skip
def test_full_size_presets_on_meta(preset, params, keys):
    """Parameter counts exclude the buffers (lvl_1L, attn_bias_for_masking, zero_k_bias), which are state-dict keys."""
    with torch.device("meta"):
        var = VAR.from_preset(preset)
    assert sum(p.numel() for p in var.parameters()) == params
    assert len(var.state_dict()) == keys
    depth = int(preset[1:])
    assert (var.C, var.num_heads, var.depth) == (64 * depth, depth, depth)
    assert var.seq_len == (2240 if depth == 36 else 680) and var.attn_bias_for_masking.shape[-1] == var.seq_len
    assert var.config.shared_aln == (depth == 36) and var.config.attn_l2_norm
    assert var.config.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert ("shared_ada_lin.1.weight" in var.state_dict()) == (depth == 36)


def test_wrong_depth_names_the_fitting_one(monkeypatch):
    with torch.device("meta"):
        d16 = VAR.from_preset("d16").state_dict()
    monkeypatch.setattr("distilled_decoding.teachers.var.load_state_dict_file", lambda *a, **k: d16)
    with pytest.raises(CheckpointError) as e:
        VAR.from_official("var_d16.pth", depth=20)
    msg = str(e.value)
    assert "var_d16.pth does not fit VAR (depth 20" in msg and "unexpected keys" not in msg
    assert "missing keys: blocks.16." in msg and "shape mismatches" in msg and "fits depth=16" in msg
    cfg = official_var_config(d16)  # without depth= the shapes decide
    assert {k: cfg[k] for k in ("depth", "embed_dim", "num_heads", "vocab_size", "Cvae", "num_classes")} == dict(
        depth=16, embed_dim=1024, num_heads=16, vocab_size=4096, Cvae=32, num_classes=1000
    )
    assert cfg["patch_nums"] == VAR_PRESETS["d16"]["patch_nums"] and cfg["attn_l2_norm"]


def test_attention_version_mismatch_is_explained(files):
    with pytest.raises(CheckpointError) as e:
        load(files, "l2", attn_l2_norm=False)
    msg = str(e.value)
    assert "unexpected keys: blocks.0.attn.scale_mul_1H11" in msg and "with l2-normalised attention" in msg
    assert "softmax scale 1" in msg and "0.25/sqrt(head_dim)" in msg and "omit attn_l2_norm=" in msg
    with pytest.raises(CheckpointError, match=r"(?s)missing keys: blocks\.0\.attn\.scale_mul_1H11.*without l2-norm"):
        load(files, "shared", attn_l2_norm=True)


def test_mismatched_vae_is_refused(files, tmp_path):
    small = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, v_patch_nums=PN)
    for kw, expected in ((dict(vocab_size=32, z_channels=8), "32 entries.*predicts 64"),
                         (dict(vocab_size=64, z_channels=16), "16 channels.*Cvae=8")):  # fmt: skip
        path = tmp_path / f"vae_{kw['vocab_size']}_{kw['z_channels']}.pth"
        torch.save(MultiScaleVQVAE(**small, **kw).state_dict(), path)
        with pytest.raises(CheckpointError, match=rf"(?s){re.escape(path.name)} does not fit the VAR .*{expected}"):
            load({**files, "vae": path}, "l2")
    with pytest.raises(CheckpointError, match="not a VAR transformer state dict.*pass that as vae_path"):
        VAR.from_official(files["vae"])


def test_input_errors(models, refs):
    var, tokens, labels = models["l2"], refs["l2"]["tokens"], refs["l2"]["labels"]
    with pytest.raises(ValueError, match=r"tokens: expected 85 tokens per image \(all scales of patch_nums"):
        var(tokens[:, :84], labels)
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 64\).*max 64"):
        var(tokens + 64 - tokens.max(), labels)
    with pytest.raises(ValueError, match="tokens: expected an integer dtype"):
        var(tokens.float(), labels)
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\).*max 10"):
        var(tokens, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"class_labels: expected a \(3,\) integer tensor"):
        var(tokens, labels[:2])
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\)"):
        sample_tokens(var, torch.tensor([10]))
    with pytest.raises(ValueError, match="prefix: sequence of 90 tokens does not fit seq_len=85"):
        sample_tokens(var, labels, prefix=torch.zeros(3, 90, dtype=torch.long))


def test_config_validation():
    tiny = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, Cvae=8, patch_nums=PN)
    with pytest.raises(ValueError, match="embed_dim=64: expected a multiple of num_heads=3"):
        VAR(**{**tiny, "num_heads": 3})
    with pytest.raises(ValueError, match="patch_nums=.*strictly increasing"):
        VAR(**{**tiny, "patch_nums": (1, 2, 2)})
    with pytest.raises(ValueError, match="cond_drop_rate=1.0: expected a probability"):
        VAR(**{**tiny, "cond_drop_rate": 1.0})
    vae_cfg = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=32, v_patch_nums=PN)
    with pytest.raises(ValueError, match=r"vae_config: the VAE codebook has 32 entries.*predicts 64"):
        VAR(**tiny, vae_config=vae_cfg)
    assert VAR(**tiny, vae_config={**vae_cfg, "vocab_size": 64}).vae.seq_len == 85
    with pytest.raises(ValueError, match="preset='d18'"):
        VAR.from_preset("d18")
    var = VAR(**tiny)  # official initialisation
    assert var.head.bias.abs().max() == 0 and var.blocks[0].ada_lin[1].weight[:128].abs().max() < 1e-5
    assert torch.allclose(var.blocks[1].attn.scale_mul_1H11, torch.full((1, 2, 1, 1), 4.0).log())


def test_without_vae_and_attach(files, refs):
    var = VAR.from_official(files["l2"], patch_nums=PN)
    ref = refs["l2"]
    assert var.vae is None and var.codebook is None and var.config.vae_config is None
    with pytest.raises(ValueError, match="forward needs the VAR's VQVAE"):
        var(ref["tokens"], ref["labels"])
    vae = MultiScaleVQVAE.from_official(files["vae"], v_patch_nums=PN)
    inputs = vae.tokens_to_var_input(ref["tokens"])
    assert rel_err(var.logits_from_inputs(inputs, ref["labels"]), ref["logits_tf"]) <= 1e-5
    var.attach_vae(vae)
    assert var.codebook is vae.codebook and var.config.vae_config["v_patch_nums"] == list(PN)
    assert rel_err(var(ref["tokens"], ref["labels"]), ref["logits_tf"]) <= 1e-5


def test_save_pretrained_round_trip(models, refs, tmp_path):
    var, ref = models["shared"], refs["shared"]
    var.save_pretrained(tmp_path / "teacher")
    back = VAR.from_pretrained(tmp_path / "teacher")
    official_keys = set(_sd(ref))
    assert {k for k in back.state_dict() if not k.startswith("vae.")} == official_keys
    assert {k[4:] for k in back.state_dict() if k.startswith("vae.")} == set(var.vae.state_dict())
    assert torch.equal(back(ref["tokens"], ref["labels"]), var(ref["tokens"], ref["labels"]))
    assert torch.equal(back.decode_tokens(ref["tokens"]), var.decode_tokens(ref["tokens"]))
    assert not back.training and not any(p.requires_grad for p in back.vae.parameters())


def test_training_mode_drops_labels_eval_mode_never(files, refs):
    ref = refs["l2"]
    var = load(files, "l2", cond_drop_rate=0.999, drop_path_rate=0.0)
    assert torch.equal(var(ref["tokens"], ref["labels"]), var(ref["tokens"], ref["labels"]))  # eval: deterministic
    assert rel_err(var(ref["tokens"], ref["labels"]), ref["logits_tf"]) <= 1e-5
    null = var.logits_from_prefix(ref["tokens"][:, :21], torch.full((3,), var.null_class))
    torch.manual_seed(0)
    assert torch.equal(var.train()(ref["tokens"], ref["labels"]), null)


def test_bfloat16_decoding_runs_close(files, refs):
    ref = refs["l2"]
    var = load(files, "l2").to(torch.bfloat16)
    logits = var(ref["tokens"], ref["labels"])
    assert logits.dtype == torch.float32 and rel_err(logits, ref["logits_tf"]) < 0.1
    state, first = var.begin(torch.cat([ref["labels"], ref["labels"]]))
    assert state.k.dtype == torch.bfloat16 and first.dtype == torch.float32
    tokens = sample_tokens(var, ref["labels"], cfg_scale=1.5, top_k=20, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 85) and int(tokens.max()) < 64
