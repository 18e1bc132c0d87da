"""Atomic file writes and inter-process locks.

Every file kvcondense writes goes to a temp file with an unpredictable name in the target's own folder (so the
final ``os.replace`` is a rename on one file system and never follows a planted symlink), is flushed to disk and
then renamed over the target: a reader sees the old file or the new one, never half of one, and two writers of
the same file never share a temp file. First-use work that several processes may start at once (model
conversion, wheel extraction) holds a :func:`file_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a result file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload, indent: int | None = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def temp_path_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh, unpredictable, empty file name next to ``path`` (for writers that need a path, e.g. safetensors).

    The file exists (created 0600 by ``mkstemp``) so no other process can take the name; the caller replaces it
    and then renames it over ``path``, or unlinks it on failure.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block; other processes wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Like :func:`file_lock`, but a lock held by another process is a one-line :class:`UsageError` at once.

    The lock is released by the kernel when its holder dies, so a killed run never leaves it stuck.
    """
    from .errors import UsageError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another kvcondense process is writing {what}; wait for it or choose another path"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_writable(path: str | Path, flag: str, folder: bool = False) -> Path:
    """Check an output path before any work: ``flag`` names it in the one-line :class:`UsageError`.

    A file path must not be a folder; a folder path must not be a file; the folder that will hold it must be
    creatable and writable (probed with a temp file that is removed at once).
    """
    from .errors import UsageError

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; give a folder path")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    holder = path if folder else path.parent
    for parent in (holder, *holder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            break
    try:
        holder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kvcondense-probe.", dir=holder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {holder} ({e.strerror}); choose a writable path") from None
    return path


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
