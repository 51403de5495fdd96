"""Record what a model really executes as a ``torch.fx.Graph``.

HF transformers v5 has no fx tracer and VLM forwards contain data-dependent Python, so trimkit
does not trace symbolically: it runs the model once on real inputs and writes down every op that
reached the dispatcher (a ``TorchDispatchMode``), plus module calls through per-module hooks.

Leaf modules (Linear, Conv, LayerNorm, Embedding) become ``call_module`` nodes; everything else is
recorded as ``call_function`` nodes on aten ops, so fused kernels (SDPA, the
``nn.MultiheadAttention`` fast path) appear as one node each. Parameters and buffers that ops use
directly become ``get_attr`` nodes. Every node carries namespaced metadata:

``trimkit.module``   dotted path of the innermost module that was running
``trimkit.shape``    output shape (tuple) of the first tensor output, or None
``trimkit.origins``  frozenset of model input names the value descends from
``trimkit.index``    execution order

Module hooks are per module, except on ``nn.TransformerEncoderLayer`` and its submodules, whose forward
skips its fused kernel when hooks are attached: those calls are seen through global module hooks, so the
graph holds the kernel the model runs without trimkit. Module calls are also kept in
:class:`Capture.calls` (path, input and output nodes), because the locator reasons about layers as modules.
"""
from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from trimkit.errors import CaptureError

__all__ = ["Capture", "ModuleCall", "capture", "LEAF_MODULES"]

LEAF_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)

try:  # GPT-2 style transposed linear
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    LEAF_MODULES = LEAF_MODULES + (_HFConv1D,)
except Exception:  # transformers missing or moved: plain models still work
    pass


@dataclasses.dataclass
class ModuleCall:
    """One call of one module during the recorded forward."""

    path: str
    module: nn.Module
    index: int  # order of the call's start
    inputs: list[fx.Node]  # nodes of the tensor arguments (positional then keyword, in order)
    input_names: list[str]  # "0", "1", ... for positional, the keyword otherwise
    outputs: list[fx.Node] = dataclasses.field(default_factory=list)
    end: int = -1  # node index when the call returned
    first_node: int = -1  # index of the first node recorded inside the call

    @property
    def main_input(self) -> fx.Node | None:
        return self.inputs[0] if self.inputs else None

    @property
    def main_output(self) -> fx.Node | None:
        return self.outputs[0] if self.outputs else None


@dataclasses.dataclass
class Capture:
    """The result of :func:`capture`."""

    graph: fx.Graph
    calls: list[ModuleCall]
    inputs: dict[str, torch.Tensor]
    output: Any
    model: nn.Module

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    def calls_of(self, path: str) -> list[ModuleCall]:
        return [c for c in self.calls if c.path == path]


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _shape(t: torch.Tensor | None) -> tuple | None:
    """The shape of ``t``, with None for a ragged dimension of a nested tensor (None: no tensor)."""
    if t is None:
        return None
    if t.is_nested:
        return tuple(_nested_size(t, i) for i in range(t.dim()))
    return tuple(t.shape)


def _nested_size(t: torch.Tensor, dim: int) -> int | None:
    try:
        return t.size(dim)
    except RuntimeError:  # a ragged dimension
        return None


class _Recorder(TorchDispatchMode):
    """Dispatch mode that appends one node per executed op."""

    def __init__(self, state: "_State"):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        st = self.state
        if st.leaf_depth == 0:
            st.record_op(func, args, kwargs, out)
        return out


