"""The registry of attention kinds.

An *attention kind* is one way a model computes attention (an eager softmax over a query·key product,
``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``, ...). Each kind is one class
registered with :func:`register_kind`; the rest of trimkit asks the registry instead of naming ops:

* ``graph_ops`` and ``pattern``: the aten ops that mark the kind in a captured graph and how
  :mod:`trimkit.locate` reads the site around them;
* ``formulas`` and ``family``: aten op name -> FLOP formula (:mod:`trimkit.profile.formulas`), and the
  op family under which both FLOP counters report those ops;
* ``functions``: the torch functions an :class:`~trimkit.attention.AttentionMode` intercepts for it;
* ``mask_keys`` / ``slice_heads`` / ``capture_probs``: how the kind applies each action of the mode.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

__all__ = ["AttentionKind", "register_kind", "kinds", "get_kind", "kind_of_function", "kind_of_op",
           "kind_of_op_name", "attention_formulas", "PATTERNS"]

PATTERNS = ("eager", "qkv", "mha_kernel", "layer_kernel")
"""How :mod:`trimkit.locate` reads a site around a kind's graph op: ``eager`` a softmax between a
query·key and a weights·value product; ``qkv`` a kernel taking q, k, v as its first three arguments;
``mha_kernel`` ``_native_multi_head_attention``'s arguments (projection weights included);
``layer_kernel`` ``_transformer_encoder_layer_fwd``'s arguments (attention and FFN weights)."""

Proceed = Callable[[tuple, dict], Any]


class AttentionKind:
    """One attention kind. Subclass it, fill the class attributes, override what the kind supports and
    decorate the class with :func:`register_kind`.

    The three action methods receive the action, the intercepted call ``(func, args, kwargs)`` and
    ``proceed(args, kwargs)``, which runs the call (through the actions after this one). They return the
    call's result. The defaults leave the call unchanged.
    """

    name: ClassVar[str] = ""
    functions: ClassVar[tuple] = ()  # torch functions (torch_function level)
    graph_ops: ClassVar[frozenset] = frozenset()  # aten OpOverloads (dispatch level, captured graphs)
    pattern: ClassVar[str] = ""  # one of PATTERNS: how locate reads the site around a graph op
    products: ClassVar[frozenset] = frozenset()  # "eager": the q·k and weights·v product ops around it
    formulas: ClassVar[Mapping[str, Callable]] = {}  # aten op name -> formula(args, out_specs) -> Cost
    family: ClassVar[str] = ""  # op family of the formulas' ops in FLOP reports

    def mask_keys(self, action, func, args: tuple, kwargs: dict, proceed: Proceed):
        return proceed(args, kwargs)

    def slice_heads(self, action, func, args: tuple, kwargs: dict, proceed: Proceed):
        return proceed(args, kwargs)

    def capture_probs(self, action, func, args: tuple, kwargs: dict, proceed: Proceed):
        return proceed(args, kwargs)

    def __repr__(self) -> str:
        return f"<attention kind {self.name!r}>"


_KINDS: dict[str, AttentionKind] = {}
_BY_FUNCTION: dict[Any, AttentionKind] = {}
_BY_OP: dict[Any, AttentionKind] = {}
_BY_NAME: dict[str, AttentionKind] = {}


def register_kind(cls: type[AttentionKind]) -> type[AttentionKind]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.graph_ops and cls.pattern not in PATTERNS:
        raise ValueError(f"attention kind {cls.name!r}: pattern must be one of {PATTERNS}, got {cls.pattern!r}")
    if cls.name in _KINDS:
        raise ValueError(f"attention kind {cls.name!r} is already registered")
    kind = cls()
    for table, keys, what in ((_BY_FUNCTION, cls.functions, "function"), (_BY_OP, cls.graph_ops, "op"),
                              (_BY_NAME, cls.formulas, "formula of")):
        taken = [k for k in keys if k in table]
        if taken:
            raise ValueError(f"attention kind {cls.name!r}: {what} {taken[0]} already belongs to "
                             f"{table[taken[0]].name!r}")
    _KINDS[cls.name] = kind
    _BY_FUNCTION.update({f: kind for f in cls.functions})
    _BY_OP.update({op: kind for op in cls.graph_ops})
    _BY_NAME.update({name: kind for name in cls.formulas})
    return cls


def kinds() -> tuple[AttentionKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def get_kind(name: str) -> AttentionKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown attention kind {name!r}; registered: {', '.join(_KINDS)}") from None


def kind_of_function(func) -> AttentionKind | None:
    """The kind a torch function computes (None: not an attention entry point)."""
    try:
        return _BY_FUNCTION.get(func)
    except TypeError:  # unhashable callables
        return None


def kind_of_op(op) -> AttentionKind | None:
    """The kind an aten op of a captured graph marks (None: not an attention op)."""
    try:
        return _BY_OP.get(op)
    except TypeError:
        return None


def kind_of_op_name(name: str) -> AttentionKind | None:
    """The kind whose formulas count the aten op ``name`` (no namespace, e.g. ``"_native_multi_head_attention"``)."""
    return _BY_NAME.get(name)


def attention_formulas() -> dict[str, Callable]:
    """Aten op name -> FLOP formula, over every registered kind."""
    return {name: f for kind in _KINDS.values() for name, f in kind.formulas.items()}
