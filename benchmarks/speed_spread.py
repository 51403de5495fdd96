"""How evenly the speed table's random SmartTrim keeps work across rows, per global-term scale.

    python benchmarks/speed_spread.py [--model blip] [--reduction 2] [--scale 1 --scale 0.25 ...]
        [--calib 8] [--rows 8] [--batch 32] [--layers 4] [--json out.json]

The speed table times SmartTrim with random scorers (``--decisions raw``: as they come; ``centred``:
centred per row plus a fixed per-position offset, the speed table's default) (``trimkit bench --speed``). A batch runs as
fast as its longest row allows, so how far apart the rows' kept amounts are decides the batch speed
as much as the mean does. For each ``--scale`` (``SpeedConfig.global_scale``: the random token
scorers' weight on the global states) this builds the variant as the speed table does, calibrated
on ``--calib`` single rows, then counts with the profiler the executed FLOPs of ``--rows`` other
single rows and of the whole padded ``--batch``. It prints per-row reductions, their max/min and
the padded batch's reduction next to the per-sample one.

Trained trimmers for comparison: the per-item executed FLOPs of the protocol runs
(``benchmarks/results/protocol/*/<model>-smarttrim-*.json``, ``test.flops``: min, p50, p95, max).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from trimkit.bench.published import published_model
from trimkit.bench.speed import SpeedConfig, build_variant, flops_of, row_slice


def spreads(model: str, reduction: float, scales: list[float], calib_n: int, rows_n: int, batch: int,
            layers: int, tiny: bool = False, emit=print, decisions: str = "raw") -> list[dict]:
    spec = published_model(model)
    base = SpeedConfig(models=(spec.name,), methods=("smarttrim",), reductions=(reduction,), layers=layers,
                       calib_rows=calib_n, decisions=decisions)
    bb = spec.build(layers, seed=base.seed, tiny=tiny)
    text_len = 8 if tiny else spec.text_len
    calib_x = bb.example_inputs(calib_n, text_len=text_len, seed=base.seed + 20)
    calib = [row_slice(calib_x, i, i + 1) for i in range(calib_n)]
    calib_clean = flops_of(bb.model, calib)
    x = bb.example_inputs(max(batch, rows_n), text_len=text_len, seed=base.seed + 10)
    rows = [row_slice(x, i, i + 1) for i in range(rows_n)]
    clean = flops_of(bb.model, rows)
    big = row_slice(x, 0, batch) if batch > 1 else None
    clean_big = flops_of(bb.model, [big])[0] if big is not None else None
    apply_inputs = bb.example_inputs(2, text_len=text_len, seed=base.seed + 30)
    results = []
    for scale in scales:
        variant = build_variant(bb, "smarttrim", reduction, replace(base, global_scale=scale), apply_inputs,
                                calib, calib_clean)
        out = {"model": {"name": bb.name, "tiny": True} if tiny else spec.describe(layers), "scale": scale,
               "decisions": decisions, "target": reduction}
        if variant.model is None:
            out["error"] = variant.error
        else:
            trimmed = flops_of(variant.model, rows)
            per_row = [c / t for c, t in zip(clean, trimmed)]
            out.update(variant.record, per_row_reduction=[round(r, 3) for r in per_row],
                       reduction=sum(clean) / sum(trimmed), max_over_min=max(per_row) / min(per_row))
            if big is not None:
                out["padded_batch"] = {"batch": batch, "reduction": clean_big / flops_of(variant.model, [big])[0]}
        results.append(out)
        emit(out)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="blip")
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--scale", type=float, action="append")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--decisions", default="raw", help="raw or centred (SpeedConfig.decisions)")
    ap.add_argument("--json")
    ap.add_argument("--tiny", action="store_true", help="the registry's tiny config (a check of this script)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: list[dict] = []

    def emit(record: dict) -> None:
        results.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=1)

    spreads(args.model, args.reduction, args.scale or [1.0, 0.25, 0.0], args.calib, args.rows, args.batch,
            args.layers, args.tiny, emit, args.decisions)


if __name__ == "__main__":
    main()
