"""The training-mode key mask of the attention mode: dropped keys get exactly no weight in every attention call it reaches
(softmax, scaled_dot_product_attention, multi_head_attention_forward), and their keep mask still gets
a gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trimkit import ops
from trimkit.attention import AttentionMode, KeyMask

torch.set_num_threads(1)
KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])


def _mode(keep=KEEP):
    keep = keep.clone().requires_grad_(True)
    action = KeyMask(ops.additive_key_mask(keep.detach()), keep=keep)
    return AttentionMode(action), action, keep


def _peaked(shape, seed=0):
    """Scores-like tensors where the dropped keys would dominate: a leak could not hide."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_softmax_call_sees_only_kept_keys():
    q, k, v = _peaked((2, 3, 4, 8)), _peaked((2, 3, 5, 8), 1), _peaked((2, 3, 5, 8), 2)
    k[:, :, [1, 3]] *= 30  # dropped keys of row 0 score far above the rest
    mode, action, keep = _mode()
    with mode:
        out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    assert action.hits == 1
    for b in range(2):
        idx = KEEP[b].bool()
        want = (q[b] @ k[b][:, idx].transpose(-2, -1)).softmax(-1) @ v[b][:, idx]
        assert torch.allclose(out[b], want, atol=1e-5)
    out.sum().backward()
    assert keep.grad[0, 1] != 0 and keep.grad[1, 3] != 0


@pytest.mark.parametrize("variant", ["plain", "bool_mask", "causal"])
def test_sdpa_call_sees_only_kept_keys(variant):
    q, k, v = _peaked((2, 3, 5, 8)), _peaked((2, 3, 5, 8), 1) * 6, _peaked((2, 3, 5, 8), 2)
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[:, 2] = False
    allowed[:, 0] = True
    kwargs = {"attn_mask": allowed} if variant == "bool_mask" else {"is_causal": variant == "causal"}
    mode, action, keep = _mode()
    with mode:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert action.hits == 1
    for b in range(2):
        bias = torch.zeros(5, 5).masked_fill(KEEP[b][None, :] == 0, float("-inf"))
        if variant == "bool_mask":
            bias = bias.masked_fill(~allowed, float("-inf"))
        if variant == "causal":
            bias = bias.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        w = (q[b] @ k[b].transpose(-2, -1) * 8 ** -0.5 + bias).softmax(-1)
        assert torch.allclose(out[b], w @ v[b], atol=1e-5)
    out.sum().backward()
    assert keep.grad[0, 1] != 0


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_call_sees_only_kept_keys(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    x[0, [1, 3]] *= 20
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 1] = True  # the module's own key padding (True: ignore) stays in force
    mode, action, keep = _mode()
    with mode:
        out, weights = mha(x, x, x, key_padding_mask=pad, need_weights=need_weights)
    assert action.hits == 1
    assert (weights is not None) == need_weights
    mha.eval()
    for b in range(2):
        idx = (KEEP[b].bool() & ~pad[b]).nonzero()[:, 0]
        want = mha(x[b:b + 1], x[b:b + 1, idx], x[b:b + 1, idx], need_weights=False)[0]
        assert torch.allclose(out[b], want[0], atol=1e-5)
    out.sum().backward()
    assert keep.grad[0, 1] != 0


def test_softmax_dtype_argument_is_kept():
    scores = _peaked((2, 3, 4, 5))
    mode, action, _ = _mode()
    with mode:
        out = F.softmax(scores, dim=-1, dtype=torch.float64)
        same = F.softmax(scores, -1, 3)  # F.softmax's third positional is _stacklevel
    assert out.dtype == torch.float64 and same.dtype == torch.float32 and action.hits == 2
    assert torch.allclose(out.float(), same) and bool((out[0, ..., 1] == 0).all())


def test_calls_of_another_key_length_are_left_alone():
    mode, action, _ = _mode()
    x = torch.randn(2, 3, 4)
    with mode:
        y = x.softmax(-1)
    assert action.hits == 0 and torch.equal(y, x.softmax(-1))
