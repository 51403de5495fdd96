"""Paired comparisons of two models on the same items: Δ accuracy with a bootstrap interval.

Two models scored on the same test items give two correctness vectors. Their difference is
judged on the items, paired: :func:`paired_bootstrap` resamples items (with replacement) and
reads the percentile interval of the mean difference ``Δ = mean(b) - mean(a)``, in points
(percent) when ``scale=100``. :meth:`PairedDelta.verdict` states a non-inferiority claim for a
margin: ``non-inferior`` when the interval's lower end is at or above ``-margin``, ``inferior``
when its upper end is below ``-margin``, else ``inconclusive``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["PairedDelta", "paired_bootstrap", "seeded_bootstrap", "VERDICTS"]

VERDICTS: tuple[str, ...] = ("non-inferior", "inconclusive", "inferior")


@dataclass(frozen=True)
class PairedDelta:
    """``delta`` = mean(b) - mean(a) and its ``confidence`` interval ``[low, high]`` over ``n``
    paired items from ``resamples`` bootstrap resamples (all in the unit of ``scale``)."""

    delta: float
    low: float
    high: float
    n: int
    resamples: int
    confidence: float
    scale: float

    def verdict(self, margin: float) -> str:
        """``non-inferior`` (low >= -margin), ``inferior`` (high < -margin) or ``inconclusive``."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if self.low >= -margin:
            return "non-inferior"
        if self.high < -margin:
            return "inferior"
        return "inconclusive"

    def to_dict(self) -> dict:
        return asdict(self)


def _vector(values: Sequence, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has values that are not finite")
    return array


def _check(resamples: int, confidence: float) -> None:
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _interval(resampled: np.ndarray, delta: float, n: int, resamples: int, confidence: float,
              scale: float) -> PairedDelta:
    """The percentile interval of the `resampled` deltas around `delta`, in the unit of `scale`."""
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return PairedDelta(delta=float(delta * scale), low=float(low * scale), high=float(high * scale), n=n,
                       resamples=resamples, confidence=confidence, scale=scale)


def paired_bootstrap(a: Sequence, b: Sequence, *, resamples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0, scale: float = 100.0, chunk: int = 256) -> PairedDelta:
    """Δ = mean(b) - mean(a) of per-item scores (1/0 correctness, or any per-item value) on the
    same items, with a percentile bootstrap interval over resampled items.

    a, b: equal-length vectors, item ``i`` of one paired with item ``i`` of the other.
    scale: multiplies Δ and the interval (100: points). seed: the resampling stream.
    """
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired vectors differ in length: {x.size} and {y.size}")
    _check(resamples, confidence)
    diff = y - x
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for lo in range(0, resamples, chunk):
        count = min(chunk, resamples - lo)
        means[lo:lo + count] = diff[rng.integers(diff.size, size=(count, diff.size))].mean(axis=1)
    return _interval(means, float(diff.mean()), int(diff.size), resamples, confidence, scale)


def _seed_rows(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be [items] or [seeds, items], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has values that are not finite")
    return array


def seeded_bootstrap(a, b, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                     scale: float = 100.0, chunk: int = 64, paired_seeds: bool = False) -> PairedDelta:
    """Δ = mean(b) - mean(a) where each side is ``[seeds, items]`` (or ``[items]``: one seed) of
    per-item scores on the same items. Each resample draws the items once (shared by both sides:
    paired) and, independently per side, its seeds with replacement, so the interval holds both
    the test set's and the training seeds' variation. With one seed per side it is
    :func:`paired_bootstrap`'s interval (same resampling of items). `paired_seeds`: row ``s`` of
    `a` and of `b` come from one training seed (a model trimmed and the same model untrimmed), so
    both sides draw the same seeds."""
    x, y = _seed_rows(a, "a"), _seed_rows(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"paired vectors differ in length: {x.shape[1]} and {y.shape[1]}")
    _check(resamples, confidence)
    n = x.shape[1]
    if paired_seeds and x.shape[0] != y.shape[0]:
        raise ValueError(f"paired seeds need as many rows on both sides, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    columns = [np.ascontiguousarray(rows.T) for rows in (x, y)]  # [items, seeds]
    for lo in range(0, resamples, chunk):
        count = min(chunk, resamples - lo)
        picks = rng.integers(n, size=(count, n))
        offsets = (np.arange(count)[:, None] * n + picks).ravel()
        weights = np.bincount(offsets, minlength=count * n).reshape(count, n) / n
        side, chosen = [], None
        for rows in columns:
            per_seed = weights @ rows  # [count, seeds]: each seed's mean on each resample's items
            if chosen is None or not paired_seeds:
                chosen = rng.integers(rows.shape[1], size=(count, rows.shape[1]))
            side.append(np.take_along_axis(per_seed, chosen, axis=1).mean(axis=1))
        deltas[lo:lo + count] = side[1] - side[0]
    delta = float(y.mean(dtype=np.float64) - x.mean(dtype=np.float64))
    return _interval(deltas, delta, int(n), resamples, confidence, scale)
