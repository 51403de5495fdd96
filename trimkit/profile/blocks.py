"""Which module paths are reported as blocks, and parameter counts.

A *block* is a module path with a kind ("attention", "ffn", "layer", "embeddings",
"head", "trimmer", ...). Each op is charged to the deepest block that encloses it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from trimkit.errors import ConfigError
from trimkit.runtime import state

__all__ = ["blocks_from_map", "default_blocks", "resolve_blocks", "is_trimmer", "trimmer_paths",
           "count_params"]


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or mapping key: works for ModelMap objects and their JSON form."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _paths(value: Any) -> Iterable[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    path = _field(value, "path")
    return [path] if isinstance(path, str) else []


def blocks_from_map(model_map: Any) -> dict[str, str]:
    """``{path: kind}`` from a ModelMap.

    Reads ``.streams[i].layers[j].path``, ``.attention[k].path`` and ``.ffn.path``.

    Duck-typed: objects or the ``trimkit inspect --json`` dict form. Layers become kind
    "layer" (their norms and residual adds), attention sites "attention", FFNs "ffn";
    optional top-level ``embeddings`` / ``head`` / ``heads`` / ``trimmers`` are added too.
    """
    blocks: dict[str, str] = {}
    for stream in _field(model_map, "streams", ()) or ():
        for layer in _field(stream, "layers", ()) or ():
            for path in _paths(_field(layer, "path")):
                blocks[path] = "layer"
            for path in _paths(_field(layer, "attention")):
                blocks[path] = "attention"
            for path in _paths(_field(layer, "ffn")):
                blocks[path] = "ffn"
    for name, kind in (("embeddings", "embeddings"), ("head", "head"), ("heads", "head"),
                       ("trimmers", "trimmer")):
        for path in _paths(_field(model_map, name)):
            blocks[path] = kind
    return blocks


def is_trimmer(path: str, module: torch.nn.Module) -> bool:
    if state.role(module) == state.TRIMMER_ROLE:
        return True
    own_name = path.rsplit(".", 1)[-1].lower()
    return "trimmer" in type(module).__name__.lower() or "trimmer" in own_name


def trimmer_paths(model: torch.nn.Module) -> list[str]:
    """Outermost modules marked as trimmers (``trimkit_role = "trimmer"`` or named so)."""
    found: list[str] = []
    for path, module in model.named_modules():
        if path and is_trimmer(path, module) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return found


def default_blocks(model: torch.nn.Module) -> dict[str, str]:
    """Top-level children of the model, kind "module"."""
    return {name: "module" for name, _ in model.named_children()}


def resolve_blocks(model: torch.nn.Module, blocks: Mapping[str, str] | None,
                   name: str = "model") -> dict[str, str]:
    """Check the paths exist; fall back to top-level children; always add trimmer modules."""
    chosen = dict(default_blocks(model) if blocks is None else blocks)
    known = dict(model.named_modules())
    missing = [p for p in chosen if p not in known]
    if missing:
        raise ConfigError(f"{name}: block path(s) not in the model: {', '.join(missing[:5])}")
    for path in trimmer_paths(model):
        chosen[path] = "trimmer"
    return chosen


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters inside trimmer modules), shared tensors counted once."""
    total = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()
    trim = 0
    for path in trimmer_paths(model):
        for p in model.get_submodule(path).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                trim += p.numel()
    return total, trim
