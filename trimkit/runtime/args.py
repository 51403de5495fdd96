"""Sequence-aligned arguments of a layer call, found from the recorded forward, and the small
rewrites of a call's arguments that token removal needs (slicing, merging a key mask)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from trimkit.graph import Capture

__all__ = ["layer_arg_axes", "get_arg", "set_arg", "mask_position", "merge_into_mask_arg"]


def _batch_size(cap: Capture) -> int:
    for t in cap.inputs.values():
        if t.dim() >= 2:
            return t.shape[0]
    return 1


def layer_arg_axes(cap: Capture, layer_path: str, other: Capture | None = None) -> dict[str, Any]:
    """Which arguments of a layer call are sequence-aligned with its main input, and on which dims.

    ``seq_first`` is True for ``[L, B, D]`` layouts. With a second capture whose lengths differ, a
    dim counts only if it follows the length in both.
    """
    def one(c: Capture):
        b = _batch_size(c)
        call = next((k for k in c.calls if k.path == layer_path), None)
        if call is None:
            return None
        main = None
        for n, name in zip(call.inputs, call.input_names):
            s, dt = n.meta["trimkit.shape"], n.meta["trimkit.dtype"]
            if s is not None and len(s) == 3 and dt is not None and dt.is_floating_point:
                seq_first = s[0] != b and s[1] == b
                main = (name, s[0] if seq_first else s[1], seq_first)
                break
        if main is None:
            return None
        axes = {}
        for n, name in zip(call.inputs, call.input_names):
            s = n.meta["trimkit.shape"]
            if name == main[0] or s is None:
                continue
            dims = [d for d in range(1, len(s)) if s[d] == main[1]]
            if dims:
                axes[name] = dims
        return main[0], axes, main[2]

    a = one(cap)
    if a is None:
        return {"main": None, "axes": {}, "seq_first": False}
    if other is not None:
        b = one(other)
        if b is not None and b[0] == a[0]:
            return {"main": a[0], "axes": {k: v for k, v in a[1].items() if b[1].get(k) == v}, "seq_first": a[2]}
    return {"main": a[0], "axes": a[1], "seq_first": a[2]}


def get_arg(args, kwargs, name: str):
    first, *rest = name.split(".")
    value = args[int(first)] if first.isdigit() and int(first) < len(args) else kwargs.get(first)
    for r in rest:
        flat, _ = tree_flatten(value)
        value = [v for v in flat if isinstance(v, torch.Tensor)][int(r)]
    return value


def set_arg(args, kwargs, name: str, new):
    first, *rest = name.split(".")
    if first.isdigit() and int(first) < len(args):
        old = args[int(first)]
    else:
        old = kwargs.get(first)
    if rest:
        flat, spec = tree_flatten(old)
        tpos = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)][int(rest[0])]
        flat = list(flat)
        flat[tpos] = new
        new = tree_unflatten(flat, spec)
    if first.isdigit() and int(first) < len(args):
        args = list(args)
        args[int(first)] = new
        args = tuple(args)
    else:
        kwargs = dict(kwargs)
        kwargs[first] = new
    return args, kwargs



_MASK_POSITION: dict = {}


def mask_position(module: nn.Module) -> int | None:
    """Position of ``attention_mask`` among the forward's positional parameters (None: no such parameter)."""
    cls = type(module)
    if cls not in _MASK_POSITION:
        try:
            params = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params]
        _MASK_POSITION[cls] = names.index("attention_mask") if "attention_mask" in names else None
    return _MASK_POSITION[cls]


def merge_into_mask_arg(module: nn.Module, args, kwargs, mask: torch.Tensor):
    """``(args, kwargs)`` with the additive key mask ``[B, 1, 1, Lk]`` merged into the module's
    ``attention_mask`` argument, or None when that cannot be done safely (then a function mode adds it).

    Only floating (additive) masks of rank 4 whose last dim is the key length are merged; a missing
    mask is merged only for self-attention, where the keys are the module's own hidden states.
    """
    pos = mask_position(module)
    if pos is None:
        return None
    in_kwargs = "attention_mask" in kwargs or pos >= len(args)
    current = kwargs.get("attention_mask") if in_kwargs else args[pos]
    lk = mask.shape[-1]
    if current is None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != lk:
            return None
        if any(isinstance(kwargs.get(k), torch.Tensor) for k in ("encoder_hidden_states", "key_value_states")):
            return None
        new = mask.to(hidden.dtype)
    elif (isinstance(current, torch.Tensor) and current.dim() == 4 and current.is_floating_point()
          and current.shape[-1] == lk and current.shape[0] in (1, mask.shape[0])):
        new = torch.clamp(current + mask.to(current.dtype), min=torch.finfo(current.dtype).min)
    else:
        return None
    if in_kwargs:
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
    else:
        args = tuple(args[:pos]) + (new,) + tuple(args[pos + 1:])
    return args, kwargs
