"""PAR: equality with the official implementation, region order, decoding protocol, conversion, errors.

``tests/data/par_reference.safetensors`` was produced by a scratch script (outside the repo) that imports the
official code (YuqingWang1029/PAR @ b1dd994, ``autoregressive/models/gpt.py`` and ``generate.py``), float32, CPU:

* a tiny official ``Transformer`` (dim 64, 2 layers, 4 heads, multiple_of 32, vocab 64, 10 classes,
  block_size 64 = 8×8 grid, ``ar_token_num`` 4, ``spe_token_num`` 3) with every parameter drawn at random
  (norm weights 1 + 0.1·N(0,1), others 0.08·N(0,1), the output head ×4), state dict under ``sd.*``;
* ``labels`` (3,), ``tokens`` (3, 64) raster order; ``logits_tf``: the official training forward
  (``model(seq[:, :-1], labels, input_pos=arange(66))`` in eval mode, first 64 logits) on the region-ordered
  sequence (``train_c2i.py`` reshape/permute), mapped back to raster order with ``sample_c2i_ddp.py``'s inverse
  permutation; ``logits_tf_seq`` the same in sequence order;
* ``logits_cached_seq``: the official KV-cached path (``setup_caches``; prefill; k−1 single steps; the first
  parallel step fed the last k−1 anchors so the model swaps in the transition tokens; then groups of 4) fed the
  same tokens, sequence order;
* ``sample_<case>``: ``torch.manual_seed(seed); generate(model, labels, 64, sample_logits=True, ...)`` for the
  four cases below, un-permuted to raster order;
* ``k16.*``: the same model with ``ar_token_num`` 16 (all weights shared except its own 15-row transition table
  ``k16.sd.spe_tok_embeddings.special_embeddings.weight``): raster ``logits_tf`` and one sample.

The parameter counts of the presets were taken from the official ``GPT_models`` factories on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distilled_decoding import PAR, CheckpointError, LlamaGen
from distilled_decoding.sampling import GreedyChooser, sample_tokens
from distilled_decoding.teachers.par import PAR_PRESETS, TRANSITION_KEY

REF = Path(__file__).parent / "data" / "par_reference.safetensors"
CFG = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, num_classes=10, block_size=64)
SAMPLES = {
    "seed123_cfg2_topk20_t09": (123, dict(cfg_scale=2.0, top_k=20, temperature=0.9)),
    "seed7_cfg15_topp08_int4": (7, dict(cfg_scale=1.5, top_p=0.8, cfg_interval=4)),
    # cfg_interval=1: guidance off for the 4th anchor, on again for the first parallel step (official counters)
    "seed11_cfg3_int1_t12": (11, dict(cfg_scale=3.0, cfg_interval=1, temperature=1.2)),
    "seed5_nocfg": (5, dict(cfg_scale=1.0)),
}


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def sd(ref) -> dict[str, torch.Tensor]:
    return {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}


@pytest.fixture()
def par(sd, tmp_path) -> PAR:
    torch.save({"model": sd, "optimizer": {}, "steps": 10}, tmp_path / "PAR-tiny-4x.pt")
    return PAR.from_official(tmp_path / "PAR-tiny-4x.pt", **CFG)


@pytest.fixture()
def par16(sd, ref, tmp_path) -> PAR:
    save_file({**sd, TRANSITION_KEY: ref[f"k16.sd.{TRANSITION_KEY}"]}, str(tmp_path / "p16.safetensors"))
    return PAR.from_official(tmp_path / "p16.safetensors", **CFG)  # k = 16 read from the transition table


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------
# equality with the official code
# ---------------------------------------------------------------------------------------------------------
def test_teacher_forcing_equals_official(par, par16, ref):
    logits = par(ref["tokens"], ref["labels"])
    assert logits.dtype == torch.float32 and logits.shape == (3, 64, 64)
    assert rel_err(logits, ref["logits_tf"]) <= 1e-5
    seq = par.logits_from_prefix(par.from_raster(ref["tokens"])[:, :60], ref["labels"])
    assert rel_err(seq, ref["logits_tf_seq"]) <= 1e-5
    assert par16.ar_token_num == 16
    assert rel_err(par16(ref["k16.tokens"], ref["k16.labels"]), ref["k16.logits_tf"]) <= 1e-5


def test_kv_cached_decoding_equals_official(par, ref):
    seq = par.from_raster(ref["tokens"])
    cache, first = par.begin(ref["labels"])
    k_ptr = cache.k.data_ptr()
    steps = [first] + [par.advance(cache, seq[:, s:e]) for s, e in par.decode_groups()[:-1]]
    assert [s.shape[1] for s in steps] == [1, 1, 1, 1] + [4] * 15
    assert cache.k.data_ptr() == k_ptr and cache.pos == 64  # static cache, written in place
    assert rel_err(torch.cat(steps, 1), ref["logits_cached_seq"]) <= 1e-5


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sampling_reproduces_official_generate(par, ref, name):
    """Same global seed → the same tokens as the official ``generate()`` (CFG, cfg_interval, temperature,
    top-k/p), returned in raster order."""
    seed, kwargs = SAMPLES[name]
    torch.manual_seed(seed)
    assert torch.equal(sample_tokens(par, ref["labels"], **kwargs), ref[f"sample_{name}"])


def test_sampling_16x_reproduces_official_generate(par16, ref):
    torch.manual_seed(123)
    tokens = sample_tokens(par16, ref["k16.labels"], cfg_scale=2.0, top_k=20, temperature=0.9)
    assert torch.equal(tokens, ref["k16.sample_seed123_cfg2_topk20_t09"])


# ---------------------------------------------------------------------------------------------------------
# order, groups, protocol properties
# ---------------------------------------------------------------------------------------------------------
def test_region_order_and_groups(par, par16):
    cells = [(0, 0), (0, 4), (4, 0), (4, 4), (0, 1), (0, 5), (4, 1), (4, 5), (0, 2), (0, 6), (4, 2), (4, 6)]
    assert par.token_order[:12].tolist() == [r * 8 + c for r, c in cells]
    assert sorted(par.token_order.tolist()) == list(range(64))
    x = torch.randint(0, 64, (2, 64, 3))
    assert torch.equal(par.to_raster(par.from_raster(x)), x) and not torch.equal(par.from_raster(x), x)
    assert par.decode_groups() == [(0, 1), (1, 2), (2, 3), (3, 4)] + [(s, s + 4) for s in range(4, 64, 4)]
    assert len(par16.decode_groups()) == 16 + 3 and par16.token_order[:4].tolist() == [0, 2, 4, 6]
    with torch.device("meta"):
        assert len(PAR.from_preset("PAR-XXL-4x").decode_groups()) == 147
        assert len(PAR.from_preset("PAR-3B-16x").decode_groups()) == 51


def test_rope_follows_the_raster_cell(par):
    """Each image token keeps the RoPE row of its raster cell; class and transition tokens get zeros."""
    from distilled_decoding.teachers.llamagen_layers import precompute_freqs_cis_2d

    raster = precompute_freqs_cis_2d(8, 16)[1:]
    f = par.freqs_cis
    assert f.shape == (64 + 4, 8, 2) and torch.all(f[0] == 0) and torch.all(f[5:8] == 0)
    order = par.token_order
    assert torch.equal(f[1:5], raster[order[:4]]) and torch.equal(f[8:], raster[order[4:]])


def test_group_mask(par):
    m = par.group_mask
    assert m[4, 7] and m[7, 4] and m[8, 11] and not m[7, 8] and not m[2, 3] and m[3, 2]  # full inside groups
    assert torch.equal(m.tril(), torch.ones(64, 64, dtype=torch.bool).tril())  # causal across groups


def test_greedy_decoding_equals_teacher_forcing(par):
    labels = torch.tensor([1, 2, 7])
    tokens = sample_tokens(par, labels, chooser=GreedyChooser())
    assert torch.equal(par(tokens, labels).argmax(-1), tokens)
    guided = sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=3.0)
    cond = par(guided, labels)
    seq = par.from_raster(guided)[:, :60]
    uncond = par.to_raster(par.logits_from_prefix(seq, torch.full_like(labels, par.null_class)))
    assert torch.equal((uncond + (cond - uncond) * 3.0).argmax(-1), guided)
    assert not torch.equal(guided, tokens)


def test_prefix_continuation_equals_decoding_from_scratch(par):
    labels = torch.tensor([3, 8])
    full = sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=1.5, order="sequence")
    assert torch.equal(par.to_raster(full), sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=1.5))
    for t in (1, 3, 4, 8, 60, 64):
        cont = sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=full[:, :t], order="sequence")
        assert torch.equal(cont, full)
    kw = dict(chooser=GreedyChooser(), cfg_scale=1.5, order="sequence")
    head = sample_tokens(par, labels, prefix=full[:, :4], stop=12, **kw)
    assert torch.equal(head, full[:, :12])
    raster = sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=full[:, :8])
    assert torch.equal(raster, par.to_raster(full))
    forced = full[:, :8].clone()
    forced[:, 7] = (forced[:, 7] + 1) % 64
    cont = sample_tokens(par, labels, chooser=GreedyChooser(), cfg_scale=1.5, prefix=forced, order="sequence")
    assert torch.equal(cont[:, :8], forced) and not torch.equal(cont, full)


def test_begin_with_prefix_equals_teacher_forcing(par, ref):
    seq = par.from_raster(ref["tokens"])
    for s, e in par.decode_groups():
        _, logits = par.begin(ref["labels"], seq[:, :s])
        assert logits.shape[1] == e - s and rel_err(logits, ref["logits_tf_seq"][:, s:e]) <= 1e-5


def test_sequence_order_is_the_raster_result_reordered(par):
    labels = torch.tensor([0, 9])
    a = sample_tokens(par, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), order="sequence")
    b = sample_tokens(par, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(par.from_raster(b), a) and not torch.equal(a, b)
    seen = []

    def chooser(logits, positions):
        seen.append((positions.start, positions.stop, logits.shape[1]))
        return torch.zeros(2, logits.shape[1], dtype=torch.long)

    sample_tokens(par, labels, chooser=chooser, cfg_scale=2.0)
    assert seen == [(s, e, e - s) for s, e in par.decode_groups()]


def test_sampling_order_errors(par):
    labels = torch.tensor([0, 1])
    with pytest.raises(
        ValueError, match="stop=12: a partial sequence exists in the teacher's decoding order.*order='sequence'"
    ):
        sample_tokens(par, labels, stop=12)
    with pytest.raises(ValueError, match="order='zigzag'"):
        sample_tokens(par, labels, order="zigzag")
    msg = r"prefix: length 6 does not end a decoding step; expected one of \[0, 1, 2, 3, 4, 8,"
    with pytest.raises(ValueError, match=msg):
        sample_tokens(par, labels, prefix=torch.zeros(2, 6, dtype=torch.long), order="sequence")
    with pytest.raises(ValueError, match="tokens: length 6 does not end a decode group of PAR-4x"):
        par.logits_from_prefix(torch.zeros(2, 6, dtype=torch.long), labels)


# ---------------------------------------------------------------------------------------------------------
# checkpoints, presets, conversion
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, params",
    [
        ("PAR-L-4x", 342_914_048),
        ("PAR-L-16x", 342_926_336),
        ("PAR-XL-4x", 774_703_360),
        ("PAR-XL-16x", 774_718_720),
        ("PAR-XXL-4x", 1_410_977_280),
        ("PAR-XXL-16x", 1_410_995_712),
        ("PAR-3B-4x", 3_096_668_800),
        ("PAR-3B-16x", 3_096_707_200),
    ],
)
def test_full_size_presets_on_meta(preset, params):
    with torch.device("meta"):
        model = PAR.from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.is_meta for p in model.parameters())
    assert len(model.state_dict()) == 5 + 7 * PAR_PRESETS[preset]["n_layer"]
    assert model.seq_len == 576 and model.freqs_cis.shape == (576 + model.ar_token_num, model.args.head_dim // 2, 2)


def test_official_file_conventions(monkeypatch):
    """A released file (no size in its name) loads as 24×24 with the size from the shapes and k from the
    transition table; a wrong preset names the fitting one."""
    with torch.device("meta"):
        xl = PAR.from_preset("PAR-XL-4x").state_dict()
    monkeypatch.setattr("distilled_decoding.teachers.par.load_state_dict_file", lambda *a, **k: xl)
    model = PAR.from_official("PAR-XL-4x.pt")
    assert (model.args.dim, model.args.n_layer, model.ar_token_num, model.seq_len) == (1280, 36, 4, 576)
    assert PAR.from_official("PAR-XL-4x.pt", preset="PAR-XL-4x").seq_len == 576
    assert PAR.from_official("par_xl_256.pt").seq_len == 256
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches: .*spe_tok_embeddings.*fit preset 'PAR-XL-4x'"):
        PAR.from_official("PAR-XL-4x.pt", preset="PAR-XL-16x")
    with pytest.raises(CheckpointError, match=r"(?s)PAR-XL-4x\.pt does not fit PAR \(48 layers.*preset 'PAR-XL-4x'"):
        PAR.from_official("PAR-XL-4x.pt", preset="PAR-XXL-4x")
    with pytest.raises(ValueError, match="preset='PAR-XL-9x'"):
        PAR.from_official("PAR-XL-4x.pt", preset="PAR-XL-9x")


@pytest.mark.parametrize("fmt", ["model", "ema", "raw", "module_prefix", "safetensors"])
def test_official_formats_load(sd, ref, tmp_path, fmt):
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "model":
        torch.save({"model": sd}, path)
    elif fmt == "ema":
        torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}}, path)
    elif fmt == "raw":  # FSDP consolidated format
        torch.save({**sd, "freqs_cis": torch.zeros(68, 8, 2)}, path)
    elif fmt == "module_prefix":
        torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        save_file(sd, str(path))
    model = PAR.from_official(path, key="ema" if fmt == "ema" else None, **CFG)
    assert rel_err(model(ref["tokens"], ref["labels"]), ref["logits_tf"]) <= 1e-5


def test_cross_family_checkpoints_are_named(sd, tmp_path):
    torch.save({"model": sd}, tmp_path / "PAR-tiny-4x.pt")
    with pytest.raises(CheckpointError, match=r"PAR-tiny-4x\.pt: this is a PAR checkpoint .*ar_token_num=4.*PAR\.from"):
        LlamaGen.from_official(tmp_path / "PAR-tiny-4x.pt", **CFG)
    torch.save({"model": {k: v for k, v in sd.items() if k != TRANSITION_KEY}}, tmp_path / "c2i_tiny.pt")
    with pytest.raises(CheckpointError, match=r"c2i_tiny\.pt: this is a LlamaGen checkpoint, not PAR.*LlamaGen\.from"):
        PAR.from_official(tmp_path / "c2i_tiny.pt", **CFG)


def test_from_llamagen_copies_weights_and_inits_transitions(sd, ref, tmp_path):
    torch.save({"model": {k: v for k, v in sd.items() if k != TRANSITION_KEY}}, tmp_path / "c2i_tiny.pt")
    gpt = LlamaGen.from_official(tmp_path / "c2i_tiny.pt", **CFG)
    par = PAR.from_llamagen(gpt, ar_token_num=4)
    assert not par.training and par.ar_token_num == 4
    psd, gsd = par.state_dict(), gpt.state_dict()
    assert set(psd) == set(gsd) | {TRANSITION_KEY}
    assert all(torch.equal(psd[k], gsd[k]) for k in gsd)
    mean = gsd["tok_embeddings.weight"].mean(0)
    assert torch.equal(psd[TRANSITION_KEY], mean.expand(3, -1))
    assert sum(p.numel() for p in par.parameters()) == sum(p.numel() for p in gpt.parameters()) + 3 * 64
    with torch.no_grad():
        par.tok_embeddings.weight.add_(1.0)  # copies, not shared storage
    assert torch.equal(gpt.state_dict()["tok_embeddings.weight"], gsd["tok_embeddings.weight"])
    # the first position sees only the class token in both orders: same conditional
    tokens, labels = ref["tokens"], ref["labels"]
    assert rel_err(PAR.from_llamagen(gpt)(tokens, labels)[:, 0], gpt(tokens, labels)[:, 0]) <= 1e-6
    assert PAR.from_llamagen(gpt, ar_token_num=16).decode_groups()[-1] == (48, 64)


@pytest.mark.parametrize(
    "k, why",
    [(9, "its root 3 does not divide 4"), (2, "2 is not a"), (0, "0 is not a positive"), (36, "6 does not divide 4")],
)
def test_from_llamagen_refuses_a_k_that_does_not_tile_the_grid(tiny_gpt, k, why):
    with pytest.raises(ValueError, match=rf"ar_token_num={k}: .*4x4 token grid.*{why}"):
        PAR.from_llamagen(tiny_gpt, ar_token_num=k)
    with pytest.raises(ValueError, match="gpt: expected a LlamaGen"):
        PAR.from_llamagen(torch.nn.Linear(2, 2))


def test_config_validation():
    with pytest.raises(ValueError, match=r"ar_token_num=9: .*perfect square.*8x8 token grid"):
        PAR(**CFG, ar_token_num=9, spe_token_num=8)
    with pytest.raises(ValueError, match=r"ar_token_num=16: .*6x6 token grid.*root 4 does not divide 6"):
        PAR(**{**CFG, "block_size": 36}, ar_token_num=16, spe_token_num=15)
    with pytest.raises(ValueError, match=r"spe_token_num=3, expected ar_token_num - 1 = 15"):
        PAR(**CFG, ar_token_num=16, spe_token_num=3)
    with pytest.raises(ValueError, match="preset='PAR-B-4x'"):
        PAR.from_preset("PAR-B-4x")
    assert len(PAR(**CFG, ar_token_num=1, spe_token_num=0).decode_groups()) == 64  # 1x = raster decoding


def test_input_errors(par):
    toks = torch.zeros(2, 64, dtype=torch.long)
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 64\).*max 64"):
        par(toks + 64, labels)
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\).*max 10"):
        par(toks, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"tokens: expected an integer dtype"):
        par(toks.float(), labels)
    with pytest.raises(ValueError, match=r"class_labels: expected an integer dtype"):
        par(toks, labels.float())
    with pytest.raises(ValueError, match=r"tokens: expected a \(B, N\)"):
        par(toks[0], labels)
    with pytest.raises(ValueError, match=r"class_labels: expected a \(2,\)"):
        par(toks, labels[:1])
    with pytest.raises(
        ValueError, match=r"tokens: expected 64 tokens per image \(the 8x8 grid in raster order\), got 16"
    ):
        par(toks[:, :16], labels)
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\)"):
        sample_tokens(par, torch.tensor([0, 10]))


def test_save_pretrained_round_trip(par, ref, tmp_path):
    par.save_pretrained(tmp_path / "m")
    back = PAR.from_pretrained(tmp_path / "m")
    assert back.ar_token_num == 4 and torch.equal(back(ref["tokens"], ref["labels"]), par(ref["tokens"], ref["labels"]))


def test_bfloat16_decoding_runs_close(par, ref):
    lo = par.to(torch.bfloat16)
    cache, first = lo.begin(ref["labels"])
    assert cache.k.dtype == torch.bfloat16 and first.dtype == torch.float32
    assert (first[:, 0] - ref["logits_cached_seq"][:, 0]).abs().max() < 0.1 * ref["logits_cached_seq"].abs().max()
    tokens = sample_tokens(lo, ref["labels"], cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 64) and int(tokens.max()) < 64
