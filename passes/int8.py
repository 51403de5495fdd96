"""``int8.dynamic``: int8 dynamic quantization of ``nn.Linear`` layers.

Weights are quantized once, symmetric per output channel (int8 in [-127, 127], one float scale per
row); activations are quantized per call (dynamic). `Int8DynamicLinear` keeps only plain tensors
(``weight_int8``, ``weight_scale``, ``bias``), so its state dict saves to safetensors; the packed
fbgemm/x86 weight is built lazily on the first CPU forward and rebuilt after loading or moving.
Where packing is unavailable (other devices, a torch without quantized CPU kernels) the layer
multiplies by the dequantized weight instead.

Linears are left alone when the module (or an ancestor) has ``trimkit_no_quant = True`` or
``trimkit_role == "trimmer"``, when they are a subclass of ``nn.Linear`` (``nn.MultiheadAttention``
reads its ``out_proj.weight`` directly), or when their path matches `skip`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes.base import TRIMMER_ROLE, PassConfig, PassResult
from trimkit.passes.registry import register_pass
from trimkit.runtime import state

__all__ = ["Int8DynamicConfig", "Int8DynamicLinear", "quantizable_linears", "DEFAULT_SKIP"]

DEFAULT_SKIP = r"(^|\.)(head|heads|classifier|lm_head|cls|itm_head|itm_score|score|qa_outputs)(\.|$)"
_QMAX = 127


@dataclass(frozen=True)
class Int8DynamicConfig(PassConfig):
    """filter: regex searched in each Linear's module path; only matches are quantized ("" = all).
    skip: regex of module paths left in float ("" = none); the default matches common task heads.
    keep_float: keep the float layers so the pass can be undone (False frees their memory).
    """

    name: ClassVar[str] = "int8.dynamic"
    forbids_after: ClassVar[tuple[str, ...]] = ("@trim",)
    tags: ClassVar[tuple[str, ...]] = ("quant",)

    filter: str = ""
    skip: str = DEFAULT_SKIP
    keep_float: bool = True

    def validate(self) -> None:
        for key in ("filter", "skip"):
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ConfigError(f"field {key!r}: invalid regex {getattr(self, key)!r} ({err})") from None


def _weight_packing_available() -> bool:
    return hasattr(torch.ops, "quantized") and hasattr(torch.ops.quantized, "linear_prepack")


class Int8DynamicLinear(nn.Module):
    """A Linear with an int8 weight (per-row scales) and dynamically quantized activations."""

    trimkit_quantized = True
    _packing_ok: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._packed = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        weight = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device,
                dtype=linear.weight.dtype)
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / _QMAX
        q.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8))
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), for code that reads ``.weight``."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _reset_packed(self) -> None:
        self._packed = None

    def _apply(self, fn, recurse=True):
        self._reset_packed()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._reset_packed()
        super()._load_from_state_dict(*args, **kwargs)

    def _packed_weight(self):
        if self._packed is None:
            bias = None if self.bias is None else self.bias.float()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                zeros = torch.zeros(self.out_features, dtype=torch.long)
                make = getattr(torch, "_make_per_channel_quantized_tensor", None)
                if make is not None:
                    qweight = make(self.weight_int8, self.weight_scale.double(), zeros, 0)
                else:
                    qweight = torch.quantize_per_channel(self.weight, self.weight_scale.double(), zeros, 0,
                                                         torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._packed

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (type(self)._packing_ok and x.device.type == "cpu" and self.weight_int8.device.type == "cpu"
                and _weight_packing_available())

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")
        out = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed_weight(), reduce_range)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The packed int8 kernel on CPU (gradients w.r.t. `x` through the dequantized weight)."""
        if self._fast_path(x):
            try:
                return _PackedLinear.apply(x, self)
            except (RuntimeError, NotImplementedError):
                type(self)._packing_ok = False
                self._reset_packed()
        return self._dequantized(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _PackedLinear(torch.autograd.Function):
    """Values of the packed kernel; gradient of the dequantized layer (the weights get none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Int8DynamicLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._kernel(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.weight.to(grad.dtype), None


def _excluded(module: nn.Module) -> bool:
    return state.no_quant(module) or state.role(module) == TRIMMER_ROLE


def quantizable_linears(model: nn.Module, config: Int8DynamicConfig) -> tuple[list[str], list[str]]:
    """(paths to quantize, Linear paths skipped) under `config`'s filter, skip and the no-quant marks."""
    keep = re.compile(config.filter)
    skip = re.compile(config.skip) if config.skip else None
    chosen, skipped = [], []

    def visit(module: nn.Module, path: str) -> None:
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if _excluded(child):
                skipped.extend(p for p, m in _named_linears(child, child_path))
                continue
            if isinstance(child, nn.Linear):
                ok = type(child) is nn.Linear and keep.search(child_path) and not (skip and skip.search(child_path))
                (chosen if ok else skipped).append(child_path)
                continue
            visit(child, child_path)

    visit(model, "")
    return chosen, skipped


def _named_linears(module: nn.Module, prefix: str):
    for name, m in module.named_modules(prefix=prefix, remove_duplicate=False):
        if isinstance(m, nn.Linear):
            yield name, m


def _linear_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@register_pass(Int8DynamicConfig)
def int8_dynamic(model: nn.Module, model_map, config: Int8DynamicConfig) -> PassResult:
    chosen, skipped = quantizable_linears(model, config)
    swaps: list[tuple[nn.Module, str, nn.Module, Int8DynamicLinear]] = []
    made: dict[int, Int8DynamicLinear] = {}
    before = after = 0
    for path in chosen:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, attr)
        if id(linear) not in made:
            made[id(linear)] = Int8DynamicLinear.from_float(linear)
            before += _linear_bytes(linear)
            after += _linear_bytes(made[id(linear)])
        setattr(parent, attr, made[id(linear)])
        swaps.append((parent, attr, linear if config.keep_float else None, made[id(linear)]))

    def undo() -> None:
        for parent, attr, linear, quantized in reversed(swaps):
            if getattr(parent, attr) is not quantized:
                raise TrimkitError(f"cannot undo int8.dynamic: {attr!r} of {type(parent).__name__} was replaced")
            setattr(parent, attr, linear)

    report = {"quantized": len(chosen), "skipped": skipped, "weight_bytes_before": before,
              "weight_bytes_after": after}
    return PassResult(model, report, undo if config.keep_float else None)
