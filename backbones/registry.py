"""Model references -> `Backbone`: registry names, hub ids, folders and factories.

A reference is tried as, in order: a shipped trained model (``vilt-vqa-where``, see
:mod:`trimkit.backbones.trained`), a registry name (``clip``, ``clip-tiny``, ...), a
``module:function`` / ``file.py:function`` factory, a local folder (``save_pretrained`` output, or
a ``trimkit apply`` folder holding ``trimkit.json``), then a Hugging Face hub id. Hub ids are read
from the local cache first; the network is tried only when ``HF_HUB_OFFLINE`` is unset and the hub
answers a short connection probe. Every failure to find a model is one `UnknownModelError` line
that lists the registry names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers

from trimkit.backbones.base import Backbone, TaskAdapter
from trimkit.backbones.factory import backbone_from_factory, is_factory_ref
from trimkit.backbones.families import FAMILIES, family_by_architecture, family_by_name, generic_inputs, tiny_kwargs
from trimkit.backbones.inputs import RepeatBatch
from trimkit.backbones.saved import BASE_DIR, MANIFEST, WEIGHTS, load_folder, read_manifest
from trimkit.backbones.trained import BENCH_FORMAT, bench_trained_backbone, list_trained, trained_folder, trained_info
from trimkit.errors import ConfigError, UnknownModelError

__all__ = ["list_backbones", "load_backbone", "load_saved", "tiny_config", "backbone_for_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBE_SECONDS = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def list_backbones() -> list[str]:
    """Every registry name: each family, then its ``-tiny`` variant."""
    return [name for family in FAMILIES for name in (family.name, f"{family.name}-tiny")]


def _unknown(ref: str, reason: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {ref!r}: {reason}. Known backbones: {', '.join(list_backbones() + list_trained())}; "
        "or give a Hugging Face hub id, a save_pretrained folder, or module:factory / file.py:factory")


def _config_class(architecture: str) -> type:
    return getattr(transformers, architecture).config_class


def tiny_config(name: str, *, attn_implementation: str | None = None) -> transformers.PretrainedConfig:
    """A fresh config object of `name`'s tiny variant (``clip`` or ``clip-tiny``)."""
    try:
        family = family_by_name(name)
    except KeyError:
        raise _unknown(name, "not a registry name") from None
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return _config_class(family.architecture)(**tiny_kwargs(name), **extra)


