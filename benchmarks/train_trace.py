"""Train one bench SmartTrim point with a per-step log, then print what each layer keeps.

    python benchmarks/train_trace.py vilt truefalse 0.5 2 [--dual-lr 0.1] [--logit-penalty 0.01]

Same base model, recipe and training settings as ``trimkit bench`` for that family, task, target
ratio and seed (tokens and heads, one thread); nothing is written. Every ``--every`` steps it prints
the training row (losses, expected ratio, its target, the Gumbel temperature and, with the ratio
multiplier, lambda). After training it runs 64 validation items at inference with the calibrated
threshold and prints the tokens alive after each trimmed layer and the heads kept per attention
site (batch means). A ratio that stops moving while its target is still below it, with heads at
the minimum and tokens all kept, is the saturated case described in benchmarks/README.md.
"""
from __future__ import annotations

import argparse

import torch

from trimkit.bench.run import BenchConfig, RunSpec, fresh_copy, items_of, smarttrim_configs, train_config, base_model
from trimkit.runtime import trim_stats
from trimkit.data import collate
from trimkit.runtime import trim_stats
from trimkit.tasks import model_batch
from trimkit.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family")
    ap.add_argument("task")
    ap.add_argument("ratio", type=float, help="target executed-FLOPs ratio, e.g. 0.5")
    ap.add_argument("seed", type=int)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--dual-lr", type=float, default=0.0)
    ap.add_argument("--logit-penalty", type=float, default=0.0)
    ap.add_argument("--base-scene-weight", type=float, default=0.0)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scene = (("scene_weight", args.base_scene_weight),) if args.base_scene_weight else ()
    config = BenchConfig(families=[args.family], tasks=[args.task], steps=args.steps, dual_lr=args.dual_lr,
                         logit_penalty=args.logit_penalty, base_train=scene)
    bench = base_model(config, args.family, args.task)
    run = RunSpec(family=args.family, task=args.task, method="smarttrim", ratio=args.ratio, seed=args.seed)

    def log(step: int, row: dict) -> None:
        if step % args.every == 0 or step == 1:
            print(step, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "step"},
                  flush=True)

    result = train(fresh_copy(bench, "cpu"), bench.data["train"], target_ratio=args.ratio, steps=args.steps,
                   recipe=smarttrim_configs("smarttrim", args.ratio), config=train_config(config, run),
                   progress=False, callback=log)
    print(f"threshold {result.threshold:.6g}, expected ratio at inference {result.expected_ratio:.4f}")
    model = result.backbone.model.eval()
    inputs, _ = model_batch(result.binding, collate(items_of(bench, "val", 64)), "cpu")
    with torch.no_grad():
        model(**inputs)
    stats = trim_stats(model)
    for stream, v in stats.get("tokens", {}).items():
        print(f"tokens {stream}: {v['length']} in, alive after each trimmed layer "
              f"{[round(k, 1) for k in v['kept']]}")
    for site, v in stats.get("heads", {}).items():
        print(f"heads {site}: {v['kept']:.2f} of {v['heads']}")


if __name__ == "__main__":
    main()
