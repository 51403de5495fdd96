"""How far latency follows token count in a bench-sized layer stack, with tokens removed for free.

    python benchmarks/token_scaling.py [--family blip] [--repeats 30] [--json out.json]

The speed rule of the bench asks a trimmed model to run at least 0.85x its executed-FLOPs
reduction faster than the untrimmed one. This script measures the best any token trimming can do
on these model sizes, on this CPU, with one thread: the encoder layers of a bench model (the real
Hugging Face layer classes, random weights; timing does not depend on them) called directly on
``[B, L, D]`` hidden states of length L and of shorter lengths, with no trimmer, no gather and no
mask. All lengths of one batch size are timed round-robin, so they share the machine's noise
(medians of ``--repeats`` rounds).

Per batch size and length it prints the FLOPs ratio of the stack (counted by the profiler on the
executed operations), the latency speedup and their quotient, the "ceiling" of the speed rule:
below 0.85 no trimming of this stack can meet the rule at that batch size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from trimkit.bench.base import default_recipe
from trimkit.bench.models import ModelConfig, build_model
from trimkit.profile import count_flops

# vocabulary and label count only size the embeddings and the head, which are not timed
_VOCAB, _LABELS = 39, 20


class _Stack(nn.Module):
    """The layers of one encoder, called one after the other on hidden states only."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out = layer(hidden_states)
            hidden_states = out[0] if isinstance(out, (tuple, list)) else out
        return hidden_states


def _encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ``ModuleList`` of the model (the encoder layers of its widest stream)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise SystemExit("no layer list found in the model")
    return max(lists, key=lambda item: len(item[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="blip", choices=("blip", "bridgetower", "vilt"))
    ap.add_argument("--length", type=int, default=None, help="full sequence length (default: the family's)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reductions", default="1.5,2,3")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    size, _, _ = default_recipe(args.family, "vqa")  # the bench models' sizes; image and text: the defaults
    config = ModelConfig(family=args.family, vocab_size=_VOCAB, num_labels=_LABELS, **size)
    model = build_model(config).eval()
    name, layers = _encoder_layers(model)
    patches = (config.image // config.patch) ** 2 + 1
    full = args.length or (patches + config.max_text_len if args.family == "vilt" else patches)
    stack = _Stack(layers).eval()
    width = config.hidden
    out: dict = {"family": args.family, "layers": name, "count": len(layers), "width": width, "length": full,
                 "threads": 1, "torch": torch.__version__, "rows": []}
    print(f"{args.family}: {len(layers)} layers of {name}, width {width}, full length {full}, one thread")
    print(f"{'batch':>5} {'length':>6} {'FLOPs ÷':>8} {'speedup':>8} {'ceiling':>8}")
    torch.manual_seed(0)
    for batch in (int(b) for b in args.batches.split(",")):
        lengths = [full] + [max(1, round(full / float(r))) for r in args.reductions.split(",")]
        xs = [torch.randn(batch, n, width) for n in lengths]
        flops = [count_flops(stack, {"hidden_states": x}).flops for x in xs]
        times: list[list[float]] = [[] for _ in xs]
        with torch.inference_mode():
            for round_ in range(args.repeats + 3):  # three warm-up rounds
                for x, bucket in zip(xs, times):
                    start = time.perf_counter()
                    stack(x)
                    if round_ >= 3:
                        bucket.append((time.perf_counter() - start) * 1e3)
        full_ms = statistics.median(times[0])
        for n, f, bucket in zip(lengths[1:], flops[1:], times[1:]):
            ms = statistics.median(bucket)
            row = {"batch": batch, "length": n, "flops_reduction": flops[0] / f, "speedup": full_ms / ms,
                   "full_ms": full_ms, "short_ms": ms}
            row["ceiling"] = row["speedup"] / row["flops_reduction"]
            out["rows"].append(row)
            print(f"{batch:>5} {n:>6} {row['flops_reduction']:>8.2f} {row['speedup']:>8.2f} {row['ceiling']:>8.2f}"
                  f"   ({full_ms:.2f} -> {ms:.2f} ms)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
