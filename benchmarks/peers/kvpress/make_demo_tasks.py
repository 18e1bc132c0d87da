"""Demo tasks files for run_presses.py, made from a plain text file with the tokenizer of ``--model`` only.

kvcondense writes the real tasks files (its own token ids); this lets the peer runner be tried without it:

    .venv/bin/python make_demo_tasks.py --model DIR --text book.txt --task prefix --windows 4 --context 1024 \
        --continuation 64 --out prefix.json
    .venv/bin/python make_demo_tasks.py --model DIR --text book.txt --task qa --items 4 --context 512 \
        --questions 4 --options 4 --out qa.json

prefix: consecutive, non-overlapping windows of context + (continuation + 1) tokens.
qa: consecutive contexts; each question asks which word follows a 6-word phrase quoted from the context
(a retrieval question the model can answer only from the kept KV); with ``--options K`` the true word and
K-1 other words of the same context are the options, with ``--options 0`` the answer is generated.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys

PHRASE = 6


def _words(text: str) -> list[re.Match]:
    return list(re.finditer(r"[A-Za-z]+(?:'[a-z]+)?", text))


def make_prefix(tokens: list[int], n: int, p: int, s: int) -> list[dict]:
    size = p + s + 1
    if len(tokens) < n * size:
        raise SystemExit(f"make_demo_tasks.py: error: the text has {len(tokens)} tokens, {n} windows need {n * size}")
    return [
        {"context": tokens[i * size : i * size + p], "continuation": tokens[i * size + p : (i + 1) * size]}
        for i in range(n)
    ]


def make_qa(tok, tokens: list[int], n: int, p: int, n_q: int, n_opt: int, rng: random.Random) -> list[dict]:
    if len(tokens) < n * p:
        raise SystemExit(f"make_demo_tasks.py: error: the text has {len(tokens)} tokens, {n} items need {n * p}")
    items = []
    for i in range(n):
        ctx = tokens[i * p : (i + 1) * p]
        text = tok.decode(ctx)
        words = _words(text)
        low = [w.group().lower() for w in words]
        # a target word of 4+ letters whose preceding phrase occurs once in the context
        cands = []
        for j in range(PHRASE, len(words) - 1):
            phrase = " ".join(low[j - PHRASE : j])
            if len(low[j]) >= 4 and " ".join(low).count(phrase) == 1:
                cands.append(j)
        if len(cands) < n_q:
            raise SystemExit(f"make_demo_tasks.py: error: item {i}: only {len(cands)} usable phrases")
        vocab = sorted({w for w in low if len(w) >= 4})
        questions = []
        for j in sorted(rng.sample(cands, n_q)):
            phrase = " ".join(w.group() for w in words[j - PHRASE : j])
            answer = words[j].group()
            prompt = f'\n\nQuestion: in the text above, which word comes right after "{phrase}"?\nAnswer:'
            q = {"question": tok.encode(prompt, add_special_tokens=False), "answer": answer}
            if n_opt:
                others = rng.sample([w for w in vocab if w != answer.lower()], n_opt - 1)
                opts = [answer] + others
                rng.shuffle(opts)
                q["options"] = [tok.encode(" " + o, add_special_tokens=False) for o in opts]
                q["answer_index"] = opts.index(answer)
                q["options_text"] = opts
            questions.append(q)
        items.append({"context": ctx, "questions": questions})
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local Hugging Face folder (its tokenizer only)")
    ap.add_argument("--text", required=True, help="a plain text file")
    ap.add_argument("--task", choices=["prefix", "qa"], default="prefix")
    ap.add_argument("--name", default=None, help="task name written into the file (default: demo-TASK)")
    ap.add_argument("--windows", type=int, default=4, help="prefix: number of windows")
    ap.add_argument("--items", type=int, default=4, help="qa: number of contexts")
    ap.add_argument("--context", type=int, default=1024, help="context tokens P")
    ap.add_argument("--continuation", type=int, default=64, help="prefix: scored tokens S (S+1 ids are written)")
    ap.add_argument("--questions", type=int, default=4, help="qa: questions per context")
    ap.add_argument("--options", type=int, default=4, help="qa: options per question (0: generated answers)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.text, encoding="utf-8") as f:
        tokens = tok.encode(f.read(), add_special_tokens=False)
    name = a.name or f"demo-{a.task}"
    if a.task == "prefix":
        out = {"task": "prefix", "name": name, "windows": make_prefix(tokens, a.windows, a.context, a.continuation)}
    else:
        items = make_qa(tok, tokens, a.items, a.context, a.questions, a.options, random.Random(a.seed))
        out = {"task": "qa", "name": name, "max_new_tokens": a.max_new_tokens, "items": items}
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {a.out}: {a.task}, {len(out.get('windows', out.get('items')))} entries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
