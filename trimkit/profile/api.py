"""Public entry points: count_flops, profile_model, compare, flop_disagreement."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from trimkit.device import dtype_name
from trimkit.errors import ConfigError, TrimkitError
from trimkit.progress import progress as progress_of
from trimkit.profile.blocks import count_params, resolve_blocks, trimmer_paths
from trimkit.profile.counter import OTHER, BlockCost, FlopRecorder, FlopReport
from trimkit.profile.fvcore_counter import FvcoreUnavailable, family_of, fvcore_count
from trimkit.profile.inputs import Inputs, batch_from, batch_size_of, call_model, samples_from
from trimkit.profile.running import (
    capture_error,
    collect_stats,
    eval_mode,
    model_name,
)
from trimkit.profile.timing import compare_latency, measure_latency

__all__ = ["COUNTERS", "MEMORY_METHOD", "count_flops", "profile_model", "compare",
           "flop_disagreement", "placement_of"]

COUNTERS = ("torch", "fvcore")
MEMORY_METHOD = ("peak bytes of tensor storage allocated by the forward and alive at once, "
                 "tracked at dispatch level (parameters and inputs excluded), batch 1, "
                 "max over samples")

Source = Inputs | Sequence[Mapping[str, Any]] | Callable[..., Inputs]


# --------------------------------------------------------------------------- one forward


_SHORTCUTS = ("fast_logits", "logits")  # trimmer methods that run their linears without module calls


@contextlib.contextmanager
def _trimmer_frames(model: torch.nn.Module, stack: Any) -> Iterator[None]:
    """Charge trimmer shortcuts (methods that skip ``forward``) to the trimmer's block: while
    counting, each one enters the trimmer on the recorder's module stack. Same calls, same results."""
    patched: list[tuple[torch.nn.Module, str]] = []

    def framed(module: torch.nn.Module, method: Callable) -> Callable:
        def run(*args, **kwargs):
            stack.push(module, args)
            try:
                return method(*args, **kwargs)
            finally:
                stack.pop(module, args, None)
        return run

    try:
        for path in trimmer_paths(model):
            for module in model.get_submodule(path).modules():
                for attr in _SHORTCUTS:
                    if callable(getattr(type(module), attr, None)) and attr not in vars(module):
                        object.__setattr__(module, attr, framed(module, getattr(module, attr)))
                        patched.append((module, attr))
        yield
    finally:
        for module, attr in patched:
            object.__delattr__(module, attr)


def _torch_count(model: torch.nn.Module, inputs: Inputs, blocks: Mapping[str, str],
                 name: str) -> FlopReport:
    recorder = FlopRecorder(model, blocks)
    try:
        with eval_mode(model), torch.inference_mode(), recorder, _trimmer_frames(model, recorder.stack):
            call_model(model, inputs)
    except TrimkitError:
        raise
    except Exception as exc:
        path, op = recorder.failure or (recorder.stack.path, None)
        raise capture_error(name, path, op, exc) from exc
    if recorder.formula_error is not None:
        raise recorder.formula_error
    batch = batch_size_of(inputs)
    block_costs = tuple(
        BlockCost(path, kind, recorder.flops[path] / batch, recorder.elementwise[path] / batch)
        for path, kind in list(blocks.items()) + [(OTHER, OTHER)]
    )
    return FlopReport(
        flops=sum(recorder.flops.values()) / batch,
        elementwise_flops=sum(recorder.elementwise.values()) / batch,
        blocks=block_costs,
        by_op={k: v / batch for k, v in recorder.by_op.items()},
        elementwise_by_op={k: v / batch for k, v in recorder.elementwise_by_op.items()},
        batch_size=batch,
        counter="torch",
        uncounted_ops=dict(recorder.uncounted),
        peak_memory_bytes=recorder.memory.peak,
    )


def _check_counter(counter: str) -> None:
    if counter not in COUNTERS:
        raise ConfigError(f"unknown counter {counter!r}; choose one of: {', '.join(COUNTERS)}")


def count_flops(model: torch.nn.Module, inputs: Inputs, blocks: Mapping[str, str] | None = None,
                *, counter: str = "torch", name: str | None = None) -> FlopReport:
    """Executed FLOPs of one forward on ``inputs``, per sample (batch totals / batch size).

    ``blocks`` maps module paths to kinds (see :func:`blocks_from_map`); None means the
    model's top-level children. ``counter="fvcore"`` falls back to the dispatch counter,
    with a note and a warning naming the model, when fvcore cannot trace it.
    """
    _check_counter(counter)
    name = name or model_name(model)
    chosen = resolve_blocks(model, blocks, name)
    if counter == "torch":
        return _torch_count(model, inputs, chosen, name)
    try:
        with eval_mode(model):
            return fvcore_count(model, inputs, chosen, name)
    except FvcoreUnavailable as exc:
        report = _torch_count(model, inputs, chosen, name)  # a model that fails raises here
        message = f"{exc}; counted with the torch dispatch counter instead"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return dataclasses.replace(report, counter="torch (fvcore fallback)",
                                   notes=report.notes + (message,))


