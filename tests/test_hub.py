"""Official files by Hub reference, the released students as pipelines, and FID reference statistics.

The tests lay out a Hugging Face cache themselves (``models--<owner>--<name>/{blobs,snapshots/<commit>,refs}``, the
layout ``hf_hub_download`` reads) under a temporary ``HF_HUB_CACHE``, holding random-weight files in the official
formats under their official repo ids and names: the reference models of ``tests/data`` (the same ones
test_llamagen / test_vq / test_var / test_msvq / test_student / test_var_student check against the official code).
Offline tests set ``HF_HUB_OFFLINE=1``; the online ones talk to a local fake Hub (``http.server`` answering the
``/<repo>/resolve/<revision>/<file>`` requests of ``huggingface_hub`` with its headers and error codes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from distilled_decoding import PAR, VAR, DistilledDecodingPipeline, LlamaGen, MultiScaleVQVAE, VQTokenizer
from distilled_decoding.fid import IMAGENET256_FID_STATISTICS, FIDStatistics, load_fid_statistics
from distilled_decoding.hub import HubReference, HubReferenceError, parse_reference, resolve_file
from distilled_decoding.releases import RELEASES, Release, load_release
from distilled_decoding.students import DDStudent, DDVARStudent
from distilled_decoding.teachers import load_teacher

DATA = Path(__file__).parent / "data"
PN = (1, 2, 4, 8)
GPT_CFG = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, num_classes=10, block_size=16)
DD_CFG = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16, multiple_of=256)
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
LLAMAGEN, VAR_REPO, DD_REPO = "FoundationVision/LlamaGen", "FoundationVision/var", "microsoft/distilled_decoding"
PAR_REPO = "Epiphqny/PAR"
PAR_CFG = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, num_classes=10, block_size=64)


def _read(name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(DATA / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _sd(name: str) -> dict[str, torch.Tensor]:
    return {k[3:]: v.float() if v.is_floating_point() else v for k, v in _read(name).items() if k.startswith("sd.")}


def _bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _numpy1_pickle(obj: dict) -> bytes:
    """``torch.save`` of numpy arrays as numpy 1.x wrote them (``numpy.core.multiarray._reconstruct``), like the DD
    release's statistic.pth."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def put(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> None:
    """Add ``files`` as snapshot ``commit`` of ``repo_id`` to a Hugging Face cache (blobs named by sha256, snapshot
    entries symlinked to them as huggingface_hub does) and point ``refs`` at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (to prove nothing was written)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The official files as local copies (``files``) and as a Hub cache (``cache``). Repo contents: LlamaGen
    ``c2i_B_256.pt`` (commit A = main; commit B = tag v2 holds other weights), ``vq_ds16_c2i.pt``; var ``var_d16.pth``,
    ``vae_ch160v4096z32.pth``; distilled_decoding ``LlamaGen-DD/llamagen-B.pt``, ``VAR-DD/var-d16.pth``; PAR
    ``PAR-XL-4x.pt``."""
    root = tmp_path_factory.mktemp("hub")
    gpt_sd = _sd("llamagen_reference.safetensors")
    gpt_v2 = {k: v * 1.5 if v.is_floating_point() else v for k, v in gpt_sd.items()}
    data = {
        "gpt": (LLAMAGEN, "c2i_B_256.pt", _bytes({"model": gpt_sd, "steps": 10})),
        "vq": (LLAMAGEN, "vq_ds16_c2i.pt", _bytes({"model": _sd("vq_reference.safetensors")})),
        "var": (VAR_REPO, "var_d16.pth", _bytes(_sd("var_l2_reference.safetensors"))),
        "vae": (VAR_REPO, "vae_ch160v4096z32.pth", _bytes(_sd("msvq_reference.safetensors"))),
        "dd": (DD_REPO, "LlamaGen-DD/llamagen-B.pt", _bytes({"ema": _sd("dd_llamagen_reference.safetensors")})),
        "par": (PAR_REPO, "PAR-XL-4x.pt", _bytes({"model": _sd("par_reference.safetensors"), "steps": 10})),
        "ddvar": (DD_REPO, "VAR-DD/var-d16.pth",
                  _bytes({"trainer": {"ema_parameters": _sd("ddvar_reference.safetensors"), "var_wo_ddp": {}}})),
    }  # fmt: skip
    files, cache = {}, root / "cache"
    for key, (_, name, blob) in data.items():
        files[key] = root / "files" / name
        files[key].parent.mkdir(parents=True, exist_ok=True)
        files[key].write_bytes(blob)
    for repo in (LLAMAGEN, VAR_REPO, DD_REPO, PAR_REPO):
        put(cache, repo, COMMIT_A, {name: blob for r, name, blob in data.values() if r == repo})
    put(cache, LLAMAGEN, COMMIT_B, {"c2i_B_256.pt": _bytes({"model": gpt_v2})}, refs=("v2",))
    files["gpt_v2"] = root / "files" / "v2" / "c2i_B_256.pt"
    files["gpt_v2"].parent.mkdir()
    files["gpt_v2"].write_bytes(_bytes({"model": gpt_v2}))
    return {"root": root, "cache": cache, "files": files, "refs": {k: f"{r}/{n}" for k, (r, n, _) in data.items()}}


