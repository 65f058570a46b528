"""Official files by name: Hugging Face Hub references resolved through ``huggingface_hub``.

Every loader of official files (``LlamaGen`` / ``VQTokenizer`` / ``VAR`` / ``MultiScaleVQVAE`` / ``DDStudent`` /
``DDVARStudent`` ``.from_official``, the recipes' ``teacher.model``, the FID statistics) accepts a local path or a
**Hub reference**, one string in the form of ``huggingface_hub``'s own ``hf://`` URLs (the prefix is optional)::

    [hf://]<owner>/<repo>[@<revision>]/<path/in/repo>

    "FoundationVision/LlamaGen/c2i_B_256.pt"
    "hf://microsoft/distilled_decoding/LlamaGen-DD/llamagen-L.pt"
    "FoundationVision/var@<commit hash, branch or tag>/var_d16.pth"      # pinned (a '/' in it written %2F)

plus a ``revision=`` keyword on the loaders, used for the references that do not carry ``@<revision>``.

Disambiguation: an existing local path always wins, and ``os.PathLike`` objects (``pathlib.Path``) are always
local; a string that is not an existing path is a Hub reference when it starts with ``hf://`` or has at least three
``/``-separated parts whose first two form a valid repo id (``a/b/c.pt``); anything else is a local path. A missing
local path that *looks* like a reference (``runs/x/model.pt``) is therefore looked up on the Hub, and the error
names both readings.

Files are fetched with :func:`huggingface_hub.hf_hub_download`: into the Hugging Face cache (``HF_HUB_CACHE``,
default ``~/.cache/huggingface/hub``), resumed when interrupted, reused when cached, never written anywhere else.
``HF_HUB_OFFLINE=1`` (read when this function runs, as well as at import by ``huggingface_hub``) or
``local_files_only=True`` resolve from the cache only. Failures raise :class:`HubReferenceError` naming the
reference and what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "HubReference",
    "HubReferenceError",
    "parse_reference",
    "is_hub_reference",
    "resolve_file",
    "offline_mode",
    "check_source",
]

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REFERENCE = re.compile(rf"^(?P<owner>{_PART})/(?P<name>{_PART})(?:@(?P<revision>[^/@]+))?/(?P<filename>[^@]+)$")
_PREFIX = "hf://"


class HubReferenceError(FileNotFoundError):
    """A local path or Hub reference that names no readable file (message: the reference and what to do)."""


@dataclass(frozen=True)
class HubReference:
    """One file of a Hub model repo: ``repo_id`` ("owner/name"), ``filename`` (path in the repo), ``revision``
    (branch, tag or commit hash; None = the default branch)."""

    repo_id: str
    filename: str
    revision: str | None = None

    def __str__(self) -> str:
        rev = "" if self.revision is None else "@" + self.revision.replace("/", "%2F")
        owner, name = self.repo_id.split("/")
        return f"{_PREFIX}{owner}/{name}{rev}/{self.filename}"

    def download_command(self) -> str:
        """The ``hf`` command line that fetches this file into the cache on a machine with network."""
        rev = "" if self.revision in (None, "main") else f" --revision {self.revision}"
        return f"hf download {self.repo_id} {self.filename}{rev}"


def parse_reference(ref: str | os.PathLike) -> HubReference | None:
    """The :class:`HubReference` a string spells, or None when it is a local path (existing paths and
    ``os.PathLike`` objects always are). Raises ValueError for a malformed ``hf://`` string."""
    if isinstance(ref, os.PathLike) or not isinstance(ref, str):
        return None
    prefixed = ref.startswith(_PREFIX)
    body = ref[len(_PREFIX) :] if prefixed else ref
    if not prefixed and Path(ref).expanduser().exists():
        return None
    m = _REFERENCE.match(body)
    parts = m.group("filename").split("/") if m else []
    if m is None or "\\" in body or any(p in ("", ".", "..") for p in parts):
        if prefixed:
            raise ValueError(
                f"{ref!r}: malformed Hub reference; expected hf://<owner>/<repo>[@<revision>]/<path/in/repo>, "
                "e.g. hf://FoundationVision/LlamaGen/c2i_B_256.pt"
            )
        return None
    rev = m.group("revision")
    return HubReference(f"{m.group('owner')}/{m.group('name')}", m.group("filename"), unquote(rev) if rev else None)


def is_hub_reference(ref: str | os.PathLike) -> bool:
    """True when ``ref`` is resolved on the Hub rather than read as a local path (see the module docstring)."""
    return parse_reference(ref) is not None