class _State:
    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        self.graph = fx.Graph()
        self.by_id: dict[int, fx.Node] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while recording
        self.stack: list[str] = []
        self.leaf_depth = 0
        self.counter = itertools.count()
        self.calls: list[ModuleCall] = []
        self.open_calls: list[ModuleCall] = []
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(b), name)
        self.attr_nodes: dict[int, fx.Node] = {}
        self.n_const = 0
        for name, t in inputs.items():
            node = self.graph.placeholder(name)
            self._bind(t, node, origins=frozenset([name]))

    # -- bookkeeping -------------------------------------------------------------------------
    def _meta(self, node: fx.Node, value, origins: frozenset) -> None:
        first = next((v for v in tree_flatten(value)[0] if _is_tensor(v)), None)
        node.meta["trimkit.module"] = self.stack[-1] if self.stack else ""
        node.meta["trimkit.shape"] = _shape(first)
        node.meta["trimkit.dtype"] = first.dtype if first is not None else None
        node.meta["trimkit.origins"] = origins
        node.meta["trimkit.index"] = next(self.counter)

    def _bind(self, tensor: torch.Tensor, node: fx.Node, origins: frozenset) -> None:
        self._meta(node, tensor, origins)
        self.by_id[id(tensor)] = node
        self.keep.append(tensor)

    def node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.by_id.get(id(t))
        if node is not None:
            return node
        node = self.attr_nodes.get(id(t))
        if node is not None:
            return node
        name = self.names.get(id(t))
        if name is None:
            name = f"_tensor_constant{self.n_const}"
            self.n_const += 1
        node = self.graph.get_attr(name)
        node.meta["trimkit.param"] = name in self.names.values()
        self._meta(node, t, frozenset())
        self.attr_nodes[id(t)] = node
        self.keep.append(t)
        return node

    def _args_to_nodes(self, args, kwargs):
        origins: set[str] = set()

        def conv(x):
            if _is_tensor(x):
                n = self.node_of(x)
                origins.update(n.meta["trimkit.origins"])
                return n
            return x

        return tree_map(conv, args), tree_map(conv, kwargs), frozenset(origins)

    def _bind_outputs(self, node: fx.Node, out, origins: frozenset) -> None:
        flat = [v for v in tree_flatten(out)[0]]
        tensors = [v for v in flat if _is_tensor(v)]
        self._meta(node, out, origins)
        if _is_tensor(out):
            self.by_id[id(out)] = node
            self.keep.append(out)
            return
        for i, v in enumerate(flat):
            if _is_tensor(v):
                item = self.graph.call_function(operator.getitem, (node, i))
                self._bind(v, item, origins)
        node.meta["trimkit.n_outputs"] = len(tensors)

    # -- events ------------------------------------------------------------------------------
    def record_op(self, func, args, kwargs, out) -> None:
        nargs, nkwargs, origins = self._args_to_nodes(args, kwargs)
        node = self.graph.call_function(func, nargs, nkwargs)
        self._bind_outputs(node, out, origins)

    def pre_call(self, path: str, module: nn.Module, args, kwargs) -> None:
        flat = list(enumerate(args)) + list(kwargs.items())
        tensor_items = [(str(k), v) for k, v in flat if _is_tensor(v)]
        # Nested tensors inside tuples/lists (rare) are looked at too.
        for k, v in flat:
            if not _is_tensor(v):
                for j, t in enumerate(x for x in tree_flatten(v)[0] if _is_tensor(x)):
                    tensor_items.append((f"{k}.{j}", t))
        nodes = [self.node_of(t) for _, t in tensor_items]
        call = ModuleCall(path, module, next(self.counter), nodes, [k for k, _ in tensor_items])
        call.first_node = call.index
        self.calls.append(call)
        self.open_calls.append(call)
        self.stack.append(path)
        if self.leaf_depth == 0 and isinstance(module, LEAF_MODULES):
            call.leaf = True  # type: ignore[attr-defined]
            self.leaf_depth += 1
        else:
            call.leaf = False  # type: ignore[attr-defined]
            if self.leaf_depth:
                self.leaf_depth += 1

    def post_call(self, path: str, module: nn.Module, output, late_kwargs: dict | None = None) -> None:
        call = self.open_calls.pop()
        if late_kwargs:  # keyword tensors of a call whose pre-hook could not see them
            for k, v in late_kwargs.items():
                if _is_tensor(v):
                    call.inputs.append(self.node_of(v))
                    call.input_names.append(str(k))
        self.stack.pop()
        if self.leaf_depth:
            self.leaf_depth -= 1
        tensors = [v for v in tree_flatten(output)[0] if _is_tensor(v)]
        if call.leaf and self.leaf_depth == 0:
            origins = frozenset().union(*(n.meta["trimkit.origins"] for n in call.inputs)) if call.inputs else frozenset()
            node = self.graph.call_module(path, tuple(call.inputs))
            self.stack.append(path)
            self._bind_outputs(node, output, origins)
            self.stack.pop()
        call.outputs = [self.node_of(t) for t in tensors]
        call.end = next(self.counter)