def _model_class(config: Any) -> type:
    architectures = getattr(config, "architectures", None) or []
    for architecture in architectures:
        cls = getattr(transformers, architecture, None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModel


def backbone_for_model(model: torch.nn.Module, *, name: str | None = None, source: str = "factory",
                       example_inputs: dict | None = None) -> Backbone:
    """Wrap a Hugging Face model: its family's task adapter and inputs, read from ``model.config``.

    Models of another class get a ``features`` adapter (first tensor output) and inputs read from
    the config's vocabulary and image size. `example_inputs` (a batch) replace the inputs made from
    the config. The model is put in eval mode.
    """
    config = model.config
    family = family_by_architecture(type(model).__name__)
    if family is not None:
        if family.prepare is not None:
            family.prepare(model)
        make_inputs, task = family.inputs(config), family.task(config)
    else:
        make_inputs, task = generic_inputs(config), TaskAdapter("features", key=None)
    if example_inputs is not None:
        make_inputs = RepeatBatch(dict(example_inputs))
    if make_inputs is None:
        raise _unknown(name or type(model).__name__,
                       f"cannot make example inputs for {type(model).__name__} (no vocabulary or image size)")
    hints = {"family": None if family is None else family.name,
             **(make_inputs.hints() if hasattr(make_inputs, "hints") else {})}
    if task.num_labels is not None:
        hints["num_labels"] = task.num_labels
    return Backbone(name=name or (family.name if family else type(model).__name__), model=model.eval(),
                    task=task, make_inputs=make_inputs, hints=hints, source=source)


def _attn_kwargs(attn_implementation: str | None) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _build_tiny(name: str, attn_implementation: str | None, seed: int) -> Backbone:
    family = family_by_name(name)
    try:
        config = tiny_config(name, attn_implementation=attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, family.architecture)(config)
    except ValueError as err:
        raise ConfigError(f"cannot build {name}: {_first_line(err)}") from None
    return backbone_for_model(model, name=name, source="registry")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_pretrained(where: str, config: Any, attn_implementation: str | None, **kw: Any) -> torch.nn.Module:
    cls = _model_class(config)
    try:
        return cls.from_pretrained(where, config=config, **_attn_kwargs(attn_implementation), **kw)
    except ValueError as err:
        raise ConfigError(f"cannot load {where!r}: {_first_line(err)}") from None


def _load_folder(ref: str, path: Path, attn_implementation: str | None,
                 example_inputs: dict | None = None) -> Backbone:
    if (path / MANIFEST).is_file():
        return load_saved(str(path))
    if not (path / "config.json").is_file():
        if (path / BASE_DIR).is_dir() or (path / WEIGHTS).is_file():
            read_manifest(path)  # a trimkit folder without its manifest: says so
        raise _unknown(ref, f"the folder has neither {MANIFEST} (a trimkit folder) nor config.json "
                            "(a save_pretrained folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise _unknown(ref, f"config.json cannot be read ({_first_line(err)})") from None
    try:
        model = _from_pretrained(str(path), config, attn_implementation)
    except OSError as err:
        raise _unknown(ref, f"the folder cannot be loaded ({_first_line(err)})") from None
    return backbone_for_model(model, name=ref, source="folder", example_inputs=example_inputs)


def _saved_base(ref: str, example_inputs: dict | None) -> Backbone:
    """The base of a saved folder: its ``base/`` folder or its factory, fed its stored inputs if any."""
    path = Path(ref)
    if path.is_dir() and not is_factory_ref(ref):
        return _load_folder(ref, path, None, example_inputs)
    backbone = load_backbone(ref)
    if example_inputs is None:
        return backbone
    return dataclasses.replace(backbone, make_inputs=RepeatBatch(dict(example_inputs)))


def load_saved(path: str | os.PathLike) -> Backbone:
    """Rebuild a folder written by ``trimkit apply`` / ``trimkit train`` (see :mod:`trimkit.backbones.saved`)."""
    return load_folder(path, _saved_base)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """A bounded probe of the hub endpoint (a proxy, if set, is trusted to answer instead)."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=_PROBE_SECONDS).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS)
    return bool(answered)


def _load_hub(ref: str, hub_id: str, attn_implementation: str | None, name: str) -> Backbone:
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    try:
        config = transformers.AutoConfig.from_pretrained(hub_id, local_files_only=True)
        cached = True
    except (OSError, ValueError):
        if offline:
            raise _unknown(ref, "not in the local cache and HF_HUB_OFFLINE is set") from None
        if not _hub_reachable():
            raise _unknown(ref, "not in the local cache and the hub is unreachable") from None
        try:
            config = transformers.AutoConfig.from_pretrained(hub_id)
        except (OSError, ValueError) as err:
            raise _unknown(ref, f"not found on the hub ({_first_line(err)})") from None
        cached = False
    try:
        model = _from_pretrained(hub_id, config, attn_implementation, local_files_only=cached)
    except OSError as err:
        raise _unknown(ref, f"the weights cannot be loaded ({_first_line(err)})") from None
    return backbone_for_model(model, name=name, source="hub")


def _load_trained(name: str, attn_implementation: str | None) -> Backbone:
    """A shipped trained model, from its package folder; ``hints["data"]`` names the data spec it
    was trained on (its vocabulary and answers are that spec's)."""
    if trained_info(name).get("format") == BENCH_FORMAT:
        return bench_trained_backbone(name)
    backbone = _load_folder(name, trained_folder(name), attn_implementation)
    return dataclasses.replace(backbone, hints={**backbone.hints, "data": trained_info(name)["data"]},
                               source="registry")


def load_backbone(ref: str, *, attn_implementation: str | None = None, seed: int = 0) -> Backbone:
    """Resolve a model reference (see the module docstring) to a Backbone in eval mode.

    attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ...); None keeps its default.
    seed: the weight seed of ``-tiny`` models (random weights, built offline).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise _unknown(str(ref), "empty reference")
    ref = ref.strip()
    if ref in list_trained():
        return _load_trained(ref, attn_implementation)
    if ref in list_backbones():
        if ref.endswith("-tiny"):
            return _build_tiny(ref, attn_implementation, seed)
        return _load_hub(ref, family_by_name(ref).hub_id, attn_implementation, name=ref)
    if is_factory_ref(ref):
        try:
            return backbone_from_factory(ref)
        except UnknownModelError as err:
            raise _unknown(ref, str(err)) from None
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_folder(ref, path, attn_implementation)
    if path.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise _unknown(ref, "not a registry name, folder or hub id")
    return _load_hub(ref, ref, attn_implementation, name=ref)