@pytest.fixture()
def offline(world, monkeypatch, tmp_path) -> dict:
    """HF_HUB_OFFLINE=1 with the test cache as HF_HUB_CACHE; the working directory is an empty folder."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(world["cache"]))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return world


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------
# the reference convention
# ----------------------------------------------------------------------------------------------------------
def test_reference_convention(tmp_path, monkeypatch):
    assert parse_reference("FoundationVision/LlamaGen/c2i_B_256.pt") == HubReference(LLAMAGEN, "c2i_B_256.pt")
    ref = parse_reference("hf://microsoft/distilled_decoding@v1.0/LlamaGen-DD/llamagen-L.pt")
    assert ref == HubReference(DD_REPO, "LlamaGen-DD/llamagen-L.pt", "v1.0")
    assert str(ref) == "hf://microsoft/distilled_decoding@v1.0/LlamaGen-DD/llamagen-L.pt"
    assert parse_reference("o/r@refs%2Fpr%2F3/f.pt").revision == "refs/pr/3"
    assert (
        ref.download_command() == "hf download microsoft/distilled_decoding LlamaGen-DD/llamagen-L.pt --revision v1.0"
    )
    for local in ("c2i_B_256.pt", "ckpt/c2i_B_256.pt", "/ckpt/a/b.pt", "./a/b/c.pt", "~/a/b/c.pt", "a/b/../c.pt",
                  "a/-b/c.pt", Path("FoundationVision/LlamaGen/c2i_B_256.pt")):  # fmt: skip
        assert parse_reference(local) is None, local
    monkeypatch.chdir(tmp_path)  # an existing local path always wins
    (tmp_path / "FoundationVision" / "LlamaGen").mkdir(parents=True)
    (tmp_path / "FoundationVision" / "LlamaGen" / "c2i_B_256.pt").write_bytes(b"x")
    assert parse_reference("FoundationVision/LlamaGen/c2i_B_256.pt") is None
    assert resolve_file("FoundationVision/LlamaGen/c2i_B_256.pt") == Path("FoundationVision/LlamaGen/c2i_B_256.pt")
    with pytest.raises(ValueError, match="malformed Hub reference"):
        parse_reference("hf://FoundationVision/c2i_B_256.pt")
    with pytest.raises(HubReferenceError, match=r"missing\.pt: no such file.*Hub reference"):
        resolve_file("missing.pt")


# ----------------------------------------------------------------------------------------------------------
# every family by Hub name, offline, equal to the same file loaded by path
# ----------------------------------------------------------------------------------------------------------
def test_every_family_loads_by_hub_name_offline(offline):
    f, r = offline["files"], offline["refs"]
    before = tree(offline["root"])
    vae_kw, var_kw = {"v_patch_nums": PN}, {"patch_nums": PN}
    pairs = [
        (LlamaGen.from_official(r["gpt"], **GPT_CFG), LlamaGen.from_official(f["gpt"], **GPT_CFG)),
        (VQTokenizer.from_official("hf://" + r["vq"]), VQTokenizer.from_official(f["vq"])),
        (MultiScaleVQVAE.from_official(r["vae"], **vae_kw), MultiScaleVQVAE.from_official(f["vae"], **vae_kw)),
        (VAR.from_official(r["var"], r["vae"], **var_kw), VAR.from_official(f["var"], f["vae"], **var_kw)),
    ]
    tok = VQTokenizer.from_official(f["vq"])
    pairs.append(
        (
            DDStudent.from_official(r["dd"], tok.codebook.detach(), split=6, timesteps=(0, 5), **DD_CFG),
            DDStudent.from_official(f["dd"], tok.codebook.detach(), split=6, timesteps=(0, 5), **DD_CFG),
        )
    )
    vae = pairs[2][1]
    pairs.append((DDVARStudent.from_official(r["ddvar"], vae, patch_nums=PN),
                  DDVARStudent.from_official(f["ddvar"], vae, patch_nums=PN)))  # fmt: skip
    for by_name, by_path in pairs:
        assert type(by_name) is type(by_path) and _equal_state(by_name, by_path), type(by_path).__name__
    assert pairs[3][0].vae is not None and _equal_state(pairs[3][0].vae, pairs[3][1].vae)
    # the teacher loader of the recipes takes references too
    gpt, vq = load_teacher("llamagen", r["gpt"], "hf://" + r["vq"], **GPT_CFG)
    assert _equal_state(gpt, pairs[0][1]) and _equal_state(vq, pairs[1][1])
    var, var_vae = load_teacher("var", r["var"], r["vae"], patch_nums=PN)
    assert _equal_state(var, pairs[3][1]) and var_vae is var.vae
    par, par_vq = load_teacher("par", r["par"], r["vq"], **PAR_CFG)
    assert _equal_state(par, PAR.from_official(f["par"], **PAR_CFG)) and _equal_state(par_vq, pairs[1][1])
    with pytest.raises(ValueError, match=r"model: ckpt/c2i\.pt does not exist .*Hub reference"):
        load_teacher("llamagen", "ckpt/c2i.pt", r["vq"])
    assert tree(offline["root"]) == before and not any(Path.cwd().iterdir())  # nothing written anywhere


def test_revision_pinning(offline):
    f = offline["files"]
    main = LlamaGen.from_official(f["gpt"], **GPT_CFG)
    v2 = LlamaGen.from_official(f["gpt_v2"], **GPT_CFG)
    assert not _equal_state(main, v2)
    ref = f"{LLAMAGEN}/c2i_B_256.pt"
    assert _equal_state(LlamaGen.from_official(ref, **GPT_CFG), main)
    assert _equal_state(LlamaGen.from_official(ref, revision=COMMIT_A, **GPT_CFG), main)
    for pinned in ({"revision": "v2"}, {"revision": COMMIT_B}):
        assert _equal_state(LlamaGen.from_official(ref, **pinned, **GPT_CFG), v2), pinned
    assert _equal_state(LlamaGen.from_official(f"hf://{LLAMAGEN}@v2/c2i_B_256.pt", **GPT_CFG), v2)
    assert resolve_file(f"{LLAMAGEN}@{COMMIT_B}/c2i_B_256.pt").parent.name == COMMIT_B
    with pytest.raises(ValueError, match="contradicts"):
        resolve_file(f"{LLAMAGEN}@v2/c2i_B_256.pt", revision="main")


# ----------------------------------------------------------------------------------------------------------
# errors name the reference and what to do
# ----------------------------------------------------------------------------------------------------------
def test_offline_errors(offline):
    before = tree(offline["root"])
    with pytest.raises(HubReferenceError) as e:  # a file the cache does not hold
        LlamaGen.from_official(f"{LLAMAGEN}/c2i_L_256.pt")
    msg = str(e.value)
    for part in (
        f"{LLAMAGEN}/c2i_L_256.pt",
        "not in the Hugging Face cache",
        "holds c2i_B_256.pt, vq_ds16_c2i.pt",
        "HF_HUB_OFFLINE=0",
        f"`hf download {LLAMAGEN} c2i_L_256.pt`",
        "models--FoundationVision--LlamaGen",
    ):
        assert part in msg, part  # fmt: skip
    with pytest.raises(HubReferenceError, match=r"(?s)FoundationVison/LlamaGen/c2i_B_256\.pt.*holds no copy"):
        LlamaGen.from_official("FoundationVison/LlamaGen/c2i_B_256.pt")  # a misspelt repo
    with pytest.raises(HubReferenceError, match=r"(?s)revision v9\).*not revision 'v9'.*main → aaaaaaaaaa, v2 → bbbbb"):
        VQTokenizer.from_official(f"{LLAMAGEN}/vq_ds16_c2i.pt", revision="v9")
    with pytest.raises(HubReferenceError, match="--revision v9"):
        resolve_file(f"{LLAMAGEN}@v9/vq_ds16_c2i.pt")
    with pytest.raises(HubReferenceError, match=r"LlamaGen-DD/llamagen-L\.pt"):
        load_release("LlamaGen-DD-L")
    assert tree(offline["root"]) == before and not any(Path.cwd().iterdir())


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """``/<owner>/<name>/resolve/<revision>/<file>``: HEAD and GET with huggingface_hub's headers and error codes.
    The first GET of a file in ``drop_once`` sends half of it and closes the connection."""

    files: dict[tuple[str, str], bytes] = {}
    drop_once: set[tuple[str, str]] = set()
    seen: list[tuple[str, str, str | None]] = []

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].lstrip("/").split("/")
        repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        self.seen.append((self.command, self.path, self.headers.get("Range")))
        error = None
        if repo not in {r for r, _ in self.files}:
            error = "RepoNotFound"
        elif rev not in ("main", COMMIT_A):
            error = "RevisionNotFound"
        elif (repo, name) not in self.files:
            error = "EntryNotFound"
        if error:
            self.send_response(404)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files[(repo, name)]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT_A)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            if (repo, name) in self.drop_once:
                self.drop_once.discard((repo, name))
                self.wfile.write(data[start : len(data) // 2])
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def online(world, monkeypatch, tmp_path):
    """A fake Hub on localhost serving the world's files, an empty cache, downloads on."""
    import huggingface_hub.constants as hub_constants

    _FakeHub.files, _FakeHub.drop_once, _FakeHub.seen = {}, set(), []
    for key, ref in world["refs"].items():
        owner, name, path = ref.split("/", 2)
        _FakeHub.files[(f"{owner}/{name}", path)] = world["files"][key].read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    cache = tmp_path / "cache"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 1 << 14)  # < the file: a cut transfer keeps chunks
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield cache
    server.shutdown()
    server.server_close()


