"""Training within a memory budget: which parameters train (trimmers, norms, LoRA adapters), and
gradient checkpointing of the located backbone layers."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trimkit.errors import ConfigError

__all__ = ["norm_parameters", "lora_targets", "add_lora", "merge_lora", "checkpoint_layers", "layer_paths", "site_paths", "pure_blocks"]


def layer_paths(model_map) -> list[str]:
    """The dotted paths of every located layer, stream by stream."""
    return [layer.path for stream in getattr(model_map, "streams", []) for layer in stream.layers]


def site_paths(model_map) -> set[str]:
    """The dotted paths of every located attention site."""
    return {site.path for stream in getattr(model_map, "streams", []) for layer in stream.layers
            for site in layer.attention}


def norm_parameters(model: nn.Module, exclude: set[int]) -> list[nn.Parameter]:
    """The parameters of normalisation modules (LayerNorm, RMSNorm, GroupNorm, any ``*Norm*`` class),
    each once, leaving out those in `exclude` (ids)."""
    params, seen = [], set(exclude)
    for module in model.modules():
        if "norm" not in type(module).__name__.lower():
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def lora_targets(model: nn.Module, model_map) -> list[str]:
    """Linear layers of the located blocks that LoRA adapts: query/key/value projections (the
    output projection, where head gates act, is left alone) and the FFN's linears."""
    paths: list[str] = []
    for stream in getattr(model_map, "streams", []):
        for layer in stream.layers:
            for site in layer.attention:
                paths += [p for p in (site.q, site.k, site.v) if p]
            if layer.ffn is not None:
                paths += [*layer.ffn.fc_in, layer.ffn.fc_out]
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if isinstance(model.get_submodule(p), nn.Linear)]


def add_lora(model: nn.Module, model_map, rank: int = 8) -> list[nn.Parameter]:
    """Inject LoRA adapters (``peft``) into :func:`lora_targets` in place; their parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("--trainable lora needs the peft package: pip install 'trimkit[lora]'") from None
    targets = lora_targets(model, model_map)
    if not targets:
        raise ConfigError("--trainable lora found no Linear projection in the located layers to adapt")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets), model)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base Linear and put the base layer back; how many."""
    merged = 0
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "merge"):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
        merged += 1
    return merged


def _checkpointed(forward: Callable, context: Callable[[], tuple[ContextManager, ContextManager]] | None):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context} if context is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    return run


def pure_blocks(module: nn.Module, path: str, avoid: set[str]) -> list[str]:
    """The largest sub-modules under `path` (itself included) that hold a Linear and no module of
    `avoid` (the attention sites: the trimming runtimes count their calls per forward, so a
    recomputation of them would not run the same)."""
    if path in avoid:
        return []
    if not any(a == path or a.startswith(path + ".") for a in avoid):
        return [path] if any(isinstance(m, nn.Linear) for m in module.modules()) else []
    found: list[str] = []
    for name, child in module.named_children():
        found += pure_blocks(child, f"{path}.{name}" if path else name, avoid)
    return found


def checkpoint_layers(model: nn.Module, paths: list[str], avoid: set[str] = frozenset(),
                      recompute: Callable[[], ContextManager] | None = None) -> Callable[[], None]:
    """Run the parts of each module at `paths` outside `avoid` (:func:`pure_blocks`) under
    ``torch.utils.checkpoint`` while gradients are on; `recompute()` is entered around each
    recomputation. Returns the undo."""
    context = None
    if recompute is not None:
        def context():
            return contextlib.nullcontext(), recompute()
    patched = []
    for path in paths:
        for block in pure_blocks(model.get_submodule(path), path, set(avoid)):
            module = model.get_submodule(block)
            module.forward = _checkpointed(module.forward, context)
            patched.append(module)

    def undo() -> None:
        for module in patched:
            del module.forward
    return undo
