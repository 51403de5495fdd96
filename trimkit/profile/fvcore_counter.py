"""fvcore as a second FLOP counter, with handles for what it misses.

fvcore's ``FlopCountAnalysis`` traces the model with ``torch.jit`` and counts
multiply-adds (MACs) per traced op. It keeps its own handles for ``linear``,
``addmm``, ``bmm``, ``mm`` and ``_convolution``; trimkit adds handles for the ops
it has none for or miscounts: ``scaled_dot_product_attention``,
``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``, ``matmul``
(broadcast and 1-D operands), ``einsum`` (general equations), ``baddbmm``,
``mv``/``addmv``/``dot``, and every elementwise op (pointwise, reductions,
softmax, norms) under keys ending in ``.elementwise``. Reported FLOPs are
2 x MACs; elementwise counts are taken as they are.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from trimkit.attention import kind_of_op_name
from trimkit.errors import TrimkitError
from trimkit.profile.counter import OTHER, BlockCost, FlopReport
from trimkit.profile.formulas import (
    DATA_MOVEMENT,
    ELEMENTWISE_NAMED,
    FORMULAS,
    QUALIFIED_FORMULAS,
    Spec,
    elementwise_cost,
)
from trimkit.profile.inputs import Inputs, batch_size_of

__all__ = ["FvcoreUnavailable", "fvcore_count", "family_of"]

_EW = ".elementwise"
_KEPT_FVCORE = {"linear", "addmm", "bmm", "mm", "_convolution"}  # fvcore's own, counted right
_FLOAT_TYPES = {"Float", "Double", "Half", "BFloat16"}


class FvcoreUnavailable(TrimkitError, RuntimeError):
    """fvcore could not trace the model (data-dependent forward, unsupported outputs...)."""


def family_of(op: str) -> str:
    """Group op names of both counters (dispatch and jit level) so they can be compared."""
    name = op.split(".")[1] if op.startswith("aten.") else op.removeprefix("aten::")
    name = name.removesuffix(_EW)
    kind = kind_of_op_name(name)
    if kind is not None and kind.family:  # attention kernels, by their attention kind
        return kind.family
    if "conv" in name:
        return "conv"
    if name in {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "mv",
                "addmv", "dot", "_addmm_activation"}:
        return "matmul"
    return name


# --------------------------------------------------------------------------- jit values


def _jit_arg(value: Any) -> Any:
    typ = value.type()
    kind = typ.kind()
    if kind == "TensorType":
        sizes = typ.sizes() if value.isCompleteTensor() else None
        if sizes is None:
            raise ValueError("tensor shape unknown in the trace")
        return Spec(tuple(int(s) for s in sizes), typ.scalarType() in _FLOAT_TYPES)
    if kind == "NoneType":
        return None
    if kind == "ListType" and value.node().kind() == "prim::ListConstruct":
        return [_jit_arg(v) for v in value.node().inputs()]
    try:
        return value.toIValue()
    except RuntimeError:
        return None


def _jit_bind(inputs: list, node: Any) -> dict[str, Any]:
    try:
        schema = torch._C.parse_schema(node.schema())
        names = [a.name for a in schema.arguments]
    except RuntimeError:
        names = [f"arg{i}" for i in range(len(inputs))]
    return {n: _jit_arg(v) for n, v in zip(names, inputs)}


def _out_specs(outputs: list) -> list[Any]:
    specs = []
    for v in outputs:
        try:
            specs.append(_jit_arg(v))
        except ValueError:
            specs.append(None)
    return specs


def _make_handle(name: str, problems: Counter, formula=None):
    formula = formula or FORMULAS.get(name)

    def handle(inputs: list, outputs: list) -> Counter:
        try:
            args = _jit_bind(inputs, outputs[0].node())
            outs = _out_specs(outputs)
            if formula is not None:
                cost = formula(args, outs)
                counts = Counter({name: cost.flops / 2.0, name + _EW: cost.elementwise})
            else:
                ew = elementwise_cost(name, args, outs)
                counts = Counter({name + _EW: ew or 0.0})
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            problems[f"aten::{name}: {exc}"] += 1
            return Counter()
        return Counter({k: v for k, v in counts.items() if v})

    return handle


def _with_bias(fv_handle, name: str, bias_index: int, problems: Counter):
    """fvcore's own MAC handle, plus the bias add as elementwise work."""

    def handle(inputs: list, outputs: list) -> Counter:
        counts = fv_handle(inputs, outputs)
        counts = Counter(counts) if isinstance(counts, Mapping) else Counter({name: counts})
        try:
            if inputs[bias_index].type().kind() != "NoneType":
                counts[name + _EW] += _jit_arg(outputs[0]).numel
        except (ValueError, IndexError) as exc:
            problems[f"aten::{name} bias: {exc}"] += 1
        return counts

    return handle


def _elementwise_names() -> set[str]:
    names = set(ELEMENTWISE_NAMED)
    names |= set(DATA_MOVEMENT)
    for attr in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, attr, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            try:
                tags = getattr(packet, overload).tags
            except (AttributeError, RuntimeError):
                continue
            if torch.Tag.pointwise in tags or torch.Tag.reduction in tags:
                names.add(attr)
                break
    return names


_HANDLED: set[str] | None = None


def _handled_names() -> set[str]:
    global _HANDLED
    if _HANDLED is None:
        _HANDLED = (set(FORMULAS) | _elementwise_names()) - _KEPT_FVCORE
    return _HANDLED


