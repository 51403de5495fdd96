"""Score a trimmed classifier on every item of a split: correctness trimmed and untrimmed, and the
executed FLOPs of every item.

Executed FLOPs are counted by the profiler (:func:`trimkit.evaluate.executed_flops`) on single-item
forwards. Counting 10,000 items one by one takes far longer than scoring them, so :func:`sweep`
counts one item per *shape signature* and reuses that count: an item's signature is its input
shapes plus, for every trimming runtime, the per-row sizes its last forward kept (tokens per layer,
keys per attention, heads kept per site; ``cost_inputs()``). Items with the same signature execute
the same operations on the same shapes, so they cost the same FLOPs. The claim is checked on every
sweep: `verify` items drawn at random are also counted directly and must match their signature's
count (else `SweepError`, never a silent estimate).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trimkit.data import collate
from trimkit.errors import ConfigError
from trimkit.evaluate import eval_inputs, length_buckets
from trimkit.profile.api import count_flops
from trimkit.progress import progress as progress_of
from trimkit.runtime.control import runtimes, trimming_off
from trimkit.tasks import model_batch

__all__ = ["SweepError", "Sweep", "sweep", "score_items", "row_signatures", "pack_bits", "unpack_bits"]


class SweepError(ConfigError):
    """A signature's FLOPs count differs from a direct count of one of its items."""


def pack_bits(values) -> str:
    """A 0/1 vector as base64 of its packed bits (1,250 bytes for 10,000 items)."""
    bits = np.asarray(values, dtype=bool)
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The first `n` bits of :func:`pack_bits` output, as a 0/1 ``uint8`` vector."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]


def _per_row(value, rows: int):
    """A cost input's value for each row: ``[B]`` / ``[B, units]`` tensors split by row (a mask's
    row counts its kept units), anything else repeated."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        flat = value.detach().reshape(rows, -1).float()
        return [round(float(x), 4) for x in flat.sum(dim=1)]
    if isinstance(value, torch.Tensor):
        return [round(float(value.float().sum()), 4)] * rows
    return [value] * rows


def row_signatures(model: nn.Module, inputs: dict) -> list[tuple]:
    """One hashable signature per row of the last forward of `model` on `inputs`: the shapes of the
    row's inputs, then every runtime's per-row kept sizes (sorted by site)."""
    rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    parts = [[(k, tuple(v.shape[1:])) for k, v in sorted(inputs.items()) if isinstance(v, torch.Tensor)]
             for _ in range(rows)]
    for number, runtime in enumerate(runtimes(model)):
        if not hasattr(runtime, "cost_inputs"):
            continue
        for kind, sites in sorted(runtime.cost_inputs().items()):
            for site, value in sorted(sites.items()):
                for row, size in enumerate(_per_row(value, rows)):
                    parts[row].append((number, kind, site, size))
    return [tuple(p) for p in parts]


@dataclass
class Sweep:
    """Per-item results of one model on one split (items in the split's order)."""

    correct: np.ndarray  # trimmed, 0/1
    correct_untrimmed: np.ndarray
    flops: np.ndarray  # executed FLOPs per item, trimmed
    flops_untrimmed: np.ndarray
    counted: int  # signatures counted in this sweep (others came from `known`)
    verified: int  # items also counted directly (all matched)

    def summary(self) -> dict:
        def dist(x: np.ndarray) -> dict:
            return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
                    "min": float(x.min()), "max": float(x.max())}

        return {"items": int(self.correct.size), "accuracy": float(self.correct.mean()),
                "accuracy_untrimmed": float(self.correct_untrimmed.mean()),
                "flops": dist(self.flops), "flops_untrimmed": dist(self.flops_untrimmed),
                "flops_ratio": float(self.flops.mean() / self.flops_untrimmed.mean()),
                "flops_reduction": float(self.flops_untrimmed.mean() / self.flops.mean()),
                "flops_counted": self.counted, "flops_verified": self.verified,
                "correct": pack_bits(self.correct), "correct_untrimmed": pack_bits(self.correct_untrimmed)}


def _single(binding, item: dict, device) -> dict:
    return eval_inputs(binding, collate([item]), device)


