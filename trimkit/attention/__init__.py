"""Attention kinds, the one attention ``TorchFunctionMode`` and the actions it applies.

>>> from trimkit.attention import AttentionMode, KeyMask
>>> with AttentionMode(KeyMask(additive_mask_b11l)):
...     out = attention_module(hidden)

Adding a kind is one class in :mod:`trimkit.attention.standard` (or anywhere) decorated with
:func:`register_kind`; locate, the profiler and the runtime take it from the registry.
"""
import trimkit.attention.standard  # noqa: F401  (registers the built-in kinds)
from trimkit.attention.actions import Action, CaptureProbs, HeadDecision, HeadSlice, KeyMask
from trimkit.attention.mode import AttentionMode
from trimkit.attention.registry import AttentionKind, get_kind, kind_of_function, kind_of_op, kinds, register_kind

__all__ = ["AttentionMode", "Action", "KeyMask", "HeadSlice", "HeadDecision", "CaptureProbs", "AttentionKind",
           "register_kind", "kinds", "get_kind", "kind_of_function", "kind_of_op"]
