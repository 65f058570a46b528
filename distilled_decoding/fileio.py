"""Safe file writing: atomic replacement, the user's umask, staged folders and a per-folder job lock.

Every file the toolkit writes goes through here:

* :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_json`: write to a temporary file in the
  target's folder, ``fsync``, then ``os.replace`` — readers see the old file or the new one, never half of one;
* :class:`StagedFolder`: a library writes a whole folder (``save_pretrained``) into a hidden staging folder
  *inside* the target; on commit each file is moved into place with ``os.replace`` and only the files that the
  previous save recorded (and this one did not write) are removed — nothing else in the target is touched, so
  saving into a job folder or into ``"."`` is safe;
* :class:`JobLock`: a lock file ``.distilled-decoding.lock`` holding the pid of the job that owns the folder
  (``fcntl.flock``: the kernel releases it when that process dies, so a stale lock is taken over without a race).

Files and folders are created with the modes ``open()`` / ``mkdir()`` would give them under the user's umask
(``tempfile.mkstemp`` alone makes 0600 files and ``mkdtemp`` 0700 folders).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "current_umask",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "make_dirs",
    "StagedFolder",
    "FILES_KEY",
    "JobLock",
    "JobLockError",
    "job_lock",
    "LOCK_NAME",
]

LOCK_NAME = ".distilled-decoding.lock"
#: key added to a staged folder's record file (``model_index.json``, ``config.json``): the files of that save.
FILES_KEY = "_distilled_decoding_files"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # fallback: two calls, not thread-safe, but only where /proc is missing
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with the umask's modes; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file written there replaces ``path``
    atomically (fsynced, mode from the umask), otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    dumps.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


# ----------------------------------------------------------------------------------------------------------
# staged folders
# ----------------------------------------------------------------------------------------------------------
_STAGING = re.compile(r"\.staging-[a-z0-9_]{8}")
_SAFE_REL = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$)).+$")


class StagedFolder:
    """Write a folder's files through a staging folder, then move them into ``target`` one by one.

    ::

        with StagedFolder(target, record="model_index.json") as stage:
            model.save_pretrained(stage.path)
            stage.commit()

    ``record``: a JSON file of the save (relative path) to which the list of written files is added under
    :data:`FILES_KEY` (diffusers ignores config keys starting with ``_``). On commit, files listed in the
    *previous* record that this save did not write are removed (stale weight shards); no other file is ever
    removed. The record file is moved last, so a save cut short leaves the previous record in place. The
    staging folder is removed in every case. The target is locked (:class:`JobLock`) during the save, so two
    saves, or a save into a folder a job is writing, cannot interleave; staging folders left by a killed save
    are removed under that lock.
    """

    def __init__(self, target: str | os.PathLike, record: str | None = None):
        self.target = Path(target)
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"{self.target}: exists and is not a folder; cannot save into it")
        self.record = record
        self._created = not self.target.exists()
        self.path: Path | None = None
        self.written: list[str] = []

    def __enter__(self) -> StagedFolder:
        self._lock = JobLock(self.target, what="save")
        self._lock.acquire()
        try:
            for stale in self.target.iterdir():  # only names mkdtemp(prefix=".staging-") makes
                if _STAGING.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
            self.path = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.target))
        except BaseException:
            self._lock.release()
            raise
        os.chmod(self.path, 0o777 & ~current_umask())
        return self

    def previous_files(self) -> list[str]:
        """Files recorded by the previous save into ``target`` (only safe relative paths)."""
        if self.record is None:
            return []
        try:
            old = json.loads((self.target / self.record).read_text())
        except (OSError, ValueError):
            return []
        files = old.get(FILES_KEY) if isinstance(old, dict) else None
        if not isinstance(files, list):
            return []
        return [f for f in files if isinstance(f, str) and _SAFE_REL.match(f) and not f.startswith(".staging-")]

    def commit(self) -> list[str]:
        assert self.path is not None, "use StagedFolder as a context manager"
        files = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
        if self.record is not None:
            rec = self.path / self.record
            data = json.loads(rec.read_text()) if rec.is_file() else {}
            data[FILES_KEY] = files
            rec.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            files = [f for f in files if f != self.record] + [self.record]
        previous = self.previous_files()
        mode = _file_mode()
        for rel in files:
            src, dst = self.path / rel, self.target / rel
            make_dirs(dst.parent)
            if dst.is_dir():
                raise IsADirectoryError(f"{dst}: a folder is in the way of the file this save writes")
            os.chmod(src, mode)
            os.replace(src, dst)
        for rel in sorted(set(previous) - set(files)):
            stale = self.target / rel
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
        self.written = files
        return files

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()
        if self._created and exc[0] is not None:
            with contextlib.suppress(OSError):
                self.target.rmdir()  # only if still empty: a failed first save leaves nothing behind


# ----------------------------------------------------------------------------------------------------------
# job lock
# ----------------------------------------------------------------------------------------------------------
class JobLockError(RuntimeError):
    """Another live job holds the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLock:
    """An exclusive lock on a job folder: ``folder/.distilled-decoding.lock`` holds ``{"pid", "host"}`` of the
    holder. A second job on the folder raises :class:`JobLockError` naming the holder's pid; a lock left by a
    dead process is taken over (``flock`` is released by the kernel when its holder dies). Re-entrant within
    one process (nested stages lock the same folder once)."""

    _held: dict[str, tuple[int, int]] = {}  # resolved path -> (fd, depth)

    def __init__(self, folder: str | os.PathLike, *, what: str = "job"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._key = ""

    def acquire(self) -> JobLock:
        import fcntl

        make_dirs(self.folder)
        self._key = str(self.path.resolve())
        if self._key in JobLock._held:
            fd, depth = JobLock._held[self._key]
            JobLock._held[self._key] = (fd, depth + 1)
            return self
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_by_pid()  # a file system without flock
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise JobLockError(self._held_message()) from None
            # the file we locked must still be the one at the path (a releasing holder unlinks it)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            os.fsync(fd)
            JobLock._held[self._key] = (fd, 1)
            return self
        raise JobLockError(f"{self.path}: could not acquire the lock (it kept changing)")

    def _acquire_by_pid(self) -> JobLock:
        """Fallback without ``flock``: the pid in the lock file decides; a dead holder's lock is taken over."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid, host = info.get("pid"), info.get("host")
        if isinstance(pid, int) and pid != os.getpid() and (host != socket.gethostname() or _pid_alive(pid)):
            raise JobLockError(self._held_message())
        atomic_write_json(self.path, {"pid": os.getpid(), "host": socket.gethostname()})
        JobLock._held[self._key] = (-1, 1)
        return self

    def _held_message(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid, host = info.get("pid"), info.get("host")
        where = "" if host in (None, socket.gethostname()) else f" on host {host}"
        return (
            f"{self.folder}: another {self.what} (pid {pid}{where}) is writing to this folder (lock file "
            f"{self.path}); wait for it to finish, or use another output folder — two writers would corrupt it"
        )

    def release(self) -> None:
        import fcntl

        if self._key not in JobLock._held:
            return
        fd, depth = JobLock._held[self._key]
        if depth > 1:
            JobLock._held[self._key] = (fd, depth - 1)
            return
        del JobLock._held[self._key]
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def job_lock(folder: str | os.PathLike, state: Any = None, *, what: str = "job") -> Iterator[None]:
    """Hold :class:`JobLock` on ``folder`` in the main process of ``state`` (Accelerate ``PartialState``; every
    process must enter). A refusal is raised in every process, so a launched group fails together."""
    multi = state is not None and state.num_processes > 1
    main = state is None or state.is_main_process
    lock = JobLock(folder, what=what)
    error = None
    if main:
        try:
            lock.acquire()
        except JobLockError as e:
            error = str(e)
    if multi:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise JobLockError(error)
    try:
        yield
    finally:
        if main:
            lock.release()
