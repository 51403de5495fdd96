"""Model inputs for profiling: batches, per-sample splits, and calling the model.

Inputs are a dict of tensors passed as ``model(**inputs)`` whose first dimension is
the batch; tensors whose first dimension is not the batch size (or 0-d tensors,
or non-tensors) are passed unchanged to every sample. A positional tuple or a
single tensor also works for plain models. A *maker* is a callable
``maker(batch_size, seed=...) -> dict`` (e.g. ``Backbone.example_inputs``) whose rows do not
depend on the batch size.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from trimkit.errors import ConfigError
from trimkit.rows import batch_size_of, take_rows

__all__ = ["Inputs", "batch_size_of", "split_samples", "take_rows", "samples_from", "batch_from",
           "call_model"]

Inputs = Union[Mapping[str, Any], Sequence[Any], torch.Tensor]
Maker = Callable[..., Inputs]


def split_samples(inputs: Inputs) -> list[Inputs]:
    """One batch-of-1 input per row."""
    return [take_rows(inputs, [i]) for i in range(batch_size_of(inputs))]


def _is_input_list(source: Any) -> bool:
    return isinstance(source, (list, tuple)) and bool(source) and all(
        isinstance(s, Mapping) for s in source)


def _call_maker(maker: Maker, batch_size: int, seed: int) -> Inputs:
    try:
        params = inspect.signature(maker).parameters
    except (TypeError, ValueError):
        params = {}
    if "seed" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return maker(batch_size, seed=seed)
    return maker(batch_size)


def samples_from(source: Inputs | Sequence[Mapping] | Maker, n: int) -> list[Inputs]:
    """Up to ``n`` batch-of-1 inputs.

    They are the rows of a batch, of a list of batches, or of ``maker(n, seed=0)``.

    Give a list of batch-of-1 dicts for samples whose shapes differ (text lengths, image sizes).
    """
    if n < 1:
        raise ConfigError(f"samples must be at least 1, got {n}")
    if callable(source) and not isinstance(source, (Mapping, torch.Tensor)):
        return split_samples(_call_maker(source, n, 0))[:n]
    batches = list(source) if _is_input_list(source) else [source]
    out = []
    for b in batches:
        out.extend(split_samples(b))
        if len(out) >= n:
            break
    return out[:n]


def batch_from(source: Inputs | Sequence[Mapping] | Maker, batch_size: int) -> Inputs:
    """A batch of ``batch_size``: from the maker (seed 0), else rows of the first batch, cycled."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if callable(source) and not isinstance(source, (Mapping, torch.Tensor)):
        return _call_maker(source, batch_size, 0)
    first = source[0] if _is_input_list(source) else source
    have = batch_size_of(first)
    return take_rows(first, [i % have for i in range(batch_size)])


def call_model(model: torch.nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)
