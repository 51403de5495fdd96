"""Saved trimkit folders (``trimkit apply --out DIR``): the layout, checking it, and rebuilding the model.

Layout::

    DIR/trimkit.json        {"format": 1, "base": {"ref", "kind", ...}, "recipe": [config dicts],
                             "map": ModelMap dict, "versions": {...}, "extra": {...},
                             "inputs": {"values": {...}} (only with DIR/inputs.safetensors)}
    DIR/base/               the untouched base model: ``save_pretrained`` output for Hugging Face
                            models, ``model.safetensors`` (its state dict) for factory models
    DIR/model.safetensors   the full state dict after the passes (trimmer weights, int8 buffers, ...)
    DIR/inputs.safetensors  example inputs, for models whose inputs no registry family can make

`load_folder` rebuilds the base (Hugging Face: from ``DIR/base``; factories: re-runs the factory and
loads ``DIR/base/model.safetensors``), re-applies the recipe with the saved map (handlers see
``context.restoring = True``), then loads ``DIR/model.safetensors`` strictly, so the restored model
gives the same outputs. Writing lives in :mod:`trimkit.io`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from trimkit.backbones.base import Backbone
from trimkit.backbones.factory import is_factory_ref
from trimkit.errors import ConfigError, TrimkitError
from trimkit.locate import ModelMap
from trimkit.passes.manager import apply_
from trimkit.passes.registry import config_from_dict

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "BASE_DIR", "INPUTS", "is_trimkit_folder", "read_manifest",
           "check_folder", "safetensors_problem", "read_example_inputs", "load_folder"]

FORMAT = 1
MANIFEST = "trimkit.json"
WEIGHTS = "model.safetensors"
BASE_DIR = "base"
INPUTS = "inputs.safetensors"

BaseLoader = Callable[[str, "Mapping[str, Any] | None"], Backbone]


def is_trimkit_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a ``trimkit.json``."""
    return (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars while writing or reading a folder (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolved_factory_ref(ref: str) -> str | None:
    """``/abs/path/file.py:factory`` for a file factory reference given relative to the working folder."""
    if not is_factory_ref(ref):
        return None
    target, _, attr = ref.rpartition(":")
    path = Path(target).expanduser()
    if target.endswith(".py") and path.is_file():
        return f"{path.resolve()}:{attr}"
    return None


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _folder_arg(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ConfigError(f"a saved folder is a path (str or os.PathLike), got {path!r}")
    return Path(path).expanduser()


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``trimkit.json`` of a saved folder (checked format)."""
    folder = _folder_arg(path)
    file = folder / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not folder.is_dir():
            raise ConfigError(f"no folder {str(path)!r}") from None
        if (folder / BASE_DIR).is_dir() or (folder / WEIGHTS).is_file():
            raise ConfigError(f"trimkit folder {str(path)!r}: {MANIFEST} is missing") from None
        raise ConfigError(f"{str(path)!r} is not a trimkit folder (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"trimkit folder {str(path)!r}: {MANIFEST} is damaged ({clip(str(err), 120)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(f"{str(file)!r} has format {found!r}; this trimkit reads format {FORMAT}")
    missing = [k for k in ("base", "recipe", "map") if k not in manifest]
    if missing:
        raise ConfigError(f"{str(file)!r} lacks {', '.join(missing)}")
    return manifest


def safetensors_problem(file: str | os.PathLike) -> str | None:
    """Why `file` is not a complete safetensors file (``"missing"``, ``"truncated: ..."``, ...), or None.

    Reads only the header: an 8-byte little-endian length, a JSON header of that length, then the
    tensor data, whose last byte must be the file's last byte.
    """
    path = Path(file)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated: the header says {length} bytes, the file has {size - 8} after it"
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        return f"truncated: {size} of {expected} bytes"
    return None


def _check_file(file: Path, folder: Path) -> None:
    """A one-line `ConfigError` naming the file and its folder when `file` is missing or damaged."""
    problem = safetensors_problem(file)
    if problem is None:
        return
    name = file.relative_to(folder) if file.is_relative_to(folder) else file
    state = "is missing" if problem == "missing" else f"is damaged ({problem})"
    raise ConfigError(f"trimkit folder {str(folder)!r}: {name.as_posix()} {state}")


def check_folder(path: str | os.PathLike, manifest: dict | None = None) -> None:
    """One-line `ConfigError` naming the first missing or damaged file of a saved folder."""
    folder = _folder_arg(path)
    manifest = read_manifest(folder) if manifest is None else manifest
    base = folder / BASE_DIR
    if not base.is_dir():
        raise ConfigError(f"trimkit folder {str(path)!r}: {BASE_DIR}/ (the base model) is missing")
    kind = manifest["base"].get("kind")
    if kind == "hf" and not (base / "config.json").is_file():
        raise ConfigError(f"trimkit folder {str(path)!r}: {BASE_DIR}/config.json is missing")
    files = sorted(base.glob("*.safetensors")) if kind == "hf" else [base / WEIGHTS]
    if "inputs" in manifest:
        files.append(folder / INPUTS)
    for file in (files or [base / WEIGHTS]) + [folder / WEIGHTS]:
        _check_file(file, folder)


def _some(label: str, keys, shown: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {label} ({', '.join(keys[:shown])}{more})" if keys else f"0 {label}"


def _load_weights(model: nn.Module, file: Path, what: str, folder: Path) -> None:
    _check_file(file, folder)
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as err:  # shape mismatches
        text = " ".join(str(err).split())
        raise TrimkitError(f"{what} in {str(file)!r} do not fit the rebuilt model: {clip(text)}") from None
    if missing or unexpected:
        raise TrimkitError(f"{what} in {str(file)!r} do not fit the rebuilt model: "
                           f"{_some('missing', missing)}; {_some('unexpected', unexpected)}")


def read_example_inputs(path: str | os.PathLike, manifest: dict | None = None) -> dict | None:
    """The example inputs stored in a saved folder (tensors and plain values), or None if it has none."""
    folder = _folder_arg(path)
    manifest = read_manifest(folder) if manifest is None else manifest
    stored = manifest.get("inputs")
    if stored is None:
        return None
    _check_file(folder / INPUTS, folder)
    inputs: dict[str, Any] = dict(load_file(str(folder / INPUTS)))
    inputs.update(stored.get("values", {}))
    order = stored.get("order", list(inputs))
    return {k: inputs[k] for k in order if k in inputs}


def _factory_ref(base: dict) -> str:
    ref, resolved = base["ref"], base.get("resolved_ref")
    if resolved and resolved_factory_ref(ref) is None:
        return resolved  # the relative path no longer resolves from here
    return ref


def _load_base(folder: Path, base: dict, load_base: BaseLoader, example: dict | None) -> Backbone:
    kind = base.get("kind")
    if kind == "hf":
        with quiet_transformers():
            return load_base(str(folder / BASE_DIR), example)
    if kind == "factory":
        backbone = load_base(_factory_ref(base), example)
        _load_weights(backbone.model, folder / BASE_DIR / WEIGHTS, "base weights", folder)
        return backbone
    raise ConfigError(f"{str(folder / MANIFEST)!r}: unknown base kind {kind!r} (expected 'hf' or 'factory')")


def load_folder(path: str | os.PathLike, load_base: BaseLoader) -> Backbone:
    """Rebuild a saved folder as a `Backbone` (source ``"trimkit"``) whose model gives the saved outputs.

    load_base(ref, example_inputs): the Backbone of a model reference (the folder's ``base/`` or
    its factory), whose inputs repeat `example_inputs` when the folder stores some.
    """
    folder = _folder_arg(path)
    manifest = read_manifest(folder)
    check_folder(folder, manifest)
    configs = [config_from_dict(d) for d in manifest["recipe"]]
    model_map = ModelMap.from_dict(manifest["map"])
    backbone = _load_base(folder, manifest["base"], load_base, read_example_inputs(folder, manifest))
    with torch.random.fork_rng(devices=[]):
        report = apply_(backbone.model, configs, model_map=model_map, inputs=backbone.example_inputs(2),
                        hints=backbone.hints, restoring=True)
    model = report.model
    _load_weights(model, folder / WEIGHTS, "weights", folder)
    model.eval()
    return dataclasses.replace(backbone, name=str(path), model=model, source="trimkit")
