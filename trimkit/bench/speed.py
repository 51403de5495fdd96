"""`trimkit bench --speed`: latency against executed FLOPs at published base sizes.

For each published model (:mod:`trimkit.bench.published`, random weights) and each method at each
FLOPs reduction, a *variant* is the model with that method inserted: SmartTrim (``smarttrim.tokens``
+ ``smarttrim.heads``, untrained, so its scorers get random weights that make decisions vary per
input, and one shared threshold is bisected until the profiler's executed-FLOPs ratio on a few
calibration rows meets the target) or a training-free baseline (``flops_ratio`` calibration at
apply time). Variants share the clean model's parameters (never written), but each is its own
module tree with its own hooks; the clean model has no pass applied at all.

Measured in one process with one thread: executed FLOPs per sample (profiler, each measured row
alone; for SmartTrim also the padded large batch), and latency at each batch size as interleaved
rounds (every round runs the clean model and every variant once, in rotating order), medians.
One JSON per variant goes to ``<out>/runs/<run id>/``, failed variants included, with the run's
manifest; :mod:`trimkit.bench.speed_report` builds the table from them.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trimkit.backbones import Backbone
from trimkit.bench.published import published_model
from trimkit.bench.run import git_revision
from trimkit.errors import ConfigError
from trimkit.passes import apply_
from trimkit.passes.random_tokens import RandomTokensConfig
from trimkit.passes.smarttrim import SmartTrimTokensConfig, TokenTrimmer
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig
from trimkit.passes.tome import ToMeMergeConfig
from trimkit.passes.topk import TopKClsAttentionConfig
from trimkit.profile import count_flops
from trimkit.profile.running import fixed_threads
from trimkit.runtime import set_threshold, state

__all__ = ["SpeedConfig", "SPEED_DEFAULT", "SPEED_QUICK", "METHODS", "run_speed", "randomise_trimmers",
           "calibrate_executed", "centre_token_logits", "interleaved_times", "shared_copy",
           "build_variant", "Variant", "flops_of", "row_slice"]

METHODS: tuple[str, ...] = ("smarttrim", "random.tokens", "topk.cls_attention", "tome.merge")
DECISIONS: tuple[str, ...] = ("centred", "raw")
_SPAN = 48.0  # threshold search range in log-odds: random scorers on un-normalised hidden states reach tens
_BASELINES = {"random.tokens": RandomTokensConfig, "topk.cls_attention": TopKClsAttentionConfig,
              "tome.merge": ToMeMergeConfig}


@dataclass(frozen=True)
class SpeedConfig:
    """What `run_speed` measures.

    models: published model names (or families); layers: layers per stream (None: all, as published);
    reductions: executed-FLOPs reductions (2 = 2x fewer); batches: timed batch sizes; rounds: timing
    rounds per batch size (same order as ``batches``); calib_rows / flops_rows: single rows that
    calibrate SmartTrim's threshold / measure each variant's FLOPs; tiny: the registry's tiny configs
    of the same classes (tests).
    """

    models: tuple[str, ...] = ("blip-vqa-base", "vilt-b32", "bridgetower-base")
    methods: tuple[str, ...] = METHODS
    reductions: tuple[float, ...] = (1.5, 2.0, 3.0)
    baseline_reductions: tuple[float, ...] | None = None  # the baselines' reductions (None: ``reductions``)
    layers: int | None = 4
    batches: tuple[int, ...] = (1, 32)
    rounds: tuple[int, ...] = (7, 3)
    calib_rows: int = 2
    flops_rows: int = 4
    calib_iterations: int = 12
    padded_flops: bool = True
    seed: int = 0
    threads: int = 1
    heads_batched: str = "union"  # SmartTrimHeadsConfig.batched: how rows that keep different heads run
    global_scale: float = 1.0  # random token scorers' weight on the global states (randomise_trimmers)
    decisions: str = "centred"  # "raw" random scorers, or "centred" per row plus a per-position offset
    tiny: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown speed method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if len(self.rounds) != len(self.batches) or min(self.rounds, default=1) < 1:
            raise ConfigError(f"rounds {self.rounds} must give one count >= 1 per batch size {self.batches}")
        if self.decisions not in DECISIONS:
            raise ConfigError(f"decisions must be one of {', '.join(DECISIONS)}, got {self.decisions!r}")
        if any(r <= 1 for r in (*self.reductions, *(self.baseline_reductions or ()))):
            raise ConfigError(f"FLOPs reductions must be > 1, got {self.reductions}")
        for m in self.models:
            published_model(m)


SPEED_DEFAULT = SpeedConfig()
SPEED_QUICK = SpeedConfig(reductions=(2.0,), batches=(1, 8), rounds=(5, 3), flops_rows=2)


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are the original tensors (modules, hooks
    and attributes are copies)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def randomise_trimmers(model: nn.Module, seed: int, global_scale: float = 1.0) -> int:
    """Random weights (zero biases) for every SmartTrim scorer, so decisions vary per input; returns
    the number of tensors set.

    ``global_scale`` multiplies the token scorers' weights on the global states (their own stream's
    and the other modality's). Those terms add one offset per row to every token's score, so at full
    scale random rows keep very different amounts (2-6x apart on BLIP-base), far more than trained
    trimmers, whose cost loss holds every row near the target; a smaller scale keeps the per-input
    decisions while the rows' kept amounts stay close. The terms are still computed either way."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if state.TOKEN_TRIMMERS not in name and state.HEAD_TRIMMERS not in name:
                continue
            if name.endswith(".weight"):
                scale = global_scale if state.TOKEN_TRIMMERS in name and name.endswith(
                    (".glob.weight", ".cross.weight")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (2 * scale / p.shape[-1] ** 0.5))
            else:
                p.zero_()
            n += 1
    return n