def _handles(problems: Counter) -> dict[str, Any]:
    from fvcore.nn.jit_handles import addmm_flop_jit, conv_flop_jit, linear_flop_jit

    handles = {
        "aten::linear": _with_bias(linear_flop_jit, "linear", 2, problems),
        "aten::addmm": _with_bias(addmm_flop_jit, "addmm", 0, problems),
        "aten::_convolution": _with_bias(conv_flop_jit, "conv", 2, problems),
    }
    for qualified, formula in QUALIFIED_FORMULAS.items():
        handles[qualified] = _make_handle(qualified.split("::")[1], problems, formula)
    for name in _handled_names():
        handles[f"aten::{name}"] = _make_handle(name, problems)
        if not name.endswith("_"):
            handles[f"aten::{name}_"] = _make_handle(name, problems)
    return handles


# --------------------------------------------------------------------------- tracing


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


class _Positional(nn.Module):
    """Calls the model from positional tensors and returns a flat tuple of tensors.

    The trace keeps only ops that reach an output, so every submodule's output is
    returned too: a module that runs but whose result the model drops (BLIP's VQA
    decoder without labels) still counts, as it does at dispatch level.
    """

    def __init__(self, model: nn.Module, keys: list[str] | None, fixed: dict[str, Any]):
        super().__init__()
        self.model = model
        self.keys = keys
        self.fixed = fixed

    def forward(self, *tensors):
        kept: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            kept.extend(_tensors(output))

        handle = register_module_forward_hook(keep)
        try:
            if self.keys is None:
                out = self.model(*tensors)
            else:
                out = self.model(**dict(zip(self.keys, tensors)), **self.fixed)
        finally:
            handle.remove()
        return tuple(_tensors(out)) + tuple(kept)


def _wrap(model: nn.Module, inputs: Inputs) -> tuple[nn.Module, tuple]:
    if isinstance(inputs, Mapping):
        keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
        fixed = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        return _Positional(model, keys, fixed), tuple(inputs[k] for k in keys)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return _Positional(model, None, {}), args


def _analysis(model: nn.Module, inputs: Inputs, problems: Counter, name: str):
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as exc:
        raise FvcoreUnavailable(f"fvcore cannot count {name}: fvcore is not importable ({exc})") \
            from exc
    wrapper, args = _wrap(model, inputs)
    analysis = FlopCountAnalysis(wrapper, args)
    analysis.set_op_handle(**_handles(problems))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _scope(path: str) -> str:
    return "model" if path == "" else f"model.{path}"


def _split(counts: Mapping[str, float]) -> tuple[float, float]:
    flops = sum(2.0 * v for k, v in counts.items() if not k.endswith(_EW))
    ew = sum(v for k, v in counts.items() if k.endswith(_EW))
    return flops, ew


def _exclusive_blocks(per_module: Mapping[str, Counter], blocks: Mapping[str, str],
                      total: Counter, batch: int) -> tuple[BlockCost, ...]:
    def inclusive(path: str) -> Counter:
        return per_module.get(_scope(path), Counter())

    def nearest_children(path: str) -> list[str]:
        inner = [b for b in blocks if b != path and (path == "" or b.startswith(path + "."))]
        return [b for b in inner if not any(
            o != b and b.startswith(o + ".") and o in inner for o in inner)]

    out = []
    top = nearest_children("") if "" not in blocks else [""]
    for path, kind in blocks.items():
        own = Counter(inclusive(path))
        for child in nearest_children(path):
            own.subtract(inclusive(child))
        flops, ew = _split(own)
        out.append(BlockCost(path, kind, flops / batch, ew / batch))
    rest = Counter(total)
    for path in top:
        rest.subtract(inclusive(path))
    flops, ew = _split(rest)
    out.append(BlockCost(OTHER, OTHER, flops / batch, ew / batch))
    return tuple(out)


def fvcore_count(model: nn.Module, inputs: Inputs, blocks: Mapping[str, str],
                 name: str) -> FlopReport:
    """FLOPs per sample from fvcore; raises FvcoreUnavailable when the trace fails."""
    problems: Counter = Counter()
    analysis = _analysis(model, inputs, problems, name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_module = analysis.by_module_and_operator()
    except Exception as exc:  # any trace failure means: this counter cannot run this model
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise FvcoreUnavailable(f"fvcore cannot trace {name}: {type(exc).__name__}: {message}") \
            from exc
    batch = batch_size_of(inputs)
    total = per_module.get("", Counter())
    flops, ew = _split(total)
    by_op = {f"aten::{k}": 2.0 * v / batch for k, v in total.items() if not k.endswith(_EW) and v}
    ew_by_op = {f"aten::{k.removesuffix(_EW)}": v / batch for k, v in total.items()
                if k.endswith(_EW) and v}
    unsupported = dict(analysis.unsupported_ops())
    notes = tuple(f"fvcore handle failed: {p} (x{n})" for p, n in problems.items())
    return FlopReport(
        flops=flops / batch,
        elementwise_flops=ew / batch,
        blocks=_exclusive_blocks(per_module, blocks, total, batch),
        by_op=by_op,
        elementwise_by_op=ew_by_op,
        batch_size=batch,
        counter="fvcore",
        uncounted_ops=unsupported,
        notes=notes,
    )
