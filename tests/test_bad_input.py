"""Bad input at every public entry point: wrong shapes, dtypes, ranges, NaN/inf, missing / corrupt / foreign files.

Walks the names exported by ``distilled_decoding``, the pipeline's methods, ``build_trajectories`` /
``TrajectoryDataset``, ``train_student``, the recipe config loader and the command line (``main([...])`` in
process). Every case asserts the exception type and that the message names the argument or the file; cases that
write nothing must not create their output folder. Every config dataclass is checked field by field, so a new
field is covered without a new test.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pickle
import pkgutil
import re
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distilled_decoding as ddk
from distilled_decoding import (
    VAR,
    CheckpointError,
    DDStudent,
    DDVARStudent,
    DistilledDecodingPipeline,
    FlowChooser,
    LlamaGen,
    MultinomialChooser,
    MultiScaleVQVAE,
    TrajectoryDataset,
    VQTokenizer,
    build_trajectories,
    load_state_dict_file,
    noise_to_tokens,
    sample_tokens,
)
from distilled_decoding.configs import ConfigError, ValidatedConfig
from distilled_decoding.distill import DistillConfig, train_student
from distilled_decoding.recipe import load_recipe_config
from distilled_decoding.trajectories import TrajectoryError

from .conftest import TINY_GPT, TINY_VQ, randomize_

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


class Ctx:
    """Shared tiny models and files, built once for the module."""


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    c = Ctx()
    c.root = root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    c.gpt = randomize_(LlamaGen(**TINY_GPT), seed=2).eval()
    c.vq = VQTokenizer(**TINY_VQ).eval()
    c.student = DDStudent.from_teacher(c.gpt, c.vq.codebook, timesteps=(0, 6)).eval()
    c.pipe = DistilledDecodingPipeline(student=c.student, tokenizer=c.vq)
    c.noise = torch.randn(2, 16, 8)
    c.labels = torch.tensor([1, 2])
    (root / "corrupt.pt").write_bytes(b"garbage" * 10)
    (root / "corrupt.safetensors").write_bytes(b"garbage" * 10)
    (root / "folder").mkdir()
    save_file({"x": torch.zeros(3)}, str(root / "foreign.safetensors"))
    c.marker = root / "PWNED"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Planted(c.marker)}, root / "malicious.pt")
    (root / "malicious.pkl").write_bytes(pickle.dumps(_Planted(c.marker)))
    c.traj = build_trajectories(c.gpt, root / "traj", num_samples=8, batch_size=8, shard_size=4,
                                codebook=c.vq.codebook, progress=False)  # fmt: skip
    (root / "empty").mkdir()
    (root / "notjson").mkdir()
    (root / "notjson" / "manifest.json").write_text("{oops")
    (root / "foreignjson").mkdir()
    (root / "foreignjson" / "manifest.json").write_text(json.dumps({"hello": 1}))
    (root / "pipe_nojson").mkdir()
    (root / "pipe_badjson").mkdir()
    (root / "pipe_badjson" / "model_index.json").write_text("{oops")
    (root / "pipe_foreign").mkdir()
    (root / "pipe_foreign" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "bad.yaml").write_text("distill: [1,\n  lr")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "section.yaml").write_text("distill: 5\n")
    return c


def _tiny_var() -> VAR:
    vae = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
               using_mid_sa=False, v_patch_nums=(1, 2))  # fmt: skip
    return VAR(num_classes=10, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), vocab_size=64, Cvae=8,
               vae_config=vae).eval()  # fmt: skip


class _Counting(torch.nn.Module):
    """A teacher wrapper that records whether decoding started."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.begun = gpt, 0
        for name in ("decode_groups", "guidance_scales", "check_tokens", "advance"):
            setattr(self, name, getattr(gpt, name))
        self.seq_len, self.null_class = gpt.seq_len, gpt.null_class
        self.condition, self.token_order = gpt.condition, gpt.token_order

    def begin(self, *a, **k):
        self.begun += 1
        return self.gpt.begin(*a, **k)