def centre_token_logits(model: nn.Module, seed: int, positions: int = 8192) -> int:
    """Make every SmartTrim token scorer of `model` return its logits centred per row plus a fixed
    random offset per position (N(0, 1)); returns the number of scorers changed.

    With random weights, the hidden states of a published-size model on random inputs are nearly
    alike within a row, so random scorers give every token of a row about the same logit and rows
    differ by tens: one threshold then keeps almost all of some rows and almost none of others
    (BLIP-base: per-row reductions 1.97x to 5.9x, and no threshold met 2x). Trained scorers rank
    tokens within a row, and the cost loss holds every row near the target. Centring removes the
    per-row level; the offset ranks tokens within a row. The scorer still runs in full, and the
    centring and offset add a few operators to each trimmed layer.
    """
    g = torch.Generator().manual_seed(seed)
    n = 0
    for module in model.modules():
        if isinstance(module, TokenTrimmer):
            offset = torch.randn(positions, generator=g)
            module.forward = _centred(module.forward, offset)
            module.fast_logits = _centred(module.fast_logits, offset)
            n += 1
    return n


def _centred(logits: Callable, offset: torch.Tensor) -> Callable:
    def call(*args, **kwargs):
        z = logits(*args, **kwargs)
        if z.shape[-1] > offset.shape[0]:
            raise ConfigError(f"centred speed decisions cover {offset.shape[0]} positions, got {z.shape[-1]}")
        return z - z.mean(-1, keepdim=True) + offset[: z.shape[-1]].to(z.device, z.dtype)
    return call


def flops_of(model: nn.Module, rows: list[dict]) -> list[float]:
    with torch.no_grad():
        return [count_flops(model, r).flops for r in rows]


def calibrate_executed(model: nn.Module, rows: list[dict], clean: list[float], target: float,
                       iterations: int = 12) -> tuple[float, float]:
    """Bisect the shared threshold (in log-odds, [-48, 48], from 0.5) until the profiler's executed
    FLOPs on `rows` over `clean` (their untrimmed counts) is closest to `target`; sets it and returns
    ``(threshold, ratio)``. Ratios fall as the threshold rises."""
    lo, hi, tried = -_SPAN, _SPAN, []
    for i in range(iterations + 1):
        z = 0.0 if i == 0 else (lo + hi) / 2
        th = 1.0 / (1.0 + math.exp(-z))
        set_threshold(model, th)
        ratio = sum(flops_of(model, rows)) / sum(clean)
        tried.append((th, ratio))
        lo, hi = (z, hi) if ratio > target else (lo, z)
    best = min(tried, key=lambda t: (abs(t[1] - target), abs(t[0] - 0.5)))
    set_threshold(model, best[0])
    return best


