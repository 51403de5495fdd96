"""Which of SmartTrim's decisions costs a trained model its accuracy (validation split only).

    python benchmarks/trim_ablate.py PROTOCOL.toml --model bridgetower-vqa-where --ratio 0.6667 --seed 1 \
        [--items 1000] [--streams REGEX] [--json out.json]

Trains SmartTrim exactly as the protocol's runs do (training split, the protocol's recipe), then
scores validation items with: every decision on; token decisions only (head runtimes off); head
decisions only (token runtimes off); nothing trimmed; and every decision but one stream's tokens,
for each trimmed stream. It also prints the tokens each stream keeps
after each trimmed layer (batch mean of the last forward) and the heads kept per site.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch


def _accuracy(model, binding, items, batch_size: int) -> tuple[float, dict]:
    """Accuracy over `items` as the protocol scores them, and the trim statistics of the last batch."""
    from trimkit.bench.sweep import score_items
    from trimkit.evaluate import length_buckets
    from trimkit.progress import progress
    from trimkit.runtime import trim_stats

    with progress(False) as bar:
        correct, _ = score_items(model, binding, items, length_buckets(items, batch_size), torch.device("cpu"),
                                 bar, full=False, with_signatures=False)
    return float(correct.mean()), trim_stats(model)


def main() -> None:
    from trimkit.bench.protocol import ProtocolRun, load_protocol
    from trimkit.bench.protocol_run import train_smarttrim
    from trimkit.bench.run import smarttrim_configs
    from trimkit.runtime import HeadRuntime, TokenRuntime, runtimes
    from trimkit.tasks import task_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protocol")
    ap.add_argument("--model", default="bridgetower-vqa-where")
    ap.add_argument("--ratio", type=float, default=0.6667)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--streams", default="", help="regex of the streams whose tokens are trimmed (the token "
                    "pass's `streams`; default every stream), e.g. '^(?!.*text_model)' to leave BridgeTower's "
                    "text tower whole: a recipe change, so a screen, not the protocol's run")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    protocol = load_protocol(args.protocol)
    recipe = None
    if args.streams:
        recipe = [dataclasses.replace(c, streams=args.streams) if hasattr(c, "streams") else c
                  for c in smarttrim_configs("smarttrim", args.ratio)]
    start = time.perf_counter()
    backbone, binding, info = train_smarttrim(protocol, ProtocolRun(args.model, "smarttrim", args.ratio, args.seed),
                                              False, recipe)
    model = backbone.model.eval()
    data = task_dataset(protocol.spec("val"), binding)
    items = [data[i] for i in range(min(args.items, len(data)))]
    kinds = {"tokens": TokenRuntime, "heads": HeadRuntime}
    out = {"model": args.model, "ratio": args.ratio, "seed": args.seed, "streams": args.streams, "items": len(items),
           "train": info, "val": {}}
    for label, off in (("all", ()), ("tokens only", ("heads",)), ("heads only", ("tokens",)), ("none", ("tokens", "heads"))):
        for rt in runtimes(model):
            rt.enabled = not any(isinstance(rt, kinds[k]) for k in off)
        acc, stats = _accuracy(model, binding, items, protocol.eval_batch)
        out["val"][label] = {"accuracy": acc, "stats": stats}
        print(f"{label:12s} val accuracy {acc:.4f}", flush=True)
        if label == "all":
            print(json.dumps(stats, default=str)[:3000], flush=True)
    for rt in runtimes(model):
        rt.enabled = True
    token_rts = [rt for rt in runtimes(model) if isinstance(rt, TokenRuntime)]
    for stream in sorted({st for rt in token_rts for st in rt.trimmed_streams}):
        with contextlib.ExitStack() as stack:  # that stream's layers stop deciding: its tokens all stay
            for rt in token_rts:
                if stream in rt.trimmed_streams:
                    stack.enter_context(rt.stream_whole(stream))
            acc, _ = _accuracy(model, binding, items, protocol.eval_batch)
        out["val"][f"all but {stream}'s tokens"] = {"accuracy": acc}
        print(f"all but {stream}'s tokens: val accuracy {acc:.4f}", flush=True)
    out["seconds"] = time.perf_counter() - start
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
