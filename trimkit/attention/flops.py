"""FLOP formulas of the fused attention kinds, and the two types every formula uses.

Conventions are those of :mod:`trimkit.profile.formulas` (2 FLOPs per multiply-add; attention counts
the full Lq x Lk score matrix whatever the mask says; elementwise work kept apart). Each formula takes
``args``: the op's arguments bound by schema name, tensors replaced by :class:`Spec`, and returns a
:class:`Cost`. The kinds in :mod:`trimkit.attention.standard` register them per aten op name.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

__all__ = ["Spec", "Cost", "SOFTMAX_FLOPS", "NORM_FLOPS", "attention_cost", "mha_cost", "encoder_layer_cost",
           "sdpa_formula", "native_mha_formula", "encoder_layer_formula"]

SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide
NORM_FLOPS = 5  # mean, subtract, variance, normalise, affine (4 without affine)


class Spec(NamedTuple):
    """What a formula needs to know about a tensor."""

    shape: tuple[int, ...]
    floating: bool = True
    rows: tuple[tuple[int, ...], ...] | None = None  # component shapes of a nested tensor

    @property
    def numel(self) -> int:
        if self.rows is not None:
            return sum(math.prod(r) for r in self.rows)
        return math.prod(self.shape)


class Cost(NamedTuple):
    flops: float = 0.0
    elementwise: float = 0.0

    def __add__(self, other):  # type: ignore[override]
        return Cost(self.flops + other.flops, self.elementwise + other.elementwise)


def sum_costs(costs: Iterable[Cost]) -> Cost:
    total = Cost()
    for c in costs:
        total = total + c
    return total


def attention_cost(q: Sequence[int], k: Sequence[int], v: Sequence[int], masked: bool) -> Cost:
    """Scaled dot-product attention on [..., Lq, E] x [..., Lk, E] x [..., Lk, Ev].

    N = prod(q[:-2]) (batch x query heads; grouped key/value heads do not reduce it).
    FLOPs = 2*N*Lq*Lk*E (scores) + 2*N*Lq*Lk*Ev (weighted values), whatever the mask.
    Elementwise = N*Lq*Lk*(1 scale + SOFTMAX_FLOPS + 1 if a mask is added).
    """
    n = math.prod(q[:-2])
    lq, e = q[-2], q[-1]
    lk, ev = k[-2], v[-1]
    scores = n * lq * lk
    flops = 2.0 * scores * e + 2.0 * scores * ev
    return Cost(flops, float(scores * (1 + SOFTMAX_FLOPS + (1 if masked else 0))))


def sdpa_formula(mask_key: str) -> Callable[..., Cost]:
    """The formula of an SDPA op whose additive mask argument is named ``mask_key``."""
    def formula(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
        q, k, v = a["query"], a["key"], a["value"]
        masked = a.get(mask_key) is not None or bool(a.get("is_causal", False))
        if q.rows is not None:  # nested (variable-length) inputs: sum over components
            return sum_costs(
                attention_cost(qr, kr, vr, masked) for qr, kr, vr in zip(q.rows, k.rows, v.rows)
            )
        return attention_cost(q.shape, k.shape, v.shape, masked)

    return formula


def mha_cost(batch: int, lq: int, lk: int, embed: int, heads: int, masked: bool,
             bias: bool = True) -> Cost:
    """nn.MultiheadAttention (fast path): in-projection, Q.K^T, A.V, out-projection.

    FLOPs = 2*B*E*E*(Lq + 2*Lk)   (q, k, v projections)
          + 2*B*Lq*Lk*E * 2        (scores and weighted values over all heads)
          + 2*B*Lq*E*E             (output projection)
    """
    proj = 2.0 * batch * embed * embed * (lq + 2 * lk) + 2.0 * batch * lq * embed * embed
    head_dim = embed // heads
    att = attention_cost((batch, heads, lq, head_dim), (batch, heads, lk, head_dim),
                         (batch, heads, lk, head_dim), masked)
    bias_ew = float(batch * embed * (lq + 2 * lk) + batch * lq * embed) if bias else 0.0
    return Cost(proj + att.flops, att.elementwise + bias_ew)


def _rows_of(t: Spec) -> list[tuple[int, int]]:
    """(batch, length) pairs: one per component of a nested tensor, else one for the whole."""
    if t.rows is not None:
        return [(1, r[-2] if len(r) >= 2 else 1) for r in t.rows]
    if len(t.shape) == 2:
        return [(1, t.shape[0])]
    return [(math.prod(t.shape[:-2]), t.shape[-2])]


def native_mha_formula(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    """``aten._native_multi_head_attention`` (see :func:`mha_cost`)."""
    q, k = a["query"], a["key"]
    embed, heads = int(a["embed_dim"]), int(a["num_head"])
    masked = a.get("mask") is not None
    bias = a.get("qkv_bias") is not None
    return sum_costs(
        mha_cost(bq, lq, lk, embed, heads, masked, bias)
        for (bq, lq), (_, lk) in zip(_rows_of(q), _rows_of(k))
    )


def encoder_layer_cost(batch: int, length: int, embed: int, heads: int, ffn: int,
                       masked: bool) -> Cost:
    """nn.TransformerEncoderLayer fast path: self-attention (see mha_cost) + 2 FFN linears.

    FFN FLOPs = 2*B*L*E*F * 2; elementwise adds 2 layer norms, the activation,
    two residual adds and the FFN biases.
    """
    att = mha_cost(batch, length, length, embed, heads, masked)
    tokens = batch * length
    ffn_flops = 2.0 * tokens * embed * ffn * 2
    ew = tokens * (2 * NORM_FLOPS * embed + ffn + 2 * embed + ffn + embed)
    return att + Cost(ffn_flops, float(ew))


def encoder_layer_formula(a: Mapping[str, Any], out: Sequence[Any] = ()) -> Cost:
    """``aten._transformer_encoder_layer_fwd`` (see :func:`encoder_layer_cost`)."""
    src = a["src"]
    embed, heads = int(a["embed_dim"]), int(a["num_heads"])
    ffn = a["ffn_weight_1"].shape[0]
    masked = a.get("mask") is not None
    return sum_costs(
        encoder_layer_cost(b, n, embed, heads, ffn, masked) for b, n in _rows_of(src)
    )
