"""FLOP formulas on shapes, shared by the dispatch counter and the fvcore handles.

Conventions (also written in the profile README section of the package docstring):

* 2 FLOPs per multiply-add; a matrix product [m, k] x [k, n] costs 2*m*k*n.
* Attention counts the full Lq x Lk score matrix whatever the mask says (that is
  what the kernels execute): 2*N*Lq*Lk*E for Q.K^T plus 2*N*Lq*Lk*Ev for A.V,
  where N is every leading dimension of the query (batch x heads).
* Elementwise work is kept apart (``Cost.elementwise``): 1 per output element of
  a pointwise op, 1 per input element of a reduction, 5 per element of a
  softmax, 5 (4 without affine) per element of a layer/group/rms norm, 2 per
  element of an inference batch norm, 1 per output element for a bias add.
  Only floating-point results count.

Every formula takes ``args``: the op's arguments bound by schema name, tensors
replaced by :class:`Spec`, and returns a :class:`Cost`. The formulas of the fused
attention ops belong to their attention kinds (:mod:`trimkit.attention.flops`);
eager attention is counted by its matrix products and its softmax.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch

from trimkit.attention import attention_formulas
from trimkit.attention.flops import (
    NORM_FLOPS, SOFTMAX_FLOPS, Cost, Spec, attention_cost, encoder_layer_cost, mha_cost,
)

__all__ = [
    "Spec",
    "Cost",
    "FORMULAS",
    "QUALIFIED_FORMULAS",
    "SOFTMAX_FLOPS",
    "matmul_flops",
    "einsum_cost",
    "attention_cost",
    "mha_cost",
    "encoder_layer_cost",
    "conv_cost",
    "elementwise_cost",
    "ELEMENTWISE_NAMED",
    "DATA_MOVEMENT",
]

ZERO = Cost()


def _is_spec(x: Any) -> bool:
    return isinstance(x, Spec)


# --------------------------------------------------------------------------- matmul family


def matmul_flops(a: Sequence[int], b: Sequence[int]) -> float:
    """FLOPs of ``torch.matmul`` on shapes ``a`` and ``b`` (1-D and broadcasting included)."""
    a, b = tuple(a), tuple(b)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"matmul needs at least 1-D operands, got {a} and {b}")
    if len(a) == 1:
        a = (1,) + a
    if len(b) == 1:
        b = b + (1,)
    m, k = a[-2], a[-1]
    k2, n = b[-2], b[-1]
    if k != k2:
        raise ValueError(f"matmul inner dimensions differ: {a} x {b}")
    batch = torch.broadcast_shapes(a[:-2], b[:-2])
    return 2.0 * math.prod(batch) * m * k * n


def _linear_like(x: Spec, w: Spec, bias: Spec | None, weight_is_out_in: bool) -> Cost:
    out_features = w.shape[0] if weight_is_out_in else w.shape[-1]
    rows = x.numel // x.shape[-1] if x.shape else 1
    flops = 2.0 * rows * x.shape[-1] * out_features
    ew = float(rows * out_features) if bias is not None else 0.0
    return Cost(flops, ew)


def _mm(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(matmul_flops(a["self"].shape, a["mat2"].shape))


def _addmm(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, y = a["mat1"].shape, a["mat2"].shape
    return Cost(matmul_flops(x, y), float(x[0] * y[1]))


def _addmm_activation(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, y = a["mat1"].shape, a["mat2"].shape
    return Cost(matmul_flops(x, y), 2.0 * x[0] * y[1])


def _bmm(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(matmul_flops(a["self"].shape, a["mat2"].shape))


def _baddbmm(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, y = a["batch1"].shape, a["batch2"].shape
    return Cost(matmul_flops(x, y), float(x[0] * x[1] * y[2]))


def _addbmm(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, y = a["batch1"].shape, a["batch2"].shape
    return Cost(matmul_flops(x, y), float(x[0] * x[1] * y[2] + x[1] * y[2]))


def _matmul(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(matmul_flops(a["self"].shape, a["other"].shape))


def _mv(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(matmul_flops(a["self"].shape, a["vec"].shape))


def _addmv(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(matmul_flops(a["mat"].shape, a["vec"].shape), float(a["mat"].shape[0]))


def _dot(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return Cost(2.0 * a["self"].shape[0])


def _linear(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    return _linear_like(a["input"], a["weight"], a.get("bias"), weight_is_out_in=True)


def _packed_linear(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    """Quantized linear with packed weights: in/out features from the input and output shapes."""
    x = a.get("X", a.get("input"))
    y = out[0]
    return Cost(2.0 * x.numel * y.shape[-1])


# --------------------------------------------------------------------------- einsum


def _split_equation(equation: str, n_operands: int) -> tuple[list[str], str]:
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != n_operands:
        raise ValueError(f"einsum {equation!r} names {len(terms)} operands, got {n_operands}")
    if not arrow:  # implicit output: labels seen once, sorted
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1)
        )
    return terms, rhs


def _expand_ellipsis(term: str, ndim: int, ell: str) -> str:
    if "..." not in term:
        return term
    n_ell = ndim - (len(term) - 3)
    return term.replace("...", ell[len(ell) - n_ell:] if n_ell > 0 else "")


def einsum_cost(equation: str, shapes: Sequence[Sequence[int]]) -> Cost:
    """Cost of ``torch.einsum`` contracted left to right, as torch executes it without opt_einsum.

    Per pairwise contraction: labels found in only one operand and not needed later are
    summed first (elementwise), then the product costs 2 * prod(sizes of remaining labels).
    """
    terms, out = _split_equation(equation, len(shapes))
    max_ell = max([len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if "..." in t] + [0])
    ell = "".join(chr(0x100 + i) for i in range(max_ell))  # labels no equation uses
    terms = [_expand_ellipsis(t, len(s), ell) for t, s in zip(terms, shapes)]
    out = _expand_ellipsis(out, max_ell + len(out) - 3, ell) if "..." in out else out
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape):
            raise ValueError(f"einsum term {term!r} does not match shape {tuple(shape)}")
        for label, size in zip(term, shape):
            sizes[label] = max(sizes.get(label, 1), size)

    total = ZERO
    ops = [list(dict.fromkeys(t)) for t in terms]
    numels = [math.prod(s) for s in shapes]
    if len(ops) == 1:
        keep = set(out)
        return Cost(0.0, float(numels[0]) if set(ops[0]) - keep else 0.0)
    left, left_numel = ops[0], numels[0]
    for idx in range(1, len(ops)):
        right, right_numel = ops[idx], numels[idx]
        later = set(out).union(*[set(o) for o in ops[idx + 1:]])
        left, total = _presum(left, left_numel, set(right) | later, sizes, total)
        right, total = _presum(right, right_numel, set(left) | later, sizes, total)
        labels = list(dict.fromkeys(left + right))
        total = total + Cost(2.0 * math.prod(sizes[c] for c in labels), 0.0)
        left = [c for c in labels if c in later]
        left_numel = math.prod(sizes[c] for c in left)
    return total


def _presum(labels, numel, needed, sizes, total):
    alone = [c for c in labels if c not in needed]
    if not alone:
        return labels, total
    return [c for c in labels if c in needed], total + Cost(0.0, float(numel))


def _einsum(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    tensors = a["tensors"]
    return einsum_cost(a["equation"], [t.shape for t in tensors])


# --------------------------------------------------------------------------- convolution


def conv_cost(x: Sequence[int], w: Sequence[int], out: Sequence[int], transposed: bool,
              bias: bool) -> Cost:
    """2 * batch * prod(weight) * prod(spatial).

    Spatial sizes are the output's, or the input's for a transposed convolution.
    """
    spatial = x[2:] if transposed else out[2:]
    flops = 2.0 * x[0] * math.prod(w) * math.prod(spatial)
    return Cost(flops, float(math.prod(out)) if bias else 0.0)


def _conv_out_shape(a: Mapping[str, Any], out: Sequence[Spec]) -> tuple[int, ...]:
    if out and _is_spec(out[0]) and out[0].shape:
        return out[0].shape
    raise ValueError("convolution output shape unknown")


def _convolution(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, w = a["input"], a["weight"]
    transposed = bool(a.get("transposed", False))
    bias = a.get("bias") is not None
    return conv_cost(x.shape, w.shape, _conv_out_shape(a, out), transposed, bias)


def _conv_transpose(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, w = a["input"], a["weight"]
    return conv_cost(x.shape, w.shape, _conv_out_shape(a, out), True, a.get("bias") is not None)


def _slow_conv(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    x, w = a["self"], a["weight"]
    return conv_cost(x.shape, w.shape, _conv_out_shape(a, out), False, a.get("bias") is not None)


# --------------------------------------------------------------------------- elementwise

_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_NORMS = {  # name -> argument holding the affine weight
    "layer_norm": "weight", "native_layer_norm": "weight", "group_norm": "weight",
    "native_group_norm": "weight", "instance_norm": "weight", "rms_norm": "weight",
    "_fused_rms_norm": "weight",
}
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                "_native_batch_norm_legit", "_batch_norm_impl_index"}
_SCANS = {"cumsum", "cumprod", "logcumsumexp"}
_POOLS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
          "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "max_pool1d",
          "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
          "adaptive_max_pool2d", "mean"}
_INTERPOLATE = {"upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
                "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
                "grid_sampler", "grid_sampler_2d", "grid_sampler_3d"}
ELEMENTWISE_NAMED = frozenset(_SOFTMAX | set(_NORMS) | _BATCH_NORMS | _SCANS | _POOLS | _INTERPOLATE)
"""Ops whose elementwise cost has a rule of its own here (softmax, norms, scans, pools, resampling)."""
# Ops that move, select or create data without arithmetic: zero elementwise FLOPs.
DATA_MOVEMENT = frozenset({
    "where", "masked_fill", "clone", "copy", "_to_copy", "fill", "zero", "lift_fresh",
    "lift_fresh_copy", "detach", "alias", "full_like", "zeros_like", "ones_like", "empty_like",
    "cat", "stack", "index_select", "embedding", "_unsafe_view", "constant_pad_nd", "index",
    "_unsafe_index", "gather", "scatter", "index_put", "slice_scatter", "select_scatter", "repeat",
    "repeat_interleave", "flip", "roll", "zeros", "ones", "empty", "empty_strided", "full",
    "arange", "linspace", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided",
    "scalar_tensor", "tril", "triu", "split_with_sizes", "unbind", "split", "chunk",
    "native_dropout",
    "dropout", "bernoulli", "rand", "randn", "randint", "normal", "uniform", "contiguous",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact2d",
    "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im", "unfold", "sort", "topk", "argsort",
    "masked_scatter", "masked_select", "nonzero", "_reshape_alias", "reshape", "flatten", "t",
    "expand", "permute", "transpose", "view", "unsqueeze", "squeeze", "select", "slice",
    "narrow", "_nested_tensor_from_mask", "_nested_from_padded", "to_padded_tensor",
    "_local_scalar_dense", "item", "resize", "set", "as_strided", "diagonal", "movedim",
    "pad", "unflatten", "unique", "_unique", "_unique2", "unique_dim", "multinomial", "one_hot",
    "bucketize", "searchsorted", "expand_as", "view_as", "type_as",
})


@lru_cache(maxsize=None)
def _tags(name: str) -> frozenset:
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return frozenset()
    tags = set()
    for overload in packet.overloads():
        try:
            tags.update(getattr(packet, overload).tags)
        except (AttributeError, RuntimeError):
            continue
    return frozenset(tags)


def elementwise_cost(name: str, args: Mapping[str, Any], out: Sequence[Any]) -> float | None:
    """Elementwise FLOPs of aten op ``name``; None when the op is not elementwise work."""
    first = out[0] if out else None
    if not _is_spec(first) or not first.floating:
        return None
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if base in _SOFTMAX:
        return float(SOFTMAX_FLOPS * first.numel)
    if base in _NORMS:
        x = _first_tensor(args)
        affine = args.get(_NORMS[base]) is not None
        return float((NORM_FLOPS if affine else NORM_FLOPS - 1) * (x.numel if x else first.numel))
    if base in _BATCH_NORMS:
        x = _first_tensor(args)
        return float(2 * (x.numel if x else first.numel))
    if base in _SCANS:
        return float(first.numel)
    if base in _POOLS:
        x = _first_tensor(args)
        return float(x.numel if x else first.numel)
    if base in _INTERPOLATE:
        return float(4 * first.numel)
    if base in DATA_MOVEMENT:
        return 0.0
    tags = _tags(base)
    if torch.Tag.reduction in tags:
        x = _first_tensor(args)
        return float(x.numel if x else first.numel)
    if torch.Tag.pointwise in tags:
        return float(first.numel)
    return None


def _first_tensor(args: Mapping[str, Any]) -> Spec | None:
    for value in args.values():
        if _is_spec(value):
            return value
    return None


# --------------------------------------------------------------------------- the table

FORMULAS: dict[str, Callable[..., Cost]] = {
    "mm": _mm,
    "_int_mm": _mm,
    "addmm": _addmm,
    "_addmm_activation": _addmm_activation,
    "bmm": _bmm,
    "baddbmm": _baddbmm,
    "addbmm": _addbmm,
    "matmul": _matmul,
    "mv": _mv,
    "addmv": _addmv,
    "dot": _dot,
    "linear": _linear,
    "einsum": _einsum,
    "convolution": _convolution,
    "_convolution": _convolution,
    "conv1d": _convolution,
    "conv2d": _convolution,
    "conv3d": _convolution,
    "conv_transpose1d": _conv_transpose,
    "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose,
    "mkldnn_convolution": _convolution,
    "_convolution_mode": _convolution,
    "_slow_conv2d_forward": _slow_conv,
    "thnn_conv2d": _slow_conv,
    **attention_formulas(),
}
"""Op name (aten, no namespace) -> ``formula(args, out_specs) -> Cost``; the attention ops' formulas
come from the attention kinds (:func:`trimkit.attention.attention_formulas`)."""

QUALIFIED_FORMULAS: dict[str, Callable[..., Cost]] = {
    f"quantized::{name}": _packed_linear
    for name in ("linear_dynamic", "linear_dynamic_fp16", "linear_relu_dynamic",
                 "linear_relu_dynamic_fp16", "linear", "linear_relu")
}
"""Ops outside aten, by qualified name. Integer matmuls count 2 per multiply-add as well."""