def test_download_resume_and_online_errors(online, world, tmp_path):
    f, r = world["files"], world["refs"]
    _FakeHub.drop_once.add((LLAMAGEN, "c2i_B_256.pt"))
    gpt = LlamaGen.from_official(r["gpt"], **GPT_CFG)
    assert _equal_state(gpt, LlamaGen.from_official(f["gpt"], **GPT_CFG))
    gets = [s for s in _FakeHub.seen if s[0] == "GET"]
    half = len(f["gpt"].read_bytes()) // 2
    assert len(gets) == 2 and gets[0][2] is None  # the cut transfer resumed from the last chunk it kept
    assert gets[1][2].startswith("bytes=") and 0 < int(gets[1][2][6:-1]) <= half
    snapshot = online / "models--FoundationVision--LlamaGen" / "snapshots" / COMMIT_A / "c2i_B_256.pt"
    assert snapshot.read_bytes() == f["gpt"].read_bytes()
    n = len(_FakeHub.seen)
    assert resolve_file(r["gpt"], local_files_only=True) == snapshot and len(_FakeHub.seen) == n  # cached: no request
    cases = {
        "someone/nothing/c2i_B_256.pt": r"the Hub has no repo someone/nothing",
        f"{LLAMAGEN}/c2i_XL_256.pt": rf"has no such file at that revision; see its files at .*{LLAMAGEN}/tree/main",
        f"{LLAMAGEN}@v9/c2i_B_256.pt": rf"{LLAMAGEN} has no revision 'v9'",
    }
    for ref, match in cases.items():
        with pytest.raises(HubReferenceError, match=match) as e:
            LlamaGen.from_official(ref, **GPT_CFG)
        assert str(e.value).startswith(ref)
    outside = [p for p in tmp_path.rglob("*") if online not in p.parents and p != online and p.name != "cwd"]
    assert outside == [] and not any(Path.cwd().iterdir())  # written: the cache only


