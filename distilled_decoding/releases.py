"""The released Distilled Decoding students as ready pipelines: one call from a release name to
:class:`~distilled_decoding.pipeline.DistilledDecodingPipeline`, with the matching tokenizer, split and timesteps.

::

    import distilled_decoding as ddk
    dd = ddk.load_release("LlamaGen-DD-L")                      # downloads into the Hugging Face cache once
    images = dd.generate(noise, class_labels, steps=1)           # noise (B, 256, 8)
    dd, gpt = ddk.load_release("LlamaGen-DD-L", teacher=True)    # + the teacher, for teacher-refined sampling
    images = dd.generate(noise, class_labels, teacher=gpt, teacher_tokens=(60, 80))

:data:`RELEASES` (names as in the official model-zoo tables), every file a Hub reference
(:mod:`distilled_decoding.hub`). Sources: ``microsoft/distilled_decoding`` ``LlamaGen/README.md`` and
``VAR/README.md`` (model zoo: the student files on Hugging Face ``microsoft/distilled_decoding``; few-step commands:
``--split_t 80`` / ``130`` and ``--t_list 0,80`` for LlamaGen-B / L with ``--ema``, ``--loss_split_t 5 / 4 / 4`` and
``--t_list 0,5 / 0,4 / 0,4`` for VAR-d16 / d20 / d24; teacher-involved commands: the teacher of the same size), the
samplers ``eval_combine_sample.py`` (VQ-16 tokenizer ``--vq-ckpt``; teacher CFG 2.0, top-k 8000) and
``VAR/combine_sample.py`` (VAE ``vae_ch160v4096z32.pth``; teacher cfg 2.0, top-k 900, top-p 0.95), and the upstream
model zoos (FoundationVision/LlamaGen README: ``vq_ds16_c2i.pt``, ``c2i_B_256.pt``, ``c2i_L_256.pt`` on Hugging
Face ``FoundationVision/LlamaGen``; FoundationVision/VAR README: ``vae_ch160v4096z32.pth``, ``var_d16.pth`` ... on
``FoundationVision/var``).

The splits are those of the few-step commands; the official teacher-involved runs used larger ones (LlamaGen-L:
180 for ``teacher_tokens=(60, 80)`` / ``(40, 80)``, 220 for ``(0, 80)``; VAR-d16: 8 for ``(3, 5)``, 9 for
``(0, 5)``): pass ``split=`` to reproduce them. To pin files, replace a reference with one carrying
``@<commit>`` (``dataclasses.replace(RELEASES["VAR-DD-d16"], student="microsoft/distilled_decoding@<commit>/...")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distilled_decoding.teachers import get_family

__all__ = ["Release", "RELEASES", "load_release"]

_LLAMAGEN_SAMPLING = {"cfg_scale": 2.0, "cfg_interval": -1, "top_k": 8000, "top_p": 1.0, "temperature": 1.0}
_VAR_SAMPLING = {"cfg_scale": 2.0, "cfg_interval": -1, "top_k": 900, "top_p": 0.95, "temperature": 1.0}


@dataclass(frozen=True)
class Release:
    """One released student and what it needs.

    ``family``: "llamagen" or "var". ``student`` / ``tokenizer`` / ``teacher``: file references (Hub or local).
    ``split``, ``timesteps``: the student's head split and 2-step schedule (tokens for LlamaGen, scales for VAR).
    ``teacher_sampling``: the official teacher-involved sampling settings (used by teacher-refined sampling).
    ``student_config`` / ``tokenizer_config`` / ``teacher_config``: extra keyword arguments of the ``from_official``
    loaders (sizes; e.g. ``{"teacher_preset": "GPT-L"}``). ``fid``: the reported FID-50k (1-step, 2-step).
    """

    name: str
    family: str
    student: str
    tokenizer: str
    teacher: str
    split: int
    timesteps: tuple[int, ...]
    teacher_sampling: Mapping[str, Any]
    student_config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_config: Mapping[str, Any] = field(default_factory=dict)
    teacher_config: Mapping[str, Any] = field(default_factory=dict)
    fid: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.family not in _ASSEMBLERS:
            raise ValueError(f"family={self.family!r}: expected one of {sorted(_ASSEMBLERS)}")
        ts = tuple(int(t) for t in self.timesteps)
        if not ts or ts[0] != 0 or list(ts) != sorted(set(ts)):
            raise ValueError(f"timesteps={self.timesteps!r}: expected increasing values starting at 0")
        if int(self.split) < 0:
            raise ValueError(f"split={self.split!r}: expected >= 0")
        object.__setattr__(self, "timesteps", ts)


def _llamagen(size: str, split: int, fid: tuple[float, float]) -> Release:
    return Release(
        name=f"LlamaGen-DD-{size}",
        family="llamagen",
        student=f"microsoft/distilled_decoding/LlamaGen-DD/llamagen-{size}.pt",
        tokenizer="FoundationVision/LlamaGen/vq_ds16_c2i.pt",
        teacher=f"FoundationVision/LlamaGen/c2i_{size}_256.pt",
        split=split,
        timesteps=(0, 80),
        teacher_sampling=_LLAMAGEN_SAMPLING,
        student_config={"teacher_preset": f"GPT-{size}"},
        teacher_config={"preset": f"GPT-{size}"},
        fid=fid,
    )


def _var(depth: int, t2: int, fid: tuple[float, float]) -> Release:
    return Release(
        name=f"VAR-DD-d{depth}",
        family="var",
        student=f"microsoft/distilled_decoding/VAR-DD/var-d{depth}.pth",
        tokenizer="FoundationVision/var/vae_ch160v4096z32.pth",
        teacher=f"FoundationVision/var/var_d{depth}.pth",
        split=t2,
        timesteps=(0, t2),
        teacher_sampling=_VAR_SAMPLING,
        student_config={"depth": depth},
        teacher_config={"depth": depth},
        fid=fid,
    )


def _assemble_llamagen(r: Release, files: Mapping[str, Any], teacher: bool) -> tuple[Any, Any, Any]:
    from distilled_decoding.students.llamagen import DDStudent
    from distilled_decoding.teachers.llamagen import LlamaGen
    from distilled_decoding.tokenizers.vq import VQTokenizer

    tok = VQTokenizer.from_official(files["tokenizer"], **r.tokenizer_config)
    student = DDStudent.from_official(files["student"], tok.codebook.detach(), split=r.split, timesteps=r.timesteps,
                                      **r.student_config)  # fmt: skip
    gpt = LlamaGen.from_official(files["teacher"], **r.teacher_config) if teacher else None
    return student, tok, gpt


def _assemble_var(r: Release, files: Mapping[str, Any], teacher: bool) -> tuple[Any, Any, Any]:
    from distilled_decoding.students.var import DDVARStudent
    from distilled_decoding.teachers.var import VAR
    from distilled_decoding.tokenizers.msvq import MultiScaleVQVAE

    var = None
    if teacher:  # the teacher owns the VAE: load it once
        var = VAR.from_official(files["teacher"], files["tokenizer"], vae_overrides=r.tokenizer_config,
                                **r.teacher_config)  # fmt: skip
        vae = var.vae
    else:
        vae = MultiScaleVQVAE.from_official(files["tokenizer"], **r.tokenizer_config)
    student = DDVARStudent.from_official(files["student"], vae, split=r.split, timesteps=r.timesteps,
                                         **r.student_config)  # fmt: skip
    return student, vae, var


#: family → builds (student, tokenizer, teacher or None) from resolved local files.
_ASSEMBLERS: dict[str, Callable[[Release, Mapping[str, Any], bool], tuple[Any, Any, Any]]] = {
    "llamagen": _assemble_llamagen,
    "var": _assemble_var,
}

#: The released DD students (``microsoft/distilled_decoding``, ImageNet 256×256), by their model-zoo names.
RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        _llamagen("B", 80, (15.50, 11.17)),
        _llamagen("L", 130, (11.35, 7.58)),
        _var(16, 5, (9.94, 7.82)),
        _var(20, 4, (9.55, 7.33)),
        _var(24, 4, (8.92, 6.95)),
    )
}


def load_release(
    release: str | Release,
    *,
    teacher: bool = False,
    split: int | None = None,
    timesteps: tuple[int, ...] | None = None,
    local_files_only: bool | None = None,
) -> Any:
    """Build the pipeline of a released student: a name of :data:`RELEASES` (case-insensitive, e.g.
    ``"LlamaGen-DD-L"``, ``"VAR-DD-d16"``) or a :class:`Release`.

    Every file is resolved first (downloaded into the Hugging Face cache on first use; ``local_files_only=None``
    follows ``HF_HUB_OFFLINE``), so a missing one fails before anything is built. ``split`` / ``timesteps``
    override the release's. Returns the :class:`~distilled_decoding.pipeline.DistilledDecodingPipeline` (eval mode,
    on the CPU), or ``(pipeline, teacher)`` with ``teacher=True``.
    """
    from distilled_decoding.hub import resolve_file
    from distilled_decoding.pipeline import DistilledDecodingPipeline

    r = _lookup(release)
    if split is not None or timesteps is not None:
        r = dataclasses.replace(r, split=r.split if split is None else split, timesteps=timesteps or r.timesteps)
    names = ("student", "tokenizer") + (("teacher",) if teacher else ())
    files = {n: resolve_file(getattr(r, n), local_files_only=local_files_only) for n in names}
    student, tok, teacher_model = _ASSEMBLERS[r.family](r, files, teacher)
    info = {
        "name": r.name,
        "release": {"student": r.student, "tokenizer": r.tokenizer, "teacher": r.teacher, "fid_1step_2step": r.fid},
        "teacher": {"class": get_family(r.family).teacher_class.__name__, "file": r.teacher},
        "teacher_sampling": dict(r.teacher_sampling),
    }
    pipe = DistilledDecodingPipeline(student=student, tokenizer=tok.eval(), info=info)
    return (pipe, teacher_model.eval()) if teacher else pipe


def _lookup(release: str | Release) -> Release:
    if isinstance(release, Release):
        return release
    by_lower = {k.lower(): v for k, v in RELEASES.items()}
    found = by_lower.get(str(release).lower())
    if found is None:
        raise ValueError(f"release={release!r}: expected one of {sorted(RELEASES)} or a Release")
    return found
