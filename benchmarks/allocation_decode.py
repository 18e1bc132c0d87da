"""What budgets per layer cost a decode step: scored-heads with equal counts per head against budgets per layer.

    .venv/bin/python benchmarks/allocation_decode.py [--context 1024] [--batch 1 8] [--kept 0.5] [--steps 16]

The same held-out wiki context is prefilled once per variant through the library's engine: full attention,
``scored-heads --allocate head`` (every layer stores the same number of slots) and ``scored-heads --allocate layer``
(each layer its own number: an attention wrapper narrows the shared mask per layer, see
:mod:`kvcondense.layer_widths`). Each prefilled stream is cloned into ``batch`` rows and decoded, the variants' steps
interleaved (``kvcondense.bench``'s timing), so a busy machine slows all alike. Prints, per batch, each variant's
median ms per step, its KV bytes, and the ratios that matter: layer / head step time (the wrapper's cost at equal
memory) and full / layer (the speedup over full attention).
"""

from __future__ import annotations

import argparse

import torch

from kvcondense.bench import measure_decode, timed_prefill
from kvcondense.data import load_split
from kvcondense.methods import build_method
from kvcondense.models import load_model
from kvcondense.prefix_task import prefix_windows


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kept", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    (context, _), = prefix_windows(load_split("wiki", "test"), tokenizer, args.context, 1, 1)  # fmt: skip
    ratio = 1 - args.kept
    variants = {
        "full": build_method("full"),
        "head": build_method("scored-heads", ratio=ratio, allocate="head"),
        "layer": build_method("scored-heads", ratio=ratio, allocate="layer"),
    }
    streams, stored = {}, {}
    for name, method in variants.items():
        streams[name], info = timed_prefill(model, method, context, {}, 512)
        stored[name] = info["kv_bytes"]
        print(f"{name:>6}: prefill {info['prefill_s']:.2f} s, KV {info['kv_bytes'] / 2**20:.2f} MiB")
    for batch in args.batch:
        got = measure_decode(streams, batch, args.steps)
        ms = {name: got[name]["decode_ms_per_step"] for name in variants}
        print(
            f"batch {batch}: ms/step full {ms['full']:.1f}, head {ms['head']:.1f}, layer {ms['layer']:.1f}; "
            f"layer / head {ms['layer'] / ms['head']:.3f}, full / layer {ms['full'] / ms['layer']:.3f}, "
            f"KV layer / head {stored['layer'] / stored['head']:.3f}"
        )


if __name__ == "__main__":
    main()