# ----------------------------------------------------------------------------------------------------------
# released students as pipelines
# ----------------------------------------------------------------------------------------------------------
def test_release_table_matches_the_official_readmes():
    assert sorted(RELEASES) == ["LlamaGen-DD-B", "LlamaGen-DD-L", "VAR-DD-d16", "VAR-DD-d20", "VAR-DD-d24"]
    for size, split in (("B", 80), ("L", 130)):
        r = RELEASES[f"LlamaGen-DD-{size}"]
        assert (r.student, r.tokenizer, r.teacher) == (
            f"{DD_REPO}/LlamaGen-DD/llamagen-{size}.pt",
            f"{LLAMAGEN}/vq_ds16_c2i.pt",
            f"{LLAMAGEN}/c2i_{size}_256.pt",
        )
        assert (r.split, r.timesteps, r.student_config["teacher_preset"]) == (split, (0, 80), f"GPT-{size}")
    for depth, t2 in ((16, 5), (20, 4), (24, 4)):
        r = RELEASES[f"VAR-DD-d{depth}"]
        assert (r.student, r.tokenizer, r.teacher) == (
            f"{DD_REPO}/VAR-DD/var-d{depth}.pth",
            f"{VAR_REPO}/vae_ch160v4096z32.pth",
            f"{VAR_REPO}/var_d{depth}.pth",
        )
        assert (r.split, r.timesteps, r.student_config["depth"]) == (t2, (0, t2), depth)
    assert all(parse_reference(getattr(r, k)) for r in RELEASES.values() for k in ("student", "tokenizer", "teacher"))
    assert parse_reference(IMAGENET256_FID_STATISTICS) == HubReference(
        DD_REPO, "ImageNet-256_FID_Statistic/statistic.pth"
    )
    with pytest.raises(ValueError, match="expected one of"):
        load_release("LlamaGen-DD-XL")
    with pytest.raises(ValueError, match="timesteps"):
        dataclasses.replace(RELEASES["VAR-DD-d16"], timesteps=(5, 0))


