"""Train a bench ViLT on the ``where`` questions and write it as a ``save_pretrained`` folder.

    python benchmarks/train_where_base.py OUT [--steps N] [--single N] [--hidden H] [--layers L]
                                              [--heads A] [--lr LR] [--spec SPEC] [--ship NAME]

Prints the loss every 250 steps and the accuracy on 500 validation questions every ``--check``
steps (a copy of the weights is kept in ``OUT/checkpoint.safetensors``). At the end: the
accuracy on 1000 validation and 1000 test questions, overall and per question type, next to the
blind prior (the majority answer of each question text on the training split), in
``OUT/record.json``; the weights as a ``ViltForQuestionAnswering`` folder in ``OUT/model``.
``--ship NAME`` copies them to ``backbones/trained/NAME`` (see :mod:`trimkit.backbones.trained`).

The shipped ``vilt-vqa-where``::

    python benchmarks/train_where_base.py /tmp/where --steps 5000 --single 1000 --warmup 300 --ship vilt-vqa-where
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from trimkit.bench.base import BaseTrainConfig, base_metrics, data_specs, train_model
from trimkit.bench.models import build_model, model_config
from trimkit.bench.where import blind_prior, by_type, export_vilt, ship
from trimkit.data import load_dataset

SPEC = "synthetic:vqa?image=48&objects=2-3&grid=3&jitter=0&questions=where"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--single", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--check", type=int, default=1000)
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", default=None, help="also copy the result to trimkit's shipped models under this name")
    args = ap.parse_args(argv)
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    recipe = BaseTrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                             single_object_steps=args.single)
    specs = data_specs("vqa", recipe, args.spec)
    val = load_dataset(specs["val"])
    size = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, patch=8)
    config = model_config("vilt", val, **size)
    net = build_model(config, seed=args.seed)
    parts = [load_dataset(specs["train"])]
    if args.single:
        parts.insert(0, load_dataset(specs["single_object"]))
    check = torch.utils.data.Subset(val, range(500))
    start = time.time()
    log: list[dict] = []

    def on_log(step: int, loss: float) -> None:
        row = {"step": step, "loss": round(loss, 4), "seconds": round(time.time() - start, 1)}
        if step % args.check == 0 or step == args.steps:
            row["val500"] = base_metrics(net, check, "vqa")["accuracy"]
            from safetensors.torch import save_model

            save_model(net, str(out / "checkpoint.safetensors"))
        log.append(row)
        print(json.dumps(row), flush=True)

    history = train_model(net, torch.utils.data.ConcatDataset(parts), recipe, progress=False, log_every=250,
                          log=on_log)
    net.eval()
    test = load_dataset(specs["test"])
    record = {"spec": args.spec, "data": specs, "model": config.to_dict(), "train": asdict(recipe),
              "seed": args.seed, "train_seconds": round(history["seconds"], 1),
              "train_cpu_seconds": round(history["cpu_seconds"], 1), "log": log,
              "val": by_type(net, val), "test": by_type(net, test),
              "blind_prior": {"val": blind_prior(load_dataset(specs["train"]), val),
                              "test": blind_prior(load_dataset(specs["train"]), test)},
              "torch": torch.__version__}
    export_vilt(net, out / "model", val)
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: record[k] for k in ("val", "test", "blind_prior", "train_seconds")}, indent=1))
    if args.ship:
        from trimkit.backbones.trained import TRAINED_DIR

        ship(out, TRAINED_DIR / args.ship, "python benchmarks/train_where_base.py " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
