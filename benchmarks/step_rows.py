"""What a 2-token decode step costs against a 1-token step, at a batch size, in one run.

    .venv/bin/python benchmarks/step_rows.py [--model smollm2-135m] [--batch 8] [--repeats 7]

A sentinel decode step that closes a span feeds the token and its ``<CR>`` together: every projection of the model
then multiplies ``2 x batch`` rows instead of ``batch``. On a GPU that costs about nothing; on a CPU it depends on
the BLAS, which picks its kernel by the number of rows. This prints, for the model's own projection shapes (all of
them: attention and MLP, every layer, so that the weights stream from memory as in a real step):

- the time of one pass over every projection with ``batch`` rows and with ``2 x batch`` rows, and their ratio;
- the same for a whole decode step of the model over an empty cache (1 token vs 2 tokens per row), and its ratio.

A ratio near 1 means a 2-token step is nearly free; ``kvcondense bench``'s decode speedup at ``--batch B`` then
has room above the attention saving alone. The variants run in turn, ``--repeats`` rounds; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcondense.models import load_model


def projections(model) -> list[torch.Tensor]:
    """The weight of every linear layer of the decoder (LM head left out: a step computes one row of it)."""
    return [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]


@torch.no_grad()
def linear_pass(weights: list[torch.Tensor], rows: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    t = time.perf_counter()
    for w in weights:
        torch.nn.functional.linear(xs[w.shape[1]], w)
    return time.perf_counter() - t


@torch.no_grad()
def model_step(model, batch: int, tokens: int) -> float:
    ids = torch.randint(0, 1000, (batch, tokens))
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    model.eval()
    weights = projections(model)
    times: dict[str, list[float]] = {k: [] for k in ("lin1", "lin2", "step1", "step2")}
    for _ in range(2):  # warm-up
        linear_pass(weights, args.batch), model_step(model, args.batch, 1)
    for _ in range(args.repeats):
        times["lin1"].append(linear_pass(weights, args.batch))
        times["lin2"].append(linear_pass(weights, 2 * args.batch))
        times["step1"].append(model_step(model, args.batch, 1))
        times["step2"].append(model_step(model, args.batch, 2))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {len(weights)} projections")
    print(f"projections, {args.batch} rows: {med['lin1']:.1f} ms; {2 * args.batch} rows: {med['lin2']:.1f} ms; "
          f"ratio {med['lin2'] / med['lin1']:.2f}")  # fmt: skip
    print(f"model step, 1 token/row: {med['step1']:.1f} ms; 2 tokens/row: {med['step2']:.1f} ms; "
          f"ratio {med['step2'] / med['step1']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