# (call, expected exception, regex naming the argument or file)
CASES: dict[str, tuple] = {
    # -- teachers and tokenizers ----------------------------------------------------------------------------
    "LlamaGen dim str": (lambda c: LlamaGen(**{**TINY_GPT, "dim": "64"}), ValueError, r"dim='64': expected an int"),
    "LlamaGen vocab<0": (lambda c: LlamaGen(**{**TINY_GPT, "vocab_size": -1}), ValueError, r"vocab_size=-1"),
    "LlamaGen eps nan": (lambda c: LlamaGen(**{**TINY_GPT, "norm_eps": NAN}), ValueError, r"norm_eps=nan"),
    "LlamaGen dropout bool": (lambda c: LlamaGen(**{**TINY_GPT, "block_size": True}), ValueError, r"block_size=True"),
    "LlamaGen missing file": (lambda c: LlamaGen.from_official(c.root / "nope.pt"), CheckpointError, r"nope\.pt"),
    "LlamaGen corrupt file": (lambda c: LlamaGen.from_official(c.root / "corrupt.pt"), CheckpointError, r"corrupt\.pt"),
    "LlamaGen foreign file": (
        lambda c: LlamaGen.from_official(c.root / "foreign.safetensors"),
        ValueError,
        r"foreign\.safetensors",
    ),
    "LlamaGen folder": (lambda c: LlamaGen.from_official(c.root / "folder"), CheckpointError, r"folder: is a folder"),
    "LlamaGen preset": (lambda c: LlamaGen.from_preset("GPT-Q"), ValueError, r"preset='GPT-Q'"),
    "gpt float tokens": (lambda c: c.gpt(torch.zeros(2, 16), c.labels), ValueError, r"^tokens: expected an integer"),
    "gpt token range": (lambda c: c.gpt(torch.full((2, 16), 99), c.labels), ValueError, r"^tokens: token ids"),
    "gpt long sequence": (lambda c: c.gpt(torch.zeros(2, 17, dtype=torch.long), c.labels), ValueError, r"^tokens:"),
    "gpt labels batch": (
        lambda c: c.gpt(torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
        ValueError,
        r"^class_labels: expected a \(2,\)",
    ),
    "gpt labels float": (
        lambda c: c.gpt(torch.zeros(2, 16, dtype=torch.long), torch.tensor([NAN, 1.0])),
        ValueError,
        r"^class_labels: expected an integer dtype",
    ),
    "VQ size 0": (lambda c: VQTokenizer(**{**TINY_VQ, "codebook_size": 0}), ValueError, r"codebook_size=0"),
    "VQ missing file": (lambda c: VQTokenizer.from_official(c.root / "nope.pt"), CheckpointError, r"nope\.pt"),
    "VQ foreign file": (
        lambda c: VQTokenizer.from_official(c.root / "foreign.safetensors"),
        CheckpointError,
        r"quantize\.embedding\.weight",
    ),
    "vq tokens float": (lambda c: c.vq.decode_tokens(torch.zeros(1, 16)), ValueError, r"^tokens"),
    "vq tokens range": (lambda c: c.vq.decode_tokens(torch.full((1, 16), 999)), ValueError, r"^tokens out of range"),
    "vq grid": (
        lambda c: c.vq.decode_tokens(torch.zeros(1, 16, dtype=torch.long), grid=(3, 3)),
        ValueError,
        r"^grid=\(3, 3\)",
    ),
    "vq vectors nan": (lambda c: c.vq.decode_vectors(torch.full((1, 16, 8), NAN)), ValueError, r"^vectors .*NaN"),
    "vq vectors inf": (lambda c: c.vq.decode_vectors(torch.full((1, 16, 8), INF)), ValueError, r"^vectors .*inf"),
    "vq vectors dim": (lambda c: c.vq.decode_vectors(torch.zeros(1, 16, 5)), ValueError, r"^vectors must have"),
    "vq encode shape": (lambda c: c.vq.encode(torch.zeros(1, 3, 7, 7)), ValueError, r"^images"),
    "VAR missing file": (lambda c: VAR.from_official(c.root / "nope.pth"), CheckpointError, r"nope\.pth"),
    "VAR foreign file": (
        lambda c: VAR.from_official(c.root / "foreign.safetensors"),
        CheckpointError,
        r"foreign\.safetensors: not a VAR",
    ),
    "VAR depth 0": (
        lambda c: VAR(num_classes=10, depth=0, embed_dim=32, num_heads=2, patch_nums=(1, 2), vocab_size=64, Cvae=8),
        ValueError,
        r"depth=0",
    ),  # fmt: skip
    "var tokens length": (lambda c: _tiny_var()(torch.zeros(2, 4, dtype=torch.long), c.labels), ValueError, r"^tokens"),
    "var labels range": (
        lambda c: _tiny_var()(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 10])),
        ValueError,
        r"^class_labels: class ids must lie in \[0, 10\)",
    ),
    "MSVQ vocab 0": (lambda c: MultiScaleVQVAE(vocab_size=0), ValueError, r"vocab_size=0"),
    "MSVQ missing file": (lambda c: MultiScaleVQVAE.from_official(c.root / "nope.pth"), CheckpointError, r"nope"),
    "MSVQ vectors nan": (
        lambda c: _tiny_var().vae.decode_vectors(torch.full((1, 5, 8), NAN)),
        ValueError,
        r"^vectors: contain NaN",
    ),
    # -- checkpoints ------------------------------------------------------------------------------------------
    "load missing": (lambda c: load_state_dict_file(c.root / "nope.pt"), CheckpointError, r"nope\.pt"),
    "load corrupt": (
        lambda c: load_state_dict_file(c.root / "corrupt.safetensors"),
        CheckpointError,
        r"corrupt\.safetensors: not a readable safetensors file",
    ),
    "load folder": (lambda c: load_state_dict_file(c.root / "folder"), CheckpointError, r"is a folder"),
    "load int path": (lambda c: load_state_dict_file(123), TypeError, r"^path: expected a checkpoint file path"),
    "load pickle code": (
        lambda c: load_state_dict_file(c.root / "malicious.pt"),
        CheckpointError,
        r"malicious\.pt: refused to unpickle",
    ),
    "load raw pickle": (lambda c: load_state_dict_file(c.root / "malicious.pkl"), CheckpointError, r"malicious\.pkl"),
    "load key": (
        lambda c: load_state_dict_file(c.root / "foreign.safetensors", key="ema"),
        CheckpointError,
        r"foreign\.safetensors: has no entry 'ema'",
    ),
    # -- sampling ---------------------------------------------------------------------------------------------
    "sample teacher": (lambda c: sample_tokens("gpt", c.labels), TypeError, r"^teacher: expected a model"),
    "sample labels object": (lambda c: sample_tokens(c.gpt, object()), TypeError, r"^class_labels: expected a \(B,\)"),
    "sample labels float": (lambda c: sample_tokens(c.gpt, torch.zeros(2)), ValueError, r"^class_labels"),
    "sample labels range": (lambda c: sample_tokens(c.gpt, torch.tensor([0, 10])), ValueError, r"^class_labels"),
    "sample temperature nan": (
        lambda c: sample_tokens(c.gpt, c.labels, temperature=NAN),
        ValueError,
        r"^temperature=nan",
    ),
    "sample temperature inf": (
        lambda c: sample_tokens(c.gpt, c.labels, temperature=INF),
        ValueError,
        r"^temperature=inf",
    ),
    "sample temperature 0": (lambda c: sample_tokens(c.gpt, c.labels, temperature=0), ValueError, r"^temperature=0"),
    "sample cfg nan": (lambda c: sample_tokens(c.gpt, c.labels, cfg_scale=NAN), ValueError, r"^cfg_scale=nan"),
    "sample cfg inf": (lambda c: sample_tokens(c.gpt, c.labels, cfg_scale=INF), ValueError, r"^cfg_scale=inf"),
    "sample cfg bool": (lambda c: sample_tokens(c.gpt, c.labels, cfg_scale=True), ValueError, r"^cfg_scale=True"),
    "sample cfg negative": (lambda c: sample_tokens(c.gpt, c.labels, cfg_scale=-1), ValueError, r"^cfg_scale=-1"),
    "sample top_k float": (lambda c: sample_tokens(c.gpt, c.labels, top_k=1.5), ValueError, r"^top_k=1\.5"),
    "sample top_p 0": (lambda c: sample_tokens(c.gpt, c.labels, top_p=0.0), ValueError, r"^top_p=0\.0"),
    "sample top_p nan": (lambda c: sample_tokens(c.gpt, c.labels, top_p=NAN), ValueError, r"^top_p=nan"),
    "sample cfg_interval": (
        lambda c: sample_tokens(c.gpt, c.labels, cfg_interval="a"),
        ValueError,
        r"^cfg_interval='a'",
    ),
    "sample prefix float": (lambda c: sample_tokens(c.gpt, c.labels, prefix=torch.zeros(2, 3)), ValueError, r"^prefix"),
    "sample prefix batch": (
        lambda c: sample_tokens(c.gpt, c.labels, prefix=torch.zeros(3, 3, dtype=torch.long)),
        ValueError,
        r"^prefix: expected batch size 2",
    ),
    "sample stop": (lambda c: sample_tokens(c.gpt, c.labels, stop=99), ValueError, r"^stop=99"),
    "sample stop float": (lambda c: sample_tokens(c.gpt, c.labels, stop=5.0), ValueError, r"^stop=5\.0"),
    "sample generator": (lambda c: sample_tokens(c.gpt, c.labels, generator="g"), TypeError, r"^generator"),
    "sample chooser": (lambda c: sample_tokens(c.gpt, c.labels, chooser="flow"), TypeError, r"^chooser"),
    "multinomial generator": (lambda c: MultinomialChooser(5), TypeError, r"^generator: expected a torch\.Generator"),
    "flow noise nan": (lambda c: FlowChooser(torch.full((2, 16, 8), NAN), c.vq.codebook), ValueError, r"^noise:.*NaN"),
    "flow noise int": (
        lambda c: FlowChooser(torch.zeros(2, 16, 8, dtype=torch.long), c.vq.codebook),
        ValueError,
        r"^noise: expected a floating dtype",
    ),
    "flow noise dim": (lambda c: FlowChooser(torch.zeros(2, 16, 4), c.vq.codebook), ValueError, r"^noise"),
    "flow codebook": (lambda c: FlowChooser(c.noise, torch.zeros(64)), ValueError, r"^codebook: expected a \(V, D\)"),
    "noise_to_tokens leading": (
        lambda c: noise_to_tokens(torch.randn(2, 8), torch.randn(3, 64), c.vq.codebook),
        ValueError,
        r"^logits",
    ),
    "noise_to_tokens steps": (
        lambda c: noise_to_tokens(torch.randn(2, 8), torch.randn(2, 64), c.vq.codebook, steps=0),
        ValueError,
        r"^steps=0",
    ),  # fmt: skip
    "noise_to_tokens solver": (
        lambda c: noise_to_tokens(torch.randn(2, 8), torch.randn(2, 64), c.vq.codebook, solver="rk4"),
        ValueError,
        r"^solver='rk4'",
    ),  # fmt: skip
    "noise_to_tokens nan logits": (
        lambda c: noise_to_tokens(torch.randn(2, 8), torch.full((2, 64), NAN), c.vq.codebook),
        ValueError,
        r"^logits: NaN",
    ),  # fmt: skip
    "noise_to_tokens nan noise": (
        lambda c: noise_to_tokens(torch.full((2, 8), NAN), torch.randn(2, 64), c.vq.codebook),
        ValueError,
        r"^noise",
    ),  # fmt: skip
    "noise_to_tokens int noise": (
        lambda c: noise_to_tokens(torch.zeros(2, 8, dtype=torch.long), torch.randn(2, 64), c.vq.codebook),
        ValueError,
        r"^noise",
    ),  # fmt: skip
    # -- students -----------------------------------------------------------------------------------------------
    "student teacher": (lambda c: DDStudent.from_teacher("gpt", c.vq.codebook), TypeError, r"^teacher"),
    "student codebook": (lambda c: DDStudent.from_teacher(c.gpt, torch.randn(10, 8)), ValueError, r"^codebook"),
    "student codebook type": (lambda c: DDStudent.from_teacher(c.gpt, [1, 2]), TypeError, r"^codebook"),
    "student timesteps": (
        lambda c: DDStudent.from_teacher(c.gpt, c.vq.codebook, timesteps=(0, 99)),
        ValueError,
        r"^timesteps=\[0, 99\]",
    ),
    "student split": (lambda c: DDStudent.from_teacher(c.gpt, c.vq.codebook, split=99), ValueError, r"^split=99"),
    "student init": (
        lambda c: DDStudent.from_teacher(c.gpt, c.vq.codebook, init_input="zeros"),
        ValueError,
        r"^init_input='zeros'",
    ),
    "student official missing": (
        lambda c: DDStudent.from_official(c.root / "nope.pt", c.vq),
        CheckpointError,
        r"nope\.pt",
    ),
    "var student official": (
        lambda c: DDVARStudent.from_official(c.root / "nope.pth", None),
        CheckpointError,
        r"nope\.pth",
    ),
    "var student teacher": (
        lambda c: DDVARStudent.from_teacher(c.gpt, c.vq.codebook),
        ValueError,
        r"^teacher: expected a VAR",
    ),
    # -- pipeline: generate ---------------------------------------------------------------------------------------
    "generate noise nan": (
        lambda c: c.pipe.generate(torch.full((2, 16, 8), NAN), c.labels),
        ValueError,
        r"^noise: contains NaN or inf",
    ),
    "generate noise inf": (
        lambda c: c.pipe.generate(c.noise.clone().index_fill_(1, torch.tensor([3]), INF), c.labels),
        ValueError,
        r"^noise: contains NaN or inf",
    ),
    "generate noise shape": (
        lambda c: c.pipe.generate(torch.randn(2, 15, 8), c.labels),
        ValueError,
        r"^noise: expected shape \(B, 16, 8\)",
    ),
    "generate noise 2d": (lambda c: c.pipe.generate(torch.randn(16, 8), c.labels), ValueError, r"^noise"),
    "generate noise int": (
        lambda c: c.pipe.generate(c.noise.long(), c.labels),
        ValueError,
        r"^noise: expected a floating dtype",
    ),
    "generate noise list": (lambda c: c.pipe.generate([[0.0] * 8] * 16, c.labels), TypeError, r"^noise"),
    "generate empty batch": (lambda c: c.pipe.generate(torch.randn(0, 16, 8), []), ValueError, r"^noise: empty"),
    "generate labels str": (lambda c: c.pipe.generate(c.noise, "cat"), TypeError, r"^class_labels: .*string 'cat'"),
    "generate labels strs": (lambda c: c.pipe.generate(c.noise, ["1", "2"]), TypeError, r"^class_labels"),
    "generate labels bool": (lambda c: c.pipe.generate(c.noise, True), TypeError, r"^class_labels: .*bool"),
    "generate labels bools": (lambda c: c.pipe.generate(c.noise, [True, False]), TypeError, r"^class_labels"),
    "generate labels bool tensor": (
        lambda c: c.pipe.generate(c.noise, torch.tensor([True, False])),
        ValueError,
        r"^class_labels: .*torch\.bool",
    ),
    "generate labels float": (lambda c: c.pipe.generate(c.noise, [1.5, 2.0]), TypeError, r"^class_labels"),
    "generate labels float tensor": (
        lambda c: c.pipe.generate(c.noise, torch.tensor([1.0, 2.0])),
        ValueError,
        r"^class_labels: .*float32",
    ),
    "generate labels empty": (lambda c: c.pipe.generate(c.noise, []), ValueError, r"^class_labels: empty"),
    "generate labels count": (lambda c: c.pipe.generate(c.noise, [1, 2, 3]), ValueError, r"^class_labels"),
    "generate labels range": (lambda c: c.pipe.generate(c.noise, [0, 10]), ValueError, r"^class_labels: class ids"),
    "generate labels negative": (lambda c: c.pipe.generate(c.noise, [-1, 0]), ValueError, r"^class_labels"),
    "generate steps": (lambda c: c.pipe.generate(c.noise, c.labels, steps=3), ValueError, r"^steps=3"),
    "generate steps bool": (lambda c: c.pipe.generate(c.noise, c.labels, steps=True), TypeError, r"^steps=True"),
    "generate steps str": (lambda c: c.pipe.generate(c.noise, c.labels, steps="1"), TypeError, r"^steps='1'"),
    "generate generator": (lambda c: c.pipe.generate(c.noise, generator=0), TypeError, r"^generator"),
    "generate sampling": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher_sampling="greedy"),
        ValueError,
        r"^teacher_sampling='greedy'",
    ),
    "generate teacher_tokens alone": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher_tokens=(2, 6)),
        ValueError,
        r"^teacher_tokens: given without a teacher",
    ),
    "generate teacher_tokens float": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens=(1.5, 6)),
        TypeError,
        r"^teacher_tokens=\(1\.5, 6\): expected a pair of ints",
    ),  # fmt: skip
    "generate teacher_tokens str": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens="26"),
        TypeError,
        r"^teacher_tokens='26'",
    ),
    "generate teacher_tokens one": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens=(6,)),
        TypeError,
        r"^teacher_tokens=\(6,\)",
    ),
    "generate teacher_tokens int": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens=6),
        TypeError,
        r"^teacher_tokens=6",
    ),
    "generate teacher_tokens bool": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens=(True, 6)),
        TypeError,
        r"^teacher_tokens=\(True, 6\)",
    ),  # fmt: skip
    "generate teacher_tokens range": (
        lambda c: c.pipe.generate(c.noise, c.labels, teacher=c.gpt, teacher_tokens=(2, 5)),
        ValueError,
        r"^teacher_tokens=\(2, 5\): expected \(T, t2\)",
    ),  # fmt: skip
    "generate teacher str": (lambda c: c.pipe.generate(c.noise, c.labels, teacher="gpt"), TypeError, r"^teacher"),
    "generate teacher size": (
        lambda c: c.pipe.generate(
            c.noise, c.labels, teacher=LlamaGen(**{**TINY_GPT, "vocab_size": 128}), teacher_tokens=(2, 6)
        ),
        ValueError,
        r"^teacher: does not match the student",
    ),  # fmt: skip
    "call output_type": (lambda c: c.pipe([1], output_type="jpg"), ValueError, r"^output_type='jpg'"),
    "call labels str": (lambda c: c.pipe("cat"), (TypeError, ValueError), r"class_labels"),
    "pipeline tokenizer": (
        lambda c: DistilledDecodingPipeline(
            student=c.student, tokenizer=VQTokenizer(**{**TINY_VQ, "codebook_size": 32})
        ),
        ValueError,
        r"^tokenizer: its codebook",
    ),  # fmt: skip
    # -- pipeline: files ------------------------------------------------------------------------------------------
    "save int": (lambda c: c.pipe.save_pretrained(5), TypeError, r"^save_directory"),
    "save onto a file": (
        lambda c: c.pipe.save_pretrained(c.root / "corrupt.pt"),
        NotADirectoryError,
        r"corrupt\.pt: exists and is not a folder",
    ),
    "load missing Path": (
        lambda c: DistilledDecodingPipeline.from_pretrained(Path("missing")),
        FileNotFoundError,
        r"^pretrained_model_name_or_path: missing is not a folder",
    ),
    "load missing dir": (
        lambda c: DistilledDecodingPipeline.from_pretrained(str(c.root / "nope")),
        FileNotFoundError,
        r"nope is not a folder",
    ),
    "load no index": (
        lambda c: DistilledDecodingPipeline.from_pretrained(c.root / "pipe_nojson"),
        FileNotFoundError,
        r"pipe_nojson: no model_index\.json",
    ),
    "load corrupt index": (
        lambda c: DistilledDecodingPipeline.from_pretrained(c.root / "pipe_badjson"),
        ValueError,
        r"pipe_badjson/model_index\.json: not valid JSON",
    ),
    "load foreign index": (
        lambda c: DistilledDecodingPipeline.from_pretrained(c.root / "pipe_foreign"),
        ValueError,
        r"model_index\.json: describes a 'StableDiffusionPipeline' pipeline",
    ),
    "load int": (lambda c: DistilledDecodingPipeline.from_pretrained(5), TypeError, r"^pretrained_model_name_or_path"),
    # -- trajectories --------------------------------------------------------------------------------------------
    "dataset missing": (lambda c: TrajectoryDataset(c.root / "nope"), TrajectoryError, r"^out_dir: .*nope"),
    "dataset file": (lambda c: TrajectoryDataset(c.root / "corrupt.pt"), TrajectoryError, r"^out_dir: .*corrupt"),
    "dataset int": (lambda c: TrajectoryDataset(5), TypeError, r"^out_dir"),
    "dataset empty": (lambda c: TrajectoryDataset(c.root / "empty"), TrajectoryError, r"empty/manifest\.json: no"),
    "dataset not json": (
        lambda c: TrajectoryDataset(c.root / "notjson"),
        TrajectoryError,
        r"notjson/manifest\.json: corrupt manifest",
    ),
    "dataset foreign json": (
        lambda c: TrajectoryDataset(c.root / "foreignjson"),
        TrajectoryError,
        r"foreignjson/manifest\.json: missing key\(s\)",
    ),
    "dataset index str": (lambda c: TrajectoryDataset(c.traj)["a"], TypeError, r"^index"),
    "dataset index float": (lambda c: TrajectoryDataset(c.traj)[1.5], TypeError, r"^index"),
    "dataset index range": (lambda c: TrajectoryDataset(c.traj)[8], IndexError, r"^index 8 out of range"),
}

