"""Click options built from the fields of a config dataclass (see `trimkit.train.config.setting`), so
that a new setting is one field: its name, type, default and help text make the option."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal

import click

__all__ = ["config_options", "option_fields", "given"]


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options (``cli`` in their metadata), in field order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def _click_type(kind: Any, low: float | None):
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(a) for a in typing.get_args(kind)])
    if kind is int:
        return int if low is None else click.IntRange(min=int(low))
    if kind is float:
        return float if low is None else click.FloatRange(min=float(low))
    return kind


def _option(f: dataclasses.Field, kind: Any, unset: bool, help: str | None, low: float | None) -> Callable:
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    if kind is bool:
        return click.option(flag, is_flag=True, help=help)
    kw: dict[str, Any] = {"type": _click_type(kind, low), "help": help}
    if not unset:
        kw.update(default=meta.get("cli_default", f.default), show_default=True)
    return click.option(flag, **kw)


def config_options(cls, names: tuple[str, ...] | None = None, *, unset: bool = False,
                   help: dict[str, str] | None = None, low: dict[str, float] | None = None) -> Callable:
    """A decorator adding one click option per option field of `cls` (or per name of `names`, in that
    order). unset: the options default to None (flags to off), for commands that only override
    the values given on the command line (see :func:`given`). help / low: per-field replacements
    of the help text and lower bound, for a command that words an option its own way."""
    help, low = help or {}, low or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in option_fields(cls)}
    chosen = [fields[n] for n in names] if names is not None else list(fields.values())

    def deco(fn: Callable) -> Callable:
        for f in reversed(chosen):
            fn = _option(f, hints[f.name], unset, help.get(f.name, f.metadata.get("help")),
                         low.get(f.name, f.metadata.get("low")))(fn)
        return fn

    return deco


def given(cls, values: dict, names: tuple[str, ...] | None = None) -> dict:
    """The option fields of `cls` that were set in `values` (not None; flags only when on)."""
    wanted = names if names is not None else tuple(f.name for f in option_fields(cls))
    return {n: values[n] for n in wanted if values.get(n) is not None and values[n] is not False}
