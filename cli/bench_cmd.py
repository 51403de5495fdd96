"""`trimkit bench`: SmartTrim against training-free baselines at matched executed FLOPs, with a report."""
from __future__ import annotations

import shlex
import time
from dataclasses import replace

import click

from trimkit.cli import command
from trimkit.cli.options import config_options, given
from trimkit.train.config import TrainConfig

__all__ = ["bench_command"]

# SmartTrim training settings the bench passes on (see `trimkit.bench.run.train_config`); unset
# options keep the bench configuration's values
_TRAINING = ("lr_backbone", "freeze_backbone", "full_task", "dual_lr", "logit_penalty", "logit_margin", "undershoot")
_TRAINING_HELP = {
    "lr_backbone": "Backbone learning rate of SmartTrim training and baseline fine-tuning (default 1e-5).",
    "freeze_backbone": "SmartTrim trains its trimmers only (backbone frozen).",
    "full_task": "Weight of the full-capacity pass's task loss.",
    "dual_lr": "Step of the Lagrange multiplier on the FLOPs-ratio gap in SmartTrim training.",
    "logit_penalty": "Weight of the penalty on SmartTrim keep-logits beyond --logit-margin (default 0 = off).",
    "logit_margin": "Keep-logit magnitude left free (default 4).",
    "undershoot": "SmartTrim trains to the target ratio minus this (negative: above it); the threshold is still "
                  "calibrated to the target.",
}


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ratios(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    from trimkit.errors import ConfigError

    out = []
    for part in _names(value):
        try:
            x = float(part.rstrip("x"))
        except ValueError:
            raise ConfigError(f"--reductions takes numbers such as 1.5,2,3; got {part!r}") from None
        if x <= 1:
            raise ConfigError(f"a FLOPs reduction must be > 1 (e.g. 2 for 2x fewer), got {part!r}")
        out.append(1.0 / x)
    return tuple(out)


def _command_line(ctx: click.Context) -> str:
    """``trimkit bench`` with the options given on the command line (not their defaults)."""
    words = ["trimkit", "bench"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source == click.core.ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                words.append(flag)
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _counts(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    from trimkit.errors import ConfigError

    try:
        return tuple(int(v) for v in _names(value))
    except ValueError:
        raise ConfigError(f"--speed-rounds takes integers such as 7,3; got {value!r}") from None


def _speed(quick: bool, families, reductions, baselines_at, methods, layers, rounds, out_dir, readme, no_report,
           report_only, ctx) -> None:
    """``trimkit bench --speed``: run the speed table (unless --report-only) and write its report."""
    from trimkit.bench.speed import SPEED_DEFAULT, SPEED_QUICK, run_speed
    from trimkit.bench.speed_report import build_speed_report

    out_dir = out_dir or "benchmarks/results/speed"
    if not report_only:
        config = SPEED_QUICK if quick else SPEED_DEFAULT
        changes = {k: v for k, v in dict(models=_names(families), methods=_names(methods), layers=layers, rounds=rounds,
                                           reductions=reductions and tuple(round(1 / r, 6) for r in reductions),
                                           baseline_reductions=baselines_at and tuple(round(1 / r, 6) for r in baselines_at)
                                           ).items() if v is not None}
        config = replace(config, **changes)
        start = time.perf_counter()
        run_dir = run_speed(config, out_dir, command=_command_line(ctx), log=click.echo)
        click.echo(f"speed bench finished in {time.perf_counter() - start:.0f} s; results in {run_dir}")
        if no_report:
            return
    # with the default --readme the SmartTrim summary also goes to the top-level README
    report = build_speed_report(out_dir, readme=readme,
                                summary="README.md" if readme == "benchmarks/README.md" else None)
    click.echo(report["markdown"])


def _protocol(path, models, methods, out_dir, threads, readme, no_report, report_only, ctx) -> None:
    """``trimkit bench --protocol FILE``: run a frozen protocol (unless --report-only), then its report."""
    from trimkit.bench.protocol import load_protocol, plan
    from trimkit.bench.protocol_report import build_protocol_report
    from trimkit.bench.protocol_run import run_protocol

    protocol = load_protocol(path)
    out_dir = out_dir or f"benchmarks/results/protocol/{protocol.name}"
    if not report_only:
        start = time.perf_counter()
        chosen = replace(protocol, models=_names(models)) if models else protocol
        only = {r.name for r in plan(chosen) if r.method in _names(methods)} if methods else None
        run_protocol(chosen, out_dir, command=_command_line(ctx), threads=threads or 1, log=click.echo, only=only)
        click.echo(f"protocol {protocol.name} finished in {time.perf_counter() - start:.0f} s; results in {out_dir}")
        if no_report:
            return
    report = build_protocol_report(protocol, out_dir, readme="README.md" if readme == "benchmarks/README.md" else readme)
    click.echo(report["markdown"])


@command("bench")
@click.option("--protocol", "protocol_path", type=click.Path(dir_okay=False),
              help="Run a frozen accuracy protocol (a TOML file such as benchmarks/protocols/where-v1.toml): "
                   "shipped bases, 10,000-item test split, seeds, controls, baselines; then its table with "
                   "paired-bootstrap intervals. --out defaults to benchmarks/results/protocol/<name>; --threads "
                   "to 1; --families names other shipped models to run it on (e.g. blip-vqa-where), --methods a subset "
                   "(prior, full, full+ft, smarttrim, a baseline, a baseline+ft); --readme names the file "
                   "whose protocol block is rewritten (default README.md).")
@click.option("--speed", is_flag=True, help="The speed table instead: published base configs (random weights), "
              "SmartTrim and the baselines at 1.5/2/3x fewer executed FLOPs, latency at batch 1 and 32 against a "
              "clean copy (one thread). --families takes blip,vilt,bridgetower or published names; "
              "--out defaults to benchmarks/results/speed.")
@click.option("--speed-quick", is_flag=True, help="A shorter speed table: 2x only, batch 1 and 8, fewer rounds.")
@click.option("--speed-layers", type=click.IntRange(min=1, max=12),
              help="Layers per stream of the speed models (default 4 of the published 12).")
@click.option("--speed-baselines-at", help="FLOPs reductions of the baselines in the speed table (default: "
              "--reductions), e.g. 2.")
@click.option("--speed-rounds", help="Interleaved timing rounds at batch 1 and at the large batch, e.g. 7,3 "
              "(the default).")
@click.option("--quick", is_flag=True, help="Reduced bench (ViLT, VQA, 2x, training-free baselines, one seed).")
@click.option("--smoke", is_flag=True, help="The pipeline with a handful of steps and tiny data (CI).")
@click.option("--families", help="Comma-separated: blip,bridgetower,vilt.")
@click.option("--tasks", help="Comma-separated: vqa,truefalse.")
@click.option("--reductions", help="SmartTrim targets as FLOPs reductions, e.g. 1.5,2,3.")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds of the 2x points.")
@click.option("--steps", type=click.IntRange(min=1), help="SmartTrim training (and baseline fine-tuning) steps.")
@click.option("--base-steps", type=click.IntRange(min=1), help="Base-model training steps (default: the recipe's).")
@click.option("--base-scene-weight", type=click.FloatRange(min=0.0),
              help="Base training: weight of the per-patch scene loss (BLIP, BridgeTower; default 0).")
@click.option("--base-scene-targets", type=click.Choice(["attributes", "full"]),
              help="Base training: what the scene loss reads (default attributes; see trimkit/bench/README.md).")
@click.option("--no-finetune", is_flag=True, help="Skip the fine-tuned baselines.")
@click.option("--no-ablations", is_flag=True, help="Skip the ablations.")
@click.option("--methods", help="Comma-separated methods to run (default: all planned), e.g. "
              "full,smarttrim,smarttrim-tokens,tome.merge.")
@click.option("--ablations-all-ratios", is_flag=True, help="Run the ablations at every target, not only 2x.")
@config_options(TrainConfig, _TRAINING, unset=True, help=_TRAINING_HELP, low={"lr_backbone": 0.0})
@click.option("--device", help="Where models train and are evaluated: cpu, cuda, cuda:N or mps (default cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Precision of SmartTrim training, baseline fine-tuning and evaluation (default float32; "
                   "trimmers stay float32).")
@click.option("--threads", type=click.IntRange(min=1), help="torch.set_num_threads (default 2).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Results folder (default benchmarks/results; --quick: benchmarks/results/quick).")
@click.option("--docs", "docs_dir", default="docs", show_default=True, type=click.Path(file_okay=False),
              help="Where the plots go.")
@click.option("--readme", default="benchmarks/README.md", show_default=True, type=click.Path(dir_okay=False),
              help="README whose bench block is rewritten.")
@click.option("--no-report", is_flag=True, help="Only write the results JSON.")
@click.option("--report-only", is_flag=True, help="Rebuild the plots and README table from the results JSON.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Base-model cache (default ~/.cache/trimkit/bench).")
def bench_command(protocol_path, speed, speed_quick, speed_layers, speed_baselines_at, speed_rounds, quick, smoke, families, tasks,
                  reductions, seeds, steps, base_steps, base_scene_weight, base_scene_targets, no_finetune,
                  no_ablations, methods, ablations_all_ratios, device, dtype, threads, out_dir, docs_dir, readme,
                  no_report, report_only, cache_dir, **training):
    """Run the trimming benchmark: full model, SmartTrim at 1.5x/2x/3x fewer executed FLOPs, the
    training-free baselines at matched FLOPs (also fine-tuned), and ablations at 2x.

    One JSON per run goes to --out as soon as it finishes; a rerun skips finished runs with the same
    settings. The report (a PNG per family/task in --docs, a table in --readme between
    `<!-- bench:start -->` and `<!-- bench:end -->`) is rebuilt from those files.

    \b
    Examples:
      trimkit bench --quick
      trimkit bench --families blip,bridgetower --tasks vqa --seeds 3
      trimkit bench --report-only
      trimkit bench --speed
      trimkit bench --speed-quick --families vilt
    """
    from trimkit.bench.report import build_report
    from trimkit.bench.run import QUICK, SMOKE, BenchConfig, run_bench
    from trimkit.errors import ConfigError

    if protocol_path:
        _protocol(protocol_path, families, methods, out_dir, threads, readme, no_report, report_only, click.get_current_context())
        return
    if speed or speed_quick:
        _speed(speed_quick, families, _ratios(reductions), _ratios(speed_baselines_at), methods, speed_layers,
               _counts(speed_rounds), out_dir, readme, no_report, report_only, click.get_current_context())
        return
    if quick and smoke:
        raise ConfigError("--quick and --smoke exclude each other")
    config = SMOKE if smoke else QUICK if quick else BenchConfig()
    default_out = "benchmarks/results/quick" if quick else "benchmarks/results/smoke" if smoke else "benchmarks/results"
    out_dir = out_dir or default_out
    if not report_only:
        changes = {k: v for k, v in dict(families=_names(families), tasks=_names(tasks), ratios=_ratios(reductions),
                                           seeds=seeds, steps=steps, base_steps=base_steps, device=device, dtype=dtype,
                                           threads=threads, cache_dir=cache_dir).items() if v is not None}
        if base_scene_targets and not base_scene_weight:
            raise ConfigError("--base-scene-targets needs --base-scene-weight")
        if base_scene_weight:
            changes["base_train"] = (*config.base_train, ("scene_weight", base_scene_weight),
                                     *([("scene_targets", base_scene_targets)] if base_scene_targets else []))
        if no_finetune:
            changes["finetune"] = False
        if no_ablations:
            changes["ablations"] = False
        if methods:
            changes["methods"] = _names(methods)
        if ablations_all_ratios:
            changes["ablations_all"] = True
        changes.update(given(TrainConfig, training, _TRAINING))
        config = replace(config, **changes)
        start = time.perf_counter()
        run_bench(config, out_dir, command=_command_line(click.get_current_context()), log=click.echo)
        click.echo(f"bench finished in {time.perf_counter() - start:.0f} s; results in {out_dir}")
    if no_report and not report_only:
        return
    report = build_report(out_dir, docs=docs_dir, readme=readme)
    click.echo(report["markdown"])
    for path in report["plots"]:
        click.echo(f"plot: {path}")
    if report["skipped"]:
        click.echo(report["skipped"], err=True)
