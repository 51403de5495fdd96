"""How much of SmartTrim's executed-FLOPs reduction a padded batch keeps, per way of running heads.

    python benchmarks/speed_padding.py [--model vilt] [--reduction 3] [--batch 32] [--layers 4] [--json out.json]

Builds the SmartTrim variant as ``trimkit bench --speed`` does, once with ``smarttrim.heads``
``batched="union"`` (the default: the heads any row keeps, dropped ones zeroed per row) and once
with ``batched="rows"`` (each row's own heads, per-row weights), and counts executed FLOPs per
sample (profiler) for single rows and for the whole padded batch. The gap between ``per_sample`` and
``padded`` is what the batch computes beyond its rows run alone: token padding to the longest kept
row, plus the union of heads in ``union`` mode. ``--rounds N`` also times the clean copy and both
variants on the batch, interleaved (one thread, medians of N rounds).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from trimkit.bench.published import published_model
from trimkit.bench.speed import SpeedConfig, build_variant, flops_of, interleaved_times, row_slice
from trimkit.runtime import trim_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vilt")
    ap.add_argument("--reduction", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = published_model(args.model)
    bb = spec.build(args.layers, seed=0)
    x = bb.example_inputs(args.batch, text_len=spec.text_len, seed=10)
    calib = [row_slice(bb.example_inputs(2, text_len=spec.text_len, seed=20), i, i + 1) for i in range(2)]
    calib_clean, apply_inputs = flops_of(bb.model, calib), bb.example_inputs(2, text_len=spec.text_len, seed=30)
    clean = flops_of(bb.model, [x])[0]
    rows = [row_slice(x, i, i + 1) for i in range(4)]
    clean_rows = flops_of(bb.model, rows)
    out, models = {}, {"clean": bb.model}
    for mode in ("union", "rows"):
        config = SpeedConfig(models=(spec.name,), layers=args.layers, heads_batched=mode)
        v = build_variant(bb, "smarttrim", args.reduction, config, apply_inputs, calib, calib_clean)
        if v.model is None:
            raise SystemExit(v.error)
        out[mode] = {"per_sample": sum(clean_rows) / sum(flops_of(v.model, rows)),
                     "padded": clean / flops_of(v.model, [x])[0], **v.record}
        with torch.no_grad():
            v.model(**x)
        out[mode]["kept"] = trim_stats(v.model)
        models[mode] = v.model
        print(mode, json.dumps({k: out[mode][k] for k in ("per_sample", "padded")}), flush=True)
    if args.rounds:
        times = interleaved_times(models, x, args.rounds)
        med = {k: statistics.median(t) for k, t in times.items()}
        for mode in ("union", "rows"):
            out[mode]["latency_ms"] = {"clean": times["clean"], "trimmed": times[mode]}
            out[mode]["speedup"] = med["clean"] / med[mode]
            print(mode, "speedup", round(out[mode]["speedup"], 3), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
