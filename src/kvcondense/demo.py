"""``kvcondense demo``: the main job on the embedded defaults.

Evaluates the committed checkpoints (``checkpoints/``) against the baselines on held-out Wikipedia text at
r = 0.5: perplexity over text tokens, continuation quality (ROUGE-L, BERTScore), decode speedup and the KV kept,
in one table. Shows one compressed-context generation next to the full-context one, and writes every result,
a markdown report and plots under ``runs/demo/``. Results already there are reused (``--force`` redoes them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from .bench import BenchConfig, run_bench
from .checkpoint import ADAPTER, META, method_from_meta, read_meta
from .data import load_split
from .evaluate import EvalConfig, run_eval
from .generate import generate
from .loader import load
from .methods import build_method, tokenize
from .models import DEFAULT_MODEL, add_special_tokens
from .report import find_result_file, write_json, write_report

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@dataclass
class DemoBudget:
    """How much text each measurement uses (``--quick`` shrinks everything for the test suite)."""

    ppl_tokens: int = 4096
    docs: int = 4
    prefix_tokens: int = 384
    new_tokens: int = 32
    context: int = 1024
    batch: int = 4
    steps: int = 4
    show_prompt: int = 400
    show_new: int = 40


QUICK = DemoBudget(
    ppl_tokens=256, docs=2, prefix_tokens=64, new_tokens=8, context=128, batch=2, steps=2, show_prompt=64, show_new=8
)


def _trained(checkpoints: Path, name: str, label: str) -> list[tuple[str, dict]]:
    """The row of the checkpoint ``checkpoints/name`` if it is there with its adapter, else a note and no row (a
    checkpoint committed without its adapter names the command that remakes it in its ``kvcondense.json``)."""
    ck = checkpoints / name
    if not (ck / META).exists():
        print(f"note: no checkpoint at {ck}; skipping {label}")
    elif not (ck / ADAPTER).exists():
        print(f"note: {ck} holds no {ADAPTER} (not committed: the command in its {META} remakes it); skipping {label}")
    else:
        return [(label, {"checkpoint": str(ck)})]
    return []


def demo_rows(checkpoints: Path, ratio: float) -> list[tuple[str, dict]]:
    """(label, how to load it) for every row; trained rows only where a checkpoint and its adapter exist."""
    rows = [("full attention", {"method": "full"})]
    rows += _trained(checkpoints, f"sentinel-r{ratio}", "sentinel (trained)")
    rows += _trained(checkpoints, f"sentinel-r{ratio}-kl", "sentinel (trained, KL to the frozen model)")
    for name in ("local", "scattered"):
        rows += _trained(checkpoints, f"{name}-r{ratio}", f"{name} (trained)")
    rows.append(("StreamingLLM (4 sinks)", {"method": "streaming"}))
    rows.append(("sentinel (untrained tokens)", {"method": "sentinel"}))
    for name, how in (("gist4", "trained"), ("gist4-kl", "trained, KL")):
        if (checkpoints / name / META).exists():  # no note when absent: the gist rows are extras at any ratio
            rows += _trained(checkpoints, name, f"gist N=4 ({how}; KV set by sentences)")
    return rows


def cached(out: Path, kind: str, config: dict, force: bool, compute):
    """Compute a result once per config under ``out`` (a rerun reuses it unless ``force``)."""
    path = find_result_file(out, kind, config)
    if path.exists() and not force:
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def _takes_ratio(source: dict) -> bool:
    """Whether a row's method (a checkpoint's, or the one named) has a compression ratio to set."""
    if "checkpoint" in source:
        return "ratio" in method_from_meta(read_meta(source["checkpoint"])).params()
    return "ratio" in build_method(source["method"]).params()


def measure_row(label: str, source: dict, model, data, ratio, budget, encoder, out, force, where=None) -> dict:
    """One row of the table; ``where``: the device and dtype (``{"device": ..., "dtype": ...}``)."""
    where = where or {}
    if not _takes_ratio(source):  # gist: its compression is set by the sentences, not by r
        ratio = None
    base = dict(model=model, data=data, ratios=() if ratio is None else (ratio,), **source, **where)
    ppl_cfg = EvalConfig(max_tokens=budget.ppl_tokens, verify=True, **base)
    ppl = cached(out, "eval-perplexity", asdict(ppl_cfg), force, lambda: run_eval(ppl_cfg))[0]
    cont_cfg = EvalConfig(
        task="continuation",
        docs=budget.docs,
        prefix_tokens=budget.prefix_tokens,
        new_tokens=budget.new_tokens,
        bertscore_encoder=encoder,
        **base,
    )
    cont = cached(out, "eval-continuation", asdict(cont_cfg), force, lambda: run_eval(cont_cfg))[0]
    for r in (ppl, cont):
        r["label"] = label
    row = {
        "label": label,
        "kv_kept": ppl["compression_ratio"],
        "perplexity": ppl["perplexity"],
        "rouge_l": cont["rouge_l"],
        "bertscore_f1": cont.get("bertscore_f1"),
        "decode_speedup": 1.0,
        "verify": ppl.get("verify", {}).get("max_abs_diff"),
    }
    if source.get("method") != "full":
        bench_cfg = BenchConfig(
            method=source.get("method", "sentinel"),
            ratio=ratio,
            checkpoint=source.get("checkpoint"),
            model=model,
            data=data,
            contexts=[budget.context],
            batches=[budget.batch],
            decode_steps=budget.steps,
            **where,
        )
        bench = cached(out, "bench", asdict(bench_cfg), force, lambda: run_bench(bench_cfg))
        row["decode_speedup"] = bench["decode_speedup"]
        row["noisy"] = bench.get("noisy", False)  # each ratio is paired with its own full reference, interleaved
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | KV kept | perplexity | ROUGE-L | BERTScore | decode speedup |", "|---|---|---|---|---|---|"]
    for r in rows:
        bert = f"{r['bertscore_f1']:.4f}" if r["bertscore_f1"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['kv_kept']:.3f} | {r['perplexity']:.2f} | {r['rouge_l']:.4f} | {bert} | "
            f"{r['decode_speedup']:.2f}x{' (noisy)' if r.get('noisy') else ''} |"
        )
    if any(r.get("noisy") for r in rows):
        lines.append(
            "\n(noisy): the paired decode steps of that row disagreed (a busy machine); rerun with --force when idle"
        )
    return "\n".join(lines)


def side_by_side(
    model_name: str, data: str, checkpoints: Path, ratio: float, budget: DemoBudget, where: dict | None = None
) -> str:
    """One continuation of a held-out document prefix with the full cache and with the sentinel cache."""
    where = where or {}
    base = load(method="full", model=model_name, **where)
    model, tokenizer = base.model, base.tokenizer
    prompt = tokenize(load_split(data, "test")[0].text, tokenizer)[: budget.show_prompt]
    shown = tokenizer.decode(prompt.ids[-60:].tolist())
    full = generate(model, tokenizer, build_method("full"), {}, prompt, budget.show_new, progress=False)
    ck = checkpoints / f"sentinel-r{ratio}"
    if (ck / ADAPTER).exists() and (ck / META).exists():
        got = load(ck, params={"ratio": ratio}, model=model_name, **where)
        model, tokenizer, method, token_ids = got.model, got.tokenizer, got.method, got.token_ids
        name = "trained sentinel"
    else:
        method = build_method("sentinel", ratio=ratio)
        token_ids = add_special_tokens(model, tokenizer, method.special_tokens)
        name = "untrained sentinel"
    comp = generate(model, tokenizer, method, token_ids, prompt, budget.show_new, progress=False)
    return (
        f"prompt: {len(prompt)} tokens of a held-out article, ending ...{shown!r}\n\n"
        f"[full attention] KV {full.kv_bytes:,} bytes\n  {full.text!r}\n\n"
        f"[{name}, r={ratio}] KV {comp.kv_bytes:,} bytes ({comp.kv_bytes / full.kv_bytes:.2f}x of full)\n"
        f"  {comp.text!r}\n"
    )


def ccm_chat(checkpoints: Path, out: Path, model_name: str | None, turns: int = 8, where: dict | None = None) -> str:
    """A held-out chitchat conversation fed turn by turn into CCM memory (when the CCM checkpoints exist): the
    memory after every turn, and the real last turn's perplexity from memory against no memory and full context."""
    import math

    from .data.episodes import load_episodes
    from .report import write_json
    from .session import MemorySession

    names = [n for n in ("merge-chitchat", "concat-chitchat") if (checkpoints / n / "kvcondense.json").exists()]
    if not names:
        return ""
    episode = next(e for e in load_episodes("chitchat", "test") if len(e.chunks) >= turns).truncated(turns)
    lines, records = [f"A held-out chat of {turns} turns, fed turn by turn into compressed memory:"], []
    for name in names:
        session = MemorySession.from_checkpoint(checkpoints / name, model_name, **(where or {}))
        by_turn, slots = [], []
        for chunk in episode.chunks:
            session.feed(chunk)
            by_turn.append(session.memory_bytes())
            slots.append(session.memory_slots())
        nll, n = session.score(episode.query, episode.answer)
        reply = session.answer(episode.query, max_new_tokens=24)
        lines.append(f"  {name}: slots after each turn {slots}; last-turn perplexity {math.exp(nll / n):.1f}")
        lines.append(f"    reply from memory: {reply.strip()!r}")
        setting = {"checkpoint": str(checkpoints / name), "model": model_name, "data": "chitchat", "split": "test"}
        records.append(
            {"kind": "memory_by_turn", "method": session.method.name, "label": name, "memory_by_turn": by_turn,
             "config": setting}
        )  # fmt: skip
    lines.append(f"    the real last turn: {episode.answer.strip()!r}")
    write_json(out / "ccm-chat" / "result.json", {"results": records})
    return "\n".join(lines)


