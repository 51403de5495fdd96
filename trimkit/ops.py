"""Small stateless tensor operations behind token and head trimming.

Shapes: ``B`` batch, ``L`` sequence length, ``Lmax`` kept length (row maximum), ``H`` heads,
``hd`` head dim. Bad shapes raise ``ValueError`` with the numbers involved.

Training uses masks (:func:`gumbel_sigmoid`, :func:`keep_softmax`, :func:`additive_key_mask`);
inference removes tokens (:func:`gather_tokens`, :func:`gather_along`, :func:`padding_key_mask`) and heads
(:func:`slice_head_rows`, :func:`slice_head_cols` and their checked forms :func:`slice_qkv_rows`,
:func:`slice_out_cols`; :func:`project_heads_in`, :func:`project_heads_out`, :func:`repair_head_shape`). :func:`additive_mask` turns a boolean attention mask (True: may attend)
into an additive one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gumbel_sigmoid",
    "gather_tokens",
    "gather_along",
    "scatter_tokens",
    "keep_softmax",
    "add_key_mask",
    "additive_mask",
    "additive_key_mask",
    "combine_masks",
    "padding_key_mask",
    "head_keep_index",
    "slice_head_rows",
    "slice_head_cols",
    "slice_qkv_rows",
    "slice_out_cols",
    "head_feature_index",
    "project_heads_in",
    "project_heads_out",
    "repair_head_shape",
]


def gumbel_sigmoid(logits: Tensor, tau: float = 1.0, hard: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """Relaxed Bernoulli sample ``sigmoid((logits + logistic noise) / tau)``, any shape.

    With ``hard=True`` the forward value is the 0/1 mask ``soft > 0.5`` and the gradient is
    that of the soft sample (straight-through).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(eps, 1.0 - eps)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    # soft - soft.detach() is exactly 0, so the value is exactly the 0/1 mask
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


