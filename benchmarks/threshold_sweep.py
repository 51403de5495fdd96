"""Train one SmartTrim point of the bench, then read it at other inference thresholds.

    python benchmarks/threshold_sweep.py SEED [TARGET] [DUAL_LR]

BLIP/VQA on the scene base (``--base-scene-weight 1``), 600 steps, tokens and heads, the bench's
training settings with ``--dual-lr`` (default 0.1), target ratio 0.5 unless given. Prints, for the
calibrated threshold and a few fixed ones, the accuracy and the executed-FLOPs ratio (hard counts
of the cost model) on the first 500 validation items; and the same items with the trimmers in
training mode (Gumbel decisions at the last step's temperature), which is what training saw.
A point that collapses at its calibrated threshold while its training-mode accuracy holds lost
accuracy between training and inference, not in training. Two more lines read it with only the
token trimmers or only the head trimmers at the calibrated threshold (the other kind keeps all).
(Its saved outputs under ``benchmarks/results/scene-screen/`` predate exact training masks; they
also read training mode with the old ``log(mask + 1e-6)`` mask replaced by an exact one.)
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

from trimkit.bench.run import BenchConfig, RunSpec, fresh_copy, smarttrim_configs, train_config, base_model
from trimkit.runtime import runtimes, set_threshold
from trimkit.cost import expected_ratio
from trimkit.data import collate
from trimkit.runtime import runtimes, set_threshold
from trimkit.tasks import model_batch, task_dataset
from trimkit.train import train


def read(model, batches) -> tuple[float, float]:
    right = rows = 0
    ratio = 0.0
    with torch.no_grad():
        for inputs, labels in batches:
            logits = model(**inputs).logits
            right += int((logits.argmax(-1) == labels).sum())
            ratio += float(expected_ratio(model)) * len(labels)
            rows += len(labels)
    return right / rows, ratio / rows


def main(argv: list[str]) -> None:
    seed = int(argv[0])
    target = float(argv[1]) if len(argv) > 1 else 0.5
    dual = float(argv[2]) if len(argv) > 2 else 0.1
    torch.set_num_threads(1)
    config = replace(BenchConfig(), base_train=(("scene_weight", 1.0),), dual_lr=dual, threads=1, steps=600)
    bench = base_model(config, "blip", "vqa")
    run = RunSpec("blip", "vqa", "smarttrim", target, seed)
    trained = train(fresh_copy(bench, "cpu"), bench.data["train"], target_ratio=target, steps=config.steps,
                    recipe=smarttrim_configs("smarttrim", target), config=train_config(config, run), progress=False)
    model, binding = trained.model.eval(), trained.binding
    val = task_dataset(bench.data["val"], binding)
    batches = [model_batch(binding, collate([val[i] for i in range(lo, lo + 50)])) for lo in range(0, 500, 50)]
    print(f"seed {seed}, target {target}: training ended at expected ratio {trained.expected_ratio:.3f}; "
          f"calibrated threshold {trained.threshold:.4g} (ratio {trained.calibrated_ratio:.3f} on training items)")
    for th in (trained.threshold, 0.5, 0.9, 0.99, 0.1, 0.01, 0.001):
        set_threshold(model, th)
        acc, ratio = read(model, batches)
        print(f"threshold {th:.4g}: accuracy {acc:.3f} at ratio {ratio:.3f}")
    for keep_all in ("HeadRuntime", "TokenRuntime"):  # one kind of trimmer off, the other at the threshold
        for rt in runtimes(model):
            if hasattr(rt, "threshold"):
                rt.threshold = 0.0 if type(rt).__name__ == keep_all else trained.threshold
        acc, ratio = read(model, batches)
        other = "tokens" if keep_all == "HeadRuntime" else "heads"
        print(f"only {other} trimmed (calibrated threshold): accuracy {acc:.3f} at ratio {ratio:.3f}")
    set_threshold(model, trained.threshold)
    model.train()
    acc, ratio = read(model, batches)
    print(f"training mode (Gumbel): accuracy {acc:.3f} at ratio {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
