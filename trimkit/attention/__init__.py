"""Attention kinds, the one attention ``TorchFunctionMode`` and the actions it applies.

Example (keys of an attention module masked by an additive ``[B, 1, 1, Lk]`` mask)::

    from trimkit.attention import AttentionMode, KeyMask
    with AttentionMode(KeyMask(mask)):
        out = attention_module(hidden_states)

Actions: :class:`KeyMask` (additive key mask, or the exact keep-softmax in training),
:class:`HeadSlice` (compute only the kept heads), :class:`CaptureProbs` (record a query row of the
attention probabilities). Adding a kind is one class decorated with :func:`register_kind` (the built-in
ones are in :mod:`trimkit.attention.standard`); locate, the profiler and the runtime take it from the
registry.
"""
from trimkit.attention import standard  # noqa: F401  (registers the built-in kinds)
from trimkit.attention.actions import Action, CaptureProbs, HeadDecision, HeadSlice, KeyMask
from trimkit.attention.mode import AttentionMode, ModeStack
from trimkit.attention.registry import (
    PATTERNS, AttentionKind, attention_formulas, get_kind, kind_of_function, kind_of_op, kind_of_op_name, kinds,
    register_kind,
)

__all__ = ["AttentionMode", "ModeStack", "Action", "KeyMask", "HeadSlice", "HeadDecision", "CaptureProbs", "AttentionKind",
           "register_kind", "kinds", "get_kind", "kind_of_function", "kind_of_op", "kind_of_op_name",
           "attention_formulas", "PATTERNS"]
