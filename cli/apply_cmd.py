"""`trimkit apply`: insert a recipe's passes into a model, show what went where, profile, save."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import click

from trimkit.cli import command
from trimkit.errors import ConfigError

__all__ = ["apply", "DEFAULT_RECIPE", "default_configs", "decoder_configs", "pass_tree"]

DEFAULT_RECIPE = """\
# SmartTrim: per-input token and head trimming
[[pass]]
name = "smarttrim.tokens"

[[pass]]
name = "smarttrim.heads"
"""


SPEEDUP = "speedup = before / after (> 1 is faster)"


def default_configs() -> list:
    from trimkit.passes import parse_recipe, registered_passes

    if "smarttrim.heads" not in registered_passes():
        return parse_recipe(DEFAULT_RECIPE.split("[[pass]]\nname = \"smarttrim.heads\"")[0])
    return parse_recipe(DEFAULT_RECIPE)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} <- {v}" for k, v in value.items()) if value else "-"
    return str(value)


def pass_tree(title: str, report_dict: dict):
    """A rich Tree: one branch per pass with its fields and what its report says it did."""
    from rich.tree import Tree

    tree = Tree(f"[bold]{title}[/]")
    for p in report_dict["passes"]:
        fields = ", ".join(f"{k}={_fmt(v)}" for k, v in p["config"].items())
        branch = tree.add(f"[cyan]{p['name']}[/] [dim]({fields})[/]")
        for key, value in p["report"].items():
            if key == "notes" or value in (None, [], {}, ""):
                continue
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], (dict, list)):
                sub = branch.add(f"{key}: {len(value)}")
                for item in value[:12]:
                    sub.add(_fmt(item) if not isinstance(item, dict) else
                            ", ".join(f"{k}={_fmt(v)}" for k, v in item.items()))
                if len(value) > 12:
                    sub.add(f"... {len(value) - 12} more")
            else:
                branch.add(f"{key}: {_fmt(value)}")
        for note in p["report"].get("notes", []) or []:
            branch.add(f"[yellow]note:[/] {note}")
    return tree


def _summary_table(report: dict):
    from rich.table import Table

    table = Table(title="before / after (per sample)", caption=SPEEDUP)
    for col in ("", "before", "after", "speedup"):
        table.add_column(col, justify="left" if not col else "right")
    b, a = report["before"], report["after"]
    table.add_row("FLOPs (mean)", f"{b['flops']['mean']:.4g}", f"{a['flops']['mean']:.4g}",
                  _times(report["speedup"].get("flops")))
    table.add_row("parameters", f"{b['params']:,}", f"{a['params']:,}", "")
    for key in b.get("latency_ms", {}):
        table.add_row(f"latency {key.replace('_', ' ')} (ms)", _number(b["latency_ms"].get(key), ".3f"),
                      _number(a.get("latency_ms", {}).get(key), ".3f"), _times(report["speedup"].get(f"latency_{key}")))
    return table


def _number(value, spec: str) -> str:
    """`value` formatted, or "-" where there is no finite number."""
    return f"{value:{spec}}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _times(ratio) -> str:
    return "-" if _number(ratio, ".3f") == "-" else f"{ratio:.3f}x"


def _inverse(ratio):
    """before / after from an after / before ratio (None where there is no positive finite one)."""
    return 1.0 / ratio if isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0 else None


def require_attention(model_map, name: str) -> None:
    """`ConfigError` "nothing to trim" when the located model has no attention site."""
    if not any(layer.attention for stream in model_map.streams for layer in stream.layers):
        raise ConfigError(f"nothing to trim: no attention site found in {name}")


def _check_args(model_ref: str, out_dir: str, data_spec: str | None, target_ratio: float | None,
                overwrite: bool) -> Path:
    """Everything that can be checked before loading the model; the output folder."""
    from trimkit.data import parse_data_spec
    from trimkit.io import is_trimkit_folder, prepare_out_dir

    if is_trimkit_folder(model_ref):
        raise ConfigError(f"{model_ref!r} already holds applied passes; load it with --model in profile/eval, "
                          "or apply to its base model")
    if target_ratio is not None and not 0.0 < target_ratio <= 1.0:
        raise ConfigError(f"--target-ratio must be in (0, 1], got {target_ratio}")
    if data_spec is not None:
        parse_data_spec(data_spec)
    return prepare_out_dir(out_dir, overwrite=overwrite)


def _interrupted(out: Path, existed: bool) -> KeyboardInterrupt:
    kept = f"{str(out)!r} was left as it was" if existed else f"nothing was written to {str(out)!r}"
    return KeyboardInterrupt(f"interrupted; {kept}")


@command("apply")
@click.option("--model", "model_ref", required=True, help="Backbone name, hub id, folder or file.py:factory.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
              help="TOML recipe of passes (default: SmartTrim tokens + heads).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write (safetensors weights + JSON recipe and map).")
@click.option("--data", "data_spec", default=None,
              help="Train the trainable passes on this data (synthetic:vqa, folder:PATH, ...).")
@click.option("--target-ratio", type=float, default=None,
              help="Executed-FLOPs ratio the training steers to (default: the recipe's).")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps (with --data).")
@click.option("--lr-backbone", type=click.FloatRange(min=0.0), default=None,
              help="Learning rate of the backbone while the passes train (with --data; default: trimkit train's).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Override every trimming pass's inference threshold.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the second latency measurement.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Inputs counted one by one for the FLOPs summary.")
@click.option("--no-profile", is_flag=True, help="Skip the before/after profile.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing trimkit folder at --out, once the new one is complete.")
@click.option("--device", default="cpu", show_default=True, help="Device of training and evaluation (with --data): "
              "cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Precision of training and evaluation (with --data); trimmers stay float32.")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables (no progress).")
def apply(model_ref: str, recipe: str | None, out_dir: str, data_spec: str | None, target_ratio: float | None,
          steps: int, lr_backbone: float | None, threshold: float | None, batch_size: int, samples: int,
          no_profile: bool, overwrite: bool, device: str, dtype: str, no_progress: bool, as_json: bool):
    """Apply a recipe of compression passes, optionally train them, profile and save.

    \b
    Examples:
      trimkit apply --model blip-vqa-tiny --out blip-trimmed
      trimkit apply --model vilt-vqa-tiny --data synthetic:vqa --target-ratio 0.5 --out vilt-trimmed
      trimkit apply --model blip-itm-tiny --recipe recipe.toml --out blip-itm-int8
      trimkit apply --model llava-tiny --data "synthetic:vqa?n=400" --target-ratio 0.5 \\
                    --lr-backbone 1e-3 --out llava-trimmed
    """
    from rich.console import Console

    from trimkit.passes import parse_recipe

    from trimkit.device import resolve_device

    resolve_device(device)
    if data_spec is None and (device != "cpu" or dtype != "float32"):
        raise ConfigError("--device and --dtype choose where --data training and evaluation run; without --data, "
                          "apply profiles on cpu in float32 (use trimkit eval --device/--dtype on the saved folder)")
    configs = parse_recipe(recipe) if recipe else default_configs()
    default = recipe is None
    out = _check_args(model_ref, out_dir, data_spec, target_ratio, overwrite)
    console = Console(stderr=as_json, quiet=as_json)
    existed = out.exists()
    show = not (as_json or no_progress)
    try:
        if data_spec is not None:
            _apply_and_train(console, model_ref, configs, out, data_spec, target_ratio, steps, threshold, samples,
                             batch_size, as_json, show, default, lr_backbone, placement=(device, dtype))
        else:
            _apply_only(console, model_ref, configs, out, threshold, batch_size, samples, no_profile, overwrite,
                        as_json, show)
    except KeyboardInterrupt:
        raise _interrupted(out, existed) from None


def _apply_only(console, model_ref, configs, out: Path, threshold, batch_size, samples, no_profile, overwrite,
                as_json, progress):
    """Apply the passes, print what went where, profile before/after and save."""
    from trimkit.backbones import load_backbone
    from trimkit.runtime import set_threshold
    from trimkit.io import base_writer, save_folder, stores_example_inputs
    from trimkit.locate import locate
    from trimkit.passes import apply_

    backbone = load_backbone(model_ref)
    base = copy.deepcopy(backbone.model)  # the model before any pass: written as the folder's base
    example = backbone.example_inputs(2)
    model_map = locate(backbone.model, example, hints=backbone.hints)
    require_attention(model_map, backbone.name)
    report = apply_(backbone.model, configs, model_map=model_map, inputs=example, hints=backbone.hints)
    model = report.model
    if threshold is not None:
        set_threshold(model, threshold)
    result = {"model": model_ref, "out": str(out), "passes": report.to_dict()["passes"]}
    console.print(pass_tree(f"{backbone.name}: {len(configs)} pass(es)", report.to_dict()))
    if report.trainable:
        console.print("[yellow]note:[/] the trimmers are untrained and keep almost every token; train them with "
                      "--data (or `trimkit train`) to save compute")
    if not no_profile:
        from trimkit.profile import compare

        profile = compare(base, model, backbone.example_inputs, batch_size=batch_size, samples=samples,
                          progress=progress, name=backbone.name)
        result["profile"] = {side: {"flops": profile[side]["flops"], "params": profile[side]["params"],
                                    "latency_ms": profile[side]["latency_ms"]} for side in ("before", "after")}
        result["profile"]["speedup"] = profile["speedup"]
        console.print(_summary_table(result["profile"]))
    save_folder(out, base_ref=model_ref, model=model, overwrite=overwrite, base_model_dir_writer=base_writer(base),
                example_inputs=example if stores_example_inputs(backbone) else None)
    console.print(f"saved to [bold]{out}[/]  (load with trimkit.load({str(out)!r}) or --model {out})")
    if as_json:
        click.echo(json.dumps(result, default=str))


def _eval_table(report: dict):
    """The before/after table of a trained model: metric, FLOPs, latency; speedups are before / after."""
    from rich.table import Table

    table = Table(title=f"before / after on {report['data']} ({report['items']} items)", caption=SPEEDUP)
    for col in ("", "before (untrimmed)", "after", "speedup"):
        table.add_column(col, justify="left" if not col else "right")
    name = report["metric"]["name"]
    table.add_row(name, _number(report["metric_untrimmed"]["value"], ".4f"), _number(report["metric"]["value"], ".4f"),
                  "")
    table.add_row("FLOPs / sample (mean)", _number(report["flops_untrimmed"]["mean"], ".4g"),
                  _number(report["flops"]["mean"], ".4g"), _times(_inverse(report["flops_ratio"])))
    for key, value in report["latency_ratio"].items():
        ms = report.get("latency_ms", {}).get(key, {})
        if value is not None:
            table.add_row(f"latency {key.replace('_', ' ')} (ms)", _number(ms.get("untrimmed"), ".3f"),
                          _number(ms.get("trimmed"), ".3f"), _times(_inverse(value)))
    return table


def decoder_configs(configs: list) -> tuple[list, list[str]]:
    """The default recipe for a decoder VLM: its token pass only (head trimming decides per forward,
    so decoding steps would meet a KV cache holding other heads' keys); the notes that say so."""
    kept = [c for c in configs if type(c).name != "smarttrim.heads"]
    if len(kept) == len(configs):
        return configs, []
    return kept, ["decoder VLM: the default recipe leaves out smarttrim.heads (generation reuses the prefill's "
                  "KV cache, which must hold every head); image tokens are trimmed inside the language model"]


def _apply_and_train(console, model_ref, configs, out: Path, data_spec, target_ratio, steps, threshold, samples,
                     batch_size, as_json, progress, default: bool = False, lr_backbone: float | None = None,
                     placement=("cpu", "float32")):
    """The one-stop path: fit to the data, apply, train (into a staging folder swapped in when
    complete), evaluate before/after. A decoder VLM (``lm`` task) trains on text answers, and the
    default recipe trims its image tokens only (:func:`decoder_configs`)."""
    from trimkit.backbones import load_backbone
    from trimkit.runtime import set_threshold
    from trimkit.io import staged_out_dir
    from trimkit.passes import applied_passes
    from trimkit.passes.registry import config_to_dict
    from trimkit.train import TrainConfig, evaluate, train

    if not any(getattr(c, "tags", ()) and "trim" in c.tags for c in configs):
        raise ConfigError("--data trains trimming passes, but the recipe has none (add smarttrim.tokens / "
                          "smarttrim.heads)")
    model = model_ref
    if default:
        model = load_backbone(model_ref)
        if model.task.kind == "lm":
            configs, notes = decoder_configs(configs)
            for note in notes:
                console.print(f"[yellow]note:[/] {note}")
    with staged_out_dir(out) as staging:
        extra = {} if lr_backbone is None else {"lr_backbone": lr_backbone}
        result = train(model, data_spec, recipe=configs, target_ratio=target_ratio, steps=steps,
                       out_dir=staging, progress=progress, base_ref=model_ref,
                       config=TrainConfig(device=placement[0], dtype=placement[1], **extra))
    model = result.model
    if threshold is not None:
        set_threshold(model, threshold)
    passes = [{"name": type(r.config).name, "config": config_to_dict(r.config)["_data"], "report": r.result.report}
              for r in applied_passes(model)]
    console.print(pass_tree(f"{model_ref}: {len(passes)} pass(es), trained {steps} steps", {"passes": passes}))
    report = evaluate(result.backbone, data_spec, samples=samples, latency_batch=batch_size, progress=progress,
                      device=placement[0], dtype=placement[1])
    console.print(_eval_table(report))
    console.print(f"saved to [bold]{out}[/]  (load with trimkit.load({str(out)!r}) or --model {out})")
    if as_json:
        training = dict(result.to_dict(), out_dir=str(out))
        if training.get("checkpoint"):
            training["checkpoint"] = str(out / Path(training["checkpoint"]).relative_to(staging))
        click.echo(json.dumps({"model": model_ref, "out": str(out), "passes": passes,
                               "training": training, "eval": report}, default=str))
