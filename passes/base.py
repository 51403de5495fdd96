"""The pass protocol: a frozen config dataclass, the result a handler returns, and field checking.

A pass is a `PassConfig` subclass (a frozen dataclass with a class-level ``name``) plus a handler
registered for it with `trimkit.passes.register_pass`::

    @dataclass(frozen=True)
    class MyConfig(PassConfig):
        name: ClassVar[str] = "my.pass"
        ratio: float = 0.5

        def validate(self) -> None:          # ranges; raise ConfigError with the values
            if not 0 < self.ratio <= 1:
                raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")

    @register_pass(MyConfig)
    def my_pass(model, model_map, config, context) -> PassResult: ...

Field values are checked against the annotations when a config is built: ``float`` fields accept
ints (stored as float), ``bool`` fields accept only booleans, ``tuple[T, ...]`` fields accept lists
(stored as tuples), ``X | None`` accepts None, ``Literal[...]`` one of its values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Union

import torch
from torch import nn

from trimkit.errors import ConfigError
from trimkit.runtime import state

__all__ = ["PassConfig", "PassResult", "PassContext", "AppliedPass", "config_fields", "check_fields",
           "trainable_parameters", "TRIMMER_ROLE"]

TRIMMER_ROLE = state.TRIMMER_ROLE


@dataclass(frozen=True)
class PassConfig:
    """Base class of every pass config (subclass it as a ``@dataclass(frozen=True)``).

    Class attributes:
      name: the pass name used in recipes (``"smarttrim.tokens"``, ``"int8.dynamic"``).
      version: bumped when fields change meaning; `upgrade` maps older saved data forward.
      requires: patterns of passes that must run before this one.
      forbids_after: patterns of passes that may not run after this one.
      tags: free labels; a pattern ``"@trim"`` matches every pass tagged ``trim``.
    Patterns are pass names with shell wildcards (``"smarttrim.*"``) or ``@tag``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    requires: ClassVar[tuple[str, ...]] = ()
    forbids_after: ClassVar[tuple[str, ...]] = ()
    tags: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Range checks of a subclass; raise `ConfigError` naming the field and its value."""

    @classmethod
    def upgrade(cls, data: dict, from_version: int) -> dict:
        """Map the fields saved by an older `version` to the current ones (default: refuse)."""
        raise ConfigError(f"pass {cls.name!r} cannot read config version {from_version} "
                          f"(current version {cls.version})")


@dataclass
class PassResult:
    """What a handler returns.

    model: the model after the pass (the same object for in-place passes).
    report: JSON-friendly facts about what the pass did (counts, replaced modules, notes).
    undo: restores the model to its state before the pass; None when the pass cannot be undone.
    trainable: whether the pass added parameters meant to be trained (see `trainable_parameters`).
    """

    model: nn.Module
    report: dict = field(default_factory=dict)
    undo: Callable[[], None] | None = None
    trainable: bool = False


@dataclass(frozen=True)
class PassContext:
    """Extra facts a handler may take as a fourth argument.

    inputs: example inputs of the model (``model(**inputs)``), or None when none were given.
    hints: backbone hints (special tokens, modalities), possibly empty.
    applied: the passes already applied to the model, in order.
    restoring: True when a saved folder is being rebuilt: the saved state dict will overwrite
      every parameter and buffer afterwards, so random initialisation and calibration can be skipped.
    """

    inputs: dict | None = None
    hints: dict = field(default_factory=dict)
    applied: tuple["AppliedPass", ...] = ()
    restoring: bool = False


@dataclass(frozen=True)
class AppliedPass:
    """One entry of a model's applied-pass record (``model._trimkit_applied``)."""

    config: PassConfig
    result: PassResult


# ----------------------------------------------------------------------------------------------
# Field types
# ----------------------------------------------------------------------------------------------
def config_fields(cls: type[PassConfig]) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config class (init fields only)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # a class defined in a function, with string annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """A short name of an annotation for error messages (``float``, ``str or None``)."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = describe_type(args[0]) if args else "any"
        return f"list of {inner}"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """`value` converted to annotation `tp` (int -> float, list -> tuple); `_Mismatch` if it does not fit."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Mismatch
            return tuple(coerce(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = tuple(coerce(v, inner) for v in value)
        return items if origin is tuple else list(items)
    raise _Mismatch


def supported_type(tp: Any) -> bool:
    """Whether recipes can express annotation `tp` (bool, int, float, str, None, unions, Literal, tuples)."""
    if tp in (Any, bool, int, float, str, type(None)):
        return True
    if _is_union(tp) or typing.get_origin(tp) is tuple:
        return all(a is Ellipsis or supported_type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, (bool, int, float, str)) for a in typing.get_args(tp))
    return False


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_fields(config: PassConfig) -> None:
    """Check (and normalise, in place) every field of `config` against its annotation."""
    for name, tp in config_fields(type(config)).items():
        value = getattr(config, name)
        try:
            fixed = coerce(value, tp)
        except _Mismatch:
            raise ConfigError(f"pass {config.name!r}: field {name!r} must be {describe_type(tp)}, "
                              f"got {_show(value)}") from None
        if fixed is not value:
            object.__setattr__(config, name, fixed)


# ----------------------------------------------------------------------------------------------
# Trainable trimmers
# ----------------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of every module whose ``trimkit_role`` is ``"trimmer"`` (each once, in module order)."""
    seen: set[int] = set()
    params: list[torch.nn.Parameter] = []
    for module in model.modules():
        if state.role(module) != TRIMMER_ROLE:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