@pytest.mark.parametrize("name", ["llamagen_b", "llamagen_l", "var_d16", "var_d20", "var_d24"])
def test_paper_configs_name_the_official_files_on_the_hub(name):
    from distilled_decoding.recipe import ROOT, load_recipe_config

    cfg = load_recipe_config(ROOT / "recipes" / "configs" / f"{name}.yaml")
    repo = LLAMAGEN if name.startswith("llamagen") else VAR_REPO
    for ref in (cfg.teacher.model, cfg.teacher.tokenizer):
        assert parse_reference(ref).repo_id == repo, ref
    assert cfg.evaluate.reference == IMAGENET256_FID_STATISTICS
    over = load_recipe_config(ROOT / "recipes" / "configs" / f"{name}.yaml", ["teacher.model=hf://o/r@v1/m.pt"])
    assert parse_reference(over.teacher.model) == HubReference("o/r", "m.pt", "v1")


def _tiny_llamagen() -> Release:
    return dataclasses.replace(RELEASES["LlamaGen-DD-B"], student_config={"teacher_preset": "GPT-B", **DD_CFG},
                               teacher_config=GPT_CFG)  # fmt: skip


def _tiny_var() -> Release:
    return dataclasses.replace(RELEASES["VAR-DD-d16"], student_config={"patch_nums": PN},
                               tokenizer_config={"v_patch_nums": PN}, teacher_config={"patch_nums": PN})  # fmt: skip


