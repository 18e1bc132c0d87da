"""Peer runner: NVIDIA kvpress presses on the exact token ids that kvcondense produces.

Runs in its own venv (``make peers``; kvpress 0.5.5 needs transformers < 5.3, kvcondense pins 5.23), reads a
tasks file of token ids (schema in README.md beside this file), and writes rows in kvcondense's result style:

    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run_presses.py \
        --tasks tasks.json --model DIR --presses streaming_llm snapkv --kept 0.5 0.25 --out results.json

Budget convention: kvpress's ``compression_ratio`` is the fraction pruned, so ``compression_ratio = 1 - kept``.
A "full" row (no press) is always written first and is the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HARNESS = "kvpress-0.5.5"


class UsageError(Exception):
    """A bad argument or tasks file: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# presses


@dataclass(frozen=True)
class PressSpec:
    factory: Callable[[float], object]  # compression_ratio -> press
    masks_only: bool = False  # kvpress keeps every KV pair and masks evicted keys at attention time
    needs_eager: bool = False  # the press reads attention weights, which sdpa does not return


def _registry() -> dict[str, PressSpec]:
    import kvpress as kp

    return {
        "streaming_llm": PressSpec(lambda cr: kp.StreamingLLMPress(compression_ratio=cr)),
        "snapkv": PressSpec(lambda cr: kp.SnapKVPress(compression_ratio=cr)),
        "expected_attention": PressSpec(lambda cr: kp.ExpectedAttentionPress(compression_ratio=cr)),
        "kvzip": PressSpec(lambda cr: kp.KVzipPress(compression_ratio=cr), masks_only=True),
        "tova": PressSpec(lambda cr: kp.TOVAPress(compression_ratio=cr)),
        "knorm": PressSpec(lambda cr: kp.KnormPress(compression_ratio=cr)),
        "keydiff": PressSpec(lambda cr: kp.KeyDiffPress(compression_ratio=cr)),
        "compactor": PressSpec(lambda cr: kp.CompactorPress(compression_ratio=cr)),
        "pyramidkv": PressSpec(lambda cr: kp.PyramidKVPress(compression_ratio=cr)),
        "random": PressSpec(lambda cr: kp.RandomPress(compression_ratio=cr, seed=0)),
        "observed_attention": PressSpec(lambda cr: kp.ObservedAttentionPress(compression_ratio=cr), needs_eager=True),
        "adakv_snapkv": PressSpec(lambda cr: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=cr)), masks_only=True),
        "adakv_expected_attention": PressSpec(
            lambda cr: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=cr)), masks_only=True
        ),
    }


PRESS_NAMES = (
    "streaming_llm snapkv expected_attention kvzip tova knorm keydiff compactor pyramidkv random observed_attention "
    "adakv_snapkv adakv_expected_attention"
).split()