# build_trajectories: nothing may be written for a bad argument
BUILD = {
    "out_dir int": (dict(out_dir=5), TypeError, r"^out_dir"),
    "num_samples 0": (dict(num_samples=0), ValueError, r"^num_samples=0"),
    "num_samples float": (dict(num_samples=4.0), ValueError, r"^num_samples=4\.0"),
    "batch_size -1": (dict(batch_size=-1), ValueError, r"^batch_size=-1"),
    "shard_size str": (dict(shard_size="4"), ValueError, r"^shard_size='4'"),
    "seed -1": (dict(seed=-1), ValueError, r"^seed=-1"),
    "seed str": (dict(seed="a"), ValueError, r"^seed='a'"),
    "cfg nan": (dict(cfg_scale=NAN), ValueError, r"^cfg_scale=nan"),
    "temperature inf": (dict(temperature=INF), ValueError, r"^temperature=inf"),
    "top_p 2": (dict(top_p=2.0), ValueError, r"^top_p=2\.0"),
    "cfg_interval": (dict(cfg_interval=-2), ValueError, r"^cfg_interval=-2"),
    "flow unknown": (dict(flow_kwargs={"nope": 1}), ValueError, r"^flow_kwargs: unknown option\(s\) \['nope'\]"),
    "flow value": (dict(flow_kwargs={"steps": 0}), ValueError, r"^flow_kwargs: steps=0"),
    "flow type": (dict(flow_kwargs=[1]), TypeError, r"^flow_kwargs"),
    "labels count": (dict(class_labels=[1, 2]), ValueError, r"^class_labels: expected 4 labels"),
    "labels range": (dict(class_labels=[0, 1, 2, 10]), ValueError, r"^class_labels: class ids"),
    "labels float": (dict(class_labels=[0.5, 1, 2, 3]), ValueError, r"^class_labels"),
    "codebook shape": (dict(codebook=torch.zeros(10, 8)), ValueError, r"^codebook: expected a \(64, D\)"),
    "store_noise": (dict(store_noise="yes"), ValueError, r"^store_noise='yes'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_named(ctx, name):
    call, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        call(ctx)
    assert not ctx.marker.exists()  # no planted pickle ever ran


@pytest.mark.parametrize("name", sorted(BUILD))
def test_build_trajectories_bad_arguments_write_nothing(ctx, tmp_path, name):
    kwargs, exc, pattern = BUILD[name]
    out = tmp_path / "traj"
    args = dict(out_dir=out, num_samples=4, batch_size=4, shard_size=4, codebook=ctx.vq.codebook, progress=False)
    with pytest.raises(exc, match=pattern):
        build_trajectories(ctx.gpt, **{**args, **kwargs})
    assert not out.exists()


def test_build_trajectories_into_a_file(ctx):
    with pytest.raises(TrajectoryError, match=r"^out_dir: .*corrupt\.pt exists and is not a folder"):
        build_trajectories(ctx.gpt, ctx.root / "corrupt.pt", num_samples=4, codebook=ctx.vq.codebook, progress=False)


def test_a_foreign_shard_is_named(ctx, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(ctx.traj, out)
    shutil.copy(ctx.root / "foreign.safetensors", out / "shard-00001.safetensors")
    with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors: header metadata .* not a shard"):
        TrajectoryDataset(out)
    (out / "shard-00001.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors: unreadable shard"):
        TrajectoryDataset(out)
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(TrajectoryError, match=r"shard-00001\.safetensors: shard missing"):
        TrajectoryDataset(out)


def test_flow_chooser_too_short_fails_before_the_first_step(ctx):
    teacher = _Counting(ctx.gpt)
    with pytest.raises(ValueError, match=r"^noise: shape \(2, 10, 8\) does not cover .* expected \(2, >= 16, 8\)"):
        sample_tokens(teacher, ctx.labels, chooser=FlowChooser(torch.randn(2, 10, 8), ctx.vq.codebook))
    with pytest.raises(ValueError, match=r"^noise: shape \(3, 16, 8\) does not cover"):
        sample_tokens(teacher, ctx.labels, chooser=FlowChooser(torch.randn(3, 16, 8), ctx.vq.codebook))
    assert teacher.begun == 0
    out = sample_tokens(teacher, ctx.labels, chooser=FlowChooser(torch.randn(2, 10, 8), ctx.vq.codebook), stop=10)
    assert out.shape == (2, 10) and teacher.begun == 1  # enough noise for the positions decoded


# ----------------------------------------------------------------------------------------------------------
# train_student
# ----------------------------------------------------------------------------------------------------------
def test_train_student_bad_input(ctx, tmp_path):
    out = tmp_path / "student"
    with pytest.raises(TypeError, match=r"^cfg: expected a DistillConfig, got dict"):
        train_student({"lr": 1e-3})
    with pytest.raises(TrajectoryError, match=r"^trajectories: .*nope is not a folder"):
        train_student(DistillConfig(trajectories=str(tmp_path / "nope"), output_dir=str(out)))
    assert not out.exists()
    with pytest.raises(TrajectoryError, match=r"empty/manifest\.json: no manifest"):
        train_student(DistillConfig(trajectories=str(ctx.root / "empty"), output_dir=str(out)))
    cfg = DistillConfig(trajectories=str(ctx.traj), output_dir=str(out), max_steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"teacher and codebook are required"):
        train_student(cfg)
    other = randomize_(LlamaGen(**TINY_GPT), seed=77).eval()
    with pytest.raises(ValueError, match=r"trajectories were built by another teacher"):
        train_student(cfg, teacher=other, codebook=ctx.vq.codebook)


# ----------------------------------------------------------------------------------------------------------
# config dataclasses: every field of every config, generically
# ----------------------------------------------------------------------------------------------------------
def _config_classes() -> list[type]:
    found = {}
    for info in pkgutil.walk_packages(ddk.__path__, "distilled_decoding."):
        if info.name.endswith(("__main__", "cli")):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


CONFIGS = _config_classes()


def test_every_config_dataclass_is_validated():
    names = {c.__name__ for c in CONFIGS}
    assert {"DistillConfig", "RecipeConfig", "TeacherConfig", "TrajectoryConfig", "EvalConfig"} <= names
    unvalidated = [c.__name__ for c in CONFIGS if not issubclass(c, ValidatedConfig)]
    assert not unvalidated, f"config dataclasses without the generic validator: {unvalidated}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_type_checked(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        with pytest.raises(ConfigError, match=rf"^{f.name}=<object"):
            cls(**{f.name: object()})
        if "float" in str(hints[f.name]):
            for bad in (NAN, INF):
                with pytest.raises(ConfigError, match=rf"^{f.name}=(nan|inf)"):
                    cls(**{f.name: bad})
        if hints[f.name] in (int, float):
            with pytest.raises(ConfigError, match=rf"^{f.name}=True"):
                cls(**{f.name: True})


RECIPE = {
    "lr str": (["distill.lr=abc"], r"^distill\.lr='abc': expected a finite number$"),
    "lr nan": (["distill.lr=.nan"], r"^distill\.lr=nan"),
    "lr zero": (["distill.lr=0"], r"^distill\.lr=0\.0: expected a number > 0"),
    "block_size str": (["teacher.block_size=abc"], r"^teacher\.block_size='abc': expected an int or null"),
    "eval batch 0": (["evaluate.batch_size=0"], r"^evaluate\.batch_size=0: expected an int >= 1"),
    "stages no brackets": (["stages=trajectories"], r"^stages='trajectories': expected a list of strings"),
    "stages unknown": (["stages=[train,deploy]"], r"^stages=\['train', 'deploy'\]: expected some of"),
    "timesteps": (["distill.timesteps=[5,0]"], r"^distill\.timesteps=\(5, 0\): expected null or increasing"),
    "timesteps str": (["distill.timesteps=[0,x]"], r"^distill\.timesteps=\[0, 'x'\]"),
    "refine one": (["evaluate.refine=[3]"], r"^evaluate\.refine=\[3\]: expected a list of 2 values"),
    "top_p": (["trajectories.top_p=1.5"], r"^trajectories\.top_p=1\.5"),
    "num_samples": (["trajectories.num_samples=-5"], r"^trajectories\.num_samples=-5"),
    "store_noise": (["trajectories.store_noise=maybe"], r"^trajectories\.store_noise='maybe': expected true or false"),
    "kind": (["teacher.kind=pixelcnn"], r"^teacher\.kind='pixelcnn'"),
    "loss": (["distill.loss=l1"], r"^distill\.loss='l1'"),
    "betas": (["distill.betas=[0.9]"], r"^distill\.betas=\[0\.9\]"),
    "unknown field": (["distill.foo=1"], r"^distill: unknown field\(s\) \['foo'\]"),
    "unknown section": (["model.dim=1"], r"^unknown config key\(s\) \['model'\]"),
    "section scalar": (["distill=5"], r"^distill: expected a mapping of DistillConfig fields"),
    "no equals": (["distill.lr"], r"^override 'distill\.lr': expected section\.key=value"),
    "output_dir list": (["output_dir=[a]"], r"^output_dir=\['a'\]: expected a string"),
    "method": (["distill.method=dd3"], r"^distill\.method='dd3': expected one of \['dd1', 'dd2'\]"),
    "dd2 init": (["dd2.init=random"], r"^dd2\.init='random': expected 'gts' or 'teacher'"),
    "dd2 csd lr": (["dd2.csd.lr_generator=0"], r"^dd2\.csd\.lr_generator=0\.0: expected a number > 0"),
    "dd2 align_at": (["dd2.csd.align_at=1000"], r"^dd2\.csd\.align_at=1000: expected null or an iteration"),
    "dd2 sampling": (["dd2.gts.sampling={cfg: 2}"], r"^dd2\.gts\.sampling: unknown key\(s\) \['cfg'\]"),
    "dd2 sampling set": (["dd2.csd.sampling={cfg_scale: 3}"], r"^dd2\.csd\.sampling=\{'cfg_scale': 3\}: expected \{\}"),
    "dd2 head": (["dd2.gts.head_base=linear"], r"^dd2\.gts\.head_base='linear': expected one of"),
}


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_recipe_config_errors(name):
    overrides, pattern = RECIPE[name]
    with pytest.raises(ConfigError, match=pattern):
        load_recipe_config(None, overrides)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("teacher.model={root}/nope", r"^teacher\.model: .*nope does not exist"),
        ("teacher.tokenizer={root}/nope", r"^teacher\.tokenizer: .*nope does not exist"),
        (
            "teacher.model={repo}/checkpoints/digits_llamagen/gpt teacher.tokenizer=null",
            r"^teacher\.tokenizer: null, but a 'llamagen' teacher needs its tokenizer",
        ),
        ("output_dir={root}/corrupt.pt", r"^output_dir: .*corrupt\.pt exists and is not a folder"),
        ("distill.output_dir={root}/corrupt.pt", r"^distill\.output_dir: .*corrupt\.pt exists and is not a folder"),
        ("evaluate.reference={root}/nope", r"^evaluate\.reference: .*nope does not exist"),
    ],  # fmt: skip
)
def test_a_job_with_bad_paths_writes_nothing(ctx, tmp_path, override, pattern):
    from distilled_decoding.recipe import run

    out = tmp_path / "job"
    repo = Path(__file__).resolve().parents[1]
    cfg = load_recipe_config(None, [f"output_dir={out}", *override.format(root=ctx.root, repo=repo).split()])
    with pytest.raises(ConfigError, match=pattern):
        run(cfg)
    assert not out.exists()


def test_recipe_config_files(ctx):
    with pytest.raises(ConfigError, match=r"^--config: .*missing\.yaml does not exist"):
        load_recipe_config(ctx.root / "missing.yaml")
    with pytest.raises(ConfigError, match=r"^--config: .*bad\.yaml is not valid YAML \(.* at line \d+"):
        load_recipe_config(ctx.root / "bad.yaml")
    with pytest.raises(ConfigError, match=r"^--config: .*list\.yaml holds list, expected a mapping"):
        load_recipe_config(ctx.root / "list.yaml")
    with pytest.raises(ConfigError, match=r"^distill: expected a mapping"):
        load_recipe_config(ctx.root / "section.yaml")
    with pytest.raises(ConfigError, match=r"^--config: .*folder does not exist \(or is not a file\)"):
        load_recipe_config(ctx.root / "folder")


# ----------------------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------------------
def _cli(_: object = None):
    from distilled_decoding.cli import main

    return main


def _recipe(name):
    return importlib.import_module(f"recipes.{name}").main


CLI = {
    "distill lr": (lambda out: (_cli(None), ["distill", f"output_dir={out}", "distill.lr=abc"]), r"distill\.lr='abc'"),
    "distill stages": (
        lambda out: (_cli(None), ["distill", f"output_dir={out}", "stages=trajectories"]),
        r"stages='trajectories'",
    ),
    "distill config": (
        lambda out: (_cli(None), ["distill", "--config", str(out / "none.yaml")]),
        r"--config: .*none\.yaml does not exist",
    ),
    "distill block": (
        lambda out: (_cli(None), ["distill", f"output_dir={out}", "teacher.block_size=abc"]),
        r"teacher\.block_size='abc'",
    ),
    "evaluate batch": (
        lambda out: (_cli(None), ["evaluate", f"output_dir={out}", "evaluate.batch_size=0"]),
        r"evaluate\.batch_size=0",
    ),
    "evaluate missing": (
        lambda out: (_cli(None), ["evaluate", "--output-dir", str(out)]),
        r"--output-dir: .* is not a folder",
    ),
    "evaluate default missing": (
        lambda out: (_cli(None), ["evaluate", f"output_dir={out}"]),
        r"output_dir: .* does not exist \(the job folder\)",
    ),
    "bench what": (
        lambda out: (_cli(None), ["bench", "--what", "nonsense", "--out", str(out / "b.json")]),
        r"--what: unknown \['nonsense'\]",
    ),
    "bench sizes": (
        lambda out: (_cli(None), ["bench", "--batch-sizes", "0", "--out", str(out / "b.json")]),
        r"--batch-sizes=\[0\]",
    ),
    "bench pipeline": (
        lambda out: (_cli(None), ["bench", "--what", "pipeline", "--pipeline", str(out)]),
        r"--pipeline: .* holds no pipeline",
    ),
    "recipe llamagen": (
        lambda out: (_recipe("distill_llamagen"), [f"output_dir={out}", "distill.lr=abc"]),
        r"distill\.lr='abc'",
    ),
    "recipe var": (
        lambda out: (_recipe("distill_var"), [f"output_dir={out}", "evaluate.batch_size=0"]),
        r"evaluate\.batch_size=0",
    ),
    "recipe trajectories": (
        lambda out: (_recipe("build_trajectories"), ["--out", str(out), "--cfg-scale", "nan"]),
        r"--cfg-scale=nan",
    ),
    "recipe trajectories n": (
        lambda out: (_recipe("build_trajectories"), ["--out", str(out), "--num-samples", "0"]),
        r"--num-samples: .*expected an int >= 1",
    ),
}


@pytest.mark.parametrize("name", sorted(CLI))
def test_command_line_errors_are_one_line(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job"
    main, argv = CLI[name][0](out)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and re.search(CLI[name][1], err[-1]), err
    assert "Traceback" not in "\n".join(err) and len([ln for ln in err if "error:" in ln]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_no_nan_inf_anywhere_in_a_valid_default_config():
    cfg = load_recipe_config(None, [])
    flat = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))

    def walk(v):
        if isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(flat)
