"""Executed-FLOPs counter at dispatch level, attributed to module blocks.

A ``TorchDispatchMode`` sees every aten op that runs, after composite ops are
decomposed (so ``einsum`` shows as ``bmm`` and ``linear`` as ``addmm``) but
before fused kernels such as the CPU flash-attention or the
``nn.MultiheadAttention`` fast path hide their inner products; those fused ops
get formulas of their own in :mod:`trimkit.profile.formulas`.

Global module forward pre/post hooks keep a stack of the module paths being run;
each op's cost goes to the deepest enclosing *block* (a path named in ``blocks``),
or to ``"other"``. The same pass tracks the bytes of live tensors the forward
allocates, for the peak-memory figure.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry as _torch_registry

from trimkit.profile.formulas import FORMULAS, QUALIFIED_FORMULAS, Cost, Spec, elementwise_cost

__all__ = ["OTHER", "BlockCost", "FlopReport", "FlopRecorder", "spec_of"]

OTHER = "other"
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class BlockCost:
    path: str
    kind: str
    flops: float
    elementwise_flops: float

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "flops": self.flops,
                "elementwise_flops": self.elementwise_flops}


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one counted forward, per input sample (batch totals divided by ``batch_size``)."""

    flops: float
    elementwise_flops: float
    blocks: tuple[BlockCost, ...]
    by_op: Mapping[str, float]
    elementwise_by_op: Mapping[str, float]
    batch_size: int = 1
    counter: str = "torch"
    uncounted_ops: Mapping[str, int] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    notes: tuple[str, ...] = ()

    def block(self, path: str) -> BlockCost:
        for b in self.blocks:
            if b.path == path:
                return b
        known = ", ".join(b.path for b in self.blocks)
        raise KeyError(f"no block {path!r}; blocks: {known}")

    def to_dict(self) -> dict:
        return {
            "unit": "FLOPs",
            "counter": self.counter,
            "flops": self.flops,
            "elementwise_flops": self.elementwise_flops,
            "batch_size": self.batch_size,
            "blocks": [b.to_dict() for b in self.blocks],
            "by_op": dict(self.by_op),
            "elementwise_by_op": dict(self.elementwise_by_op),
            "uncounted_ops": dict(self.uncounted_ops),
            "peak_memory_bytes": self.peak_memory_bytes,
            "notes": list(self.notes),
        }


def spec_of(t: torch.Tensor) -> Spec:
    floating = t.dtype in _FLOATING
    if getattr(t, "is_nested", False):
        sizes = t._nested_tensor_size().tolist()
        rows = tuple(tuple(int(d) for d in r) for r in sizes)
        return Spec(shape=(len(rows),), floating=floating, rows=rows)
    return Spec(shape=tuple(int(d) for d in t.shape), floating=floating)


def _to_spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return spec_of(x)
    if isinstance(x, (list, tuple)):
        return [_to_spec(v) for v in x]
    return x


def bind(schema: torch.FunctionSchema, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Name the arguments of an op call after its schema (tensors become Specs)."""
    named: dict[str, Any] = {}
    for argument, value in zip(schema.arguments, args):
        named[argument.name] = _to_spec(value)
    for key, value in kwargs.items():
        named[key] = _to_spec(value)
    return named


def _owning_block(path: str, blocks: Mapping[str, str]) -> str | None:
    """The longest block path that is ``path`` or one of its ancestors."""
    while True:
        if path in blocks:
            return path
        if not path:
            return None
        path = path.rpartition(".")[0]


class _ModuleStack:
    """Paths of the modules running now, and the block each op is charged to.

    A module inside a block (by path) charges that block, wherever it is called from;
    a module outside every block charges the block of its caller (a shared helper
    called by a layer belongs to that layer), or "other".
    """

    def __init__(self, model: torch.nn.Module, blocks: Mapping[str, str]):
        self.paths: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(module), name)  # a shared module keeps its first name
        self.owner = {key: _owning_block(path, blocks) for key, path in self.paths.items()}
        self.frames: list[tuple[int, str, str]] = []  # (module id, path, block)

    @property
    def block(self) -> str:
        return self.frames[-1][2] if self.frames else OTHER

    @property
    def path(self) -> str:
        return self.frames[-1][1] if self.frames else ""

    def push(self, module: torch.nn.Module, _inputs: Any) -> None:
        path = self.paths.get(id(module))
        if path is None:
            return
        block = self.owner[id(module)] or self.block
        self.frames.append((id(module), path, block))

    def pop(self, module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        key = id(module)
        if key not in self.paths:
            return
        for i in range(len(self.frames) - 1, -1, -1):
            if self.frames[i][0] == key:
                del self.frames[i:]
                return

    def attach(self) -> "_Hooks":
        return _Hooks(register_module_forward_pre_hook(self.push),
                      register_module_forward_hook(self.pop))


class _Hooks:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _LiveBytes:
    """Bytes of tensor storage the forward allocated and still holds, and the peak."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.live[key]

    def track(self, func, out: Any) -> None:
        aliasing = any(r.alias_info is not None for r in func._schema.returns)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_nested or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                if aliasing:
                    continue  # a view of an input or parameter: not a new allocation
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)


class FlopRecorder(TorchDispatchMode):
    """Counts FLOPs of every op run inside it; attribute with ``attach(model, blocks)``."""

    def __init__(self, model: torch.nn.Module, blocks: Mapping[str, str]):
        super().__init__()
        self.stack = _ModuleStack(model, blocks)
        self.flops: Counter = Counter()  # block -> FLOPs
        self.elementwise: Counter = Counter()
        self.by_op: Counter = Counter()
        self.elementwise_by_op: Counter = Counter()
        self.uncounted: Counter = Counter()
        self.memory = _LiveBytes()
        self.failure: tuple[str, str] | None = None  # (module path, op) of the first failing op
        self.formula_error: Exception | None = None
        self._hooks: _Hooks | None = None

    def __enter__(self):
        self._hooks = self.stack.attach()
        try:
            return super().__enter__()
        except BaseException:
            self._hooks.remove()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.failure is None:
                self.failure = (self.stack.path, str(func.overloadpacket))
            raise
        try:
            self._count(func, args, kwargs, out)
        except Exception as exc:  # a formula that cannot read these shapes
            if self.formula_error is None:
                self.formula_error = RuntimeError(
                    f"FLOP formula for {func} failed at {self.stack.path or '<root>'}: {exc}"
                )
        self.memory.track(func, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        block = self.stack.block
        outs = [_to_spec(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        qualified = f"{func.namespace}::{name}"
        if func.namespace == "aten" and name in FORMULAS:
            cost = FORMULAS[name](bind(func._schema, args, kwargs), outs)
        elif qualified in QUALIFIED_FORMULAS:
            cost = QUALIFIED_FORMULAS[qualified](bind(func._schema, args, kwargs), outs)
        elif func.overloadpacket in _torch_registry:
            cost = Cost(float(_torch_registry[func.overloadpacket](*args, **kwargs, out_val=out)))
        else:
            ew = elementwise_cost(name, bind(func._schema, args, kwargs), outs) \
                if func.namespace == "aten" else None
            if ew is None:
                if outs and outs[0].floating and not _is_view(func):
                    self.uncounted[str(func.overloadpacket)] += 1
                return
            cost = Cost(0.0, ew)
        key = str(func.overloadpacket)
        if cost.flops:
            self.flops[block] += cost.flops
            self.by_op[key] += cost.flops
        if cost.elementwise:
            self.elementwise[block] += cost.elementwise
            self.elementwise_by_op[key] += cost.elementwise


def _is_view(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)