def _flatten_inputs(inputs) -> dict[str, torch.Tensor]:
    if not isinstance(inputs, dict):
        raise CaptureError(f"example inputs must be a dict of keyword arguments, got {type(inputs).__name__}")
    return inputs


def _hook_sensitive(model: nn.Module) -> dict[nn.Module, str]:
    """Modules whose forward takes another path when hooks are attached to them (``nn.TransformerEncoderLayer``
    skips its fused kernel then), with their paths: the capture hooks them globally instead."""
    out: dict[nn.Module, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.TransformerEncoderLayer):
            prefix = f"{path}." if path else ""
            for sub_path, sub in module.named_modules(remove_duplicate=False):
                out.setdefault(sub, prefix + sub_path if sub_path else path)
    return out


def _install_hooks(model: nn.Module, state: _State, handles: list) -> None:
    """Forward hooks that report every module call of ``model`` to ``state``, their handles appended to
    ``handles`` as they are made."""
    quiet = _hook_sensitive(model)
    for module, path in {m: p for p, m in model.named_modules(remove_duplicate=False)}.items():
        if module in quiet:
            continue

        def pre(mod, args, kwargs, _p=path):
            state.pre_call(_p, mod, args, kwargs)

        def post(mod, args, kwargs, output, _p=path):
            state.post_call(_p, mod, output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    if quiet:
        def global_pre(mod, args):
            if mod in quiet:
                state.pre_call(quiet[mod], mod, args, {})

        def global_post(mod, args, kwargs, output):
            if mod in quiet:
                state.post_call(quiet[mod], mod, output, late_kwargs=kwargs)

        handles.append(register_module_forward_pre_hook(global_pre))
        handles.append(register_module_forward_hook(global_post, with_kwargs=True))


def capture(model: nn.Module, inputs: dict[str, Any], *, name: str | None = None,
            forward: Callable[..., Any] | None = None) -> Capture:
    """Run ``model(**inputs)`` once under no_grad and record the executed graph.

    ``forward`` replaces the call (``forward(model, inputs)``) for models that need another entry
    point. Hooks and the dispatch mode are always removed, also when the model raises; a failure
    inside the model is re-raised as a one-line :class:`CaptureError` naming the module that ran.
    """
    inputs = _flatten_inputs(inputs)
    tensor_inputs = {k: v for k, v in inputs.items() if _is_tensor(v)}
    state = _State(model, tensor_inputs)
    handles = []
    try:
        _install_hooks(model, state, handles)
        with torch.no_grad(), _Recorder(state):
            output = forward(model, inputs) if forward else model(**inputs)
    except CaptureError:
        raise
    except Exception as exc:
        where = state.stack[-1] if state.stack else "<top>"
        label = name or type(model).__name__
        msg = " ".join(str(exc).split())
        raise CaptureError(f"{label}: forward failed in module '{where}': {type(exc).__name__}: {msg}") from exc
    finally:
        for h in handles:
            h.remove()
    out_nodes = [state.by_id[id(t)] for t in tree_flatten(output)[0] if _is_tensor(t) and id(t) in state.by_id]
    state.graph.output(tuple(out_nodes))
    return Capture(state.graph, state.calls, tensor_inputs, output, model)