def run_demo(
    quick: bool = False,
    max_tokens: int | None = None,
    model: str | None = None,
    data: str = "wiki",
    checkpoints: str | Path | None = None,
    out: str | Path = "runs/demo",
    bertscore_encoder: str | None = None,
    force: bool = False,
    ratio: float = 0.5,
    device: str | None = None,
    dtype: str | None = None,
) -> int:
    budget = QUICK if quick else DemoBudget()
    where = {"device": device, "dtype": dtype}
    if max_tokens:
        budget = replace(budget, ppl_tokens=max_tokens)
    model_name = model or DEFAULT_MODEL
    checkpoints, out = Path(checkpoints or CHECKPOINTS), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    todo = demo_rows(checkpoints, ratio)
    with tqdm(todo, desc="demo rows", unit="row") as bar:  # the bar's ETA is the whole table's
        for label, source in bar:
            bar.set_postfix_str(label)
            rows.append(measure_row(label, source, model, data, ratio, budget, bertscore_encoder, out, force, where))
    text = table(rows)
    gen = side_by_side(model_name, data, checkpoints, ratio, budget, where)
    chat = ccm_chat(checkpoints, out, model, where=where) if not quick else ""
    report, pngs = write_report([out], out / "report")
    summary = (
        f"Held-out {data} test split, r = {ratio}: perplexity over text tokens ({budget.ppl_tokens} tokens, "
        f"blocks of 256), continuation after a {budget.prefix_tokens}-token prefix ({budget.docs} documents, "
        f"{budget.new_tokens} new tokens), decode speedup at {budget.context} tokens x batch {budget.batch}."
    )
    (out / "table.md").write_text(summary + "\n\n" + text + "\n")
    (out / "generation.txt").write_text(gen)
    print("\n" + summary + "\n\n" + text)
    print(
        "\nverify (parallel vs evicting cache, max |logit diff|): "
        + ", ".join(f"{r['label']}: {r['verify']:.1e}" for r in rows if r["verify"] is not None)
    )
    print("\n" + gen)
    if chat:
        (out / "chat.txt").write_text(chat + "\n")
        print(chat + "\n")
    print(f"table, generation, report and plots written under {out}/ ({', '.join(p.name for p in pngs)})")
    return 0