def score_items(model, binding, items, groups, device, bar, full: bool, with_signatures: bool = True):
    """Correctness and signature of every item, from batched forwards over `groups` (lists of item
    indices) with trimming on, or off when `full`; signatures are None unless `with_signatures`."""
    correct = np.zeros(len(items), dtype=np.uint8)
    signatures: list[tuple | None] = [None] * len(items)
    step = bar.add("scoring untrimmed" if full else "scoring trimmed", len(items))
    for group in groups:
        inputs, labels = model_batch(binding, collate([items[i] for i in group]), device)
        with torch.no_grad():
            with trimming_off(model) if full else contextlib.nullcontext():
                logits = model(**inputs).logits
            if not with_signatures:
                sig = [None] * len(group)
            elif full:
                sig = [tuple((k, tuple(v.shape[1:])) for k, v in sorted(inputs.items())
                             if isinstance(v, torch.Tensor))] * len(group)
            else:
                sig = row_signatures(model, inputs)
        hits = (logits.float().argmax(-1) == labels).cpu().numpy()
        for j, i in enumerate(group):
            correct[i], signatures[i] = hits[j], sig[j]
        bar.advance(step, len(group))
    return correct, signatures


class _Counter:
    """Executed FLOPs of single items, counted by the profiler and reused by key (see `_flops`)."""

    def __init__(self, model, binding, items, device, full: bool):
        self.model, self.binding, self.items, self.device, self.full = model, binding, items, device, full

    def report(self, i: int):
        inputs = _single(self.binding, self.items[i], self.device)
        with torch.no_grad():
            if self.full:
                with trimming_off(self.model):
                    return count_flops(self.model, inputs)
            return count_flops(self.model, inputs)


def _key(signature: tuple) -> str:
    """A short stable name of a signature (the first 24 hex digits of its SHA-1)."""
    return hashlib.sha1(repr(signature).encode()).hexdigest()[:24]


def _flops(counter: _Counter, signatures: list[tuple], bar, verify: list[int],
           known: dict[str, float]) -> tuple[np.ndarray, int]:
    """Executed FLOPs per item, one count per distinct signature not in `known` (signature key ->
    FLOPs, from earlier sweeps of the same model; new counts are added to it), and how many were
    counted; then the `verify` items are counted directly and must agree (else `SweepError`)."""
    label = "counting FLOPs" + (" (untrimmed)" if counter.full else "")
    first: dict[tuple, int] = {}
    for i, sig in enumerate(signatures):
        first.setdefault(sig, i)
    keys = {sig: _key(sig) for sig in first}
    fresh = {sig: i for sig, i in first.items() if keys[sig] not in known}
    step = bar.add(label, len(fresh) + len(verify))
    for sig, i in fresh.items():
        known[keys[sig]] = counter.report(i).flops
        bar.advance(step)
    flops = np.array([known[keys[s]] for s in signatures], dtype=np.float64)
    bad = _mismatch(counter, flops, verify)
    if bad is not None:
        i, direct = bad
        raise SweepError(f"item {i}: executed FLOPs {direct:.6g} counted alone, {flops[i]:.6g} from its "
                         f"signature; the runtime's cost inputs do not determine its shapes")
    bar.advance(step, len(verify))
    return flops, len(fresh)


def _mismatch(counter: _Counter, flops: np.ndarray, verify: list[int]) -> tuple[int, float] | None:
    for i in verify:
        direct = counter.report(i).flops
        if not np.isclose(direct, flops[i], rtol=1e-9, atol=0.0):
            return i, direct
    return None


def sweep(model: nn.Module, binding, items: list[dict], *, batch_size: int = 128, verify: int = 32, seed: int = 0,
          device: str | torch.device = "cpu", progress: bool = False, known: dict[str, dict] | None = None) -> Sweep:
    """Score `model` (a classifier with trimming passes, or none) on every item, trimmed and
    untrimmed, with every item's executed FLOPs (see the module docstring). Batches hold one text
    length each, so no row is padded. `known`: ``{"trimmed": {...}, "untrimmed": {...}}``, FLOPs of
    signatures counted before on a model of the same architecture and passes (read and extended;
    every sweep still verifies its own items)."""
    known = {} if known is None else known
    if not items:
        raise ConfigError("sweep needs at least one item")
    if binding.generative or binding.pairs:
        raise ConfigError("sweep scores classifiers (one label per item); this binding is "
                          f"{'generative' if binding.generative else 'image-text pairs'}")
    device = torch.device(device)
    model.eval()
    groups = length_buckets(items, batch_size)
    picks = np.random.default_rng(seed).choice(len(items), size=min(verify, len(items)), replace=False).tolist()
    with progress_of(progress) as bar:
        correct, sig = score_items(model, binding, items, groups, device, bar, full=False)
        full_correct, full_sig = score_items(model, binding, items, groups, device, bar, full=True)
        flops, counted = _flops(_Counter(model, binding, items, device, False), sig, bar, picks,
                                known.setdefault("trimmed", {}))
        full_flops, _ = _flops(_Counter(model, binding, items, device, True), full_sig, bar, picks[:4],
                               known.setdefault("untrimmed", {}))
    return Sweep(correct, full_correct, flops, full_flops, counted, len(picks))
