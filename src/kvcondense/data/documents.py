"""Documents, user text files and the deterministic train/validation/test split by document."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError


class DataError(UsageError):
    """The data a user pointed at cannot be used (missing, empty, malformed)."""


@dataclass(frozen=True)
class Document:
    """One document: the unit the split works on."""

    title: str
    text: str


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Keep going on a stray byte, but never silently: the replacement characters stay visible in the text.
        import warnings

        text = raw.decode("utf-8", errors="replace")
        if text.count("\ufffd") > 0.25 * max(len(text), 1) or "\x00" in text:
            raise DataError(
                f"{path} is not text (mostly bytes that are not UTF-8); give a UTF-8 .txt or .jsonl"
            ) from None
        warnings.warn(f"{path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD", stacklevel=2)
        return text


def jsonl_records(path: Path):
    """(1-based line number, parsed object) of every non-blank line of a JSON-lines file; bad JSON is a
    :class:`DataError` naming the file and the line."""
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except RecursionError:
            raise DataError(f"{path}:{n}: JSON nested too deeply; each line must be one flat JSON object") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, obj in jsonl_records(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{n}: expected an object with a "text" string field')
        docs.append(Document(obj.get("title") or f"{path.name}:{n}", obj["text"]))
    return docs


def read_path(path: str | Path) -> list[Document]:
    """Documents from a ``.txt`` file (one document), a ``.jsonl`` file (one per line) or a directory of them."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist; pass a built-in corpus name or a .txt/.jsonl file or folder")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if p.is_file() and p.suffix not in (".txt", ".jsonl"):
        raise DataError(f"data file {p} is neither .txt nor .jsonl")
    docs: list[Document] = []
    for f in files:
        docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else [Document(f.name, _read_text(f))])
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"data path {p} holds no text; give it non-empty .txt or .jsonl files")
    return docs


SPLITS = ("train", "validation", "test", "all")  # all: every document (a file the user kept apart for evaluation)


def split_of(doc: Document, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Deterministic split of a document from a hash of its title and text (independent of corpus order)."""
    h = int(hashlib.sha256((doc.title + "\0" + doc.text[:1000]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < fractions[0]:
        return "train"
    return "validation" if h < fractions[0] + fractions[1] else "test"


def pieces(doc: Document, chars: int = 2000) -> list[Document]:
    """Cut a document into pieces of about ``chars`` characters at line ends."""
    out, buf = [], []
    for line in doc.text.splitlines(keepends=True):
        buf.append(line)
        if sum(map(len, buf)) >= chars:
            out.append("".join(buf))
            buf = []
    if buf:
        out.append("".join(buf))
    return [Document(f"{doc.title}#{i}", t) for i, t in enumerate(out) if t.strip()]


def split_documents(docs: list[Document], split: str, min_docs: int = 10) -> list[Document]:
    """The documents of one split, assigned by hash so the split is stable across runs and machines (``all``: every
    document, for a file kept apart for evaluation).

    A corpus of fewer than ``min_docs`` documents (one user file, say) is cut into pieces first, so the test split
    never shares text with the training split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "all":
        return list(docs)
    if len(docs) < min_docs:
        size = max(300, sum(len(d.text) for d in docs) // 30)
        docs = [p for d in docs for p in pieces(d, size)]
    chosen = [d for d in docs if split_of(d) == split]
    if not chosen:
        longest = max((max(map(len, d.text.splitlines()), default=0) for d in docs), default=0)
        if len(docs) < 3 and longest >= 0.9 * sum(len(d.text) for d in docs):
            raise DataError(
                f"the text is one line of {longest:,} characters: it is split into train/validation/test at line "
                "ends, so one line gives no test split; break it into lines or paragraphs, or give several files"
            )
        raise DataError(
            f"the {split} split is empty ({len(docs)} pieces of text in all; the split is 80/10/10 by piece): give "
            f"more text (a few thousand words), evaluate another --split, or keep a file apart for evaluation and "
            "score all of it (--data FILE --split all)"
        )
    return chosen
