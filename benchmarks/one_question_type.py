"""Train a bench ViLT on one VQA question type alone and report what it answers.

    python benchmarks/one_question_type.py count|relation STEPS [PATCH]

Data: ``synthetic:vqa?image=64&objects=2-3&jitter=0``, keeping only count questions ("how many
...") or only relation questions ("is ... left of ..."); ``STEPS`` steps of batch 32, lr 1e-3,
warm-up 200, one thread, patch 16 unless ``PATCH`` says otherwise. Prints the validation accuracy
on 500 questions of the same type, the answers the model gives (class ids) and the loss every 100
steps.
"""
from __future__ import annotations

import collections
import sys
import time

import torch

from trimkit.bench.base import BaseTrainConfig, batch_inputs, train_model
from trimkit.bench.models import build_model, model_config
from trimkit.data import collate, load_dataset

SPEC = "synthetic:vqa?image=64&objects=2-3&jitter=0"


def _keeps(kind: str, text: str) -> bool:
    first = text.split()[0]
    return first == "how" if kind == "count" else first == "is"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("count", "relation"):
        raise SystemExit("usage: one_question_type.py count|relation STEPS [PATCH]")
    kind, steps = argv[0], int(argv[1])
    patch = int(argv[2]) if len(argv) > 2 else 16
    torch.set_num_threads(1)
    train = load_dataset(f"{SPEC}&n={steps * 32 * 8}")  # about 1 in 6 questions is a count
    train_idx = [i for i in range(len(train)) if _keeps(kind, train.record(i).text)][: steps * 32]
    if len(train_idx) < steps * 32:
        raise SystemExit(f"only {len(train_idx)} {kind} questions for {steps} steps of 32")
    val = load_dataset(f"{SPEC}&n=3000&split=val")
    val_idx = [i for i in range(len(val)) if _keeps(kind, val.record(i).text)][:500]
    net = build_model(model_config("vilt", train, patch=patch), seed=0)
    start = time.time()
    history = train_model(net, torch.utils.data.Subset(train, train_idx),
                          BaseTrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup=200), progress=False)
    net.eval()
    answers: collections.Counter = collections.Counter()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(val_idx), 100):
            batch = collate([val[i] for i in val_idx[lo:lo + 100]])
            pred = net(**batch_inputs(batch)).logits.argmax(-1)
            correct += int((pred == batch["labels"]).sum())
            answers.update(pred.tolist())
    print(f"{kind}: {steps} steps, patch {patch}: val accuracy {correct / len(val_idx):.3f} on {len(val_idx)}, "
          f"answers {dict(answers)}, losses {[round(x, 3) for x in history['losses']]}, "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