def interleaved_times(models: dict[str, nn.Module], inputs: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of one forward of each model, `rounds` times; every round runs each model once,
    the order rotated by one model per round."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def row_slice(inputs: dict, lo: int, hi: int) -> dict:
    n = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in inputs.items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    method: str
    reduction: float
    model: nn.Module | None = None
    record: dict = field(default_factory=dict)
    error: str | None = None


def build_variant(bb: Backbone, method: str, reduction: float, config: SpeedConfig, apply_inputs: dict,
                  calib: list[dict], calib_clean: list[float]) -> Variant:
    v = Variant(method, reduction)
    target = 1.0 / reduction
    try:
        model = shared_copy(bb.model)
        if method == "smarttrim":
            report = apply_(model, [SmartTrimTokensConfig(), SmartTrimHeadsConfig(batched=config.heads_batched)], inputs=apply_inputs,
                            hints=bb.hints)
            randomise_trimmers(model, config.seed + 1, config.global_scale)
            if config.decisions == "centred":
                centre_token_logits(model, config.seed + 2)
            th, ratio = calibrate_executed(model, calib, calib_clean, target, config.calib_iterations)
            v.record = {"threshold": th, "calibrated_ratio": ratio}
        else:
            report = apply_(model, [_BASELINES[method](flops_ratio=target)], inputs=apply_inputs, hints=bb.hints)
            got = report.results[-1].report
            v.record = {"calibrated_ratio": got.get("flops_ratio"), "keep_ratio": got.get("keep_ratio")}
        v.record["passes"] = [type(c).name for c in report.configs]
        v.model = model.eval()
    except Exception as err:  # one failed variant must not stop the table; its JSON says why
        v.error = _first_line(err)
    return v


def _seeded_logits(bb: Backbone, inputs: dict) -> torch.Tensor:
    """The clean model's logits, the global generator seeded first (ViLT draws patches from it)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return bb.task.logits(bb.model(**inputs))


def _check_clean(bb: Backbone, inputs: dict, before: torch.Tensor) -> None:
    after = _seeded_logits(bb, inputs)
    if not torch.equal(before, after):
        raise ConfigError(f"{bb.name}: the clean model's outputs changed while variants were built")


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "ms": [round(t, 3) for t in times]}


def _measure_flops(variants: list[Variant], rows: list[dict], clean: list[float], big: dict | None,
                   clean_big: float | None, log: Callable[[str], None]) -> None:
    for v in variants:
        if v.model is None:
            continue
        trimmed = flops_of(v.model, rows)
        v.record["flops"] = {"rows": len(rows), "clean_per_sample": sum(clean) / len(clean),
                             "trimmed_per_sample": sum(trimmed) / len(trimmed),
                             "reduction": sum(clean) / sum(trimmed),
                             "per_row_reduction": [c / t for c, t in zip(clean, trimmed)]}
        if big is not None and v.method == "smarttrim":
            padded = flops_of(v.model, [big])[0]
            v.record["flops"]["padded_batch"] = {"batch": _batch(big), "clean_per_sample": clean_big,
                                                 "trimmed_per_sample": padded, "reduction": clean_big / padded}
        log(f"  {v.method} {v.reduction}x: executed-FLOPs reduction {v.record['flops']['reduction']:.3f}")


def _batch(inputs: dict) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())


# ----------------------------------------------------------------------------------------------
# One model, one run
# ----------------------------------------------------------------------------------------------
def _environment(config: SpeedConfig) -> dict:
    import os
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": config.threads,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "git_revision": git_revision(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _inputs(bb: Backbone, spec_len: int, batch: int, seed: int) -> dict:
    limit = bb.hints.get("text_len", {}).get("max", spec_len)
    return bb.example_inputs(batch, text_len=min(spec_len, limit), seed=seed)


def _timings(bb: Backbone, variants: list[Variant], inputs: dict, config: SpeedConfig,
             log: Callable[[str], None], done: Callable[[], None]) -> None:
    """Interleaved timing at each batch size; `done` is called after each one (results so far)."""
    ok = [v for v in variants if v.model is not None]
    models = {"clean": bb.model, **{f"{v.method}@{v.reduction:g}": v.model for v in ok}}
    for i, (b, rounds) in enumerate(zip(config.batches, config.rounds)):
        x = row_slice(inputs, 0, b)
        start = time.perf_counter()
        if i == 0:
            interleaved_times(models, x, 1)  # warm-up
        times = interleaved_times(models, x, rounds)
        clean = _summary(times["clean"])
        for v in ok:
            mine = _summary(times[f"{v.method}@{v.reduction:g}"])
            speedup = clean["median_ms"] / mine["median_ms"]
            red = v.record["flops"]["reduction"]
            v.record.setdefault("latency", {})[f"batch_{b}"] = {
                "clean": clean, "trimmed": mine, "speedup": speedup, "speedup_over_reduction": speedup / red}
        log(f"  batch {b}: {rounds} interleaved rounds of {len(models)} models in {time.perf_counter() - start:.0f} s")
        done()


def _record(v: Variant, base: dict) -> dict:
    out = {**base, "method": v.method, "target_reduction": v.reduction, "status": "failed" if v.error else "ok",
           **v.record}
    if v.error:
        out["error"] = v.error
    return out


def _run_model(name: str, config: SpeedConfig, base: dict, log: Callable[[str], None],
               write: Callable[[list[dict]], None]) -> None:
    """Measure one model; `write` gets every variant's record after each batch size is timed."""
    spec = published_model(name)
    layers = None if config.tiny else config.layers
    bb = spec.build(layers, seed=config.seed, tiny=config.tiny)
    base = {**base, "model": spec.describe(layers) if not config.tiny else {"name": bb.name, "tiny": True}}
    inputs = _inputs(bb, spec.text_len, max(config.batches), config.seed + 10)
    base["inputs"] = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    calib = _inputs(bb, spec.text_len, config.calib_rows, config.seed + 20)
    calib = [row_slice(calib, i, i + 1) for i in range(config.calib_rows)]
    rows = [row_slice(inputs, i, i + 1) for i in range(min(config.flops_rows, _batch(inputs)))]
    apply_inputs = _inputs(bb, spec.text_len, 2, config.seed + 30)
    with fixed_threads(config.threads):
        clean_rows, calib_clean = flops_of(bb.model, rows), flops_of(bb.model, calib)
        before = _seeded_logits(bb, rows[0])
        variants = []
        for method in config.methods:
            at = config.reductions if method == "smarttrim" or config.baseline_reductions is None \
                else config.baseline_reductions
            for red in at:
                start = time.perf_counter()
                variants.append(build_variant(bb, method, red, config, apply_inputs, calib, calib_clean))
                v = variants[-1]
                log(f"  {method} {red:g}x: {'built' if v.error is None else 'FAILED: ' + v.error} "
                    f"({time.perf_counter() - start:.0f} s)")
        _check_clean(bb, rows[0], before)
        padded = config.padded_flops and _batch(inputs) > 1 and "smarttrim" in config.methods
        clean_big = flops_of(bb.model, [inputs])[0] if padded else None
        _measure_flops(variants, rows, clean_rows, inputs if padded else None, clean_big, log)
        _timings(bb, variants, inputs, config, log, lambda: write([_record(v, base) for v in variants]))


def _run_id(config: SpeedConfig) -> str:
    names = "+".join(published_model(m).name for m in config.models)
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + names + ("-tiny" if config.tiny else "")


class _RunFolder:
    """A run folder: one JSON per variant (rewritten as its figures come in) and ``manifest.json``."""

    def __init__(self, out_dir: str | Path, base: dict):
        self.dir = Path(out_dir) / "runs" / base["run_id"]
        self.dir.mkdir(parents=True, exist_ok=False)
        self.manifest = {**base, "status": "running", "files": [], "failed": []}
        self.save()

    def save(self) -> None:
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n", encoding="utf-8")

    def write(self, records: list[dict], seconds: float) -> None:
        for r in records:
            r["seconds_model"] = round(seconds, 1)
            stem = f"{r['model']['name']}-{r['method'].replace('*', 'all')}"
            stem += f"-x{r['target_reduction']:g}" if "target_reduction" in r else ""
            (self.dir / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
            if f"{stem}.json" not in self.manifest["files"]:
                self.manifest["files"].append(f"{stem}.json")
            self.manifest["failed"] = [f for f in self.manifest["failed"] if f["file"] != f"{stem}.json"]
            if r["status"] != "ok":
                self.manifest["failed"].append({"file": f"{stem}.json", "error": r.get("error")})
        self.save()


def run_speed(config: SpeedConfig, out_dir: str | Path, *, command: str = "",
              log: Callable[[str], None] = lambda s: None) -> Path:
    """Measure every model of `config`; one JSON per variant (failed ones too) and ``manifest.json``
    in a new ``<out_dir>/runs/<run id>/`` (returned), each variant's JSON rewritten after every
    timed batch size, so a run stopped early keeps what it measured."""
    base = {"kind": "speed", "run_id": _run_id(config), "command": command, "config": asdict(config),
            "environment": _environment(config)}
    folder = _RunFolder(out_dir, base)
    started = time.perf_counter()
    for name in config.models:
        log(f"{name}: building and calibrating variants")
        t0 = time.perf_counter()
        try:
            _run_model(name, config, base, log, lambda recs: folder.write(recs, time.perf_counter() - t0))
        except Exception as err:  # the model itself failed: one JSON says so
            folder.write([{**base, "model": {"name": published_model(name).name}, "method": "*", "status": "failed",
                           "error": _first_line(err)}], time.perf_counter() - t0)
        log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    folder.manifest.update(status="complete", seconds=round(time.perf_counter() - started, 1))
    folder.save()
    return folder.dir
