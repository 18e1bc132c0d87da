"""The plain-text table ``kvcondense eval`` prints: one row per result, columns chosen by the task."""

from __future__ import annotations


def format_table(results: list[dict]) -> str:
    """A plain-text table of results (one row each)."""
    if results and results[0].get("task") == "memory":
        from .memory_eval import format_memory_table

        return format_memory_table(results)
    if results and results[0].get("task") == "prefix":
        head = (
            f"{'method':<28} {'budget':>6} {'KV kept':>8} {'ppl':>8} {'full ppl':>8} {'KL to full':>10} {'tokens':>7}"
        )
        rows = [head, "-" * len(head)]
        for r in results:
            budget = "-" if r.get("kv_budget") is None else f"{r['kv_budget']:.3f}"
            rows.append(
                f"{r['label']:<28} {budget:>6} {r['kv_kept']:>8.3f} {r['perplexity']:>8.3f} "
                f"{r['full_perplexity']:>8.3f} {r['kl_to_full']:>10.4f} {r['tokens_scored']:>7}"
            )
        for r in results:
            if "kl_to_base" in r:  # --reference on a checkpoint: against the model it was trained from
                rows.append(f"  {r['label']} at {r['kv_kept']:.3f}: KL to the base model {r['kl_to_base']:.4f}, "
                            f"base perplexity {r['base_perplexity']:.3f}")  # fmt: skip
        rows.append(f"({results[0]['windows']} windows, {results[0]['seconds']} s for the first row)")
        return "\n".join(rows)
    if results and results[0].get("task") in ("qa", "needle"):
        head = f"{'method':<28} {'budget':>6} {'KV kept':>8} {'accuracy':>8} {'options':>8} {'generate':>8}"
        head += f" {'questions':>9}"
        rows = [head, "-" * len(head)]
        for r in results:
            budget = "-" if r.get("kv_budget") is None else f"{r['kv_budget']:.3f}"
            opt, gen = (f"{r[k]:.3f}" if k in r else "-" for k in ("accuracy_options", "accuracy_generate"))
            rows.append(
                f"{r['label']:<28} {budget:>6} {r['kv_kept']:>8.3f} {r['accuracy']:>8.3f} {opt:>8} {gen:>8} "
                f"{r['questions']:>9}"
            )
        rows.append(f"({results[0]['contexts']} contexts, each compressed once; {results[0]['seconds']} s per row)")
        return "\n".join(rows)
    if results and results[0].get("task") == "continuation":
        head = f"{'method':<28} {'ratio':>5} {'KV kept':>8} {'ROUGE-L':>8} {'BERTScore':>9} {'docs':>5}"
        rows = [head, "-" * len(head)]
        for r in results:
            bert = f"{r['bertscore_f1']:.4f}" if "bertscore_f1" in r else "-"
            rows.append(
                f"{r['label']:<28} {r['params'].get('ratio', '-')!s:>5} {r['kv_kept_generation']:>8.3f} "
                f"{r['rouge_l']:>8.4f} {bert:>9} {r['documents']:>5}"
            )
        return "\n".join(rows)
    head = f"{'method':<28} {'ratio':>5} {'KV kept':>8} {'perplexity':>10} {'tokens':>7} {'KV bytes':>10}"
    rows = [head, "-" * len(head)]
    for r in results:
        ratio = r["params"].get("ratio", "-")
        rows.append(
            f"{r['label']:<28} {ratio!s:>5} {r['compression_ratio']:>8.3f} {r['perplexity']:>10.3f} "
            f"{r['tokens_scored']:>7} {r['kv_bytes']:>10}"
        )
        if "perplexity_with_special_targets" in r:
            rows.append(
                f"  perplexity with special-token targets (easier, not comparable): "
                f"{r['perplexity_with_special_targets']:.3f}; R_c {r.get('R_c', 0):.2f} regular tokens per special"
            )
        for b in r.get("perplexity_by_prefix", []):
            if b["tokens"]:
                rows.append(
                    f"  prefix <= {b['prefix_upto']:>6}: perplexity {b['perplexity']:.3f} ({b['tokens']} tokens)"
                )
        if "verify" in r:
            rows.append(f"  verify: max_abs_diff {r['verify']['max_abs_diff']:.2e}")
    return "\n".join(rows)
