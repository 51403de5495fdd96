"""The pass registry, config (de)serialisation and TOML recipes.

The registry maps pass names to config classes and handlers. It is filled by `register_pass`, by
the built-in pass modules (imported on first use) and by the entry points of group
``trimkit.passes`` (each entry point names a module or a registered config class; loading it
registers its passes).

Saved configs use ``{"_type": name, "_version": version, "_data": {field: value}}``; only registered
names are accepted, so loading a recipe or a folder never imports arbitrary code.

Recipes are TOML::

    [[pass]]
    name = "int8.dynamic"
    skip = "classifier"
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import math
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes.base import PassConfig, PassResult, config_fields, describe_type, supported_type

__all__ = ["register_pass", "registered_passes", "pass_config", "handler_for", "config_to_dict",
           "config_from_dict", "parse_recipe", "recipe_to_toml", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "trimkit.passes"
BUILTIN_MODULES = ("trimkit.passes.int8", "trimkit.passes.smarttrim", "trimkit.passes.smarttrim_heads",
                   "trimkit.passes.random_tokens", "trimkit.passes.topk", "trimkit.passes.tome",
                   "trimkit.passes.fastv", "trimkit.passes.visionzip")

Handler = Callable[..., PassResult]


@dataclass(frozen=True)
class _Entry:
    config_cls: type[PassConfig]
    handler: Handler
    takes_context: bool


_REGISTRY: dict[str, _Entry] = {}
_loaded = {"builtins": False, "entry_points": False}


def _takes_context(handler: Handler) -> bool:
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind is p.VAR_POSITIONAL for p in params) or "context" in {
        p.name for p in params}


def _check_config_class(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, PassConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_pass needs a PassConfig dataclass, got {cls!r}")
    if "__dataclass_fields__" not in cls.__dict__ or not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass config {cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"pass config {cls.__name__} needs a class attribute name = '...'")
    for fname, tp in config_fields(cls).items():
        if fname == "name":
            raise TypeError(f"pass config {cls.__name__} cannot have a field called 'name' (used by recipes)")
        if not supported_type(tp):
            raise TypeError(f"pass config {cls.__name__}: field {fname!r} has type {tp!r}, which recipes "
                            "cannot express (use bool, int, float, str, Literal, tuple[...] or X | None)")


def register_pass(config_cls: type[PassConfig]) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler(model, model_map, config[, context]) -> PassResult`` for `config_cls`.

    Registering another class under a taken name raises `TrimkitError`; re-registering the same
    class (a module imported twice) replaces the handler.
    """
    _check_config_class(config_cls)

    def decorate(handler: Handler) -> Handler:
        old = _REGISTRY.get(config_cls.name)
        if old is not None and _class_id(old.config_cls) != _class_id(config_cls):
            raise TrimkitError(f"pass name {config_cls.name!r} is taken by {_class_id(old.config_cls)}; "
                               f"cannot register {_class_id(config_cls)}")
        _REGISTRY[config_cls.name] = _Entry(config_cls, handler, _takes_context(handler))
        return handler

    return decorate


