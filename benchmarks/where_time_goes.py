"""Where the time of a trimmed bench model goes at batch 1 and at a large batch.

    python benchmarks/where_time_goes.py [--family blip] [--task vqa] [--steps 200] [--batch 32]

Trains SmartTrim token trimmers (backbone frozen) on the bench base model to half the executed
FLOPs, then, on test items, in one process with one thread:

* executed FLOPs of the trimmed model: per sample (one item at a time, the bench's figure) and
  for the whole padded batch (rows padded to the longest kept row), each over the untrimmed model;
* latency (interleaved medians) of the trimmed and untrimmed model at batch 1 and ``--batch``;
* a torch.profiler breakdown of one trimmed forward at each batch size: time in matrix products
  and attention (the work trimming shrinks) against everything else (indexing, masks, scorers,
  Python and dispatch).
"""
from __future__ import annotations

import argparse
import collections
import json

import torch

from trimkit.bench.base import train_base
from trimkit.data import collate
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.profile import compare_latency, count_flops
from trimkit.runtime import trimming_off
from trimkit.tasks import model_batch
from trimkit.evaluate import Untrimmed
from trimkit.train import TrainConfig, train

COMPUTE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
           "aten::scaled_dot_product", "aten::_softmax", "aten::linear", "aten::matmul", "aten::gelu", "aten::layer_norm",
           "aten::native_layer_norm", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution")


def _breakdown(model, inputs) -> dict:
    with torch.no_grad():
        model(**inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**inputs)
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    compute = sum(r.self_cpu_time_total for r in rows if r.key.startswith(COMPUTE))
    top = sorted(rows, key=lambda r: -r.self_cpu_time_total)[:12]
    return {"self_cpu_ms": total / 1e3, "compute_share": compute / total if total else None,
            "ops": sum(r.count for r in rows),
            "top": [(r.key, round(r.self_cpu_time_total / 1e3, 3), r.count) for r in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="blip")
    ap.add_argument("--task", default="vqa")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = train_base(args.family, args.task, progress=False)
    result = train(bench.backbone(), bench.data["train"], target_ratio=0.5, steps=args.steps,
                   recipe=[SmartTrimTokensConfig(target_ratio=0.5)],
                   config=TrainConfig(freeze_backbone=True, batch_size=32, measure_every=0), progress=False)
    model, binding = result.model.eval(), result.binding
    test = bench.dataset("test")
    # one text length per batch, as the bench's evaluation batches are: the commonest length
    lengths = collections.Counter(int(test[i]["input_ids"].shape[-1]) for i in range(args.batch))
    length = min(n for n, count in lengths.items() if count == max(lengths.values()))
    pool = [test[i] for i in range(len(test)) if int(test[i]["input_ids"].shape[-1]) == length][: args.batch]
    out: dict = {"family": args.family, "task": args.task, "threshold": result.threshold, "batch": len(pool)}
    with torch.no_grad():
        per_t = per_f = 0.0
        for it in pool:
            inputs, _ = model_batch(binding, collate([it]))
            per_t += count_flops(model, inputs).flops
            with trimming_off(model):
                per_f += count_flops(model, inputs).flops
        out["flops_ratio_per_sample"] = per_t / per_f
        big, _ = model_batch(binding, collate(pool))
        batch_t = count_flops(model, big).flops
        with trimming_off(model):
            batch_f = count_flops(model, big).flops
        out["flops_ratio_padded_batch"] = batch_t / batch_f
    for name, inputs in (("batch_1", model_batch(binding, collate(pool[:1]))[0]), (f"batch_{len(pool)}", big)):
        times = compare_latency(Untrimmed(model), model, inputs, repeats=args.repeats)  # interleaved
        t, f = times["b_ms"], times["a_ms"]
        out[name] = {"trimmed_ms": t, "untrimmed_ms": f, "speedup": f / t, "trimmed": _breakdown(model, inputs)}
        with trimming_off(model):
            out[name]["untrimmed"] = _breakdown(model, inputs)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