def offline_mode() -> bool:
    """True when downloads are off: ``HF_HUB_OFFLINE`` set now or when ``huggingface_hub`` was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def resolve_file(
    ref: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local path of the file ``ref`` names: ``ref`` itself when it is a local path, else the cached (downloaded on
    first use) Hub file. ``revision`` pins references without ``@<revision>`` (it must agree with one given inline);
    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Raises :class:`HubReferenceError`."""
    hub = parse_reference(ref)
    if hub is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise HubReferenceError(
                f"{os.fspath(ref)}: no such file. Expected a local path or a Hub reference "
                "[hf://]<owner>/<repo>[@<revision>]/<path/in/repo>, e.g. FoundationVision/LlamaGen/c2i_B_256.pt"
            )
        return path
    if revision is not None and hub.revision is not None and revision != hub.revision:
        raise ValueError(f"revision={revision!r} contradicts the revision {hub.revision!r} written in {ref!r}")
    hub = HubReference(hub.repo_id, hub.filename, hub.revision or revision)
    offline = offline_mode() if local_files_only is None else bool(local_files_only)
    return _download(str(ref), hub, offline, cache_dir)


def _download(ref: str, hub: HubReference, offline: bool, cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from distilled_decoding import __version__

    try:
        path = hf_hub_download(
            hub.repo_id,
            hub.filename,
            revision=hub.revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            library_name="distilled-decoding",
            library_version=__version__,
        )
        return Path(path)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
        what = f"{ref} (Hub repo {hub.repo_id}, file {hub.filename}, revision {hub.revision or 'main'})"
        url = f"https://huggingface.co/{hub.repo_id}"
        if isinstance(e, GatedRepoError):
            msg = f"the repo is gated: accept its conditions on {url} and log in (`hf auth login` or HF_TOKEN)"
        elif isinstance(e, RepositoryNotFoundError):
            msg = (
                f"the Hub has no repo {hub.repo_id} (or it is private and you are not logged in: `hf auth login`); "
                "no local file has that name either. Check the <owner>/<repo> part of "
                "[hf://]<owner>/<repo>[@<revision>]/<path/in/repo>"
            )
        elif isinstance(e, RevisionNotFoundError):
            msg = f"{hub.repo_id} has no revision {hub.revision!r} (a branch, tag or commit hash); see {url}/commits"
        elif not isinstance(e, LocalEntryNotFoundError):
            msg = f"the repo has no such file at that revision; see its files at {url}/tree/{hub.revision or 'main'}"
        elif offline:
            msg = (
                f"not in the Hugging Face cache {cache}{_cache_detail(cache, hub)}, and downloads are off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True). Allow downloads (HF_HUB_OFFLINE=0), or download it "
                f"on a machine with network (`{hub.download_command()}`) and copy that cache's "
                f"{_repo_folder(hub.repo_id)} folder into {cache} (or point HF_HUB_CACHE at a copy)"
            )
        else:
            msg = (
                f"the Hub could not be reached ({e.__cause__ or e}) and the file is not in the cache "
                f"{cache}{_cache_detail(cache, hub)}. Check the connection, or download it elsewhere "
                f"(`{hub.download_command()}`) and copy the cache; HF_HUB_OFFLINE=1 skips the network"
            )
        raise HubReferenceError(f"{what}: {msg}") from e


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _cache_detail(cache: Path, hub: HubReference) -> str:
    """What the cache holds for ``hub``'s repo, for error messages (reads only)."""
    repo = cache / _repo_folder(hub.repo_id)
    if not repo.is_dir():
        return f" (it holds no copy of {hub.repo_id})"
    refs = {str(p.relative_to(repo / "refs")): p.read_text().strip() for p in (repo / "refs").rglob("*") if p.is_file()}
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    rev = hub.revision or "main"
    commit = refs.get(rev, rev if rev in snapshots else None)
    if commit is None:
        known = ", ".join([f"{k} → {v[:10]}" for k, v in sorted(refs.items())] + [s[:10] for s in snapshots])
        return f" (it holds {hub.repo_id} but not revision {rev!r}; cached: {known or 'nothing'})"
    files = sorted(str(p.relative_to(repo / "snapshots" / commit)) for p in (repo / "snapshots" / commit).rglob("*")
                   if p.is_file())  # fmt: skip
    shown = ", ".join(files[:10]) + (f", ... ({len(files)} files)" if len(files) > 10 else "")
    return f" (its snapshot {commit[:10]} of {hub.repo_id} holds {shown or 'no files'}, not {hub.filename})"


def check_source(name: str, source: str | os.PathLike, expected: str) -> None:
    """ValueError naming ``name`` unless ``source`` is an existing local path or a Hub reference."""
    if not (Path(source).exists() or is_hub_reference(source)):
        raise ValueError(f"{name}: {os.fspath(source)} does not exist (expected {expected})")
