"""Train a bench model on a synthetic VQA spec and report its accuracy per question type.

    python benchmarks/base_by_type.py FAMILY STEPS ONE_OBJECT_STEPS SPEC [PATCH]
    python benchmarks/base_by_type.py --bench FAMILY [SCENE_WEIGHT]

e.g. ``python benchmarks/base_by_type.py vilt 2500 750
"synthetic:vqa?image=64&objects=2-3&jitter=0&questions=open"``. Batch 32, lr 1e-3, warm-up 300,
one thread, patch 8 unless ``PATCH`` says otherwise; the first ``ONE_OBJECT_STEPS`` steps read
one-object scenes of the same spec (the bench recipe's curriculum). Prints the loss every 250
steps and the validation accuracy on 1000 questions, overall and per type: colour / shape / size
of a named object, count of a shape or colour, count of all objects, yes/no relation, the
attribute of the object in a direction of a named one, of the object closest to it.

``--bench`` reads the bench's VQA base of FAMILY instead (``trimkit.bench.train_base``, trained
first if it is not cached; ``SCENE_WEIGHT`` as ``trimkit bench --base-scene-weight``) and prints
the same table for its validation split.
"""
from __future__ import annotations

import collections
import sys
import time
from dataclasses import replace

import torch

from trimkit.bench.base import BaseTrainConfig, batch_inputs, train_model
from trimkit.bench.models import build_model, model_config
from trimkit.data import collate, format_data_spec, load_dataset, parse_data_spec


def question_type(text: str) -> str:
    words = text.split()
    if words[0] == "how":
        return "count-all" if words[2] == "objects" else "count"
    if words[0] == "is":
        return "yes/no relation"
    if "closest" in words:
        return "closest"
    if {"left", "right", "above", "below"} & set(words):
        return "direction"
    return words[1]


def by_type(net, val) -> tuple[float, str]:
    """Accuracy of `net` on `val` overall, and per question type as text."""
    net.eval()
    right, total = collections.Counter(), collections.Counter()
    with torch.no_grad():
        for lo in range(0, len(val), 100):
            idx = range(lo, min(lo + 100, len(val)))
            pred = net(**batch_inputs(collate([val[i] for i in idx]))).logits.argmax(-1)
            for i, p in zip(idx, pred.tolist()):
                rec = val.record(i)
                kind = question_type(rec.text)
                total[kind] += 1
                right[kind] += p == rec.label
    per_type = ", ".join(f"{k} {right[k] / total[k]:.2f} ({total[k]})" for k in sorted(total))
    return sum(right.values()) / len(val), per_type


def bench_base(argv: list[str]) -> None:
    from trimkit.bench import train_base

    weight = float(argv[1]) if len(argv) > 1 else 0.0
    bench = train_base(argv[0], "vqa", train={"scene_weight": weight} if weight else None, threads=1)
    accuracy, per_type = by_type(bench.model, bench.dataset("val"))
    print(f"{argv[0]} bench base (scene weight {weight}): val accuracy {accuracy:.3f}; {per_type}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--bench"]:
        return bench_base(argv[1:])
    if len(argv) < 4:
        raise SystemExit("usage: base_by_type.py FAMILY STEPS ONE_OBJECT_STEPS SPEC [PATCH]")
    family, steps, single, spec = argv[0], int(argv[1]), int(argv[2]), parse_data_spec(argv[3])
    patch = int(argv[4]) if len(argv) > 4 else 8
    torch.set_num_threads(1)
    parts = [load_dataset(format_data_spec(replace(spec, n=(steps - single) * 32, split="train")))]
    if single:
        one = replace(spec, n=single * 32, split="train", seed=spec.seed + 1, extra={**spec.extra, "objects": (1, 1)})
        parts.insert(0, load_dataset(format_data_spec(one)))
    val = load_dataset(format_data_spec(replace(spec, n=1000, split="val")))
    size = dict(hidden=128, layers=4, heads=4, patch=patch, **({"cross_layers": 2} if family == "bridgetower" else {}))
    net = build_model(model_config(family, val, **size), seed=0)
    start = time.time()
    recipe = BaseTrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup=300)
    train_model(net, torch.utils.data.ConcatDataset(parts), recipe, progress=False, log_every=250,
                log=lambda step, loss: print(f"step {step} loss {loss:.3f} {time.time() - start:.0f} s", flush=True))
    accuracy, per_type = by_type(net, val)
    print(f"{family} {steps} steps ({single} one-object), patch {patch}: val accuracy "
          f"{accuracy:.3f}; {per_type}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