def test_llamagen_release_samples_like_the_hand_assembled_pipeline(offline):
    f = offline["files"]
    pipe, gpt = load_release(_tiny_llamagen(), teacher=True, split=6, timesteps=(0, 5))
    tok = VQTokenizer.from_official(f["vq"])
    student = DDStudent.from_official(f["dd"], tok.codebook.detach(), split=6, timesteps=(0, 5), **DD_CFG)
    sampling = {"cfg_scale": 2.0, "cfg_interval": -1, "top_k": 8000, "top_p": 1.0, "temperature": 1.0}
    hand = DistilledDecodingPipeline(student=student, tokenizer=tok, info={"teacher_sampling": sampling})
    hand_gpt = LlamaGen.from_official(f["gpt"], **GPT_CFG)
    assert (
        pipe.info["teacher_sampling"] == sampling
        and pipe.info["release"]["student"] == RELEASES["LlamaGen-DD-B"].student
    )
    noise, labels = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 4, 9])
    for kw in ({"steps": 1}, {"steps": 2}):
        assert torch.equal(pipe.generate(noise, labels, **kw), hand.generate(noise, labels, **kw)), kw
    refined = pipe.generate(noise, labels, teacher=gpt, teacher_tokens=(3, 5), return_tokens=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            refined, hand.generate(noise, labels, teacher=hand_gpt, teacher_tokens=(3, 5), return_tokens=True)
        )
    )
    # the released names resolve to the released files in the cache (real sizes: GPT-B does not fit these files)
    from distilled_decoding import CheckpointError

    with pytest.raises(CheckpointError, match=r"llamagen-B\.pt does not fit DD LlamaGen student \(GPT-B\)"):
        DistilledDecodingPipeline.from_release("llamagen-dd-b")


