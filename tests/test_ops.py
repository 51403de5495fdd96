"""Property tests for trimkit.ops: masking in training must equal removal at inference."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from trimkit.ops import (
    add_key_mask, additive_key_mask, additive_mask, combine_masks, gather_along, gather_tokens, gumbel_sigmoid,
    head_feature_index, head_keep_index, keep_softmax, padding_key_mask,
    project_heads_in, project_heads_out, repair_head_shape, scatter_tokens, slice_head_cols, slice_head_rows,
    slice_out_cols, slice_qkv_rows,
)

torch.set_num_threads(1)
SETTINGS = settings(max_examples=20, deadline=None)


@st.composite
def keep_masks(draw, max_b=3, max_l=7):
    b = draw(st.integers(1, max_b))
    length = draw(st.integers(1, max_l))
    bits = draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))
    return torch.tensor(bits, dtype=torch.bool).view(b, length), draw(st.integers(0, 2**16))


def attention(q, k, v, mask=None):
    """Plain softmax(q k^T / sqrt d + mask) v on [B, h, L, d]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


@SETTINGS
@given(keep_masks(), st.integers(0, 3))
def test_gather_order_padding_and_round_trip(case, extra):
    keep, seed = case
    x = torch.randn(*keep.shape, 2, 3, generator=torch.Generator().manual_seed(seed))
    y, index, valid = gather_tokens(x, keep, pad_value=-7.0)
    assert y.shape == (keep.shape[0], int(keep.sum(1).max()), 2, 3)
    assert torch.equal(valid.sum(1), keep.sum(1))
    for row in range(keep.shape[0]):
        src = torch.nonzero(keep[row]).flatten()
        assert torch.equal(index[row][valid[row]], src)  # ascending: order preserved
        assert torch.equal(y[row][valid[row]], x[row, src])
        assert bool((y[row][~valid[row]] == -7.0).all())
        assert bool((index[row][~valid[row]] == 0).all())
    back = scatter_tokens(y, index, valid, keep.shape[1])
    assert torch.equal(back, x * keep[:, :, None, None])


@SETTINGS
@given(keep_masks(), st.floats(0.05, 0.95))
def test_gather_keeps_special_tokens(case, threshold):
    keep, seed = case
    probs = torch.rand(keep.shape, generator=torch.Generator().manual_seed(seed))
    probs[:, 0] = 0.0
    mask = probs > threshold
    mask[:, 0] = True  # a special token
    x = torch.arange(keep.numel(), dtype=torch.float32).view(keep.shape)
    y, index, valid = gather_tokens(x, mask)
    assert torch.equal(y[:, 0], x[:, 0]) and bool((index[:, 0] == 0).all() and valid[:, 0].all())


@SETTINGS
@given(keep_masks(max_b=3, max_l=8), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_key_mask_equals_removal(case, causal, dtype):
    keep, seed = case
    g = torch.Generator().manual_seed(seed)
    b, length = keep.shape
    heads, dim = 2, 4
    x = torch.randn(b, length, heads * dim, generator=g, dtype=dtype)
    pos = torch.randn(1, length, heads * dim, generator=g, dtype=dtype)  # broadcast over batch
    w = torch.randn(3, heads * dim, heads * dim, generator=g, dtype=dtype) / dim

    def run(h, mask):
        q, k, v = (
            (h @ w[i].T).view(h.shape[0], h.shape[1], heads, dim).transpose(1, 2)
            for i in range(3)
        )
        return attention(q, k, v, mask).transpose(1, 2).reshape(h.shape)

    base = None
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool).tril()
        base = torch.zeros(1, 1, length, length, dtype=dtype).masked_fill(
            ~tri, torch.finfo(dtype).min)
    full = run(x + pos, combine_masks(base, additive_key_mask(keep.to(dtype), dtype)))

    xg, index, valid = gather_tokens(x, keep)
    mask = padding_key_mask(valid, dtype)
    if causal:
        mask = combine_masks(gather_along(gather_along(base, index, -1), index, -2), mask)
    out = run(xg + gather_along(pos, index, 1), mask)
    expect = gather_along(full, index, 1)
    assert torch.allclose(out[valid], expect[valid], atol=1e-5)
    restored = scatter_tokens(out, index, valid, length)
    assert torch.allclose(restored, full * keep[..., None], atol=1e-5)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16),
       st.sampled_from(["separate", "qkv_blocks", "per_head"]))
