"""Zero-shot continuation quality (the sentinel paper's C4 setting, on documents of the chosen corpus).

A document prefix is compressed by the method, a continuation is generated greedily through the evicting cache,
and it is scored against the document's true continuation with ROUGE-L and BERTScore.

    kvcondense eval --task continuation --checkpoint checkpoints/sentinel-r0.5 --docs 8
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .errors import UsageError
from .generate import generate
from .methods import Method, TokenizedText, tokenize
from .metrics import BertScore, rouge_l


def continuation_samples(docs, tokenizer, prefix_tokens: int, new_tokens: int, n: int) -> list[tuple]:
    """Up to ``n`` (prefix, reference text) pairs from documents long enough for both parts."""
    samples = []
    for doc in docs:
        toks = tokenize(doc.text, tokenizer)
        if len(toks) >= prefix_tokens + new_tokens:
            reference = tokenizer.decode(toks.ids[prefix_tokens : prefix_tokens + new_tokens].tolist())
            samples.append((toks[:prefix_tokens], reference))
        if len(samples) == n:
            break
    if not samples:
        raise UsageError(
            f"no document has {prefix_tokens + new_tokens} tokens for a continuation; lower --prefix-tokens"
        )
    return samples


def continuation_quality(
    model,
    tokenizer,
    method: Method,
    token_ids: dict,
    samples: list[tuple[TokenizedText, str]],
    new_tokens: int,
    scorer: BertScore | None,
    seed: int = 0,
) -> dict:
    """Mean ROUGE-L (and BERTScore F1 when a scorer is given) of generated continuations, with the KV kept."""
    predictions, references, kept, full = [], [], 0, 0
    for i, (prefix, reference) in enumerate(tqdm(samples, desc=f"continue {method.name}", leave=False)):
        gen = generate(model, tokenizer, method, token_ids, prefix, new_tokens, seed=seed + i, progress=False)
        predictions.append(gen.text)
        references.append(reference)
        kept += gen.kv_bytes
        full += gen.kv_bytes_full
    rouge = rouge_l(predictions, references)
    out = {
        "rouge_l": sum(rouge) / len(rouge),
        "documents": len(samples),
        "kv_kept_generation": kept / max(full, 1),
        "examples": [{"prediction": p, "reference": r} for p, r in zip(predictions[:3], references[:3], strict=True)],
    }
    if scorer is not None:
        f1 = scorer(predictions, references)
        out["bertscore_f1"] = sum(f1) / len(f1)
    return out
