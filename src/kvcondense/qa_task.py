"""Question answering over a compressed context: the user's own data (``--task qa``) and a built-in needle.

The context is compressed once, before any question is seen (question-agnostic, kvpress's default), by the
library's own prefill with real eviction; the cache is then frozen and every question of the context reads a
copy of it (the multi-query setting of KVzip and SCBench: one compression, many questions). With options, the
answer is the option whose tokens have the highest summed log-likelihood after the question; without options,
greedy generation scored by normalised exact match. ``kv_kept`` is measured: stored slots / context tokens.

Data (``.jsonl``, one context per line)::

    {"context": "...", "question": "...", "answer": "...", "options": ["...", "..."]}
    {"context": "...", "questions": [{"question": "...", "answer": "...", "options": [...]}, ...]}

    kvcondense eval --task qa --data qa.jsonl --method streaming --kv-budget 0.25
    kvcondense eval --task needle --checkpoint checkpoints/sentinel-r0.5 --needle-lengths 512 1024
"""

from __future__ import annotations

import random
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import EvictingCache
from .data.documents import DataError, jsonl_records
from .engine import Stream, generate_step
from .forward import feed_text
from .methods import Method, TextPolicy, tokenize

PROMPT = "\n\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class Question:
    """A question; ``raw``: the text is the whole prompt and the options are appended verbatim (an episode's
    query such as "The code word for Athens is", with options " banana", ...), instead of the QA template."""

    question: str
    answer: str
    options: tuple[str, ...] = ()
    raw: bool = False

    def prompt(self) -> str:
        return self.question if self.raw else PROMPT.format(question=self.question)

    def option_text(self, option: str) -> str:
        return option if self.raw else " " + option


@dataclass(frozen=True)
class QAItem:
    """One context and the questions asked about it (extra fields, such as the needle's depth, in ``tags``)."""

    context: str
    questions: tuple[Question, ...]
    tags: dict = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------------------------------------------------------- data
def _question(obj, where: str) -> Question:
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
        raise DataError(f'{where}: each question needs "question" and "answer" strings')
    options = obj.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise DataError(f'{where}: "options" must be a list of non-empty strings')
    if options and obj["answer"] not in options:
        raise DataError(f"{where}: the answer {obj['answer']!r} is not one of its options")
    if len(options) == 1:
        raise DataError(f"{where}: one option is no choice; give two or more, or none (generation)")
    return Question(obj["question"], obj["answer"], tuple(options))


def read_qa(path: str | Path) -> list[QAItem]:
    """QA items from a ``.jsonl`` file (see the module docstring); a malformed line names the file and line."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".jsonl":
        raise DataError(f"--task qa reads a .jsonl file of contexts and questions; {path} is not one")
    items = []
    for n, obj in jsonl_records(path):
        where = f"{path}:{n}"
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), str) or not obj["context"].strip():
            raise DataError(f'{where}: expected an object with a non-empty "context" string')
        if "questions" in obj:
            if not isinstance(obj["questions"], list) or not obj["questions"]:
                raise DataError(f'{where}: "questions" must be a non-empty list')
            questions = tuple(_question(q, where) for q in obj["questions"])
        else:
            questions = (_question(obj, where),)
        items.append(QAItem(obj["context"], questions))
    if not items:
        raise DataError(f"{path} holds no question")
    return items


def episodes_as_qa(episodes, limit: int, questions: int = 1) -> list[QAItem]:
    """Online episodes with options (``--data recall``, ``analogy``) as QA items: all their chunks are the context,
    compressed at once; the query is the prompt and the options continue it verbatim. ``questions`` > 1 (recall
    only): the episode's question and ``questions - 1`` more about its other facts, all reading one compressed
    context (the multi-query setting)."""
    chosen = [e for e in episodes if e.options][:limit]
    if not chosen:
        raise DataError("--task qa on episodes needs episodes with options (recall, analogy, or a .jsonl with them)")
    items = []
    for i, e in enumerate(chosen):
        first = Question(e.query, e.answer, tuple(e.options), raw=True)
        more = recall_questions(e, questions - 1, random.Random(f"questions:{i}")) if questions > 1 else []
        items.append(QAItem("".join(e.chunks), (first, *more)))
    return items


def recall_questions(episode, n: int, rng: random.Random) -> list[Question]:
    """``n`` more 4-option questions about a recall episode's facts (not the one it asks), in its own format."""
    from .data.episodes import RECALL_QUERY, recall_facts

    pairs = recall_facts(episode)
    if pairs is None:
        raise DataError("--questions > 1 needs --data recall (or a .jsonl with several questions per context)")
    others = [j for j in range(len(pairs)) if j != episode.evidence]
    if n > len(others):
        raise DataError(f"--questions {n + 1} asks more than the {len(pairs)} facts of an episode")
    out = []
    for j in rng.sample(others, n):
        subject, value = pairs[j]
        options = [value, *rng.sample([v for k, (_, v) in enumerate(pairs) if k != j], len(episode.options) - 1)]
        rng.shuffle(options)
        out.append(Question(RECALL_QUERY.format(subject=subject), " " + value, tuple(" " + o for o in options), True))
    return out


