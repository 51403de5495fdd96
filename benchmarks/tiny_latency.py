"""Executed FLOPs and latency of SmartTrim (tokens + heads) on every tiny backbone, before/after.

    python benchmarks/tiny_latency.py [--batch 1 --batch 8] [--image 128] [--repeats 30] [--json out.json]

The trimmers are untrained, so their scoring layer is replaced by a seeded random one that keeps
about half the tokens and heads at threshold 0.5 ("half"); threshold 1.0 prunes everything that
may be pruned ("all"). FLOPs: profiler, per sample. Latency: interleaved medians against the same
model with every trimmer off, one thread, after warm-up, in one process.

Before any pass is applied, each model's own batch-1 and batch-8 latencies give ``row_share_b1``:
the part of a batch-1 forward that grows with the rows, ``(t8 - t1) / 7 / t1``. The rest is fixed
per call (Python, dispatch, kernel launch), and no token or head trimming can remove it: at batch 1,
trimming away half of everything per row saves at most ``row_share_b1 / 2`` of the latency.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))

from trimkit.backbones import load_backbone  # noqa: E402
from trimkit.passes import apply_  # noqa: E402
from trimkit.passes.smarttrim import SmartTrimTokensConfig  # noqa: E402
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig  # noqa: E402
from trimkit.profile import count_flops, measure_latency  # noqa: E402
from trimkit.runtime import set_threshold, state, trimming_off  # noqa: E402

MODELS = ["blip-vqa-tiny", "blip-itm-tiny", "bridgetower-itm-tiny", "vilt-vqa-tiny", "clip-tiny", "siglip-tiny",
          str(ROOT / "tests/models/toy_vlms.py") + ":two_stream", str(ROOT / "tests/models/toy_vlms.py") + ":single_stream"]


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        trimmer = state.TOKEN_TRIMMERS in name or state.HEAD_TRIMMERS in name
        if trimmer and name.endswith(".weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[-1] ** 0.5)
        elif trimmer and name.endswith(".bias"):
            with torch.no_grad():
                p.zero_()


class Untrimmed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        with trimming_off(self.model):
            return self.model(**kw)


def ratio_latency(model, inputs, repeats: int) -> float:
    full = Untrimmed(model)
    times = {"a": [], "b": []}
    for _ in range(3):  # interleave whole measurements too
        times["a"].append(measure_latency(full, inputs, repeats=repeats, warmup=3))
        times["b"].append(measure_latency(model, inputs, repeats=repeats, warmup=3))
    a, b = sorted(times["a"])[1], sorted(times["b"])[1]
    return a / b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--models", default="")
    ap.add_argument("--image", type=int, default=None, help="image side for the measured inputs (default: native)")
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    models = [m for m in MODELS if not args.models or any(k in m for k in args.models.split(","))]
    torch.set_num_threads(1)
    rows = []
    for ref in models:
        bb = load_backbone(ref)
        model = bb.model.eval()
        extra = {"image_size": args.image} if args.image else {}
        t1, t8 = (statistics.median(measure_latency(model, bb.example_inputs(b, seed=3, **extra),
                                                    repeats=args.repeats, warmup=3) for _ in range(3))
                  for b in (1, 8))
        share = {"row_share_b1": (t8 - t1) / 7 / t1, "full_ms_b1": t1, "full_ms_b8": t8}
        apply_(model, [SmartTrimTokensConfig(), SmartTrimHeadsConfig()], inputs=bb.example_inputs(4), hints=bb.hints)
        randomise(model)
        for label, thr in (("half", 0.5), ("all", 1.0)):
            set_threshold(model, thr)
            row = {"model": ref.rsplit("/", 1)[-1], "setting": label, "image": args.image or "native", **share}
            for b in batches:
                inputs = bb.example_inputs(b, seed=3, **extra)
                with torch.no_grad():
                    after = count_flops(model, inputs).flops
                    with trimming_off(model):
                        before = count_flops(model, inputs).flops
                row[f"flops_ratio_b{b}"] = after / before
                row[f"speedup_b{b}"] = ratio_latency(model, inputs, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
