"""Train a bench model on the ``where`` questions and write it as a shippable folder.

    python benchmarks/train_where_base.py OUT [--family vilt|blip|bridgetower] [--steps N] [--single N]
                                              [--hidden H] [--layers L] [--heads A] [--lr LR]
                                              [--spec SPEC] [--ship NAME]

Prints the loss every 250 steps and the accuracy on 500 validation questions every ``--check``
steps (a copy of the weights is kept in ``OUT/checkpoint.safetensors``). At the end: the
accuracy on 1000 validation and 1000 test questions, overall and per question type, next to the
blind prior (the majority answer of each question text on the training split), in
``OUT/record.json``; the weights in ``OUT/model``: a ``ViltForQuestionAnswering`` folder for ViLT,
the bench model's ``model.safetensors`` for BLIP and BridgeTower (rebuilt from the ``ModelConfig``
in the record). ``--ship NAME`` copies them to ``backbones/trained/NAME`` (see
:mod:`trimkit.backbones.trained`). ``--ground W`` adds W x the loss of the grounding read-outs of
the image tokens (:func:`trimkit.bench.where.grounding_probe`).

The shipped ``vilt-vqa-where``::

    python benchmarks/train_where_base.py /tmp/where --steps 2000 --single 400 --warmup 150 --ground 1 --check 500 --ship vilt-vqa-where

(the defaults). ViLT shuffles its patches with torch's global random stream, which the shipped run
did not seed; the script now seeds it (``--seed``), so a rerun gives the recipe's accuracy, not the
shipped bytes. The shipped ``blip-vqa-where``::

    python benchmarks/train_where_base.py /tmp/where-blip --family blip --steps 2000 --single 400 --warmup 150 --ground 1 --check 500 --ship blip-vqa-where

BLIP and BridgeTower are scored, written and shipped with their weights rounded to float16.
``--finish`` skips training and scores, writes (and ships) ``OUT/checkpoint.safetensors`` of a run
that has finished, with the training log and times of its ``OUT/record.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from trimkit.bench.base import BaseTrainConfig, base_metrics, data_specs, lr_factor, train_model
from trimkit.bench.models import build_model, model_config
from trimkit.bench.where import (blind_prior, by_type, export_bench, export_vilt, grounding_probe, grounding_targets,
                                 round_to_half, ship)
from trimkit.data import collate, load_dataset

SPEC = "synthetic:vqa?image=48&objects=2-3&grid=3&jitter=0&questions=where"


def _batches(parts, batch_size: int, patch: int):
    items, targets = [], []
    for part in parts:
        for i in range(len(part)):
            rec = part.record(i)
            items.append(part.encode_item(rec.image, rec.text, rec.label))
            targets.append(grounding_targets(rec.objects, rec.text, part.image_size, patch, part.source.grid))
            if len(items) == batch_size:
                yield collate(items), torch.stack(targets)
                items, targets = [], []


def train_grounded(net, parts, recipe: BaseTrainConfig, weight: float, on_log) -> dict:
    """The task loss plus `weight` x the grounding read-outs' loss (the probe is dropped after)."""
    probe = grounding_probe(net)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "embedding" not in n] + [probe.heads.weight]
    rest = [p for n, p in net.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)] + [probe.heads.bias]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    side = net.config.image // net.config.patch
    start, cpu = time.perf_counter(), time.process_time()
    window, ground = [], []
    net.train()
    try:
        for step, (batch, targets) in enumerate(_batches(parts, recipe.batch_size, net.config.patch)):
            if step == recipe.steps:
                break
            logits = net(**{k: v for k, v in batch.items() if k != "labels"}).logits
            task = torch.nn.functional.cross_entropy(logits, batch["labels"])
            aux = probe.loss(targets, side)
            (task + weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(list(net.parameters()) + list(probe.parameters()), recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            window.append(task.item())
            ground.append(aux.item())
            if (step + 1) % 250 == 0 or step + 1 == recipe.steps:
                print(json.dumps({"step": step + 1, "ground_loss": round(sum(ground) / len(ground), 4)}), flush=True)
                on_log(step + 1, sum(window) / len(window))
                window, ground = [], []
    finally:
        probe.remove()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--family", default="vilt", choices=("vilt", "blip", "bridgetower"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--single", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--check", type=int, default=500)
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ground", type=float, default=1.0,
                    help="weight of the grounding read-outs of the image tokens (grounding_probe)")
    ap.add_argument("--finish", action="store_true",
                    help="skip training: score and write the last checkpoint of a finished run in OUT")
    ap.add_argument("--ship", default=None, help="also copy the result to trimkit's shipped models under this name")
    args = ap.parse_args(argv)
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    recipe = BaseTrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                             single_object_steps=args.single)
    specs = data_specs("vqa", recipe, args.spec)
    val = load_dataset(specs["val"])
    size = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, patch=8)
    config = model_config(args.family, val, **size)
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

    if args.finish:  # a finished run: its last checkpoint, training log and times
        history, log = _finished(net, out)
    elif args.ground:
        history = train_grounded(net, parts, recipe, args.ground, on_log)
    else:
        history = train_model(net, torch.utils.data.ConcatDataset(parts), recipe, progress=False, log_every=250,
                              log=on_log)
    _final(net, out, args, argv, config, recipe, specs, val, history, log)


def _finished(net, out) -> tuple[dict, list]:
    from safetensors.torch import load_model

    load_model(net, str(out / "checkpoint.safetensors"))
    old = json.loads((out / "record.json").read_text(encoding="utf-8"))
    return {"seconds": old["train_seconds"], "cpu_seconds": old["train_cpu_seconds"]}, old["log"]


def _final(net, out, args, argv, config, recipe, specs, val, history, log) -> None:
    """Score the trained model (BLIP / BridgeTower: with the float16 weights it ships) and write it."""
    net.eval()
    if args.family != "vilt":
        round_to_half(net)
    test = load_dataset(specs["test"])
    record = {"spec": args.spec, "data": specs, "model": config.to_dict(), "train": asdict(recipe),
              "seed": args.seed, "train_seconds": round(history["seconds"], 1),
              "train_cpu_seconds": round(history["cpu_seconds"], 1), "log": log,
              "val": by_type(net, val), "test": by_type(net, test),
              "blind_prior": {"val": blind_prior(load_dataset(specs["train"]), val),
                              "test": blind_prior(load_dataset(specs["train"]), test)},
              "torch": torch.__version__}
    (export_vilt if args.family == "vilt" else export_bench)(net, out / "model", val)
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: record[k] for k in ("val", "test", "blind_prior", "train_seconds")}, indent=1))
    if args.ship:
        from trimkit.backbones.trained import TRAINED_DIR

        command = [a for a in argv if a != "--finish"]
        ship(out, TRAINED_DIR / args.ship, "python benchmarks/train_where_base.py " + " ".join(command))

if __name__ == "__main__":
    main(sys.argv[1:])