def test_head_slicing_equals_zeroed_heads(heads, dim, seed, layout):
    g = torch.Generator().manual_seed(seed)
    hidden, inner = 5, heads * dim
    x = torch.randn(2, 3, hidden, generator=g, dtype=torch.float64)
    wq, wk, wv = torch.randn(3, inner, hidden, generator=g, dtype=torch.float64)
    bq, bk, bv = torch.randn(3, inner, generator=g, dtype=torch.float64)
    wo, bo = torch.randn(hidden, inner, generator=g, dtype=torch.float64), torch.randn(hidden)
    keep_heads = torch.rand(heads, generator=g) < 0.6
    idx = head_keep_index(keep_heads)

    def heads_out(q, k, v, n):
        split = [t.view(2, 3, n, dim).transpose(1, 2) for t in (q, k, v)]
        return attention(*split)  # [B, n, L, d]

    per_head = heads_out(x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv, heads)
    per_head = per_head * keep_heads.to(per_head.dtype)[None, :, None, None]
    expect = per_head.transpose(1, 2).reshape(2, 3, inner) @ wo.T + bo

    n = len(idx)
    if layout == "separate":
        parts = [slice_qkv_rows(w, bias, idx, dim, heads) for w, bias in
                 ((wq, bq), (wk, bk), (wv, bv))]
        q, k, v = (x @ w.T + bias for w, bias in parts)
    else:
        if layout == "qkv_blocks":
            wf, bf = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
        else:
            wf = torch.stack([t.view(heads, dim, hidden) for t in (wq, wk, wv)], 1)
            wf = wf.reshape(3 * inner, hidden)
            bf = torch.stack([t.view(heads, dim) for t in (bq, bk, bv)], 1).reshape(-1)
        ws, bs = slice_qkv_rows(wf, bf, idx, dim, heads, layout=layout)
        assert ws.shape == (3 * n * dim, hidden)
        fused = x @ ws.T + bs
        if layout == "qkv_blocks":
            q, k, v = fused.view(2, 3, 3, n * dim).unbind(2)
        else:
            q, k, v = fused.view(2, 3, n, 3, dim).unbind(3)
            q, k, v = (t.reshape(2, 3, n * dim) for t in (q, k, v))
    got = heads_out(q, k, v, n).transpose(1, 2).reshape(2, 3, n * dim) @ \
        slice_out_cols(wo, idx, dim).T + bo
    assert torch.allclose(got, expect, atol=1e-10)


