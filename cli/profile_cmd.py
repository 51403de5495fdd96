"""`trimkit profile`: executed FLOPs, parameters, latency and memory of a model."""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
from typing import Any

import click
import torch

from trimkit.cli import command
from trimkit.errors import ConfigError

__all__ = ["profile"]

COUNTERS = ("torch", "fvcore")


def _load(ref: str):
    from trimkit.backbones import load_backbone

    return load_backbone(ref)


def _model_map(backbone) -> Any | None:
    """The ModelMap from trimkit.locate when it is available and can map this model."""
    try:
        from trimkit.locate import locate
    except ImportError:
        return None
    try:
        return locate(backbone.model, backbone.example_inputs(2), name=backbone.name,
                      hints=backbone.hints)
    except Exception as exc:  # profiling goes on without a map; say why on stderr
        reason = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"note: no block map ({reason}); blocks are the top-level modules", err=True)
        return None


def _apply_recipe(model: torch.nn.Module, recipe: str, model_map: Any,
                  **context: Any) -> torch.nn.Module:
    """A copy of `model` with the recipe applied (``inputs`` / ``hints`` passed when accepted)."""
    passes = importlib.import_module("trimkit.passes")
    apply_recipe = getattr(passes, "apply_recipe", None)
    if apply_recipe is None:
        raise ConfigError("recipes need the passes module: trimkit.passes.apply_recipe is missing")
    after = copy.deepcopy(model)
    accepted = inspect.signature(apply_recipe).parameters
    extra = {k: v for k, v in context.items() if k in accepted}
    result = apply_recipe(after, recipe, model_map, **extra)
    if isinstance(result, (list, tuple)) and result:
        result = result[-1]  # the last pass's result holds the final model
    if isinstance(result, torch.nn.Module):
        return result
    final = getattr(result, "model", None)
    return final if isinstance(final, torch.nn.Module) else after


def _existing(model: torch.nn.Module, blocks: dict[str, str]) -> dict[str, str]:
    paths = {name for name, _ in model.named_modules()}
    return {path: kind for path, kind in blocks.items() if path in paths}


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _rows(report: dict) -> list[tuple[str, str]]:
    flops, ew = report["flops"], report["elementwise_flops"]
    rows = [
        ("FLOPs / sample (mean)", _si(flops["mean"], "FLOPs")),
        ("FLOPs p50 / p95", f"{_si(flops['p50'])} / {_si(flops['p95'])}"),
        ("elementwise FLOPs (mean)", _si(ew["mean"], "FLOPs")),
        ("parameters", f"{report['params']:,}"),
        ("trimmer parameters", f"{report['trimmer_params']:,}"),
    ]
    for key, value in report["latency_ms"].items():
        rows.append((f"latency {key.replace('_', ' ')}", _ms(value)))
    rows.append(("peak memory (batch 1)", f"{report['peak_memory_mb']:.2f} MiB"))
    if "device" in report:
        rows.append(("device / dtype", f"{report['device']} / {report['dtype']}"))
    return rows


def _block_table(report: dict, title: str):
    from rich.table import Table

    total = report["flops"]["mean"] or 1.0
    table = Table(title=title)
    for col in ("block", "kind", "FLOPs", "share", "elementwise"):
        table.add_column(col, justify="left" if col in ("block", "kind") else "right",
                         overflow="fold")
    for b in report["blocks"]:
        table.add_row(b["path"], b["kind"], _si(b["flops"]), f"{b['flops'] / total:.1%}",
                      _si(b["elementwise_flops"]))
    return table


def _print(report: dict, by_block: bool, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "before" in report:
        table = Table(title=title)
        for col in ("", "before", "after"):
            table.add_column(col, justify="right" if col else "left")
        for (label, before), (_, after) in zip(_rows(report["before"]), _rows(report["after"])):
            table.add_row(label, before, after)
        console.print(table)
        speed = Table(title="speedup", caption="before / after (> 1 is faster)")
        speed.add_column("")
        speed.add_column("x", justify="right")
        for key, value in report["speedup"].items():
            speed.add_row(key, f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "-")
        console.print(speed)
        parts = [("before", report["before"]), ("after", report["after"])] if by_block else []
    else:
        table = Table(title=title)
        table.add_column("")
        table.add_column("value", justify="right")
        for label, value in _rows(report):
            table.add_row(label, value)
        console.print(table)
        parts = [("", report)] if by_block else []
    for label, part in parts:
        console.print(_block_table(part, f"blocks {label}".strip()))
    notes = report.get("notes", []) or report.get("before", {}).get("notes", [])
    for note in notes:
        console.print(f"[dim]note:[/] {note}")


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f} KiB"


def _generation_rows(g: dict) -> list[tuple[str, str]]:
    cache = g["kv_cache_bytes"]
    return [
        ("prompt tokens / batch", f"{g['prompt_tokens']} / {g['batch_size']}"),
        ("prefill FLOPs / sample", _si(g["prefill_flops"], "FLOPs")),
        ("decode FLOPs / token / sample", _si(g["decode_flops_per_token"], "FLOPs")),
        ("KV cache after prefill", _bytes(cache["prefill"])),
        (f"KV cache after {g['new_tokens']} tokens", _bytes(cache["final"])),
        ("time to first token", _ms(g["ttft_ms"])),
        ("per-token latency (median)", _ms(g["per_token_ms"])),
    ]