def test_var_release_samples_like_the_hand_assembled_pipeline(offline):
    f = offline["files"]
    pipe, var = load_release(_tiny_var(), teacher=True, split=2, timesteps=(0, 2))
    alone = load_release(_tiny_var(), split=2, timesteps=(0, 2))  # the tokenizer loaded without the teacher
    vae = MultiScaleVQVAE.from_official(f["vae"], v_patch_nums=PN)
    student = DDVARStudent.from_official(f["ddvar"], vae, split=2, timesteps=(0, 2), patch_nums=PN)
    hand = DistilledDecodingPipeline(
        student=student, tokenizer=vae, info={"teacher_sampling": pipe.info["teacher_sampling"]}
    )
    hand_var = VAR.from_official(f["var"], f["vae"], patch_nums=PN)
    assert pipe.tokenizer is var.vae and pipe.info["teacher_sampling"]["top_k"] == 900
    noise, labels = torch.randn(2, 85, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    for kw in ({"steps": 1}, {"steps": 2}):
        want = hand.generate(noise, labels, **kw)
        assert torch.equal(pipe.generate(noise, labels, **kw), want) and torch.equal(
            alone.generate(noise, labels, **kw), want
        )
    got = pipe.generate(noise, labels, teacher=var, teacher_tokens=(1, 2))
    assert torch.equal(got, hand.generate(noise, labels, teacher=hand_var, teacher_tokens=(1, 2)))


# ----------------------------------------------------------------------------------------------------------
# FID reference statistics
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_stats(tmp_path_factory) -> dict:
    """Real and 'generated' 8 px digits, torch-fidelity's own FID statistics of the real ones (its cache file)."""
    import torch_fidelity

    from distilled_decoding import metrics as M
    from distilled_decoding.digits import load_digits_images

    imgs, _ = load_digits_images(8, "all")
    real, gen = imgs[:400], imgs[400:600]
    M.register_digits_feature_extractor()
    d = tmp_path_factory.mktemp("fidelity_cache")
    torch_fidelity.calculate_metrics(
        input1=_Images(real),
        input2=_Images(gen),
        fid=True,
        cache=True,
        cache_root=str(d),
        input1_cache_name="real",
        feature_extractor="digits-cnn",
        digits_classifier=M.default_classifier(),
        cuda=False,
        save_cpu_ram=True,
    )
    stats = load_fid_statistics(d / "real-digits-cnn-stat-fid-feat.pt")  # torch-fidelity's own {"mu", "sigma"} file
    return {"real": real, "gen": gen, "mu": stats.mu, "sigma": stats.sigma}


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_fid_against_statistics_equals_fid_against_the_images(digits_stats, world, monkeypatch, tmp_path):
    """The release's statistic.pth layout ({"m", "s"} numpy, pickled by numpy 1.x) in the Hub cache, read by name
    with weights_only=True, gives the FID of the images it summarises; IS is the generated images' own."""
    import huggingface_hub.constants as hub_constants

    from distilled_decoding.metrics import compute_metrics

    real, gen, mu, sigma = (digits_stats[k] for k in ("real", "gen", "mu", "sigma"))
    cache = tmp_path / "cache"
    put(cache, DD_REPO, COMMIT_A, {"ImageNet-256_FID_Statistic/statistic.pth": _numpy1_pickle({"m": mu, "s": sigma})})
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    want = compute_metrics(gen, real, isc=True, prc=False)
    got = compute_metrics(gen, IMAGENET256_FID_STATISTICS, isc=True, prc=False)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-5) and got["is"] == want["is"]
    assert got["fid"] > 0.1  # the two sets differ
    # other layouts: {"mu", "sigma"} tensors, .npz, a folder holding statistic.pth (the official --fid_statistic)
    torch.save({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, tmp_path / "t.pth")
    np.savez(tmp_path / "s.npz", mu=mu, sigma=sigma)
    (tmp_path / "official").mkdir()
    torch.save({"m": mu, "s": sigma}, tmp_path / "official" / "statistic.pth")
    for ref in (tmp_path / "t.pth", tmp_path / "s.npz", tmp_path / "official"):
        stats = load_fid_statistics(ref)
        assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma), ref
    assert compute_metrics(gen, tmp_path / "official", isc=False, prc=False)["fid"] == pytest.approx(got["fid"])
    with pytest.raises(ValueError, match="give FID .* only; pass prc=False"):
        compute_metrics(gen, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"has 7-d statistics but 'digits-cnn' gives 128-d"):
        compute_metrics(gen, FIDStatistics(np.zeros(7), np.eye(7), "tiny"), isc=False, prc=False)
    torch.save({"m": mu, "s": sigma, "evil": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: not readable as FID statistics with weights_only=True"):
        load_fid_statistics(tmp_path / "evil.pth")
    torch.save({"mean": mu}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"expected keys m/s or mu/sigma, found \['mean'\]"):
        load_fid_statistics(tmp_path / "keys.pth")
    with pytest.raises(HubReferenceError, match="statistic.pth"):  # not in the cache offline
        load_fid_statistics(IMAGENET256_FID_STATISTICS, revision="v9")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_inception_statistics_offline_without_weights_names_the_file(digits_stats, monkeypatch, tmp_path):
    from distilled_decoding.metrics import INCEPTION_WEIGHTS_FILENAME, WeightsNotFoundError, compute_metrics

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    stats = FIDStatistics(np.zeros(2048), np.eye(2048), "statistic.pth")
    with pytest.raises(WeightsNotFoundError, match=INCEPTION_WEIGHTS_FILENAME) as e:
        compute_metrics(digits_stats["gen"], stats, feature_extractor="inception", prc=False)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in str(e.value)


def test_evaluation_against_statistics(offline, digits_stats, tmp_path):
    """The evaluation table with FID statistics as the reference: FID and IS per sampler, no precision / recall."""
    from distilled_decoding.evaluation import evaluate_pipeline

    pipe, gpt = load_release(_tiny_llamagen(), teacher=True, split=6, timesteps=(0, 5))
    torch.save({"m": digits_stats["mu"], "s": digits_stats["sigma"]}, tmp_path / "statistic.pth")
    out = evaluate_pipeline(pipe, gpt, str(tmp_path / "statistic.pth"), num_images=20, batch_size=20, progress=False)
    assert set(out["rows"]) == {
        "teacher AR (multinomial)",
        "teacher AR (flow map)",
        "DD 1-step",
        "DD 2-step",
        "DD refined (4-5)",
    }
    for row in out["rows"].values():
        assert row["fid"] > 0 and row["is"] > 0 and row["precision"] is None and row["recall"] is None
    assert out["settings"]["reference"] == str(tmp_path / "statistic.pth")
