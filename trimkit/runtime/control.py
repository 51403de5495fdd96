"""Switches shared by every trimming runtime installed on a model.

A trimming pass installs a *runtime* object (hooks plus per-forward state) and registers it here.
A runtime has these attributes and methods:

``enabled: bool``
    False makes the runtime a no-op: the model runs at full capacity (the teacher of
    self-distillation, the "untrimmed" side of every ratio).
``threshold: float``
    Inference keeps a unit when its keep probability is above it.
``tau: float``
    Gumbel temperature used in training.
``stats() -> dict``
    Facts about the last forward (tokens / heads alive per row), JSON-friendly.
``cost_inputs() -> dict``
    What the last forward kept, for :mod:`trimkit.cost`: any of the keys
    ``"tokens"`` ({layer path: ``[B, L]`` soft keep mask or ``[B]`` counts of the tokens the
    layer computes}), ``"keys"`` ({attention path: same, for the keys it attends to}) and
    ``"heads"`` ({attention path: ``[B, H]`` soft keep mask}) and ``"lengths"`` ({layer or
    attention path: the untrimmed token count}). Soft masks carry gradients in training mode.
``train_logits() -> list[Tensor]`` (optional)
    The keep-logits its trimmers produced in the last training forward, flat, with gradient
    (for the trainer's logit penalty).
``remove()``
    Takes the hooks out.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from trimkit.errors import ConfigError
from trimkit.runtime import state

__all__ = ["register_runtime", "unregister_runtime", "runtimes", "trimming_off", "set_threshold", "set_tau",
           "trim_stats", "train_logits"]


def register_runtime(model: nn.Module, runtime: Any) -> None:
    lst = model.__dict__.setdefault(state.RUNTIMES, [])
    if runtime not in lst:
        lst.append(runtime)


def unregister_runtime(model: nn.Module, runtime: Any) -> None:
    lst = model.__dict__.get(state.RUNTIMES, [])
    if runtime in lst:
        lst.remove(runtime)


def runtimes(model: nn.Module) -> list:
    """The trimming runtimes installed on ``model``, in installation order."""
    return list(model.__dict__.get(state.RUNTIMES, []))


@contextmanager
def trimming_off(model: nn.Module) -> Iterator[None]:
    """Run ``model`` at full capacity inside the block (every runtime disabled, then restored)."""
    saved = [(rt, rt.enabled) for rt in runtimes(model)]
    try:
        for rt, _ in saved:
            rt.enabled = False
        yield
    finally:
        for rt, was in saved:
            rt.enabled = was


def train_logits(model: nn.Module) -> list:
    """Every runtime's keep-logits of the last training forward (see ``train_logits`` above)."""
    return [z for rt in runtimes(model) if hasattr(rt, "train_logits") for z in rt.train_logits()]


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Set every runtime's inference threshold (a keep probability in [0, 1]; 0 keeps everything)."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    for rt in runtimes(model):
        if hasattr(rt, "threshold"):
            rt.threshold = value


def set_tau(model: nn.Module, tau: float) -> None:
    """Set every runtime's Gumbel temperature (training)."""
    for rt in runtimes(model):
        if hasattr(rt, "tau"):
            rt.tau = float(tau)


def trim_stats(model: nn.Module) -> dict:
    """Every runtime's ``stats()`` of the last forward, merged."""
    out: dict = {}
    for rt in runtimes(model):
        for key, value in rt.stats().items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}  # two runtimes reporting tokens of different streams
            else:
                out[key] = value
    return out