@SETTINGS
@given(st.integers(0, 2**16), st.floats(0.3, 3.0), st.sampled_from([torch.float32, torch.float64]))
def test_gumbel_sigmoid_straight_through(seed, tau, dtype):
    logits = (torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    logits.requires_grad_(True)
    weights = torch.randn(4, 6, dtype=dtype)
    hard = gumbel_sigmoid(logits, tau, generator=torch.Generator().manual_seed(seed))
    assert bool(((hard == 0) | (hard == 1)).all())
    (grad,) = torch.autograd.grad((hard * weights).sum(), logits)
    soft = gumbel_sigmoid(logits, tau, hard=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(hard.detach(), (soft > 0.5).to(dtype))
    (soft_grad,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
    assert torch.allclose(grad, soft_grad)


def test_gumbel_sigmoid_is_bernoulli_of_sigmoid():
    logits = torch.tensor([-1.5, 0.0, 0.7]).expand(20000, 3)
    sample = gumbel_sigmoid(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample.mean(0), torch.sigmoid(logits[0]), atol=0.015)


def test_soft_key_mask_gradients():
    keep = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    hard = additive_key_mask(keep)
    assert hard[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert torch.allclose(hard[0, 0, 0, [0, 2]], torch.log(torch.tensor([1.0, 0.5])))
    scores = torch.zeros(1, 1, 1, 3)
    (grad,) = torch.autograd.grad((scores + hard).softmax(-1)[..., 2].sum(), keep)
    assert bool(torch.isfinite(grad).all()) and grad[0, 1] == 0 and grad[0, 2] != 0
    leaky = additive_key_mask(keep, eps=1e-6)
    (grad,) = torch.autograd.grad((scores + leaky).softmax(-1)[..., 2].sum(), keep)
    # multiplicative-mask gradient: d/dm_j of m_2 / (m_0 + m_1 + m_2) at m = (1, 0, .5)
    assert torch.allclose(grad, torch.tensor([[-0.5 / 2.25, -0.5 / 2.25, 1 / 1.5 - 0.5 / 2.25]]),
                          atol=1e-4)
    half = additive_key_mask(torch.tensor([[1.0, 0.0]]), torch.float16)
    assert half.dtype == torch.float16 and half[0, 0, 0, 1] == torch.finfo(torch.float16).min


@SETTINGS
@given(keep_masks())
def test_keep_softmax_is_softmax_over_kept_keys(case):
    keep, seed = case
    keep[:, 0] = True  # every row keeps a key
    scores = torch.randn(keep.shape[0], 2, 3, keep.shape[1], generator=torch.Generator().manual_seed(seed)) * 8
    weights = keep_softmax(scores, keep[:, None, None, :].float())
    for b in range(keep.shape[0]):
        kept = scores[b][..., keep[b]].softmax(-1)
        assert torch.allclose(weights[b][..., keep[b]], kept, atol=1e-6)
        assert bool((weights[b][..., ~keep[b]] == 0).all())


def test_keep_softmax_does_not_leak_and_matches_the_leaky_gradient():
    # a dropped key scoring 20 above the kept ones: log(keep + 1e-6) hands it most of the weight
    scores = torch.tensor([[0.0, 20.0, 1.0]], dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    leaky = (scores + additive_key_mask(keep, eps=1e-6)[0, 0]).softmax(-1)
    assert leaky[0, 1] > 0.5
    exact = keep_softmax(scores, keep)
    assert exact[0, 1] == 0 and torch.allclose(exact, scores.masked_fill(keep == 0, -math.inf).softmax(-1))
    # gradient at the dropped key: that of a multiplicative mask, d/dm_j of m_2 e^s_2 / sum m_k e^s_k,
    # -(e^s_j / Z) p_2, except that s_j is capped at the kept maximum (1 here)
    (grad,) = torch.autograd.grad(exact[0, 2], keep)
    e = (scores - 1).exp()
    z = e[0, 0] + e[0, 2]
    assert torch.allclose(grad[0, 1], -1 / z * (e[0, 2] / z))
    near = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)  # below the cap: the multiplicative mask's
    (grad,) = torch.autograd.grad(keep_softmax(near, keep)[0, 2], keep)
    tiny = torch.autograd.grad((near + additive_key_mask(keep, eps=1e-14)[0, 0]).softmax(-1)[0, 2], keep)[0]
    assert torch.allclose(grad, tiny, rtol=1e-4)
    # other masks in the scores, low precision, and a row with no kept key
    low = torch.finfo(torch.float16).min
    half = keep_softmax(torch.tensor([[low, 3.0, 1.0, 2.0]], dtype=torch.float16), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert half.dtype == torch.float16 and half.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert keep_softmax(torch.randn(1, 3), torch.zeros(1, 3)).abs().sum() == 0


def test_combine_masks_clamps_and_broadcasts():
    low = torch.finfo(torch.float32).min
    a = torch.full((2, 1, 1, 3), low)
    b = torch.zeros(1, 1, 4, 3).fill_(low)
    out = combine_masks(a, b)
    assert out.shape == (2, 1, 4, 3) and bool((out == low).all())
    assert combine_masks(None, b) is b and combine_masks(a, None) is a
    with pytest.raises(ValueError, match=r"\(2, 1, 1, 3\).*\(1, 1, 4, 5\)"):
        combine_masks(a, torch.zeros(1, 1, 4, 5))


def test_bad_shapes_name_the_numbers():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        gather_tokens(torch.zeros(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch 3 does not match index batch 2"):
        gather_along(torch.zeros(3, 4), torch.zeros(2, 1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="index max 4 out of range"):
        gather_along(torch.zeros(2, 4), torch.full((2, 1), 4), -1)
    with pytest.raises(ValueError, match="24 rows; expected 12"):
        slice_qkv_rows(torch.zeros(24, 5), None, torch.tensor([0]), 3, 4, fused=False)
    with pytest.raises(ValueError, match=r"\[0, 4\] out of range for 4 heads"):
        slice_qkv_rows(torch.zeros(12, 5), None, torch.tensor([0, 4]), 3, 4)
    with pytest.raises(ValueError, match="head_dim 4"):
        slice_out_cols(torch.zeros(5, 10), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        gumbel_sigmoid(torch.zeros(2), tau=0)


@SETTINGS
@given(keep_masks(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_additive_mask_true_means_may_attend(case, dtype):
    allowed, seed = case
    mask = additive_mask(allowed, dtype)
    assert mask.shape == allowed.shape and mask.dtype == dtype
    assert bool((mask[allowed] == 0).all()) and bool((mask[~allowed] == float("-inf")).all())
    scores = torch.randn(allowed.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    probs = (scores + mask.double()).softmax(-1)
    rows = allowed.any(-1)
    want = keep_softmax(scores, allowed.double())
    assert torch.allclose(probs[rows], want[rows])


def test_additive_mask_needs_a_bool_tensor():
    with pytest.raises(ValueError, match="bool"):
        additive_mask(torch.zeros(2, 3))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_head_feature_index_is_the_kept_rows(units, unit, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(units, generator=g) < 0.6
    idx = head_keep_index(keep)
    got = head_feature_index(idx, unit, units, blocks)
    layout = torch.arange(blocks * units * unit).view(blocks, units, unit)
    assert got.tolist() == layout[:, idx].reshape(-1).tolist()
    batched = head_feature_index(idx.expand(2, -1), unit, units, blocks)
    assert batched.shape == (2, blocks * idx.numel() * unit) and torch.equal(batched[1], got)


@SETTINGS
@given(st.integers(2, 4), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(0, 2**16))
def test_projecting_kept_heads_equals_zeroed_heads(units, unit, blocks, seed):
    """Uniform and per-row (padded) kept heads give what the full projection gives with the other
    heads' features zeroed, in and out."""
    g = torch.Generator().manual_seed(seed)
    b, length, din, dout = 3, 4, 5, 6
    x = torch.randn(b, length, din, generator=g, dtype=torch.float64)
    w_in = torch.randn(blocks * units * unit, din, generator=g, dtype=torch.float64)
    b_in = torch.randn(blocks * units * unit, generator=g, dtype=torch.float64)
    w_out = torch.randn(dout, units * unit, generator=g, dtype=torch.float64)
    b_out = torch.randn(dout, generator=g, dtype=torch.float64)
    keep = torch.rand(b, units, generator=g) < 0.5
    keep[:, 0] = True
    full = (x @ w_in.T + b_in).view(b, length, blocks, units, unit)
    hk = int(keep.sum(1).max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :hk]
    valid = torch.arange(hk) < keep.sum(1)[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order))
    got = project_heads_in(x, w_in, b_in, blocks=blocks, unit=unit, units=units, idx=idx, valid=valid)
    assert got.shape == (b, length, blocks * hk * unit)
    got = got.view(b, length, blocks, hk, unit)
    for r in range(b):
        n = int(keep[r].sum())
        assert torch.allclose(got[r, :, :, :n], full[r][:, :, keep[r]])
        assert bool((got[r, :, :, n:] == 0).all())
    width = valid.repeat_interleave(unit, 1)[:, None]
    ctx = torch.randn(b, length, hk * unit, generator=g, dtype=torch.float64) * width
    out = project_heads_out(ctx, w_out, b_out, unit=unit, units=units, idx=idx, valid=valid)
    spread = torch.zeros(b, length, units, unit, dtype=torch.float64)
    for r in range(b):
        n = int(keep[r].sum())
        spread[r][:, keep[r]] = ctx[r].view(length, hk, unit)[:, :n]
    assert torch.allclose(out, spread.flatten(2) @ w_out.T + b_out)
    masked = project_heads_out(spread.flatten(2), w_out, b_out, unit=unit, units=units, mask=keep.double())
    assert torch.allclose(masked, out)
    first = idx[0, :int(keep[0].sum())]
    uniform = project_heads_in(x, w_in, b_in, blocks=blocks, unit=unit, units=units, idx=first[None],
                               uniform=first)
    assert torch.allclose(uniform.view(b, length, blocks, -1, unit), full[:, :, :, first])


def test_repair_head_shape():
    assert repair_head_shape((2, 5, 4, 8), 2 * 5 * 2 * 8, 4, 8, 2) == (2, 5, 2, 8)
    assert repair_head_shape((2, 5, -1, 8), 2 * 5 * 2 * 8, 4, 8, 2) is None  # fits already
    assert repair_head_shape((2, 5, 32), 2 * 5 * 16, 4, 8, 2) == (2, 5, 16)
    assert repair_head_shape((2, 5, 7), 2 * 5 * 16, 4, 8, 2) is None
    # a batch equal to the head count and a length equal to the head dim: the merged width is what
    # shrank (BLIP's vision attention at batch 4, 32 kept tokens, 4 heads of 32, one head kept)
    assert repair_head_shape((4, 32, 128), 4 * 32 * 32, 4, 32, 1) == (4, 32, 32)
    assert repair_head_shape((4, 32, 4, 32), 4 * 32 * 32, 4, 32, 1) == (4, 32, 1, 32)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_slicing_head_weights_takes_the_feature_index(units, unit, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(units, generator=g) < 0.6
    idx = head_keep_index(keep)
    w = torch.randn(blocks * units * unit, 5, generator=g)
    b = torch.randn(blocks * units * unit, generator=g)
    rows = head_feature_index(idx, unit, units, blocks)
    ws, bs = slice_head_rows(w, b, idx, unit, blocks)
    assert ws.shape == (blocks * idx.numel() * unit, 5) and torch.equal(ws, w[rows]) and torch.equal(bs, b[rows])
    assert slice_head_rows(w, None, idx, unit, blocks)[1] is None
    wo = torch.randn(6, units * unit, generator=g)
    assert torch.equal(slice_head_cols(wo, idx, unit), wo[:, head_feature_index(idx, unit, units)])


def test_add_key_mask_writes_into_fresh_scores_only_without_autograd():
    lo = torch.finfo(torch.float32).min
    mask = padding_key_mask(torch.tensor([[True, True, False], [True, False, False]]))
    scores = torch.randn(2, 4, 5, 3)
    scores[0, 0, 0, 1] = lo  # the model's own mask already at finfo.min: no overflow to -inf
    want = torch.clamp(scores + mask, min=lo)
    with torch.no_grad():
        fresh = scores.clone()
        got = add_key_mask(fresh, mask)
        assert got.data_ptr() == fresh.data_ptr() and torch.equal(got, want)
        view = scores.clone()[:, :, :4]  # a view of another tensor: never written
        before = view.clone()
        assert torch.equal(add_key_mask(view, mask), want[:, :, :4]) and torch.equal(view, before)
        one = scores[:1].clone()  # broadcast to a larger shape: a new tensor
        assert add_key_mask(one, mask).shape == (2, 4, 5, 3) and torch.equal(one, scores[:1])
    with torch.inference_mode():
        fresh = scores.clone()
        assert add_key_mask(fresh, mask).data_ptr() == fresh.data_ptr()
    outside = fresh  # an inference tensor outside inference mode cannot be written in place
    assert torch.equal(add_key_mask(outside, mask), torch.clamp(outside + mask, min=lo))
    leaf = scores.clone().requires_grad_()
    out = add_key_mask(leaf, mask)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(out.detach(), want)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(out).all()
