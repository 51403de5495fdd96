"""What trimkit stores on a user's model, and the one place that reads and writes it.

Every name is a constant here; code elsewhere calls the functions instead of spelling the
attribute. The names never change: the module attributes (``TOKEN_TRIMMERS``, ``HEAD_TRIMMERS``,
``BASELINE_TOKENS``) are prefixes of state-dict keys of saved folders.

Plain attributes (``__dict__``, not submodules):

* ``_trimkit_runtimes``: the trimming runtimes installed on the model (see :mod:`.control`);
* ``_trimkit_map``: the ModelMap recorded by ``apply_``;
* ``_trimkit_applied``: the applied-pass records, in order;
* ``_trimkit_cost``: the cost model of :mod:`trimkit.cost`;
* ``_trimkit_token_runtime`` / ``_trimkit_head_runtime`` / ``_trimkit_baseline_runtime``: the
  runtime each token or head pass installed;
* ``_trimkit_logits_hooks`` / ``_trimkit_decoder_logits``: a backbone adapter's hooks that carry a
  decoder's logits out of a model whose forward does not return them (BLIP VQA), and the logits
  in flight.

Submodules (saved with the weights): ``trimkit_token_trimmers``, ``trimkit_head_trimmers``,
``trimkit_baseline_tokens``, attached with :func:`attach`. They are real children of the model, so
``state_dict()``, ``parameters()``, ``.to()`` and ``.train()`` reach them, and each is a
:class:`PassThrough`: called, it returns its first argument unchanged. A model whose forward runs its
children in turn (``nn.Sequential``, a loop over ``self.children()``) therefore computes what it
computed before; on an ``nn.Sequential`` they are its last entries (``len(model)`` and
``model[-1]`` see them) until ``remove_``.

Marks on modules: ``trimkit_role`` (``"trimmer"``: trainable), ``trimkit_no_quant`` (int8 leaves it in float).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["RUNTIMES", "MAP", "APPLIED", "COST", "TOKEN_RUNTIME", "HEAD_RUNTIME", "BASELINE_RUNTIME",
           "TOKEN_TRIMMERS", "HEAD_TRIMMERS", "BASELINE_TOKENS", "LOGITS_HOOKS", "DECODER_LOGITS", "ROLE",
           "TRIMMER_ROLE", "NO_QUANT", "PassThrough", "Trimmers", "get", "put", "attach", "drop", "has_module",
           "role", "no_quant", "mark_no_quant", "unmark_no_quant"]

RUNTIMES = "_trimkit_runtimes"
MAP = "_trimkit_map"
APPLIED = "_trimkit_applied"
COST = "_trimkit_cost"
TOKEN_RUNTIME = "_trimkit_token_runtime"
HEAD_RUNTIME = "_trimkit_head_runtime"
BASELINE_RUNTIME = "_trimkit_baseline_runtime"
LOGITS_HOOKS = "_trimkit_logits_hooks"
DECODER_LOGITS = "_trimkit_decoder_logits"

TOKEN_TRIMMERS = "trimkit_token_trimmers"
HEAD_TRIMMERS = "trimkit_head_trimmers"
BASELINE_TOKENS = "trimkit_baseline_tokens"

ROLE = "trimkit_role"
TRIMMER_ROLE = "trimmer"
NO_QUANT = "trimkit_no_quant"


class PassThrough(nn.Module):
    """Base of every module trimkit attaches to a model: calling it returns its first argument."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        return next(iter(kwargs.values()), None)


class Trimmers(PassThrough, nn.ModuleDict):
    """A dict of trimmers keyed by site (dots as ``__``), attachable to a model."""


def get(model: nn.Module, name: str, default: Any = None) -> Any:
    """The plain attribute or submodule ``name`` of ``model`` (``default`` when absent)."""
    return getattr(model, name, default)


def put(model: nn.Module, name: str, value: Any) -> None:
    """Store a plain (non-module) attribute, bypassing ``nn.Module.__setattr__``."""
    object.__setattr__(model, name, value)


def attach(model: nn.Module, name: str, module: PassThrough) -> None:
    """Register ``module`` as the submodule ``name`` of ``model`` (saved with its weights)."""
    if not isinstance(module, PassThrough):
        raise TypeError(f"{name}: trimkit attaches PassThrough modules only, got {type(module).__name__}")
    model.add_module(name, module)


def drop(model: nn.Module, name: str) -> None:
    """Remove attribute or submodule ``name`` (no error when absent)."""
    if name in model.__dict__:
        object.__delattr__(model, name)
    elif name in model._modules:
        delattr(model, name)


def has_module(model: nn.Module, name: str) -> bool:
    return name in model._modules


def role(module: nn.Module) -> str | None:
    """``"trimmer"`` for modules whose parameters are trained; None for the model's own."""
    return getattr(module, ROLE, None)


def no_quant(module: nn.Module) -> bool:
    return bool(getattr(module, NO_QUANT, False))


def mark_no_quant(module: nn.Module) -> bool:
    """Mark ``module`` to stay in float; True when this call set the mark."""
    if no_quant(module):
        return False
    object.__setattr__(module, NO_QUANT, True)
    return True


def unmark_no_quant(module: nn.Module) -> None:
    module.__dict__.pop(NO_QUANT, None)
