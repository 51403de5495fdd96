"""bfloat16 against float32 training on CPU: the same SmartTrim run (vilt-vqa-tiny on synthetic VQA,
fixed seeds) trained and evaluated in each precision; prints accuracy, executed-FLOPs ratio, step time
and peak resident memory per run, and the paired accuracy difference per seed.

    OMP_NUM_THREADS=1 python benchmarks/precision_check.py --steps 150 --seeds 0 1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from trimkit.evaluate import evaluate
from trimkit.train import TrainConfig, train

RECIPE = '[[pass]]\nname = "smarttrim.tokens"\ntarget_ratio = 0.5\n'


def one_run(dtype: str, seed: int, steps: int, train_n: int, test_n: int, work: Path) -> dict:
    config = TrainConfig(batch_size=16, seed=seed, dtype=dtype, measure_every=0, calibrate=128)
    started = time.perf_counter()
    result = train("vilt-vqa-tiny", f"synthetic:vqa?n={train_n}&seed={seed}", target_ratio=0.5, steps=steps,
                   recipe=RECIPE, config=config, out_dir=work / f"{dtype}-{seed}", progress=False)
    seconds = time.perf_counter() - started
    report = evaluate(work / f"{dtype}-{seed}", f"synthetic:vqa?n={test_n}&split=test", samples=16, latency=False,
                      dtype=dtype)
    return {"dtype": dtype, "seed": seed, "accuracy": report["metric"]["value"], "items": report["items"],
            "flops_ratio": report["flops_ratio"], "s_per_step": seconds / steps,
            "peak_mib": result.history[-1]["peak_mib"], "final_loss": result.history[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-n", type=int, default=2000)
    ap.add_argument("--test-n", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for dtype in ("float32", "bfloat16"):
                rows.append(one_run(dtype, seed, args.steps, args.train_n, args.test_n, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    for seed in args.seeds:
        a, b = (next(r for r in rows if r["seed"] == seed and r["dtype"] == d) for d in ("float32", "bfloat16"))
        n = a["items"]
        se = math.sqrt(a["accuracy"] * (1 - a["accuracy"]) / n + b["accuracy"] * (1 - b["accuracy"]) / n)
        print(f"seed {seed}: bf16 - fp32 accuracy {b['accuracy'] - a['accuracy']:+.4f} "
              f"(+-{1.96 * se:.4f}, unpaired 95% on {n} items)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
