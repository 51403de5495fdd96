"""`trimkit train` and `trimkit eval`: self-distillation training of trimmers, and evaluation against
the same model with every trimmer off."""
from __future__ import annotations

import json
import math
import os
import sys

import click

from trimkit.cli import command
from trimkit.cli.options import config_options
from trimkit.train.config import TrainConfig

__all__ = ["train_command", "eval_command"]


@command("train")
@click.option("--model", "model_ref", required=True, help="Backbone name, hub id, folder or file.py:factory.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
              help="Recipe (TOML) with at least one trainable pass; omit for a folder that already has one.")
@click.option("--data", "data_spec", required=True, help="Data spec, e.g. synthetic:vqa or synthetic:vqa?n=2000.")
@click.option("--target-ratio", type=float, default=None,
              help="Executed-FLOPs ratio to reach, in (0, 1]; default: the recipe's target_ratio.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: the trained model, checkpoints under OUT/checkpoints.")
@config_options(TrainConfig)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--overwrite", is_flag=True,
              help="Replace a trimkit folder at --out, once the new model is complete (never a foreign folder).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch.set_num_threads.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Training processes on this machine (torch.distributed: gloo on cpu, nccl on cuda).")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as one JSON object.")
def train_command(model_ref, recipe, data_spec, target_ratio, steps, out_dir, resume, overwrite, threads, nproc,
                  no_progress, as_json, **settings):
    """Train the trimmers of a model (task + self-distillation + FLOPs cost) and save it to --out.

    \b
    Examples:
      trimkit train --model vilt-vqa-tiny --recipe smarttrim.toml --data synthetic:vqa \\
                    --target-ratio 0.5 --steps 300 --out vilt-trimmed
      trimkit train ... --out vilt-trimmed --resume
      trimkit train ... --nproc 2            (or: torchrun --nproc_per_node 2 -m trimkit.cli train ...)
      trimkit train ... --device cuda --dtype bfloat16 --trainable trimmers --grad-checkpointing
    """
    import torch

    from trimkit.io import prepare_out_dir
    from trimkit.train import latest_checkpoint, train
    from trimkit.train.distributed import current, launch

    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        TrainConfig(**settings)  # bad settings fail here, once
        launch(nproc, _without_nproc(sys.argv[1:]))
        return
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(**settings)
    out = prepare_out_dir(out_dir, overwrite=overwrite, resume=resume)   # before any work
    replacing = out.is_dir() and any(out.iterdir()) and not resume
    try:
        result = train(model_ref, data_spec, target_ratio=target_ratio, steps=steps, recipe=recipe,
                       out_dir=out_dir, config=config, resume=resume, overwrite=overwrite,
                       progress=not no_progress and not as_json)
    except KeyboardInterrupt:
        click.echo(f"Error: {_interrupted(out_dir, replacing, latest_checkpoint(out) if out.is_dir() else None)}",
                   err=True)
        sys.exit(130)
    if not current().main:
        return
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps(summary))
        return
    last = summary["last"] or {}
    click.echo(f"trained {summary['steps']} steps -> {summary['out_dir']}")
    click.echo(f"  task loss {last.get('task', float('nan')):.4f}  expected ratio {summary['expected_ratio']:.3f}"
               f"  target {summary['target_ratio']:.3f}")
    if summary["threshold"] is not None:
        click.echo(f"  inference threshold {summary['threshold']:.4f} (executed ratio on training items "
                   f"{summary['calibrated_ratio']:.3f})")


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its ``--nproc`` option (what every launched process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _interrupted(typed: str, replacing: bool, checkpoint) -> str:
    """What an interrupted `trimkit train` kept, in one line."""
    if replacing:
        return f"interrupted; {typed!r} was left as it was"
    if checkpoint is not None:
        return f"interrupted; checkpoint kept at {str(checkpoint)!r} (continue with --resume)"
    return "interrupted before the first checkpoint; nothing was saved"


def _cell(value, fmt: str) -> str:
    """A table cell: '-' for a missing or non-finite number."""
    return f"{value:{fmt}}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _print_eval(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['data']}",
                  caption="speedup = untrimmed / trimmed (> 1: the trimmed model is cheaper or faster)")
    for col in ("", "trimmed", "untrimmed", "speedup"):
        table.add_column(col, justify="left" if not col else "right")
    metric, full = report["metric"], report["metric_untrimmed"]
    table.add_row(metric["name"], _cell(metric["value"], ".4f"), _cell(full["value"], ".4f"), "")
    for key in ("mean", "p50", "p95"):
        a, b = report["flops"][key], report["flops_untrimmed"][key]
        table.add_row(f"FLOPs {key}", _cell(a, ".4g"), _cell(b, ".4g"), _cell(b / a if a else None, ".3f"))
    for key, value in report["latency_ratio"].items():
        ms = report["latency_ms"].get(key, {})
        table.add_row(f"latency {key.replace('_', ' ')} (ms)", _cell(ms.get("trimmed"), ".3f"),
                      _cell(ms.get("untrimmed"), ".3f"), _cell(1 / value if value else None, ".3f"))
    Console().print(table)


@command("eval")
@click.option("--model", "model_ref", required=True, help="A trained folder, backbone name, hub id or factory.")
@click.option("--data", "data_spec", required=True, help="Data spec; its val split unless it names one.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--samples", default=32, show_default=True, type=click.IntRange(min=1),
              help="Inputs counted one by one for the FLOPs distribution.")
@click.option("--latency-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the second latency measurement.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch.set_num_threads during latency runs.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--device", default="cpu", show_default=True, help="Device: cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Precision of the weights (trimmers stay float32).")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object (no progress).")
def eval_command(model_ref, data_spec, batch_size, samples, latency_batch, threads, no_latency, device, dtype,
                 no_progress, as_json):
    """Metric, executed FLOPs and latency of a model, each against the same model with every trimmer off.

    \b
    Examples:
      trimkit eval --model vilt-trimmed --data synthetic:vqa --json
      trimkit eval --model vilt-trimmed --data "synthetic:vqa?n=500&split=test"
    """
    from trimkit.evaluate import evaluate

    report = evaluate(model_ref, data_spec, batch_size=batch_size, samples=samples, latency=not no_latency,
                      latency_batch=latency_batch, threads=threads, progress=not (no_progress or as_json),
                      device=device, dtype=dtype)
    if as_json:
        click.echo(json.dumps(report))
        return
    _print_eval(report)