def press_params(press) -> dict:
    """The press's dataclass fields that are plain values (nested presses by class name), for the row."""
    out = {}
    for f in dataclasses.fields(press):
        if f.name.startswith("_"):
            continue
        v = getattr(press, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = {"class": type(v).__name__, **press_params(v)}
        elif v is None or isinstance(v, bool | int | float | str):
            out[f.name] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# tasks file


def _ids(x, where: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise UsageError(f"{where}: expected a list of token ids")
    return x


def load_tasks(path: str) -> dict:
    try:
        with open(path) as f:
            t = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read tasks file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"tasks file {path} is not JSON: {e}") from None
    if not isinstance(t, dict) or t.get("task") not in ("prefix", "qa"):
        raise UsageError(f'tasks file {path}: "task" must be "prefix" or "qa"')
    if not isinstance(t.get("name"), str):
        raise UsageError(f'tasks file {path}: "name" (a string) is required')
    if t["task"] == "prefix":
        ws = t.get("windows")
        if not isinstance(ws, list) or not ws:
            raise UsageError(f'tasks file {path}: a prefix task needs a non-empty "windows" list')
        for i, w in enumerate(ws):
            _ids(w.get("context"), f"windows[{i}].context")
            c = _ids(w.get("continuation"), f"windows[{i}].continuation")
            if len(c) < 2:
                raise UsageError(f"windows[{i}].continuation: needs S+1 >= 2 ids")
    else:
        items = t.get("items")
        if not isinstance(items, list) or not items:
            raise UsageError(f'tasks file {path}: a qa task needs a non-empty "items" list')
        for i, it in enumerate(items):
            _ids(it.get("context"), f"items[{i}].context")
            qs = it.get("questions")
            if not isinstance(qs, list) or not qs:
                raise UsageError(f"items[{i}].questions: a non-empty list is required")
            for j, q in enumerate(qs):
                _ids(q.get("question"), f"items[{i}].questions[{j}].question")
                if "options" in q:
                    for k, o in enumerate(q["options"]):
                        if not _ids(o, f"items[{i}].questions[{j}].options[{k}]"):
                            raise UsageError(f"items[{i}].questions[{j}].options[{k}]: empty option")
                    ai = q.get("answer_index")
                    if not isinstance(ai, int) or not 0 <= ai < len(q["options"]):
                        raise UsageError(f"items[{i}].questions[{j}]: answer_index must index options")
                elif not isinstance(q.get("answer"), str):
                    raise UsageError(f"items[{i}].questions[{j}]: answer (a string) is required without options")
    return t


# ---------------------------------------------------------------------------------------------------------------
# model


def load_model(model_dir: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def clear_masks(model) -> None:
    """kvpress's masking presses leave ``masked_key_indices`` on the attention modules: drop them between runs."""
    for layer in model.model.layers:
        if getattr(layer.self_attn, "masked_key_indices", None) is not None:
            layer.self_attn.masked_key_indices = None


def compress_context(model, press, context: list[int]):
    """Prefill the context (through model.model, as kvpress's pipeline does) with the press active, if any.

    Returns the cache and a dict: kv_kept measured (stored positions / context tokens, mean over layers),
    whether masks were set, and for masks the effective kept fraction (unmasked / stored, mean over layers).
    """
    import torch
    from transformers import DynamicCache

    clear_masks(model)
    cache = DynamicCache()
    ids = torch.tensor([context], dtype=torch.long)
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ids, past_key_values=cache)
    stored = [layer.keys.shape[-2] for layer in cache.layers]
    n_kv_heads = cache.layers[0].keys.shape[1]
    masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    masked = any(m is not None for m in masks)
    eff = None
    if masked:
        eff = sum(
            1.0 - (0 if m is None else len(m[0])) / (n_kv_heads * s) for m, s in zip(masks, stored, strict=True)
        ) / len(stored)
    return cache, {"kv_kept": sum(stored) / len(stored) / len(context), "masked": masked, "effective": eff}


def forward_over_cache(model, ids: list[int], cache, start_pos: int):
    """Logits [len(ids), V] for ``ids`` fed after the cache, at true positions start_pos.. (the context length,
    not the compressed cache length). Token by token when layers keep different lengths (PyramidKV): the causal
    mask transformers builds once for all layers would not fit them, while a one-token query needs no mask."""
    import torch

    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    with torch.inference_mode():
        if len(lengths) == 1:
            pos = torch.arange(start_pos, start_pos + len(ids)).unsqueeze(0)
            return model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=pos).logits[0].float()
        out = []
        for i, t in enumerate(ids):
            pos = torch.tensor([[start_pos + i]])
            out.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache, position_ids=pos).logits[0, -1])
        return torch.stack(out).float()


# ---------------------------------------------------------------------------------------------------------------
# prefix task


