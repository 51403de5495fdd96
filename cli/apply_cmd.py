"""`trimkit apply`: insert a recipe's passes into a model, show what went where, profile, save."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import click

from trimkit.cli import command
from trimkit.errors import ConfigError

__all__ = ["apply", "DEFAULT_RECIPE", "default_configs", "pass_tree"]

DEFAULT_RECIPE = """\
# SmartTrim: per-input token and head trimming
[[pass]]
name = "smarttrim.tokens"

[[pass]]
name = "smarttrim.heads"
"""


def default_configs() -> list:
    from trimkit.passes import parse_recipe, registered_passes

    if "smarttrim.heads" not in registered_passes():
        return parse_recipe(DEFAULT_RECIPE.split("[[pass]]\nname = \"smarttrim.heads\"")[0])
    return parse_recipe(DEFAULT_RECIPE)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
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

    table = Table(title="before / after (per sample)")
    for col in ("", "before", "after", "before / after"):
        table.add_column(col, justify="left" if not col else "right")
    b, a = report["before"], report["after"]
    table.add_row("FLOPs (mean)", f"{b['flops']['mean']:.4g}", f"{a['flops']['mean']:.4g}",
                  f"{report['speedup']['flops']:.3f}x")
    table.add_row("parameters", f"{b['params']:,}", f"{a['params']:,}", "")
    for key in b.get("latency_ms", {}):
        sp = report["speedup"].get(f"latency_{key}")
        table.add_row(f"latency {key.replace('_', ' ')} (ms)", f"{b['latency_ms'][key]:.3f}",
                      f"{a['latency_ms'][key]:.3f}", "-" if sp is None else f"{sp:.3f}x")
    return table


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
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Override every trimming pass's inference threshold.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the second latency measurement.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Inputs counted one by one for the FLOPs summary.")
@click.option("--no-profile", is_flag=True, help="Skip the before/after profile.")
@click.option("--overwrite", is_flag=True, help="Replace an existing trimkit folder at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def apply(model_ref: str, recipe: str | None, out_dir: str, data_spec: str | None, target_ratio: float | None,
          steps: int, threshold: float | None, batch_size: int, samples: int, no_profile: bool, overwrite: bool,
          as_json: bool):
    """Apply a recipe of compression passes, optionally train them, profile and save.

    \b
    Examples:
      trimkit apply --model blip-vqa-tiny --out blip-trimmed
      trimkit apply --model vilt-vqa-tiny --data synthetic:vqa --target-ratio 0.5 --out vilt-trimmed
      trimkit apply --model blip-itm-tiny --recipe recipe.toml --out blip-itm-int8
    """
    from rich.console import Console

    from trimkit.backbones import load_backbone
    from trimkit.runtime import set_threshold
    from trimkit.io import _is_hf, hf_base_writer, is_trimkit_folder, save_folder, state_dict_base_writer
    from trimkit.passes import apply_, parse_recipe

    if is_trimkit_folder(model_ref):
        raise ConfigError(f"{model_ref!r} already holds applied passes; load it with --model in profile/eval, "
                          "or apply to its base model")
    if target_ratio is not None and not 0.0 < target_ratio <= 1.0:
        raise ConfigError(f"--target-ratio must be in (0, 1], got {target_ratio}")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (overwrite and is_trimkit_folder(out)):
        what = "a trimkit folder (add --overwrite)" if is_trimkit_folder(out) else "a non-empty folder"
        raise ConfigError(f"--out {str(out)!r} is {what}; nothing was written")
    console = Console(stderr=as_json, quiet=as_json)
    configs = parse_recipe(recipe) if recipe else default_configs()
    if data_spec is not None:
        _apply_and_train(console, model_ref, configs, out, data_spec, target_ratio, steps, threshold, samples,
                         batch_size, overwrite, as_json)
        return
    backbone = load_backbone(model_ref)
    base = copy.deepcopy(backbone.model)  # the model before any pass: written as the folder's base
    report = apply_(backbone.model, configs, inputs=backbone.example_inputs(2), hints=backbone.hints)
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
                          progress=not as_json, name=backbone.name)
        result["profile"] = {side: {"flops": profile[side]["flops"], "params": profile[side]["params"],
                                    "latency_ms": profile[side]["latency_ms"]} for side in ("before", "after")}
        result["profile"]["speedup"] = profile["speedup"]
        console.print(_summary_table(result["profile"]))
    writer = hf_base_writer(base) if _is_hf(base) else state_dict_base_writer(base)
    save_folder(out, base_ref=model_ref, model=model, overwrite=overwrite, base_model_dir_writer=writer)
    console.print(f"saved to [bold]{out}[/]  (load with trimkit.load({str(out)!r}) or --model {out})")
    if as_json:
        click.echo(json.dumps(result, default=str))


def _apply_and_train(console, model_ref, configs, out: Path, data_spec, target_ratio, steps, threshold, samples,
                     batch_size, overwrite, as_json):
    """The one-stop path: fit to the data, apply, train, evaluate before/after, save."""
    import shutil

    from rich.table import Table

    from trimkit.runtime import set_threshold
    from trimkit.passes import applied_passes
    from trimkit.passes.registry import config_to_dict
    from trimkit.train import evaluate, train

    if not any(getattr(c, "tags", ()) and "trim" in c.tags for c in configs):
        raise ConfigError("--data trains trimming passes, but the recipe has none (add smarttrim.tokens / "
                          "smarttrim.heads)")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    result = train(model_ref, data_spec, recipe=configs, target_ratio=target_ratio, steps=steps, out_dir=out,
                   progress=not as_json)
    model = result.model
    if threshold is not None:
        set_threshold(model, threshold)
    passes = [{"name": type(r.config).name, "config": config_to_dict(r.config)["_data"], "report": r.result.report}
              for r in applied_passes(model)]
    console.print(pass_tree(f"{model_ref}: {len(passes)} pass(es), trained {steps} steps", {"passes": passes}))
    report = evaluate(result.backbone, data_spec, samples=samples, latency_batch=batch_size)
    table = Table(title=f"before / after on {report['data']} ({report['items']} items)")
    for col in ("", "before (untrimmed)", "after", "before / after"):
        table.add_column(col, justify="left" if not col else "right")
    name = report["metric"]["name"]
    table.add_row(name, f"{report['metric_untrimmed']['value']:.4f}", f"{report['metric']['value']:.4f}", "")
    table.add_row("FLOPs / sample (mean)", f"{report['flops_untrimmed']['mean']:.4g}", f"{report['flops']['mean']:.4g}",
                  f"{1 / report['flops_ratio']:.3f}x")
    for key, value in report["latency_ratio"].items():
        if value:
            table.add_row(f"latency {key.replace('_', ' ')}", "", "", f"{1 / value:.3f}x")
    console.print(table)
    console.print(f"saved to [bold]{out}[/]  (load with trimkit.load({str(out)!r}) or --model {out})")
    if as_json:
        click.echo(json.dumps({"model": model_ref, "out": str(out), "passes": passes,
                               "training": result.to_dict(), "eval": report}, default=str))
