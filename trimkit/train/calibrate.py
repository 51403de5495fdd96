"""The inference threshold: :func:`calibrate_threshold` picks it from the cost model's hard counts
(:func:`hard_ratio`), which are exact for eval forwards and far cheaper than profiling (the
profiler's count is :func:`trimkit.evaluate.executed_ratio`)."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from trimkit.runtime import set_threshold
from trimkit.cost import expected_ratio
from trimkit.data import collate
from trimkit.evaluate import length_buckets
from trimkit.progress import progress as progress_of
from trimkit.tasks import model_batch

__all__ = ["hard_ratio", "calibrate_threshold", "calibration_batches", "unpadded_rows", "with_threshold"]

_LOGIT_SPAN = 24.0  # calibration searches keep-logit thresholds in [-span, span]


def hard_ratio(model: nn.Module, batches: list[dict]) -> float:
    """Row-weighted executed-FLOPs ratio (hard counts of the cost model) of eval forwards."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for inputs in batches:
            model(**inputs)
            n = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())
            total += float(expected_ratio(model)) * n
            rows += n
    return total / rows


def calibrate_threshold(model: nn.Module, batches: list[dict], target: float, *,
                        iterations: int = 16, progress: bool = False) -> tuple[float, float]:
    """The shared inference threshold whose executed ratio on `batches` (unpadded model inputs) is
    closest to `target`, set on every runtime; ``(threshold, ratio)``. Ratios fall as it rises.

    The search bisects the threshold's log-odds in ``[-24, 24]``, starting at 0.5: trained
    trimmers often give the tokens they like keep-logits far above 9 (probabilities that a search in
    probability space, halving ``[0, 1]``, never gets past), and those would stay kept at any
    threshold it can reach. `progress` shows the search on stderr (:mod:`trimkit.progress`)."""
    was = model.training
    model.eval()
    tried: list[tuple[float, float]] = []
    try:
        with progress_of(progress) as bar:
            task = bar.add("calibrating threshold", iterations + 1)
            lo, hi = -_LOGIT_SPAN, _LOGIT_SPAN
            for z in (0.0, *([None] * iterations)):
                z = (lo + hi) / 2 if z is None else z
                th = 1.0 / (1.0 + math.exp(-z))
                set_threshold(model, th)
                ratio = hard_ratio(model, batches)
                tried.append((th, ratio))
                bar.advance(task, info=f"threshold {th:.4f}  ratio {ratio:.3f} (target {target:.3f})")
                if ratio > target:
                    lo = z
                else:
                    hi = z
        best = min(tried, key=lambda t: (abs(t[1] - target), abs(t[0] - 0.5)))
        set_threshold(model, best[0])
    finally:
        model.train(was)
    return best


def calibration_batches(dataset, binding, count: int, batch_size: int, device) -> list[dict]:
    """The first `count` items of `dataset` as unpadded model inputs (see :func:`length_buckets`)."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return [model_batch(binding, collate([items[i] for i in group]), device)[0]
            for group in length_buckets(items, batch_size)]


def unpadded_rows(inputs: dict, binding) -> dict:
    """The rows of a batch whose text is not padded (the longest ones): a batch without padding."""
    text = dict(binding.keys).get("attention_mask")
    mask = inputs.get(text) if text else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return inputs
    full = (mask != 0).all(1)
    if bool(full.all()) or not bool(full.any()):
        return inputs
    rows = full.nonzero().flatten()
    n = mask.shape[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in inputs.items()}


def with_threshold(configs: list, threshold: float | None) -> list:
    """`configs` (pass configs) with ``threshold`` set on those that have the field."""
    if threshold is None:
        return configs
    return [dataclasses.replace(c, threshold=threshold) if "threshold" in {f.name for f in dataclasses.fields(c)}
            else c for c in configs]
