"""Running passes: ordering checks, roll-back on failure, and the applied-pass record on the model.

`apply_(model, configs)` changes `model` in place (the trailing underscore) and records every
applied pass in ``model._trimkit_applied`` (a list of `AppliedPass`), so `remove_(model)` can undo
them in reverse order and `trimkit.io.save_folder` can write the recipe that rebuilds the model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn

from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes.base import AppliedPass, PassConfig, PassContext, PassResult
from trimkit.passes.registry import config_to_dict, handler_for, parse_recipe
from trimkit.runtime import state

__all__ = ["PassManager", "ApplyReport", "apply_", "remove_", "apply_recipe", "applied_passes",
           "check_order"]



def applied_passes(model: nn.Module) -> list[AppliedPass]:
    """The passes applied to `model` by this library, in order (empty if none)."""
    return list(state.get(model, state.APPLIED, []))


def _records(model: nn.Module) -> list[AppliedPass]:
    records = state.get(model, state.APPLIED)
    if records is None:
        records = []
        state.put(model, state.APPLIED, records)
    return records


def _matches(pattern: str, cls: type[PassConfig]) -> bool:
    if pattern.startswith("@"):
        return pattern[1:] in cls.tags
    return fnmatch.fnmatchcase(cls.name, pattern)


def _label(config: PassConfig, index: int) -> str:
    return f"pass {type(config).name!r} (#{index})"


def check_order(configs: Sequence[PassConfig], applied: Sequence[PassConfig] = ()) -> None:
    """Raise `ConfigError` if `configs` (run after the already `applied` ones) break a requires/forbids rule."""
    done: list[PassConfig] = list(applied)
    names = ", ".join(type(c).name for c in configs)
    for i, config in enumerate(configs, 1):
        cls = type(config)
        if not isinstance(config, PassConfig):
            raise ConfigError(f"pass #{i} is a {cls.__name__}, not a PassConfig")
        for pattern in cls.requires:
            if not any(_matches(pattern, type(d)) for d in done):
                raise ConfigError(f"{_label(config, i)} requires {pattern!r} to run before it; order: {names}")
        for j, earlier in enumerate(done, 1 - len(applied)):
            for pattern in type(earlier).forbids_after:
                if _matches(pattern, cls):
                    where = f"#{j}" if j > 0 else "already applied"
                    raise ConfigError(f"{_label(config, i)} cannot run after {type(earlier).name!r} ({where}), "
                                      f"which forbids {pattern!r} after it; order: {names}")
        done.append(config)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@dataclass
class PassManager:
    """Runs configs in order on a model, after checking their ordering constraints.

    inputs / hints / restoring: passed to handlers that take a `PassContext`.
    On a failing pass, the passes this run applied are undone (newest first) and a `TrimkitError`
    (the failing error's class when it is one) names the failing pass and those that ran before it.
    """

    inputs: dict | None = None
    hints: dict = field(default_factory=dict)
    restoring: bool = False

    def run(self, model: nn.Module, model_map: Any, configs: Iterable[PassConfig]) -> list[PassResult]:
        configs = list(configs)
        records = _records(model)
        check_order(configs, [r.config for r in records])
        start = len(records)
        results: list[PassResult] = []
        for i, config in enumerate(configs, 1):
            handler, takes_context = handler_for(config)
            context = PassContext(self.inputs, dict(self.hints), tuple(records), self.restoring)
            try:
                args = (model, model_map, config, context) if takes_context else (model, model_map, config)
                result = handler(*args)
                if not isinstance(result, PassResult):
                    raise TrimkitError(f"handler returned {type(result).__name__}, not a PassResult")
            except Exception as err:
                raise self._failure(err, config, i, records, start) from err
            if result.model is not model:
                state.drop(model, state.APPLIED)
                model = result.model
                state.put(model, state.APPLIED, records)
            records.append(AppliedPass(config, result))
            results.append(result)
        state.put(model, state.MAP, model_map)
        return results

    @staticmethod
    def _failure(err: Exception, config: PassConfig, index: int, records: list[AppliedPass],
                 start: int) -> TrimkitError:
        before = [type(r.config).name for r in records[start:]]
        problems = []
        while len(records) > start:
            record = records.pop()
            if record.result.undo is None:
                problems.append(f"{type(record.config).name!r} cannot be undone")
                continue
            try:
                record.result.undo()
            except Exception as undo_err:  # keep undoing the others, then report
                problems.append(f"undoing {type(record.config).name!r} failed ({_first_line(undo_err)})")
        ran = f"passes run before it: {', '.join(before)}" if before else "no passes ran before it"
        ran += f" ({'; '.join(problems)})" if problems else (" (undone)" if before else "")
        message = f"{_label(config, index)} failed: {_first_line(err) if not isinstance(err, TrimkitError) else str(err)}; {ran}"
        cls = type(err) if isinstance(err, TrimkitError) else TrimkitError
        try:
            return cls(message)
        except TypeError:
            return TrimkitError(message)


@dataclass
class ApplyReport:
    """What `apply_` did: the model (the same object unless a pass replaced it), the map it used
    and, per pass, its config and result."""

    model: nn.Module
    model_map: Any
    configs: list[PassConfig]
    results: list[PassResult]

    @property
    def trainable(self) -> bool:
        return any(r.trainable for r in self.results)

    def to_dict(self) -> dict:
        return {"passes": [{"name": type(c).name, "config": config_to_dict(c)["_data"], "report": r.report,
                            "trainable": r.trainable} for c, r in zip(self.configs, self.results)]}


def _as_configs(configs: PassConfig | Iterable[PassConfig] | str | Path) -> list[PassConfig]:
    if isinstance(configs, PassConfig):
        return [configs]
    if isinstance(configs, (str, Path)):
        return parse_recipe(configs)
    return list(configs)


def apply_(model: nn.Module, configs: PassConfig | Iterable[PassConfig] | str | Path, model_map: Any = None,
           inputs: dict | None = None, *, hints: dict | None = None, restoring: bool = False) -> ApplyReport:
    """Apply passes to `model` in place (configs, one config, or a recipe's text or path).

    model_map: the model's `ModelMap`; when None it is located from one forward on `inputs`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"apply_ needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(configs, (PassConfig, str, Path, Iterable)) or isinstance(configs, (bytes, dict)):
        raise ConfigError(f"passes are a PassConfig, a list of them, or a recipe's text or path; "
                          f"got {type(configs).__name__}")
    configs = _as_configs(configs)
    if model_map is None:
        if inputs is None:
            raise ConfigError("apply_ needs a model_map or example inputs to locate the model's blocks")
        from trimkit.locate import locate

        model_map = locate(model, inputs, hints=hints)
    manager = PassManager(inputs=inputs, hints=dict(hints or {}), restoring=restoring)
    results = manager.run(model, model_map, configs)
    return ApplyReport(results[-1].model if results else model, model_map, configs, results)


def apply_recipe(model: nn.Module, recipe: str | Path, model_map: Any, *, inputs: dict | None = None,
                 hints: dict | None = None) -> list[PassResult]:
    """Apply a TOML recipe (text or path) to `model` in place; the results of its passes, in order."""
    return PassManager(inputs=inputs, hints=dict(hints or {})).run(model, model_map, parse_recipe(recipe))


def remove_(model: nn.Module) -> list[PassConfig]:
    """Undo every applied pass, newest first; the configs removed. Refuses if one cannot be undone."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"remove_ needs a torch.nn.Module, got {type(model).__name__}")
    records = _records(model)
    stuck = [type(r.config).name for r in records if r.result.undo is None]
    if stuck:
        raise TrimkitError(f"cannot remove passes: {', '.join(stuck)} cannot be undone")
    removed = []
    while records:
        record = records.pop()
        record.result.undo()
        removed.append(record.config)
    state.drop(model, state.MAP)
    return removed[::-1]
