"""Screen SmartTrim settings on a protocol's validation split (the test split is never built).

    python benchmarks/protocol_screen.py PROTOCOL.toml OUT_DIR --ratio 0.5 --seed 0 \
        --set lr_backbone=1e-5 [--set freeze_backbone=true ...] [--model NAME]

Trains SmartTrim on the protocol's training split with its recipe changed by ``--set``, then scores
every validation item trimmed and untrimmed (:func:`trimkit.bench.sweep.sweep`, executed FLOPs of
every item included) and writes ``OUT_DIR/<model>-<tag>-r<ratio>-s<seed>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv: list[str]) -> None:
    from trimkit.bench.protocol import load_protocol
    from trimkit.bench.protocol_run import train_smarttrim
    from trimkit.bench.protocol import ProtocolRun
    from trimkit.bench.sweep import sweep
    from trimkit.tasks import task_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("protocol")
    ap.add_argument("out")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a TrainConfig field")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    protocol = load_protocol(args.protocol)
    changes = dict(part.split("=", 1) for part in args.set)
    protocol = replace(protocol, train={**protocol.train, **{k: _value(v) for k, v in changes.items()}})
    model = args.model or protocol.models[0]
    run = ProtocolRun(model, "smarttrim", args.ratio, args.seed)
    start = time.perf_counter()
    backbone, binding, info = train_smarttrim(protocol, run, False)
    items = task_dataset(protocol.spec("val"), binding)
    result = sweep(backbone.model.eval(), binding, [items[i] for i in range(len(items))],
                   batch_size=protocol.eval_batch, verify=8).summary()
    tag = "-".join(f"{k}{v}" for k, v in sorted(changes.items())) or "protocol"
    record = {"protocol": protocol.to_dict(), "model": model, "ratio": args.ratio, "seed": args.seed, "set": changes,
              "train_settings": protocol.train, "train": info, "val": result,
              "seconds": round(time.perf_counter() - start, 1), "command": "python benchmarks/protocol_screen.py " + " ".join(argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{model}-{tag}-r{round(args.ratio * 1000):04d}-s{args.seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"set": changes, "val": result["accuracy"], "val_untrimmed": result["accuracy_untrimmed"],
                      "flops_reduction": round(result["flops_reduction"], 3), "seconds": record["seconds"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
