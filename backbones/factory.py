"""``pkg.module:factory`` and ``path/file.py:factory`` model references.

``factory()`` returns a `Backbone`, or a pair ``(model, example_inputs)``; a pair becomes a Backbone
whose inputs repeat or slice the example batch and whose task adapter reads the first tensor output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from trimkit.backbones.base import Backbone, TaskAdapter
from trimkit.backbones.inputs import RepeatBatch
from trimkit.errors import ConfigError, UnknownModelError

__all__ = ["is_factory_ref", "load_factory", "backbone_from_factory"]


def is_factory_ref(ref: str) -> bool:
    """Whether `ref` has the ``target:function`` form (hub ids and folders have no colon)."""
    target, _, attr = ref.rpartition(":")
    return bool(target) and attr.isidentifier()


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"trimkit_factory_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UnknownModelError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise UnknownModelError(f"no module named {name!r}") from None
        raise


def load_factory(ref: str) -> Callable[[], Any]:
    """The function named by ``module:function`` or ``file.py:function``."""
    target, _, attr = ref.rpartition(":")
    as_file = target.endswith(".py") or "/" in target or "\\" in target
    if as_file:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"no factory file {target!r}")
        module = _import_file(path)
    else:
        module = _import_module(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UnknownModelError(f"{target!r} has no callable {attr!r}")
    return factory


def backbone_from_factory(ref: str) -> Backbone:
    """Call the factory named by `ref` and wrap its result as a Backbone (source ``"factory"``)."""
    result = load_factory(ref)()
    if isinstance(result, Backbone):
        result.model.eval()
        return dataclasses.replace(result, source="factory")
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
            and isinstance(result[1], Mapping)):
        model, example = result
        return Backbone(name=ref, model=model.eval(), task=TaskAdapter("features", key=None),
                        make_inputs=RepeatBatch(dict(example)), source="factory")
    raise ConfigError(f"factory {ref!r} must return a Backbone or (model, example_inputs), got {_shape_of(result)}")


def _shape_of(result: Any) -> str:
    """What a factory returned, with a hint where example inputs are not a dict of named tensors."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return (f"(model, {type(result[1]).__name__}): the example inputs must be a dict of keyword "
                "arguments, e.g. {'pixel_values': ..., 'input_ids': ...}, so that model(**inputs) runs")
    if isinstance(result, tuple):
        return f"a tuple of {len(result)} ({', '.join(type(r).__name__ for r in result)})"
    return type(result).__name__
