"""Shape formulas against brute-force definitions."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from trimkit.attention import kinds
from trimkit.profile.formulas import (
    FORMULAS,
    SOFTMAX_FLOPS,
    Spec,
    attention_cost,
    conv_cost,
    einsum_cost,
    elementwise_cost,
    matmul_flops,
)


@pytest.mark.parametrize("a, b, expected", [
    ((3, 4), (4, 5), 2 * 3 * 4 * 5),
    ((4,), (4,), 2 * 4),
    ((4,), (4, 5), 2 * 4 * 5),
    ((2, 3, 4), (4,), 2 * 2 * 3 * 4),
    ((7, 3, 4), (4, 5), 2 * 7 * 3 * 4 * 5),
    ((3, 4), (6, 4, 5), 2 * 6 * 3 * 4 * 5),  # broadcast of the left operand
    ((2, 1, 3, 4), (5, 4, 6), 2 * 2 * 5 * 3 * 4 * 6),
])
def test_matmul_flops_follow_broadcasting(a, b, expected):
    assert matmul_flops(a, b) == expected
    # one multiply-add per output element and inner index: the output shape is torch's own broadcast
    out = torch.matmul(torch.zeros(a), torch.zeros(b))
    assert matmul_flops(a, b) == 2 * out.numel() * a[-1]


def test_matmul_rejects_mismatched_inner_dimensions():
    with pytest.raises(ValueError, match=r"\(3, 4\) x \(5, 6\)"):
        matmul_flops((3, 4), (5, 6))


def _brute_pair(eq: str, shapes) -> float:
    """2 x (number of index combinations over every label of a two-operand einsum)."""
    terms = eq.split("->")[0].split(",")
    sizes = {}
    for term, shape in zip(terms, shapes):
        sizes.update(dict(zip(term, shape)))
    return 2.0 * math.prod(sizes.values())


@pytest.mark.parametrize("eq, shapes", [
    ("bhld,bhmd->bhlm", [(2, 3, 5, 4), (2, 3, 7, 4)]),
    ("bhlm,bhmd->bhld", [(2, 3, 5, 7), (2, 3, 7, 4)]),
    ("bld,de->ble", [(2, 5, 4), (4, 6)]),
    ("ij,kj->ik", [(3, 4), (5, 4)]),
    ("i,j->ij", [(3,), (4,)]),  # outer product runs as a bmm with k = 1
])
def test_einsum_two_operands(eq, shapes):
    cost = einsum_cost(eq, shapes)
    assert cost.flops == _brute_pair(eq, shapes)
    assert cost.elementwise == 0


def test_einsum_ellipsis_and_presum():
    assert einsum_cost("...ld,...md->...lm", [(2, 3, 5, 4), (2, 3, 7, 4)]).flops == \
        2 * 2 * 3 * 5 * 7 * 4
    # j appears only in the first operand and not in the output: summed first (elementwise)
    cost = einsum_cost("ij,k->ik", [(3, 4), (5,)])
    assert cost.flops == 2 * 3 * 5
    assert cost.elementwise == 3 * 4


def test_einsum_three_operands_left_to_right():
    cost = einsum_cost("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)])
    assert cost.flops == 2 * 2 * 3 * 4 + 2 * 2 * 4 * 5


def test_einsum_matches_dispatch_count():
    from trimkit.profile import count_flops

    class E(torch.nn.Module):
        def forward(self, a, b):
            return torch.einsum("bhld,bhmd->bhlm", a, b)

    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4)
    report = count_flops(E(), (a, b))
    assert report.flops == einsum_cost("bhld,bhmd->bhlm", [(1, 3, 5, 4), (1, 3, 7, 4)]).flops


def test_conv_cost():
    x, w = (2, 3, 8, 8), (6, 3, 3, 3)
    out = tuple(torch.nn.functional.conv2d(torch.zeros(x), torch.zeros(w)).shape)
    cost = conv_cost(x, w, out, transposed=False, bias=True)
    assert cost.flops == 2 * 2 * 6 * 3 * 9 * 6 * 6
    assert cost.elementwise == math.prod(out)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), lq=st.integers(1, 9), lk=st.integers(1, 9),
       e=st.integers(1, 8), ev=st.integers(1, 8), masked=st.booleans())
def test_attention_cost(b, h, lq, lk, e, ev, masked):
    cost = attention_cost((b, h, lq, e), (b, h, lk, e), (b, h, lk, ev), masked)
    assert cost.flops == 2 * b * h * lq * lk * (e + ev)
    assert cost.elementwise == b * h * lq * lk * (1 + SOFTMAX_FLOPS + int(masked))


def test_efficient_and_cudnn_sdpa_formulas_use_their_bias_argument():
    q, k, v = Spec((1, 2, 5, 4)), Spec((1, 2, 7, 4)), Spec((1, 2, 7, 3))
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        plain = FORMULAS[name]({"query": q, "key": k, "value": v, "attn_bias": None})
        biased = FORMULAS[name]({"query": q, "key": k, "value": v, "attn_bias": Spec((5, 7))})
        assert plain.flops == biased.flops == 2 * 2 * 5 * 7 * (4 + 3)
        assert biased.elementwise - plain.elementwise == 2 * 5 * 7


def test_elementwise_conventions():
    x = Spec((2, 3, 4))
    assert elementwise_cost("add", {"self": x, "other": x}, [x]) == 24
    assert elementwise_cost("add_", {"self": x, "other": x}, [x]) == 24
    assert elementwise_cost("_softmax", {"self": x}, [x]) == SOFTMAX_FLOPS * 24
    assert elementwise_cost("native_layer_norm", {"input": x, "weight": Spec((4,))}, [x]) == 5 * 24
    assert elementwise_cost("native_layer_norm", {"input": x, "weight": None}, [x]) == 4 * 24
    assert elementwise_cost("sum", {"self": x}, [Spec((2,))]) == 24
    assert elementwise_cost("view", {"self": x}, [x]) == 0
    assert elementwise_cost("eq", {"self": x}, [Spec((2, 3, 4), floating=False)]) is None
    assert elementwise_cost("some_unknown_op", {"self": x}, [x]) is None


def test_three_operand_einsum_matches_dispatch_count():
    """torch contracts left to right unless opt_einsum is installed and picks another order."""
    import importlib.util

    from trimkit.profile import count_flops

    if importlib.util.find_spec("opt_einsum") is not None:
        pytest.skip("opt_einsum chooses the contraction order")

    class E(torch.nn.Module):
        def forward(self, a, b, c):
            return torch.einsum("bij,bjk,bkl->bil", a, b, c)

    a, b, c = torch.randn(1, 2, 3), torch.randn(1, 3, 4), torch.randn(1, 4, 5)
    expected = einsum_cost("bij,bjk,bkl->bil", [(1, 2, 3), (1, 3, 4), (1, 4, 5)]).flops
    assert count_flops(E(), (a, b, c)).flops == expected == 2 * 2 * 3 * 4 + 2 * 2 * 4 * 5


def test_attention_formulas_come_from_the_attention_kinds():
    owned = {name: f for kind in kinds() for name, f in kind.formulas.items()}
    assert {"scaled_dot_product_attention", "_native_multi_head_attention",
            "_transformer_encoder_layer_fwd"} <= owned.keys()
    for name, formula in owned.items():
        assert FORMULAS[name] is formula