def gather_along(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """Select ``index`` ``[B, Lmax]`` along ``dim`` of ``t`` (dim 0 = batch, size ``B`` or 1).

    Any sequence-aligned tensor works: ids ``[B|1, L]``, embeddings ``[B|1, L, D]``, masks
    ``[B|1, 1, Lq, Lk]`` (call once per sequence dim). Returns ``t`` with ``dim`` of size ``Lmax``.
    """
    if index.dim() != 2:
        raise ValueError(f"index must be [B, Lmax], got shape {tuple(index.shape)}")
    if t.dim() < 2:
        raise ValueError(f"t needs a batch dim and a sequence dim, got shape {tuple(t.shape)}")
    d = dim % t.dim()
    if d == 0:
        raise ValueError("dim must not be the batch dim 0")
    batch, kept = index.shape
    if t.shape[0] not in (1, batch):
        raise ValueError(f"t batch {t.shape[0]} does not match index batch {batch}")
    if index.numel() and int(index.max()) >= t.shape[d]:
        raise ValueError(f"index max {int(index.max())} out of range for t dim {dim} of size "
                         f"{t.shape[d]}")
    t = t.expand(batch, *t.shape[1:])
    view = [1] * t.dim()
    view[0], view[d] = batch, kept
    size = list(t.shape)
    size[d] = kept
    return t.gather(d, index.view(view).expand(size))


def gather_tokens(x: Tensor, keep: Tensor, *, pad_value: float = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Remove dropped tokens from ``x`` ``[B, L, ...]`` given ``keep`` bool ``[B, L]``.

    Order is preserved; rows are padded to the row maximum ``Lmax``. Returns ``(y [B, Lmax, ...],
    index [B, Lmax] long source positions (0 where padded), valid [B, Lmax] bool)``.
    """
    if keep.dtype != torch.bool or keep.dim() != 2 or tuple(keep.shape) != tuple(x.shape[:2]):
        raise ValueError(f"keep must be bool [B, L] = {tuple(x.shape[:2])}, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    counts = keep.sum(dim=1)
    kept = int(counts.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :kept]
    valid = torch.arange(kept, device=keep.device) < counts[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    y = gather_along(x, index, 1)
    y = y.masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 2))), pad_value)
    return y, index, valid


def scatter_tokens(y: Tensor, index: Tensor, valid: Tensor, length: int) -> Tensor:
    """Inverse of :func:`gather_tokens`: ``y`` ``[B, Lmax, ...]`` -> ``[B, length, ...]``, zeros
    where no valid entry lands."""
    if tuple(index.shape) != tuple(y.shape[:2]) or tuple(valid.shape) != tuple(y.shape[:2]):
        raise ValueError(f"index {tuple(index.shape)} and valid {tuple(valid.shape)} must both "
                         f"be [B, Lmax] = {tuple(y.shape[:2])}")
    if index.numel() and int(index.max()) >= length:
        raise ValueError(f"index max {int(index.max())} out of range for length {length}")
    batch, kept = index.shape
    target = torch.where(valid, index, torch.full_like(index, length))  # padding -> spare slot
    trailing = y.shape[2:]
    out = y.new_zeros(batch, length + 1, *trailing)
    idx = target.view(batch, kept, *([1] * len(trailing))).expand_as(y)
    return out.scatter(1, idx, y)[:, :length]


def additive_mask(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean attention mask (True: may attend) -> additive mask of the same shape: 0 where allowed,
    ``-inf`` where not."""
    if allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor, got {allowed.dtype}")
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def additive_key_mask(keep: Tensor, dtype: torch.dtype | None = None, eps: float = 0.0) -> Tensor:
    """Keep mask ``[B, L]`` in [0, 1] (soft or hard) -> additive attention bias ``[B, 1, 1, L]``.

    ``eps == 0`` (default): ``log(keep)``, exactly ``finfo(dtype).min`` where ``keep == 0``, so a
    dropped key gets no weight, the same as removing it. Gradients reach ``keep`` at kept keys
    (``d/dkeep = 1/keep``); a key whose mask is exactly 0 receives none.
    ``eps > 0``: ``log(keep + eps)``. A dropped key then leaks weight ``~eps``, and gradients
    also reach dropped keys: the softmax gradient matches a multiplicative mask
    ``exp(s) * keep / sum(exp(s) * keep)``. Use it in training with straight-through masks.
    """
    if keep.dim() != 2:
        raise ValueError(f"keep must be [B, L], got shape {tuple(keep.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dtype = dtype or (keep.dtype if keep.is_floating_point() else torch.float32)
    lowest = torch.finfo(dtype).min
    keep = keep.to(torch.promote_types(dtype, torch.float32))
    if eps > 0:
        bias = torch.log(keep + eps).clamp_min(lowest)
    else:
        tiny = torch.finfo(keep.dtype).tiny
        bias = torch.where(keep > 0, torch.log(keep.clamp_min(tiny)), torch.full_like(keep, lowest))
    return bias.clamp_min(lowest).to(dtype)[:, None, None, :]


# A dropped key's exp(s_j) is capped at the kept keys' maximum exp(s), so its gradient factor
# exp(s_j) / Z is at most 1, the scale of a kept key's weight. A dropped key far above the kept ones
# otherwise sends a gradient up to exp(score gap) times larger: uncapped, a BLIP 3x run went to NaN;
# capped at 1e6 (the bound of a log(keep + 1e-6) mask), BridgeTower's 2x training ended at ratio 0.54
# for 0.5 (40.3 % after calibration); capped here it ends at 0.49 (51.7 %; benchmarks/README.md).
_EXP_CAP = 0.0


def keep_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Attention weights over the last dim with every key weighted by ``keep`` (broadcast to ``scores``):
    ``exp(s_j) * keep_j / sum_k exp(s_k) * keep_k``.

    With a 0/1 ``keep`` the forward value is exactly the softmax over the kept keys alone (a dropped
    key gets weight 0, as if it were removed), while the gradient still reaches the dropped keys'
    ``keep``: ``d/dkeep_j = exp(s_j) / Z * (g_j - sum_k p_k g_k)``, the gradient of a multiplicative
    mask, with a dropped key's ``s_j`` capped at the kept keys' maximum. An additive
    ``log(keep + eps)`` mask has the same gradient for small ``eps`` (uncapped), but lets dropped keys
    leak a weight of ``eps * exp(score gap)``.
    Computed in at least float32; returned in ``scores``' dtype. A row without a kept key is all 0.
    """
    work = torch.promote_types(scores.dtype, torch.float32)
    s, k = scores.to(work), keep.to(work)
    alive = (k > 0) & (s > torch.finfo(work).min)
    top = torch.where(alive, s, torch.full_like(s, float("-inf"))).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    e = torch.exp((s - top).clamp_max(_EXP_CAP)) * k
    return (e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(work).tiny)).to(scores.dtype)


def add_key_mask(scores: Tensor, mask: Tensor) -> Tensor:
    """``scores + mask`` clamped to ``finfo(scores.dtype).min``, for attention scores about to enter
    a softmax.

    Where ``scores`` needs no gradient, is no view of another tensor and keeps its shape under the
    broadcast, the sum is written into ``scores`` itself. An eager attention's pre-softmax scores are a
    fresh ``[B, H, Lq, Lk]`` tensor read once, by the softmax; at batch 32 and 577 keys, allocating a
    second and third copy of it (the sum, then the clamp) took longer than the softmax itself.
    """
    lo = torch.finfo(scores.dtype).min
    in_place = (not scores.requires_grad and scores._base is None
                and (torch.is_inference_mode_enabled() or not scores.is_inference())
                and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape)
    if in_place:
        return scores.add_(mask).clamp_(min=lo)
    return torch.clamp(scores + mask, min=lo)


def combine_masks(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Sum two additive masks with broadcasting, clamped to the result dtype's ``finfo.min``."""
    if a is None or b is None:
        return b if a is None else a
    try:
        total = a + b
    except RuntimeError as err:
        raise ValueError(f"masks of shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
                         f"broadcast") from err
    return total.clamp_min(torch.finfo(total.dtype).min)


def padding_key_mask(valid: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``valid`` bool ``[B, Lmax]`` -> additive mask ``[B, 1, 1, Lmax]``: 0 valid, ``finfo.min`` not."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, Lmax], got {valid.dtype} {tuple(valid.shape)}")
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~valid, torch.finfo(dtype).min)[:, None, None, :]


def head_keep_index(keep_heads: Tensor) -> Tensor:
    """Keep mask ``[H]`` bool -> long index of the kept heads, ascending."""
    if keep_heads.dim() != 1 or keep_heads.dtype != torch.bool:
        raise ValueError(f"keep_heads must be bool [H], got {keep_heads.dtype} "
                         f"{tuple(keep_heads.shape)}")
    return torch.nonzero(keep_heads).flatten()


def _check_heads(heads_idx: Tensor, num_heads: int) -> None:
    if heads_idx.dim() != 1:
        raise ValueError(f"heads_idx must be 1-D, got shape {tuple(heads_idx.shape)}")
    if heads_idx.numel() and (int(heads_idx.min()) < 0 or int(heads_idx.max()) >= num_heads):
        raise ValueError(f"heads_idx {heads_idx.tolist()} out of range for {num_heads} heads")


def slice_head_rows(weight: Tensor, bias: Tensor | None, idx: Tensor, unit: int,
                    blocks: int = 1) -> tuple[Tensor, Tensor | None]:
    """Rows of the kept units ``idx [Hk]`` of a projection ``weight [blocks * units * unit, in]`` laid out
    as ``[blocks, units, unit]`` (``blocks``: 1 separate, 2 fused k/v, 3 fused q/k/v), and of its bias.
    The result keeps the layout: ``[blocks * Hk * unit, in]``."""
    din = weight.shape[1]
    w = weight.view(blocks, -1, unit, din)[:, idx].reshape(-1, din)
    b = None if bias is None else bias.view(blocks, -1, unit)[:, idx].reshape(-1)
    return w, b


def slice_head_cols(weight: Tensor, idx: Tensor, unit: int) -> Tensor:
    """Input columns of the kept units ``idx [Hk]`` of an output projection ``weight [out, units * unit]``."""
    dout = weight.shape[0]
    return weight.view(dout, -1, unit)[:, idx].reshape(dout, -1)


def slice_qkv_rows(weight: Tensor, bias: Tensor | None, heads_idx: Tensor, head_dim: int,
                   num_heads: int, fused: bool | None = None,
                   layout: str = "qkv_blocks") -> tuple[Tensor, Tensor | None]:
    """Rows of a q/k/v projection ``weight [out, in]`` (and ``bias [out]``) for the kept heads, checked.

    Separate projection (``out = H*hd``): rows ``h*hd:(h+1)*hd``. Fused (``out = 3*H*hd``; guessed
    from ``out`` when ``fused`` is None): ``layout="qkv_blocks"`` is ``[q | k | v]`` each ``[H*hd]``,
    ``"per_head"`` is ``[H, 3, hd]`` (q, k, v interleaved per head). The result keeps the layout.
    """
    out = weight.shape[0]
    inner = num_heads * head_dim
    if fused is None:
        fused = out == 3 * inner
    if out != (3 if fused else 1) * inner:
        raise ValueError(f"weight has {out} rows; expected {(3 if fused else 1) * inner} "
                         f"({'3 * ' if fused else ''}{num_heads} heads * {head_dim})")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight rows {out}")
    if layout not in ("qkv_blocks", "per_head"):
        raise ValueError(f"layout must be 'qkv_blocks' or 'per_head', got {layout!r}")
    _check_heads(heads_idx, num_heads)
    idx = heads_idx.long().to(weight.device)
    if fused and layout == "per_head":
        return slice_head_rows(weight, bias, idx, 3 * head_dim)
    return slice_head_rows(weight, bias, idx, head_dim, 3 if fused else 1)


def slice_out_cols(weight: Tensor, heads_idx: Tensor, head_dim: int) -> Tensor:
    """Input columns of an output projection ``weight [out, H*hd]`` for the kept heads, checked."""
    if weight.dim() != 2 or weight.shape[1] % head_dim:
        raise ValueError(f"weight shape {tuple(weight.shape)}: columns not a multiple of "
                         f"head_dim {head_dim}")
    _check_heads(heads_idx, weight.shape[1] // head_dim)
    return slice_head_cols(weight, heads_idx.long().to(weight.device), head_dim)


def head_feature_index(idx: Tensor, unit: int, units: int, blocks: int = 1) -> Tensor:
    """Feature indices ``[..., blocks * Hk * unit]`` of the kept units ``idx [..., Hk]`` in a projection laid
    out as ``[blocks, units, unit]`` (``blocks = 3`` for a fused q/k/v projection)."""
    base = (idx[..., None] * unit + torch.arange(unit, device=idx.device)).flatten(-2)
    return torch.cat([base + k * units * unit for k in range(blocks)], dim=-1)


def _feature_valid(valid: Tensor, unit: int, blocks: int) -> Tensor:
    return valid.repeat_interleave(unit, dim=-1).repeat(*([1] * (valid.dim() - 1)), blocks)


def project_heads_in(x: Tensor, weight: Tensor, bias: Tensor | None, *, blocks: int, unit: int, units: int,
                     idx: Tensor | None = None, valid: Tensor | None = None,
                     uniform: Tensor | None = None) -> Tensor:
    """A q/k/v projection of batch-first ``x [B, ..., Din]`` computing only the kept units.

    ``weight [blocks * units * unit, Din]``. ``idx [B, Hk]`` (None: every unit) with ``valid [B, Hk]`` for
    per-row choices padded to the row maximum (padded units give 0), or ``uniform [Hk]`` when every row
    keeps the same units. Returns ``[B, ..., blocks * Hk * unit]``.
    """
    if idx is None:
        return F.linear(x, weight, bias)
    if uniform is not None:
        rows = head_feature_index(uniform, unit, units, blocks)
        return F.linear(x, weight[rows], None if bias is None else bias[rows])
    b = idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"projection input has batch {x.shape[0]}, decisions have {b} rows")
    rows = head_feature_index(idx, unit, units, blocks)  # [B, R]
    keep = _feature_valid(valid, unit, blocks).to(weight.dtype)
    w = weight[rows] * keep[..., None]  # [B, R, Din]
    y = torch.bmm(x.reshape(b, -1, x.shape[-1]), w.transpose(1, 2))
    if bias is not None:
        y = y + (bias[rows] * keep)[:, None, :]
    return y.reshape(*x.shape[:-1], rows.shape[1])


def project_heads_out(x: Tensor, weight: Tensor, bias: Tensor | None, *, unit: int, units: int,
                      idx: Tensor | None = None, valid: Tensor | None = None, uniform: Tensor | None = None,
                      mask: Tensor | None = None) -> Tensor:
    """The output projection ``weight [Dout, units * unit]`` of batch-first ``x``.

    With ``mask [B, units]`` every unit is computed and its features are scaled by the mask; with ``idx``
    / ``valid`` / ``uniform`` (as in :func:`project_heads_in`) ``x`` holds the kept units' features only.
    """
    if mask is not None:
        scale = mask.repeat_interleave(unit, dim=-1).to(x.dtype)
        if x.shape[0] != scale.shape[0]:
            raise ValueError(f"output projection input has batch {x.shape[0]}, masks have {scale.shape[0]} rows")
        x = x * scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1])
        return F.linear(x, weight, bias)
    if idx is None:
        return F.linear(x, weight, bias)
    if uniform is not None:
        return F.linear(x, weight[:, head_feature_index(uniform, unit, units, 1)], bias)
    b = idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"output projection input has batch {x.shape[0]}, decisions have {b} rows")
    cols = head_feature_index(idx, unit, units, 1)
    w = weight.t()[cols] * valid.repeat_interleave(unit, dim=-1).to(weight.dtype)[..., None]
    y = torch.bmm(x.reshape(b, -1, x.shape[-1]), w)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fits(shape: tuple, numel: int) -> bool:
    known = [s for s in shape if s != -1]
    prod = math.prod(known)
    if len(known) == len(shape):
        return prod == numel
    return len(shape) - len(known) == 1 and prod > 0 and numel % prod == 0


def repair_head_shape(shape: tuple, numel: int, heads: int, head_dim: int, kept: int) -> tuple | None:
    """A reshape target that no longer fits ``numel`` elements because heads were removed: ``shape`` with
    the full head count (next to ``head_dim``) or the full width ``heads * head_dim`` replaced by the kept
    ones. None when ``shape`` fits already or no replacement fits."""
    if _fits(shape, numel):
        return None
    if shape and shape[-1] == heads * head_dim:  # the merged width, last: the usual ``[B, L, H * D]``
        new = shape[:-1] + (kept * head_dim,)
        if _fits(new, numel):
            return new  # before the pair search, which a batch equal to H and a length equal to D would fool
    for i in range(len(shape) - 2, -1, -1):
        if shape[i] == heads and shape[i + 1] == head_dim:
            new = shape[:i] + (kept,) + shape[i + 1:]
            if _fits(new, numel):
                return new
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] == heads * head_dim:
            new = shape[:i] + (kept * head_dim,) + shape[i + 1:]
            if _fits(new, numel):
                return new
    return None
