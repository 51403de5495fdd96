"""Evaluation: a model's metric, executed FLOPs and latency, each against the same model with every
trimmer off, measured in one run (the ``trimkit eval`` report).

:func:`executed_flops` / :func:`executed_ratio` are the one executed-FLOPs measurement of trimkit:
training, calibration, the bench and :func:`evaluate` all count with them.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import torch
from torch import nn

from trimkit.backbones import Backbone, backbone_for_model, load_backbone
from trimkit.runtime import trimming_off
from trimkit.data import collate, format_data_spec, load_dataset
from trimkit.device import autocast, dtype_name, place, resolve_device, resolve_dtype
from trimkit.errors import ConfigError
from trimkit.generative import exact_match, generate_answers, prompt_batch
from trimkit.io import read_manifest
from trimkit.passes import applied_passes
from trimkit.profile import compare_latency, count_flops
from trimkit.progress import progress as progress_of
from trimkit.tasks import Binding, adapt, binding_for, metric_of, model_batch, refreshed, resolve_data, task_dataset

__all__ = ["evaluate", "executed_flops", "executed_ratio", "length_buckets", "backbone_of", "fitted", "eval_inputs", "Untrimmed"]


def backbone_of(model_or_backbone) -> Backbone:
    """A `Backbone` from a model reference, a Backbone or a Hugging Face model."""
    if isinstance(model_or_backbone, Backbone):
        return model_or_backbone
    if isinstance(model_or_backbone, (str, os.PathLike)):
        return load_backbone(str(model_or_backbone))
    if isinstance(model_or_backbone, nn.Module) and hasattr(model_or_backbone, "config"):
        return backbone_for_model(model_or_backbone)
    raise ConfigError(f"train needs a model reference, a Backbone or a Hugging Face model, "
                      f"got {type(model_or_backbone).__name__}")


def executed_flops(model: nn.Module, inputs: dict) -> tuple[float, float]:
    """Executed FLOPs per sample of one forward on `inputs`: ``(trimmed, untrimmed)``."""
    with torch.no_grad():
        trimmed = count_flops(model, inputs).flops
        with trimming_off(model):
            full = count_flops(model, inputs).flops
    return trimmed, full


def executed_ratio(model: nn.Module, batches: Iterable[dict]) -> float:
    """Executed FLOPs summed over `batches` (model inputs), trimmed / untrimmed (NaN when 0)."""
    trimmed = full = 0.0
    for inputs in batches:
        a, b = executed_flops(model, inputs)
        trimmed += a
        full += b
    return float(trimmed / full) if full else float("nan")


def length_buckets(items: list[dict], batch_size: int) -> list[list[int]]:
    """Item indices grouped by text length, in chunks of at most `batch_size`: batches without padding
    (a removed token then never meets a padded one)."""
    by_len: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_len.setdefault(int(item["input_ids"].shape[-1]), []).append(i)
    return [group[lo:lo + batch_size] for _, group in sorted(by_len.items())
            for lo in range(0, len(group), batch_size)]


class Untrimmed(nn.Module):
    """The same model with every trimmer off (for interleaved latency against the trimmed one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        with trimming_off(self.inner):
            return self.inner(**inputs)


class _Synced(nn.Module):
    """Waits for the device after each forward, so wall-clock timings of CUDA models are complete."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        out = self.inner(**inputs)
        torch.cuda.synchronize()
        return out


def _saved_binding(backbone):
    if getattr(backbone, "source", "") != "trimkit":
        return None
    saved = read_manifest(backbone.name).get("extra", {}).get("train", {}).get("binding")
    return Binding.from_dict(saved) if saved else None


def _distribution(values) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def _same_length_rows(items: list[dict], rows: int) -> list[dict]:
    """`rows` items of one text length (the commonest), repeated when there are fewer."""
    group = max(length_buckets(items, len(items)), key=len)
    return [items[group[i % len(group)]] for i in range(rows)]



def fitted(model_or_backbone, data_spec: str, split: str):
    """The backbone, its binding to the data, and the resolved spec (a trained folder keeps its binding;
    a model without passes is first adapted to the data)."""
    backbone = backbone_of(model_or_backbone)
    spec = resolve_data(data_spec, backbone, split=split)
    data = load_dataset(spec)
    binding = _saved_binding(backbone)
    if binding is None:
        if applied_passes(backbone.model):
            binding = binding_for(backbone, data)
        else:
            binding, _ = adapt(backbone, data)
            backbone = refreshed(backbone)
    return backbone, binding, spec


IN_BATCH_RECALL = "in_batch_recall@1"
EXACT_MATCH = "exact_match"


def eval_inputs(binding, batch: dict, device) -> dict:
    """The model inputs a batch is measured on: a decoder's prompts (its prefill, answers cut off)."""
    inputs, labels = model_batch(binding, batch, device)
    return prompt_batch(inputs, labels, binding.pad_id)[0] if binding.generative else inputs


def _generative_metrics(model, binding, items: list[dict], batch_size: int, device, bar) -> tuple[str, dict]:
    """Exact match of greedy generations (at most the longest answer plus one token per batch) with
    the answers, trimmed and untrimmed."""
    hits: dict[str, list[bool]] = {"trimmed": [], "untrimmed": []}
    groups = [list(range(lo, min(lo + batch_size, len(items)))) for lo in range(0, len(items), batch_size)]
    step = bar.add("generating answers (trimmed, untrimmed)", len(groups))
    for group in groups:
        inputs, labels = model_batch(binding, collate([items[i] for i in group]), device)
        prompts, answers = prompt_batch(inputs, labels, binding.pad_id)
        budget = max(len(a) for a in answers) + 1
        for side in ("trimmed", "untrimmed"):
            if side == "untrimmed":
                with trimming_off(model):
                    made = generate_answers(model, prompts, budget, binding.eos_id, binding.pad_id)
            else:
                made = generate_answers(model, prompts, budget, binding.eos_id, binding.pad_id)
            hits[side] += exact_match(made, answers, binding.eos_id)
        bar.advance(step)
    return EXACT_MATCH, {side: sum(v) / len(v) for side, v in hits.items()}


def _row_weighted(recalls: list[tuple[float, int]]) -> float:
    """The share of queries ranked first, from ``(recall, rows)`` per batch."""
    rows = sum(n for _, n in recalls)
    return sum(r * n for r, n in recalls) / rows


def _metrics(model, task, binding, items: list[dict], batch_size: int, device, bar) -> tuple[str, dict]:
    """The metric's name and its value ``{"trimmed": .., "untrimmed": ..}`` over `items`.

    A contrastive model on retrieval ranks each image's caption among the captions of its batch
    (at most `batch_size`, all of one text length): ``in_batch_recall@1``, not recall over the set.
    A decoder generates its answers: ``exact_match``."""
    if binding.generative:
        return _generative_metrics(model, binding, items, batch_size, device, bar)
    logits, labels = {"trimmed": [], "untrimmed": []}, []
    values: dict[str, list] = {"trimmed": [], "untrimmed": []}
    groups = length_buckets(items, batch_size)
    step = bar.add("evaluating (trimmed, untrimmed)", len(groups))
    with torch.no_grad():
        for group in groups:
            inputs, y = model_batch(binding, collate([items[i] for i in group]), device)
            for side in ("trimmed", "untrimmed"):
                if side == "untrimmed":
                    with trimming_off(model):
                        out = model(**inputs)
                else:
                    out = model(**inputs)
                if binding.metric_task == "retrieval":
                    values[side].append((metric_of(binding, task.logits(out).cpu(), None)[1], len(group)))
                else:
                    logits[side].append(task.logits(out).float().cpu())
            if y is not None:
                labels.append(y.cpu())
            bar.advance(step)
    if binding.metric_task == "retrieval":
        return IN_BATCH_RECALL, {side: _row_weighted(v) for side, v in values.items()}
    y = torch.cat(labels)
    scored = {side: metric_of(binding, torch.cat(v), y) for side, v in logits.items()}
    return scored["trimmed"][0], {side: s[1] for side, s in scored.items()}


def _latency(model, binding, items: list[dict], device, sizes: tuple[int, int], bar,
             **timing_kw) -> tuple[dict, dict]:
    """Latency ratios (trimmed / untrimmed) and times in ms per batch size, interleaved."""
    full, trimmed = Untrimmed(model), model
    if device.type == "cuda":
        full, trimmed = _Synced(full), _Synced(model)
    ratios, ms = {}, {}
    step = bar.add("measuring latency (interleaved)", len(sizes))
    for size in sizes:
        inputs = eval_inputs(binding, collate(_same_length_rows(items, size)), device)
        timing = compare_latency(full, trimmed, inputs, **timing_kw)
        ratios[f"batch_{size}"] = timing["b_ms"] / timing["a_ms"] if timing["a_ms"] else None
        ms[f"batch_{size}"] = {"trimmed": timing["b_ms"], "untrimmed": timing["a_ms"]}
        bar.advance(step)
    return ratios, ms


def _counted(model, binding, items: list[dict], count: int, device, bar) -> list[tuple[float, float]]:
    """Executed FLOPs ``(trimmed, untrimmed)`` of the first `count` items, one at a time."""
    step = bar.add("counting FLOPs per sample", count)
    counted = []
    for i in range(count):
        counted.append(executed_flops(model, eval_inputs(binding, collate([items[i]]), device)))
        bar.advance(step)
    return counted


def evaluate(model_or_backbone, data_spec: str, *, batch_size: int = 16, samples: int = 32, latency: bool = True,
             latency_batch: int = 8, threads: int = 1, warmup: int = 3, repeats: int = 10,
             split: str = "val", progress: bool = False, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> dict:
    """The ``trimkit eval --json`` report of a model on a data set.

    The metric runs over the whole data set (the spec's split, `split` when it names none) in
    batches of `batch_size`; executed FLOPs are counted one sample at a time over the first
    `samples` items, trimmed and untrimmed; latency is interleaved against the same model with
    every trimmer off at batch 1 and `latency_batch`. Ratios are trimmed / untrimmed. A decoder VLM
    (generative binding) is scored by exact match of its greedy answers; its FLOPs and latency are
    those of the prefill of the prompts (image, question). `progress` shows each phase on stderr
    (:mod:`trimkit.progress`). `device` / `dtype`: where the model runs and the precision of its
    weights (:func:`trimkit.device.place`; trimmers stay float32); None leaves the model as it is.
    """
    for label, value in (("batch_size", batch_size), ("samples", samples), ("latency_batch", latency_batch),
                         ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    if device is not None:
        resolve_device(device)  # an unavailable device fails before the model loads
    backbone, binding, spec = fitted(model_or_backbone, data_spec, split)
    if device is not None or dtype is not None:
        place(backbone.model, device if device is not None else next(backbone.model.parameters()).device, dtype)
    model, task = backbone.model.eval(), backbone.task
    dataset = task_dataset(spec, binding)
    items = [dataset[i] for i in range(len(dataset))]
    device = next(model.parameters()).device
    count = min(samples, len(items))
    with progress_of(progress) as bar, autocast(device, resolve_dtype(dtype)):
        name, metric = _metrics(model, task, binding, items, batch_size, device, bar)
        counted = _counted(model, binding, items, count, device, bar)
        ratios, ms = _latency(model, binding, items, device, (1, latency_batch), bar, threads=threads, warmup=warmup,
                              repeats=repeats) if latency else ({}, {})
    report = {"model": backbone.name, "data": format_data_spec(spec), "items": len(items),
              "metric": {"name": name, "value": metric["trimmed"]},
              "metric_untrimmed": {"name": name, "value": metric["untrimmed"]},
              "flops": _distribution([t for t, _ in counted]), "flops_untrimmed": _distribution([f for _, f in counted]),
              "flops_samples": count}
    report["flops_ratio"] = report["flops"]["mean"] / report["flops_untrimmed"]["mean"]
    report["latency_ratio"] = {"batch_1": None, f"batch_{latency_batch}": None}
    report["latency_ratio"].update(ratios)
    report["latency_ms"] = ms
    report["threads"] = threads
    report["device"] = device.type
    report["dtype"] = dtype_name(resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype)
    return report