# --------------------------------------------------------------------------- summaries


def _distribution(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95))}


def _mean_stats(per_sample: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict]:
    """Average each numeric stat (lists elementwise) over samples; others keep the last value."""
    merged: dict[str, dict[str, list]] = {}
    for sample in per_sample:
        for path, stats in sample.items():
            for key, value in stats.items():
                merged.setdefault(path, {}).setdefault(key, []).append(value)
    return {path: {key: _mean_value(values) for key, values in stats.items()}
            for path, stats in merged.items()}


def _mean_value(values: list) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        values = [v.tolist() for v in values]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return float(sum(values) / len(values))
    if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
        try:
            return [float(x) for x in np.mean(np.asarray(values, dtype=float), axis=0)]
        except (TypeError, ValueError):
            return values[-1]
    return values[-1]


def _mean_blocks(reports: Sequence[FlopReport]) -> list[dict]:
    rows = []
    for i, first in enumerate(reports[0].blocks):
        col = [r.blocks[i] for r in reports]
        rows.append({"path": first.path, "kind": first.kind,
                     "flops": float(np.mean([b.flops for b in col])),
                     "elementwise_flops": float(np.mean([b.elementwise_flops for b in col]))})
    return rows


def _merge_counts(reports: Sequence[FlopReport], attr: str) -> dict[str, float]:
    total: Counter = Counter()
    for r in reports:
        total.update(getattr(r, attr))
    return {k: v / len(reports) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


# --------------------------------------------------------------------------- profile


def _validate(batch_size: int, samples: int, counter: str, threads: int) -> None:
    _check_counter(counter)
    for label, value in (("batch_size", batch_size), ("samples", samples), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")


def _count_samples(model, samples, blocks, counter, name, bar, label) -> tuple[list, list]:
    task = bar.add(f"{label}counting FLOPs ({counter})", len(samples))
    reports, stats = [], []
    for sample in samples:
        reports.append(count_flops(model, sample, blocks, counter=counter, name=name))
        stats.append(collect_stats(model))
        bar.advance(task)
    return reports, stats


def _peak_memory_mb(model, samples, reports, blocks, name) -> float:
    peaks = [r.peak_memory_bytes for r in reports if r.peak_memory_bytes is not None]
    if not peaks:  # fvcore reports no memory: one dispatch-level pass on the first sample
        peaks = [_torch_count(model, samples[0], blocks, name).peak_memory_bytes or 0]
    return max(peaks) / 2**20


def placement_of(model: torch.nn.Module) -> tuple[str, str]:
    """``(device, dtype)`` names of `model`: the device of its first parameter and the floating dtype
    holding most parameter elements (trimmers kept in float32 do not decide it)."""
    params = list(model.parameters())
    if not params:
        return "cpu", "float32"
    sizes: Counter = Counter()
    for p in params:
        if p.is_floating_point():
            sizes[p.dtype] += p.numel()
    dtype = sizes.most_common(1)[0][0] if sizes else torch.float32
    return str(params[0].device), dtype_name(dtype)


def _summary(model, name, counter, reports, stats, blocks, samples, latency_ms,
             threads) -> dict:
    params, trimmer_params = count_params(model)
    device, dtype = placement_of(model)
    notes = sorted({n for r in reports for n in r.notes})
    return {
        "unit": "FLOPs",
        "model": name,
        "counter": reports[0].counter,
        "samples": len(reports),
        "flops": _distribution([r.flops for r in reports]),
        "elementwise_flops": _distribution([r.elementwise_flops for r in reports]),
        "params": int(params),
        "trimmer_params": int(trimmer_params),
        "latency_ms": latency_ms,
        "threads": threads,
        "device": device,
        "dtype": dtype,
        "peak_memory_mb": _peak_memory_mb(model, samples, reports, blocks, name),
        "peak_memory_method": MEMORY_METHOD,
        "blocks": _mean_blocks(reports),
        "by_op": _merge_counts(reports, "by_op"),
        "elementwise_by_op": _merge_counts(reports, "elementwise_by_op"),
        "uncounted_ops": _merge_counts(reports, "uncounted_ops"),
        "stats": _mean_stats(stats),
        "notes": notes,
    }


def profile_model(model: torch.nn.Module, inputs: Source, *,
                  blocks: Mapping[str, str] | None = None, batch_size: int = 8,
                  samples: int = 8, counter: str = "torch", threads: int = 1,
                  latency: bool = True, progress: bool = True, name: str | None = None,
                  warmup: int = 3, repeats: int = 10) -> dict:
    """The ``trimkit profile --json`` report of one model.

    ``inputs``: a batched dict (split into per-sample dicts), a list of such dicts, or a
    maker ``maker(batch_size, seed=...)``. FLOPs are counted per sample (batch of 1) over
    ``samples`` samples and summarised as mean / p50 / p95; latency is the median after
    warm-up at batch 1 and at ``batch_size``.
    """
    _validate(batch_size, samples, counter, threads)
    name = name or model_name(model)
    chosen = resolve_blocks(model, blocks, name)
    per_sample = samples_from(inputs, samples)
    latency_ms: dict[str, float | None] = {"batch_1": None, f"batch_{batch_size}": None}
    with progress_of(progress) as bar:
        reports, stats = _count_samples(model, per_sample, chosen, counter, name, bar, "")
        if latency:
            task = bar.add("measuring latency", 2)
            for size, sample in ((1, per_sample[0]), (batch_size, None)):
                batch = sample if sample is not None else batch_from(inputs, batch_size)
                latency_ms[f"batch_{size}"] = measure_latency(
                    model, batch, threads=threads, warmup=warmup, repeats=repeats, name=name)
                bar.advance(task)
    return _summary(model, name, counter, reports, stats, chosen, per_sample, latency_ms,
                    threads)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(model_before: torch.nn.Module, model_after: torch.nn.Module, inputs: Source, *,
            blocks_before: Mapping[str, str] | None = None,
            blocks_after: Mapping[str, str] | None = None, batch_size: int = 8,
            samples: int = 8, counter: str = "torch", threads: int = 1, latency: bool = True,
            progress: bool = True, name: str | None = None, warmup: int = 3,
            repeats: int = 10) -> dict:
    """Profiles of both models and their speedups (before / after), latency interleaved."""
    _validate(batch_size, samples, counter, threads)
    name = name or model_name(model_before)
    per_sample = samples_from(inputs, samples)
    result = {}
    with progress_of(progress) as bar:
        for label, model, blocks in (("before", model_before, blocks_before),
                                     ("after", model_after, blocks_after)):
            chosen = resolve_blocks(model, blocks, f"{name} ({label})")
            reports, stats = _count_samples(model, per_sample, chosen, counter,
                                            f"{name} ({label})", bar, f"{label}: ")
            result[label] = _summary(model, f"{name} ({label})", counter, reports, stats,
                                     chosen, per_sample, {}, threads)
        speedup: dict[str, float | None] = {
            "flops": _ratio(result["before"]["flops"]["mean"], result["after"]["flops"]["mean"])}
        keys = ("batch_1", f"batch_{batch_size}")
        task = bar.add("measuring latency (interleaved)", 2 if latency else 0)
        for key, size in zip(keys, (1, batch_size)):
            timing = {"a_ms": None, "b_ms": None}
            if latency:
                batch = per_sample[0] if size == 1 else batch_from(inputs, size)
                timing = compare_latency(model_before, model_after, batch, threads=threads,
                                         warmup=warmup, repeats=repeats)
                bar.advance(task)
            result["before"]["latency_ms"][key] = timing["a_ms"]
            result["after"]["latency_ms"][key] = timing["b_ms"]
            speedup[f"latency_{key}"] = _ratio(timing["a_ms"], timing["b_ms"])
    return {"before": result["before"], "after": result["after"], "speedup": speedup}


# --------------------------------------------------------------------------- counters compared


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return (b - a) / a if a else math.inf


def _rows(torch_side: Mapping[str, float], fv_side: Mapping[str, float], key: str) -> list[dict]:
    rows = []
    for item in sorted(set(torch_side) | set(fv_side)):
        t, f = torch_side.get(item, 0.0), fv_side.get(item, 0.0)
        rows.append({key: item, "torch": t, "fvcore": f, "diff": f - t, "rel_diff": _rel(t, f)})
    return sorted(rows, key=lambda r: -abs(r["diff"]))


def _families(by_op: Mapping[str, float]) -> dict[str, float]:
    out: Counter = Counter()
    for op, value in by_op.items():
        out[family_of(op)] += value
    return dict(out)


def flop_disagreement(model: torch.nn.Module, inputs: Inputs,
                      blocks: Mapping[str, str] | None = None, *, name: str | None = None,
                      tolerance: float = 0.01) -> dict:
    """Both counters on the same forward: totals, and where they differ by op family and block.

    Op families group the dispatch-level and jit-level names (``addmm``/``linear`` ->
    "matmul", every SDPA variant -> "attention"); a fused op on one side and its parts on
    the other (``_native_multi_head_attention`` vs linear + bmm) shows as a pair of rows
    that cancel in the total.
    """
    name = name or model_name(model)
    chosen = resolve_blocks(model, blocks, name)
    reference = _torch_count(model, inputs, chosen, name)
    with eval_mode(model):
        other = fvcore_count(model, inputs, chosen, name)
    rel = _rel(reference.flops, other.flops)
    return {
        "model": name,
        "torch": {"flops": reference.flops, "elementwise_flops": reference.elementwise_flops},
        "fvcore": {"flops": other.flops, "elementwise_flops": other.elementwise_flops},
        "rel_diff": rel,
        "agree": abs(rel) <= tolerance,
        "by_op": _rows(_families(reference.by_op), _families(other.by_op), "op"),
        "by_block": _rows({b.path: b.flops for b in reference.blocks},
                          {b.path: b.flops for b in other.blocks}, "path"),
        "fvcore_unsupported_ops": dict(other.uncounted_ops),
        "torch_uncounted_ops": dict(reference.uncounted_ops),
        "notes": list(other.notes),
    }
