"""``kvcondense demo``: the main job on the embedded defaults.

Evaluates the committed checkpoints (``checkpoints/``) against the baselines on held-out Wikipedia text at
r = 0.5, prints one table, shows a compressed-context generation next to the full-context one, and writes
everything under ``runs/demo/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_checkpoint
from .data import load_split
from .evaluate import EvalConfig, run_eval
from .generate import generate
from .methods import build_method
from .models import DEFAULT_MODEL, add_special_tokens, load_model

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
OUT = Path("runs/demo")


def demo_rows(ratio: float) -> list[tuple[str, dict]]:
    """(label, EvalConfig kwargs) for every row of the table; trained rows only where a checkpoint exists."""
    rows = [("full attention", {"method": "full"})]
    for name in ("sentinel", "local", "scattered"):
        ck = CHECKPOINTS / f"{name}-r{ratio}"
        if (ck / "kvcondense.json").exists():
            rows.append((f"{name} (trained)", {"checkpoint": str(ck)}))
        else:
            print(f"note: no checkpoint at {ck}; skipping trained {name}")
    rows.append(("StreamingLLM (4 sinks)", {"method": "streaming"}))
    if (CHECKPOINTS / "gist4" / "kvcondense.json").exists():
        rows.append(("gist N=4 (trained; KV set by sentences)", {"checkpoint": str(CHECKPOINTS / "gist4")}))
    rows.append(("sentinel (untrained tokens)", {"method": "sentinel"}))
    return rows


def markdown_table(results: list[tuple[str, dict]]) -> str:
    lines = [
        "| method | KV kept (measured) | perplexity | tokens scored | KV bytes (first block) |",
        "|---|---|---|---|---|",
    ]
    for label, r in results:
        lines.append(
            f"| {label} | {r['compression_ratio']:.3f} | {r['perplexity']:.2f} | {r['tokens_scored']} | "
            f"{r['kv_bytes']:,} |"
        )
    return "\n".join(lines)


def show_generation(ratio: float, prompt_tokens: int, new_tokens: int) -> str:
    """One continuation of a held-out document prefix with the full cache and with the trained sentinel cache."""
    model, tokenizer = load_model(DEFAULT_MODEL)
    doc = load_split("wiki", "test")[0].text
    ids = tokenizer(doc, add_special_tokens=False).input_ids[:prompt_tokens]
    prompt = tokenizer.decode(ids)
    parts = [f"prompt ({len(ids)} tokens): ...{prompt[-300:]!r}\n"]
    full = generate(model, tokenizer, build_method("full"), {}, prompt, new_tokens, progress=False)
    parts.append(f"[full attention]   KV {full.kv_bytes:,} bytes\n  {full.text!r}\n")
    ck = CHECKPOINTS / f"sentinel-r{ratio}"
    if (ck / "kvcondense.json").exists():
        model, tokenizer, method, token_ids, _ = load_checkpoint(ck)
    else:
        method = build_method("sentinel", ratio=ratio)
        token_ids = add_special_tokens(model, tokenizer, method.special_tokens)
    comp = generate(model, tokenizer, method, token_ids, prompt, new_tokens, progress=False)
    parts.append(
        f"[sentinel r={ratio}] KV {comp.kv_bytes:,} bytes ({comp.kv_bytes / full.kv_bytes:.2f}x)\n  {comp.text!r}\n"
    )
    return "\n".join(parts)


def run_demo(quick: bool = False, max_tokens: int | None = None, ratio: float = 0.5) -> int:
    max_tokens = max_tokens or (512 if quick else 4096)
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for label, kwargs in demo_rows(ratio):
        cfg = EvalConfig(ratios=(ratio,), max_tokens=max_tokens, verify=True, **kwargs)
        print(f"evaluating {label} ...", flush=True)
        results.append((label, run_eval(cfg)[0]))
    table = markdown_table(results)
    gen = show_generation(ratio, 128 if quick else 400, 16 if quick else 48)
    print("\nHeld-out perplexity over text tokens (wiki test split, blocks of 256 tokens, r = 0.5):\n")
    print(table)
    print(
        "\nverify (parallel vs evicting cache, max |logit diff|): "
        + ", ".join(f"{label}: {r['verify']['max_abs_diff']:.1e}" for label, r in results)
    )
    print("\n" + gen)
    tmp = OUT / "results.json.tmp"
    tmp.write_text(json.dumps([{"label": label, **r} for label, r in results], indent=2))
    tmp.replace(OUT / "results.json")
    (OUT / "table.md").write_text(table + "\n")
    (OUT / "generation.txt").write_text(gen)
    print(f"results, table and generation written under {OUT}/")
    return 0
