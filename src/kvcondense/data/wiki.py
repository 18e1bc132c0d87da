"""The built-in ``wiki`` corpus: 103 English Wikipedia articles shipped as test data in the ``gensim==4.4.0`` wheel.

The wheel is fetched (not installed) and the dump is read with ``zipfile``; wiki markup is removed with
``mwparserfromhell``.
"""

from __future__ import annotations

import bz2
import io
import re
import xml.etree.ElementTree as ET
import zipfile

import mwparserfromhell

from ..fetch import fetch_package
from .documents import Document

PACKAGE, VERSION = "gensim", "4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def clean_wikitext(raw: str) -> str:
    """Plain paragraphs from wiki markup: templates, tables, refs, files and headings' markup removed."""
    code = mwparserfromhell.parse(raw)
    junk = code.filter_templates(recursive=False) + [t for t in code.filter_tags() if str(t.tag).strip() == "ref"]
    for node in junk:
        try:
            code.remove(node)
        except ValueError:  # already gone with an enclosing node
            pass
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if not line or line.startswith(("Category:", "File:", "Image:", "thumb|")) or line in ("()", "."):
            continue
        lines.append(line)
    return "\n".join(lines)


def load_wiki() -> list[Document]:
    """The articles of the dump as documents (redirects and non-article pages skipped)."""
    with zipfile.ZipFile(fetch_package(PACKAGE, VERSION)) as zf:
        xml = bz2.decompress(zf.read(MEMBER))
    docs = []
    for _, elem in ET.iterparse(io.BytesIO(xml)):
        if not elem.tag.endswith("}page"):
            continue
        ns = "{" + elem.tag.split("}")[0][1:] + "}"
        title = elem.findtext(f"{ns}title") or ""
        raw = elem.findtext(f"{ns}revision/{ns}text") or ""
        if elem.findtext(f"{ns}ns") == "0" and elem.find(f"{ns}redirect") is None and raw:
            text = clean_wikitext(raw)
            if len(text) > 200:
                docs.append(Document(title, text))
        elem.clear()
    return docs
