"""Where a trimmed published-size model's time goes, against a clean copy, at batch 1 and a large batch.

    python benchmarks/speed_profile.py --model bridgetower --reduction 2 --batch 1 --batch 32 [--layers 4]
        [--method smarttrim] [--repeat 1] [--json out.json]

Builds the variant exactly as ``trimkit bench --speed`` does (random weights, SmartTrim's scorers
randomised and its threshold calibrated on the profiler's executed FLOPs), then, with one thread,
profiles one forward of the clean copy and one of the variant at each batch size (after a warm-up)
and splits the self time of the executed operators into categories. With ``R`` the executed-FLOPs
reduction per sample, a perfect speedup would run each category in ``clean / R``; the *excess* of a
category is ``trimmed - clean / R``, and the excesses add up to the time that keeps the speedup
below ``R`` (``unaccounted``: wall time outside any operator -- Python, hooks, dispatch).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from trimkit.bench.published import published_model
from trimkit.bench.speed import SpeedConfig, build_variant, flops_of, row_slice

CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_softmax", "aten::_safe_softmax"),
    "conv": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv"),
    "norm+activation": ("aten::native_layer_norm", "aten::gelu", "aten::erf", "aten::tanh"),
    "indexing+copies": ("aten::index", "aten::gather", "aten::scatter", "aten::nonzero", "aten::masked_fill",
                        "aten::where", "aten::cat", "aten::copy_", "aten::clone", "aten::_to_copy", "aten::zeros",
                        "aten::new_zeros", "aten::fill_", "aten::zero_", "aten::empty", "aten::index_copy",
                        "aten::index_select", "aten::cumsum", "aten::sort", "aten::topk", "aten::arange",
                        "aten::_index_put", "aten::index_put", "aten::eq", "aten::ne", "aten::lt", "aten::gt",
                        "aten::logical", "aten::any", "aten::all", "aten::sum", "aten::item", "aten::_local_scalar"),
    "elementwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::mean", "aten::sigmoid"),
}


def category(key: str) -> str:
    for name, prefixes in CATEGORIES.items():
        if key.startswith(prefixes):
            return name
    return "other"


def profile_once(model, inputs, repeat: int = 1) -> dict:
    """Self time per category of `repeat` profiled forwards (after one warm-up), per forward."""
    with torch.inference_mode():
        model(**inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeat):
                model(**inputs)
            wall = (time.perf_counter() - start) * 1e3 / repeat
    by: dict[str, float] = {}
    ops, top = 0, {}
    for row in prof.key_averages():
        c = category(row.key)
        by[c] = by.get(c, 0.0) + row.self_cpu_time_total / 1e3 / repeat
        ops += row.count // repeat
        top[row.key] = (row.self_cpu_time_total / 1e3 / repeat, row.count // repeat)
    by["unaccounted"] = max(0.0, wall - sum(by.values()))
    return {"wall_ms": wall, "ops": ops, "ms": by,
            "top": sorted(([k, round(v[0], 2), v[1]] for k, v in top.items()), key=lambda t: -t[1])[:15]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bridgetower")
    ap.add_argument("--method", default="smarttrim")
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--repeat", type=int, default=1, help="profiled forwards per model and batch (times are per forward)")
    ap.add_argument("--json")
    ap.add_argument("--tiny", action="store_true", help="the registry's tiny config (a check of this script)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = published_model(args.model)
    config = SpeedConfig(models=(spec.name,), methods=(args.method,), reductions=(args.reduction,), layers=args.layers)
    bb = spec.build(args.layers, seed=config.seed, tiny=args.tiny)
    text_len = 8 if args.tiny else spec.text_len
    batches = args.batch or [1, 32]
    inputs = bb.example_inputs(max(*batches, 4), text_len=text_len, seed=config.seed + 10)  # 4 rows count FLOPs
    calib = [row_slice(bb.example_inputs(2, text_len=text_len, seed=config.seed + 20), i, i + 1) for i in range(2)]
    variant = build_variant(bb, args.method, args.reduction, config, bb.example_inputs(2, text_len=text_len,
                                                                                      seed=config.seed + 30),
                            calib, flops_of(bb.model, calib))
    if variant.model is None:
        raise SystemExit(variant.error)
    rows = [row_slice(inputs, i, i + 1) for i in range(4)]
    clean_f, trim_f = flops_of(bb.model, rows), flops_of(variant.model, rows)
    out = {"model": spec.describe(args.layers), "method": args.method, "target": args.reduction, "repeat": args.repeat,
           "flops_reduction": sum(clean_f) / sum(trim_f), **variant.record}
    for b in batches:
        x = row_slice(inputs, 0, b)
        clean, trimmed = profile_once(bb.model, x, args.repeat), profile_once(variant.model, x, args.repeat)
        padded = sum(flops_of(bb.model, [x])) / sum(flops_of(variant.model, [x]))
        r = out["flops_reduction"]
        excess = {c: trimmed["ms"].get(c, 0.0) - clean["ms"].get(c, 0.0) / r
                  for c in sorted(set(clean["ms"]) | set(trimmed["ms"]))}
        out[f"batch_{b}"] = {"clean": clean, "trimmed": trimmed, "padded_flops_reduction": padded,
                             "speedup_profiled": clean["wall_ms"] / trimmed["wall_ms"],
                             "excess_ms": {k: round(v, 2) for k, v in sorted(excess.items(), key=lambda t: -t[1])}}
        print(json.dumps({"batch": b, "speedup": out[f"batch_{b}"]["speedup_profiled"], "reduction": r,
                          "padded": padded, "excess_ms": out[f"batch_{b}"]["excess_ms"]}), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
