"""LlamaGen GPT: equality with the official implementation, checkpoint formats, presets, errors.

``tests/data/llamagen_reference.safetensors`` holds a random-weight official ``Transformer`` (its state dict,
``sd.*``), inputs, and the outputs of the official code (FoundationVision/LlamaGen ``gpt.py`` /
``generate.py``, float32, CPU): teacher-forced logits, KV-cached logits, and sampled sequences.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distilled_decoding import CheckpointError, LlamaGen
from distilled_decoding.sampling import sample_tokens
from distilled_decoding.teachers.llamagen import LLAMAGEN_PRESETS, official_config

REF = Path(__file__).parent / "data" / "llamagen_reference.safetensors"
CFG = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, num_classes=10, block_size=16)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def sd(ref) -> dict[str, torch.Tensor]:
    return {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}


@pytest.fixture()
def gpt(sd, tmp_path) -> LlamaGen:
    torch.save({"model": sd, "optimizer": {}, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "c.pt")
    return LlamaGen.from_official(tmp_path / "c.pt", **CFG)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_teacher_forcing_equals_official(gpt, ref):
    logits = gpt(ref["tokens"], ref["labels"])
    assert logits.dtype == torch.float32 and logits.shape == (3, 16, 64)
    assert rel_err(logits, ref["logits_tf"]) <= 1e-5


def test_kv_cached_decoding_equals_official(gpt, ref):
    toks, labels = ref["tokens"], ref["labels"]
    cache, first = gpt.begin(labels)
    k_ptr = cache.k.data_ptr()
    steps = [first] + [gpt.advance(cache, toks[:, i : i + 1]) for i in range(15)]
    assert cache.k.data_ptr() == k_ptr and cache.pos == 16  # static cache, written in place
    assert rel_err(torch.cat(steps, 1), ref["logits_cached"]) <= 1e-5


def test_prefix_prefill_equals_teacher_forcing(gpt, ref):
    _, logits = gpt.begin(ref["labels"], ref["tokens"][:, :7])
    assert rel_err(logits[:, 0], ref["logits_tf"][:, 7]) <= 1e-5


@pytest.mark.parametrize(
    "name, seed, kwargs",
    [
        ("sample_seed123_cfg2_topk20_t09", 123, dict(cfg_scale=2.0, top_k=20, temperature=0.9)),
        ("sample_seed7_cfg15_topp08_int4", 7, dict(cfg_scale=1.5, top_p=0.8, cfg_interval=4)),
    ],
)
def test_sampling_reproduces_official_generate(gpt, ref, name, seed, kwargs):
    """Same global seed → the same tokens as the official ``generate()`` (CFG, temperature, top-k/p)."""
    torch.manual_seed(seed)
    tokens = sample_tokens(gpt, ref["labels"], **kwargs)
    assert torch.equal(tokens, ref[name])


@pytest.mark.parametrize("fmt", ["model", "ema", "raw", "module_prefix", "freqs", "safetensors", "legacy"])
def test_official_formats_load(sd, ref, tmp_path, fmt):
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "model":
        torch.save({"model": sd}, path)
    elif fmt == "ema":
        torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}}, path)
    elif fmt == "raw":  # FSDP consolidated format
        torch.save(sd, path)
    elif fmt == "module_prefix":
        torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "freqs":
        torch.save({**sd, "freqs_cis": torch.zeros(17, 8, 2)}, path)
    elif fmt == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        save_file(sd, str(path))
    model = LlamaGen.from_official(path, key="ema" if fmt == "ema" else None, **CFG)
    assert rel_err(model(ref["tokens"], ref["labels"]), ref["logits_tf"]) <= 1e-5


def test_unsafe_pickle_refused(sd, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": sd, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only"):
        LlamaGen.from_official(path, **CFG)


def test_truncated_file_named(sd, tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"model": sd}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*(corrupt|truncated)"):
        LlamaGen.from_official(path, **CFG)
    bad = tmp_path / "cut.safetensors"
    save_file(sd, str(bad))
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        LlamaGen.from_official(bad, **CFG)
    assert pickle  # pickle-based formats are only read through weights_only=True


def test_mismatched_config_names_keys(sd, tmp_path):
    torch.save({"model": sd}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\.") as e:
        LlamaGen.from_official(tmp_path / "c.pt", **{**CFG, "n_layer": 3})
    assert "c.pt" in str(e.value) and "fit" in str(e.value)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*wqkv"):
        LlamaGen.from_official(tmp_path / "c.pt", **{**CFG, "dim": 128, "n_head": 8})


def test_wrong_preset_names_the_fitting_one(monkeypatch):
    """A GPT-L checkpoint loaded as GPT-B: the error lists the shape mismatches and names GPT-L."""
    with torch.device("meta"):
        large = LlamaGen.from_preset("GPT-L").state_dict()
    monkeypatch.setattr("distilled_decoding.teachers.llamagen.load_state_dict_file", lambda *a, **k: large)
    with pytest.raises(CheckpointError) as e:
        LlamaGen.from_official("c2i_L_256.pt", preset="GPT-B")
    msg = str(e.value)
    assert "unexpected keys: layers.12." in msg and "shape mismatches" in msg and "'GPT-L'" in msg
    # with no preset the shapes decide; block_size comes from the file name
    cfg = official_config(large, filename="c2i_L_384.pt")
    assert (cfg["dim"], cfg["n_layer"], cfg["n_head"]) == (1024, 24, 16)
    assert cfg["block_size"] == 576 and cfg["num_classes"] == 1000 and cfg["vocab_size"] == 16384
    assert official_config(large, filename="c2i_L_256.pt", block_size=64)["block_size"] == 64


@pytest.mark.parametrize(
    "preset, params",
    [
        ("GPT-B", 110_888_448),
        ("GPT-L", 342_910_976),
        ("GPT-XL", 774_699_520),
        ("GPT-XXL", 1_410_972_672),
        ("GPT-3B", 3_096_659_200),
    ],
)
def test_full_size_presets_on_meta(preset, params):
    with torch.device("meta"):
        model = LlamaGen.from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.is_meta for p in model.parameters())
    n = LLAMAGEN_PRESETS[preset]["n_layer"]
    assert len(model.state_dict()) == 4 + 7 * n  # GPT-B: 88 keys, as in the official dumps
    assert model.freqs_cis.shape == (257, model.args.head_dim // 2, 2)


def test_rope_table_layout():
    model = LlamaGen(**CFG)
    f = model.freqs_cis
    assert torch.all(f[0] == 0)  # class token rows are zeros, not identity
    grid = 4
    head_quarter = model.args.head_dim // 4
    r, c = 1, 2  # token at grid cell (1, 2) sits at sequence index 1 + r*grid + c
    row = f[1 + r * grid + c]
    base = 1.0 / (10000 ** (torch.arange(0, model.args.head_dim // 2, 2).float() / (model.args.head_dim // 2)))
    assert torch.allclose(row[:head_quarter, 0], torch.cos(r * base))
    assert torch.allclose(row[head_quarter:, 0], torch.cos(c * base))


def test_input_errors(gpt):
    toks = torch.zeros(2, 16, dtype=torch.long)
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 64\).*max 64"):
        gpt(toks + 64, labels)
    with pytest.raises(ValueError, match=r"class_labels: class ids must lie in \[0, 10\).*max 10"):
        gpt(toks, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"tokens: expected an integer dtype"):
        gpt(toks.float(), labels)
    with pytest.raises(ValueError, match=r"tokens: expected a \(B, N\)"):
        gpt(toks[0], labels)
    with pytest.raises(ValueError, match=r"class_labels: expected a \(2,\)"):
        gpt(toks, labels[:1])
    with pytest.raises(ValueError, match=r"block_size=16"):
        gpt(torch.zeros(2, 17, dtype=torch.long), labels)


def test_config_validation():
    with pytest.raises(ValueError, match="block_size=200.*perfect square"):
        LlamaGen(**{**CFG, "block_size": 200})
    with pytest.raises(ValueError, match="dim=66.*multiple of n_head"):
        LlamaGen(**{**CFG, "dim": 66})
    with pytest.raises(ValueError, match="model_type='x2i'"):  # t2i is supported: tests/test_llamagen_t2i.py
        LlamaGen(**{**CFG, "model_type": "x2i"})
    with pytest.raises(ValueError, match="preset='GPT-Q'"):
        LlamaGen.from_preset("GPT-Q")


def test_save_pretrained_round_trip(gpt, ref, tmp_path):
    gpt.save_pretrained(tmp_path / "m")
    back = LlamaGen.from_pretrained(tmp_path / "m")
    assert torch.equal(back(ref["tokens"], ref["labels"]), gpt(ref["tokens"], ref["labels"]))
    assert back.freqs_cis.shape == gpt.freqs_cis.shape and torch.equal(back.freqs_cis, gpt.freqs_cis)


def test_bfloat16_decoding_runs_close(gpt, ref):
    lo = gpt.to(torch.bfloat16)
    cache, first = lo.begin(ref["labels"])
    assert cache.k.dtype == torch.bfloat16 and first.dtype == torch.float32
    assert (first[:, 0] - ref["logits_tf"][:, 0]).abs().max() < 0.1 * ref["logits_tf"].abs().max()
    tokens = sample_tokens(lo, ref["labels"], cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 16) and int(tokens.max()) < 64