def reference_logprobs(model, window: dict):
    """Full attention, one pass over context + continuation[:-1]: log-softmax at the S scored positions."""
    import torch

    ctx, cont = window["context"], window["continuation"]
    ids = torch.tensor([ctx + cont[:-1]])
    s = len(cont) - 1
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=s).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def run_prefix(model, press, windows: list[dict], refs: list) -> dict:
    import torch

    nll = kl = 0.0
    n = 0
    kept, masked, eff = [], False, []
    for w, ref in zip(windows, refs, strict=True):
        ctx, cont = w["context"], w["continuation"]
        cache, info = compress_context(model, press, ctx)
        kept.append(info["kv_kept"])
        masked |= info["masked"]
        if info["effective"] is not None:
            eff.append(info["effective"])
        logp = torch.log_softmax(forward_over_cache(model, cont[:-1], cache, len(ctx)), dim=-1)
        target = torch.tensor(cont[1:])
        nll += -logp.gather(1, target[:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        n += len(target)
        clear_masks(model)
    return {
        "perplexity": math.exp(nll / n),
        "kl_to_full": kl / n,
        "kv_kept_stored": sum(kept) / len(kept),
        "masked": masked,
        "kv_kept_effective": sum(eff) / len(eff) if eff else None,
        "n_tokens": n,
    }


# ---------------------------------------------------------------------------------------------------------------
# qa task


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _cache_lengths(cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def greedy(model, cache, question: list[int], start_pos: int, max_new_tokens: int, eos: set[int]) -> list[int]:
    logits = forward_over_cache(model, question, cache, start_pos)
    out = [int(logits[-1].argmax())]
    pos = start_pos + len(question)
    while len(out) < max_new_tokens and out[-1] not in eos:
        logits = forward_over_cache(model, [out[-1]], cache, pos)
        out.append(int(logits[-1].argmax()))
        pos += 1
    return out


def run_qa(model, press, items: list[dict], tokenizer, max_new_tokens: int) -> dict:
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    correct = contains = n = n_open = compressions = 0
    kept, masked, eff = [], False, []
    for item in items:
        ctx = item["context"]
        cache, info = compress_context(model, press, ctx)  # once per item, question-agnostic
        compressions += 1
        kept.append(info["kv_kept"])
        masked |= info["masked"]
        if info["effective"] is not None:
            eff.append(info["effective"])
        lengths = _cache_lengths(cache)
        for q in item["questions"]:
            if "options" in q:
                qcache = copy.deepcopy(cache)
                logits = forward_over_cache(model, q["question"], qcache, len(ctx))
                first = torch.log_softmax(logits[-1], dim=-1)
                scores = []
                for opt in q["options"]:
                    s = first[opt[0]].item()
                    if len(opt) > 1:
                        ocache = copy.deepcopy(qcache)
                        lp = torch.log_softmax(
                            forward_over_cache(model, opt[:-1], ocache, len(ctx) + len(q["question"])), dim=-1
                        )
                        s += lp.gather(1, torch.tensor(opt[1:])[:, None]).sum().item()
                    scores.append(s)
                correct += int(max(range(len(scores)), key=scores.__getitem__) == q["answer_index"])
            else:
                qcache = copy.deepcopy(cache)
                gen = greedy(model, qcache, q["question"], len(ctx), max_new_tokens, eos)
                text = tokenizer.decode(gen, skip_special_tokens=True).strip()
                pred = text.split("\n")[0]  # the answer line: a chat model goes on after it
                gold = normalize_answer(q["answer"])
                correct += int(normalize_answer(pred) == gold)
                contains += int(bool(gold) and gold in normalize_answer(text))
                n_open += 1
            n += 1
            if _cache_lengths(cache) != lengths:  # the compressed cache is reused, never grown
                raise RuntimeError("compressed cache changed while answering questions")
        clear_masks(model)
    return {
        "accuracy": correct / n,
        "contains_accuracy": contains / n_open if n_open else None,
        "n_questions": n,
        "n_open_questions": n_open,
        "n_compressions": compressions,
        "kv_kept_stored": sum(kept) / len(kept),
        "masked": masked,
        "kv_kept_effective": sum(eff) / len(eff) if eff else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# driver


def write_atomic(path: str, obj) -> None:
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="tasks file (JSON of token ids)")
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--presses", nargs="*", default=["streaming_llm", "snapkv", "expected_attention"])
    p.add_argument("--kept", nargs="*", type=float, default=[0.5, 0.25, 0.125], help="fraction of KV kept")
    p.add_argument("--out", required=True, help="result JSON, written atomically")
    a = p.parse_args(argv)
    unknown = [n for n in a.presses if n not in PRESS_NAMES]
    if unknown:
        raise UsageError(f"unknown press {', '.join(map(repr, unknown))} (known: {' '.join(PRESS_NAMES)})")
    bad = [k for k in a.kept if not 0 < k <= 1]
    if bad:
        raise UsageError(f"--kept values must lie in (0, 1], got {bad}")
    if not Path(a.model, "config.json").is_file():
        raise UsageError(f"--model {a.model}: no config.json there (a local Hugging Face folder is needed)")
    return a


def run(argv=None) -> int:
    a = parse_args(argv)
    tasks = load_tasks(a.tasks)

    import torch
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    registry = _registry()
    models: dict[str, object] = {}

    def model_for(attn: str):
        if attn not in models:
            models[attn] = load_model(a.model, attn)
        return models[attn]

    kind = tasks["task"]
    tokenizer = AutoTokenizer.from_pretrained(a.model) if kind == "qa" else None
    base = {
        "kind": kind,
        "harness": HARNESS,
        "transformers_version": transformers.__version__,
        "task_name": tasks["name"],
        "model": str(Path(a.model).resolve()),
    }
    refs = None
    if kind == "prefix":
        t0 = time.perf_counter()
        refs = [reference_logprobs(model_for("sdpa"), w) for w in tasks["windows"]]
        nll = sum(
            -ref.gather(1, torch.tensor(w["continuation"][1:])[:, None]).sum().item()
            for w, ref in zip(tasks["windows"], refs, strict=True)
        )
        full_ppl = math.exp(nll / sum(len(w["continuation"]) - 1 for w in tasks["windows"]))
        print(
            f"[kvpress] reference (one pass, full attention): ppl {full_ppl:.3f} {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

    runs = [("full", None, 1.0)] + [(n, registry[n], k) for n in a.presses for k in a.kept]
    rows, failed = [], 0
    for name, spec, kept in runs:
        cr = round(1.0 - kept, 10)
        press = spec.factory(cr) if spec is not None else None
        row = dict(base)
        row.update(
            method="full" if spec is None else f"kvpress-{name}",
            press=None if press is None else type(press).__name__,
            press_params=None if press is None else press_params(press),
            compression_ratio=cr,
            kept_nominal=kept,
            attn_implementation="eager" if spec is not None and spec.needs_eager else "sdpa",
        )
        model = model_for(row["attn_implementation"])
        t0 = time.perf_counter()
        try:
            if kind == "prefix":
                r = run_prefix(model, press, tasks["windows"], refs)
            else:
                r = run_qa(model, press, tasks["items"], tokenizer, int(tasks.get("max_new_tokens", 16)))
        except Exception as e:  # one failing press does not lose the others' rows
            clear_masks(model)
            failed += 1
            traceback.print_exc()
            row.update(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            rows.append(row)
            print(f"[kvpress] {row['method']} kept={kept}: FAILED ({row['error']})", file=sys.stderr)
            continue
        seconds = time.perf_counter() - t0
        masks_only = bool(r.pop("masked")) or (spec is not None and spec.masks_only)
        stored = r.pop("kv_kept_stored")
        effective = r.pop("kv_kept_effective")
        if kind == "prefix":
            row.update(perplexity=r["perplexity"], full_perplexity=full_ppl, kl_to_full=r["kl_to_full"])
        row["masks_only"] = masks_only
        if masks_only:
            # memory is not freed: every KV pair stays stored and the evicted keys are masked at attention time
            row.update(kv_kept=kept, kv_kept_measured=False, kv_kept_stored=stored, kv_kept_effective=effective)
        else:
            row.update(kv_kept=stored, kv_kept_measured=True)
        row.update({k: v for k, v in r.items() if k not in ("perplexity", "kl_to_full")})
        row["seconds"] = seconds
        rows.append(row)
        summary = (
            f"ppl {row['perplexity']:.3f} kl {row['kl_to_full']:.4f}"
            if kind == "prefix"
            else f"acc {row['accuracy']:.3f}"
        )
        print(
            f"[kvpress] {row['method']} kept={kept}: {summary} kv_kept {row['kv_kept']:.3f} "
            f"({'nominal, masks only' if masks_only else 'measured'}) {seconds:.1f} s",
            file=sys.stderr,
        )
    write_atomic(a.out, {"results": rows})
    return 1 if failed else 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as e:
        print(f"run_presses.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