def _class_id(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtins() -> None:
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as err:  # a broken plugin must not break the built-in passes
            warnings.warn(f"trimkit pass plugin {ep.name!r} ({ep.value}) failed to load: {err}", stacklevel=2)
            continue
        if isinstance(target, type) and issubclass(target, PassConfig) and target.name not in _REGISTRY:
            warnings.warn(f"trimkit pass plugin {ep.name!r} names {target.__name__}, which has no registered "
                          "handler (decorate one with @register_pass)", stacklevel=2)


def reload_plugins() -> None:
    """Read the ``trimkit.passes`` entry points again (after installing a plugin in the same process)."""
    _loaded["entry_points"] = False
    _load_entry_points()


def _entries() -> dict[str, _Entry]:
    _load_builtins()
    _load_entry_points()
    return _REGISTRY


def registered_passes() -> dict[str, type[PassConfig]]:
    """Pass name -> config class for every known pass (built-ins, registrations, entry points), sorted."""
    return {name: e.config_cls for name, e in sorted(_entries().items())}


def _unknown_pass(name: Any, where: str = "") -> ConfigError:
    known = ", ".join(sorted(_entries())) or "(none)"
    return ConfigError(f"unknown pass {name!r}{where}; registered passes: {known}")


def pass_config(name: str) -> type[PassConfig]:
    """The config class registered as `name` (`ConfigError` listing the registered names if none)."""
    entry = _entries().get(name)
    if entry is None:
        raise _unknown_pass(name)
    return entry.config_cls


def handler_for(config: PassConfig) -> tuple[Handler, bool]:
    """(handler, takes_context) registered for `config`'s class."""
    entry = _entries().get(type(config).name)
    if entry is None or entry.config_cls is not type(config):
        raise _unknown_pass(type(config).name, f" (config class {type(config).__name__} is not registered)")
    return entry.handler, entry.takes_context


# ----------------------------------------------------------------------------------------------
# Dicts
# ----------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def config_to_dict(config: PassConfig) -> dict:
    """``{"_type": name, "_version": version, "_data": {field: value}}`` (JSON-ready)."""
    if not isinstance(config, PassConfig):
        raise TypeError(f"config_to_dict needs a PassConfig, got {type(config).__name__}")
    data = {f: _plain(getattr(config, f)) for f in config_fields(type(config))}
    return {"_type": type(config).name, "_version": type(config).version, "_data": data}


def build_config(cls: type[PassConfig], data: dict, where: str = "") -> PassConfig:
    """``cls(**data)`` with one-line errors naming the pass, the field and the valid fields."""
    fields = config_fields(cls)
    label = f"pass {cls.name!r}{where}"
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(f"{f} ({describe_type(t)})" for f, t in fields.items()) or "(none)"
        raise ConfigError(f"{label}: unknown field {unknown[0]!r}; valid fields: {valid}")
    try:
        return cls(**data)
    except ConfigError as err:
        text = str(err)
        for prefix in (f"pass {cls.name!r}: ", f"{cls.name}: "):
            text = text[len(prefix):] if text.startswith(prefix) else text
        raise ConfigError(f"{label}: {text}") from None


def config_from_dict(d: dict) -> PassConfig:
    """Inverse of `config_to_dict`; only registered pass names are accepted."""
    if not isinstance(d, dict) or "_type" not in d:
        raise ConfigError(f"a saved pass config needs keys _type, _version, _data; got {d!r}")
    cls = pass_config(d["_type"])
    data = dict(d.get("_data", {}))
    version = d.get("_version", cls.version)
    if not isinstance(version, int) or version > cls.version:
        raise ConfigError(f"pass {cls.name!r}: saved config version {version!r} is newer than this "
                          f"trimkit's version {cls.version}")
    if version < cls.version:
        data = cls.upgrade(data, version)
    return build_config(cls, data)


# ----------------------------------------------------------------------------------------------
# TOML recipes
# ----------------------------------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    """A one-line string with no TOML syntax in it (``r.toml``, ``dir/recipe``, a pass name)."""
    return "\n" not in text and not any(c in text for c in "[]=\"'")


def _read_recipe_text(source: str | Path) -> tuple[str, str]:
    """(text, label) of a recipe given as TOML text or as a path."""
    if isinstance(source, Path):
        path = source
    elif not isinstance(source, str):
        raise ConfigError(f"a recipe is TOML text or a path, got {type(source).__name__}")
    elif source.strip() and "\n" not in source and Path(source).expanduser().is_file():
        path = Path(source).expanduser()
    elif not source.strip() or not _looks_like_path(source):
        return source, "recipe"
    elif source.strip() in _entries():
        raise ConfigError(f"{source.strip()!r} is a pass name, not a recipe: give its config "
                          f"(pass_config({source.strip()!r})()) or a recipe with [[pass]] name = {source.strip()!r}")
    elif source.strip().endswith(".toml") or "/" in source or "\\" in source:
        path = Path(source).expanduser()
    else:
        raise ConfigError(f"recipe {source!r} is neither a file nor TOML text ([[pass]] tables)")
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} not found")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {str(path)!r}: {err}") from None


def parse_recipe(source: str | Path) -> list[PassConfig]:
    """Configs of a TOML recipe (text or path): one ``[[pass]]`` table per pass, in order."""
    text, label = _read_recipe_text(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{label}: invalid TOML: {err}") from None
    extra = sorted(set(doc) - {"pass"})
    if extra:
        raise ConfigError(f"{label}: unknown top-level key {extra[0]!r}; a recipe is a list of [[pass]] tables")
    tables = doc.get("pass", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{label}: 'pass' must be an array of tables ([[pass]]), got {type(tables).__name__}")
    configs = []
    for i, table in enumerate(tables, 1):
        data = dict(table)
        name = data.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{label}: pass #{i} needs a string 'name', got {name!r}")
        entry = _entries().get(name)
        if entry is None:
            raise _unknown_pass(name, f" (pass #{i})")
        configs.append(build_config(entry.config_cls, data, f" (pass #{i})"))
    return configs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} {value!r} to TOML")


def recipe_to_toml(configs: Iterable[PassConfig]) -> str:
    """A TOML recipe that `parse_recipe` reads back to equal configs (None fields are left out)."""
    blocks = []
    for config in configs:
        data = config_to_dict(config)["_data"]
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.init}
        lines = ["[[pass]]", f"name = {_toml_value(type(config).name)}"]
        for key, value in data.items():
            if value is None:
                if defaults.get(key, dataclasses.MISSING) is not None:
                    raise ConfigError(f"pass {type(config).name!r}: field {key!r} is None, which TOML cannot "
                                      "write unless None is its default")
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
