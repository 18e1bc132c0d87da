"""Corpora by name (built-in, from package registries) or by path (the user's own files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_text
from ..fetch import cache_dir
from .books import load_books
from .documents import SPLITS, DataError, Document, read_path, split_documents
from .episodes import EPISODE_SOURCES, Episode, load_episodes, read_episodes_jsonl
from .wiki import load_wiki

CORPORA: dict[str, Callable[[], list[Document]]] = {
    "wiki": load_wiki,
    "books": load_books,
}


def load_corpus(name_or_path: str) -> list[Document]:
    """All documents of a built-in corpus (cached after the first build) or of a user path."""
    if name_or_path in CORPORA:
        cached = cache_dir() / "corpora" / f"{name_or_path}.json"
        if cached.exists():
            return [Document(**d) for d in json.loads(cached.read_text())]
        docs = CORPORA[name_or_path]()
        write_text(cached, json.dumps([d.__dict__ for d in docs]))
        return docs
    if not Path(name_or_path).exists() and "/" not in name_or_path and "." not in name_or_path:
        raise DataError(f"unknown corpus {name_or_path!r}; choose one of: {', '.join(CORPORA)}, or pass a path")
    return read_path(name_or_path)


def load_split(name_or_path: str, split: str) -> list[Document]:
    """The documents of one split (train, validation, test) of a corpus."""
    return split_documents(load_corpus(name_or_path), split)


__all__ = [
    "CORPORA",
    "EPISODE_SOURCES",
    "SPLITS",
    "DataError",
    "Document",
    "Episode",
    "load_corpus",
    "load_episodes",
    "load_split",
    "read_episodes_jsonl",
    "read_path",
]