def _print_generation(report: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    sides = ["before", "after"] if "before" in report else [None]
    table = Table(title=title, caption="speedup = before / after (> 1 is faster or smaller)"
                  if sides[0] else None)
    table.add_column("")
    for side in sides:
        table.add_column(side or "value", justify="right")
    if sides[0]:
        table.add_column("speedup", justify="right")
    keys = [None, "prefill_flops", "decode_flops_per_token", None, "kv_cache_bytes", "ttft", "per_token"]
    rows = [_generation_rows(report[s] if s else report) for s in sides]
    for i, (label, _) in enumerate(rows[0]):
        cells = [r[i][1] for r in rows]
        if sides[0]:
            ratio = report["speedup"].get(keys[i]) if keys[i] else None
            cells.append("" if ratio is None else f"{ratio:.3f}x")
        table.add_row(label, *cells)
    Console().print(table)


def _generation(backbone, after, new_tokens: int, threads: int) -> dict:
    from trimkit.profile import compare_generation, profile_generation

    inputs = backbone.example_inputs(1)
    if after is None:
        return profile_generation(backbone.model, inputs, new_tokens, threads=threads,
                                  name=backbone.name).to_dict()
    return compare_generation(backbone.model, after, inputs, new_tokens, threads=threads)


@command("profile")
@click.option("--model", "model_ref", required=True,
              help="Backbone name, hub id, folder or file.py:factory.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
              help="Profile before and after applying this recipe (TOML).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the second latency measurement.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Inputs counted one by one for the FLOPs distribution.")
@click.option("--counter", default="torch", show_default=True, type=click.Choice(COUNTERS),
              help="FLOP counter: dispatch-level (torch) or fvcore with trimkit's handles.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch.set_num_threads during latency runs.")
@click.option("--by-block", is_flag=True, help="Also show FLOPs per block (attention, FFN, ...).")
@click.option("--generate", "new_tokens", type=click.IntRange(min=1), default=None,
              help="Decoders: also run greedy generation of N new tokens (batch 1) and report prefill and "
                   "per-token decode FLOPs, KV-cache bytes, time to first token and per-token latency.")
@click.option("--device", default="cpu", show_default=True,
              help="Device the model runs on while counting and timing: cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Precision of the weights (trimmers stay float32); the forward runs under autocast.")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object (no progress).")
def profile(model_ref: str, recipe: str | None, batch_size: int, samples: int, counter: str,
            threads: int, by_block: bool, new_tokens: int | None, device: str, dtype: str,
            no_progress: bool, as_json: bool):
    """Count executed FLOPs per input, parameters, latency and peak memory.

    \b
    Examples:
      trimkit profile --model vilt-vqa-tiny --json
      trimkit profile --model blip-vqa-tiny --by-block --samples 16
      trimkit profile --model blip-vqa-tiny --recipe smarttrim.toml
      trimkit profile --model llava-tiny --generate 16
      trimkit profile --model blip-vqa-tiny --device cuda --dtype bfloat16
    """
    from trimkit.device import autocast, place, resolve_device, resolve_dtype

    placement = resolve_device(device), resolve_dtype(dtype)  # an unavailable device fails before loading
    backbone = _load(model_ref)
    place(backbone.model, *placement)
    with autocast(*placement):
        report = _report(backbone, recipe, new_tokens, placement,
                         dict(batch_size=batch_size, samples=samples, counter=counter, threads=threads,
                              name=backbone.name, progress=not (no_progress or as_json)))
    if as_json:
        click.echo(json.dumps(report))
        return
    title = f"{backbone.name} ({counter} counter, {samples} samples, {device} {dtype})"
    _print(report, by_block, title)
    if new_tokens is not None:
        _print_generation(report["generate"], f"greedy generation of {new_tokens} tokens")


def _report(backbone, recipe: str | None, new_tokens: int | None, placement: tuple, options: dict) -> dict:
    """The profile (or before/after comparison) of a placed backbone, with generation when asked."""
    from trimkit.device import place
    from trimkit.profile import blocks_from_map, compare, profile_model

    model_map = _model_map(backbone)
    blocks = blocks_from_map(model_map) if model_map is not None else None
    after = None
    if recipe:
        after = _apply_recipe(backbone.model, recipe, model_map,
                              inputs=backbone.example_inputs(2), hints=backbone.hints)
        place(after, *placement)  # trimmers the recipe added join the model's device, in float32
        kept = None if blocks is None else _existing(after, blocks)
        report = compare(backbone.model, after, backbone.example_inputs, blocks_before=blocks,
                         blocks_after=kept, **options)
    else:
        report = profile_model(backbone.model, backbone.example_inputs, blocks=blocks, **options)
    if new_tokens is not None:
        report["generate"] = _generation(backbone, after, new_tokens, options["threads"])
    return report