def needle_items(docs, tokenizer, lengths: tuple[int, ...], depths: tuple[float, ...], per_cell: int, seed: int):
    """Passkey retrieval (needle in a haystack): held-out text of each length with a 5-digit passkey sentence
    inserted at each depth (fraction of the context before it), asked with four options and by generation."""
    rng = random.Random(seed)
    text = " ".join(" ".join(d.text.split()) for d in docs)
    ids = tokenize(text, tokenizer).ids
    items = []
    for length in lengths:
        if len(ids) < length + 64:
            raise DataError(f"the held-out text has {len(ids)} tokens, fewer than a needle context of {length}")
        for depth in depths:
            for _ in range(per_cell):
                key = rng.randrange(10_000, 100_000)
                needle = f" The passkey is {key}. Remember it: {key}. "
                start = rng.randrange(0, len(ids) - length)
                budget = length - len(tokenize(needle, tokenizer))
                hay = tokenizer.decode(ids[start : start + budget].tolist())
                cut = int(depth * len(hay))
                cut = hay.rfind(" ", 0, cut) if 0 < cut < len(hay) else cut  # at a word boundary
                context = hay[: max(cut, 0)] + needle + hay[max(cut, 0) :]
                wrong = {str(rng.randrange(10_000, 100_000)) for _ in range(5)} - {str(key)}
                options = [str(key), *sorted(wrong)[:3]]
                rng.shuffle(options)
                asked = (  # the same question twice over one compressed context: by options, and by generation
                    Question("What is the passkey?", str(key), tuple(options)),
                    Question("What is the passkey?", str(key)),
                )
                items.append(QAItem(context, asked, {"length": length, "depth": depth}))
    return items


# ----------------------------------------------------------------------------------------------------------- scoring
def normalise(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@torch.no_grad()
def answer(model, tokenizer, cache: EvictingCache, first: int, position: int, q: Question, max_new_tokens: int):
    """(correct, prediction) for one question over a frozen compressed context (``cache`` is not modified)."""
    prompt = torch.tensor(tokenizer(q.prompt(), add_special_tokens=False)["input_ids"])
    if q.options:
        scores = []
        for option in q.options:
            opt = torch.tensor(tokenizer(q.option_text(option), add_special_tokens=False)["input_ids"])
            ids = torch.cat([prompt, opt])
            logp = torch.log_softmax(feed_text(model, cache.clone(), ids, first, position).float(), -1).cpu()
            rows = torch.arange(len(prompt) - 1, len(ids) - 1)
            scores.append(float(logp[rows, opt].sum()))
        pick = q.options[max(range(len(scores)), key=scores.__getitem__)]
        return pick == q.answer, pick
    work = cache.clone()
    logits = feed_text(model, work, prompt, first, position)[-1]
    first, position = first + len(prompt), position + len(prompt)
    stream = Stream(model, None, {}, work, policy=TextPolicy(first, position), seen=first)
    out = []
    for (token,) in generate_step(stream, logits, max_new_tokens, tokenizer.eos_token_id):
        if "\n" in tokenizer.decode([token]):
            break
        out.append(token)
    prediction = tokenizer.decode(out).strip()
    return normalise(prediction) == normalise(q.answer), prediction


def qa_task(
    model, tokenizer, method: Method, token_ids: dict, items: list[QAItem], max_new_tokens: int = 16, seed: int = 0
) -> dict:
    """Accuracy over every question, the KV kept (measured) and per-item rows (with their tags)."""
    t0 = time.perf_counter()
    rows, kept, ctx_tokens, compressions = [], 0, 0, 0
    for i, item in enumerate(tqdm(items, desc=f"qa {method.name}", leave=False)):
        context = tokenize(item.context, tokenizer)
        stream = Stream(model, method, token_ids)
        stream.prefill(context, chunk_tokens=512, seed=seed + i)
        layout, cache = stream.layouts[0], stream.cache
        compressions += 1  # once per context, whatever the number of its questions
        kept += int(cache.stored_slots().max())
        ctx_tokens += len(context)
        cache.freeze()
        position = int(layout.position_ids.max()) + 1
        for q in item.questions:
            correct, prediction = answer(model, tokenizer, cache, len(layout), position, q, max_new_tokens)
            mode = "options" if q.options else "generate"
            rows.append({**item.tags, "mode": mode, "correct": bool(correct), "prediction": prediction})
    by_mode = {m: [r["correct"] for r in rows if r["mode"] == m] for m in ("options", "generate")}
    return {
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        **{f"accuracy_{m}": sum(v) / len(v) for m, v in by_mode.items() if v},
        "questions": len(rows),
        "contexts": len(items),
        "compressions": compressions,
        "kv_kept": kept / max(ctx_tokens, 1),
        "context_tokens": ctx_tokens // max(len(items), 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def needle_grid(rows: list[dict]) -> list[dict]:
    """Accuracy per (mode, length, depth) cell of the needle task."""
    cells: dict[tuple, list[bool]] = {}
    for r in rows:
        cells.setdefault((r["mode"], r["length"], r["depth"]), []).append(r["correct"])
    return [
        {"mode": k[0], "length": k[1], "depth": k[2], "accuracy": sum(v) / len(v), "n": len(v)}
        for k, v in sorted(cells.items())
    ]


def export_qa(items: list[QAItem], tokenizer, path: str | Path, name: str) -> None:
    """The items as token ids for the kvpress peer runner (``benchmarks/peers/kvpress``)."""
    from .atomic import write_json

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    payload = {"task": "qa", "name": name, "items": []}
    for item in items:
        qs = []
        for q in item.questions:
            row = {"question": ids(q.prompt()), "answer": q.answer}
            if q.options:
                row["options"] = [ids(q.option_text(o)) for o in q.options]
                row["answer_index"] = q.options.index(q.answer)
            qs.append(row)
        payload["items"].append({"context": tokenize(item.context, tokenizer).ids.tolist(), "questions": qs})
    write_json(path, payload, indent=None)
