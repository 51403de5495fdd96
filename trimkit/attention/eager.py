"""Attention written out in plain torch ops, for the calls an action has to compute differently:
with the keep-weighted softmax (training key masks), with the kept heads only, or to read the
probabilities a fused kernel never returns."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trimkit import ops

__all__ = ["attend", "sdpa_keep", "bind_mha", "mha_keep", "mha_kept_heads", "sdpa_probs"]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def bind_mha(args: tuple, kwargs: dict) -> dict:
    """The arguments of a ``F.multi_head_attention_forward`` call by name, defaults filled in."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _as_additive(mask: Tensor | None, dtype: torch.dtype, allowed: bool) -> Tensor | None:
    """A boolean mask (``allowed``: True means may attend; else True means masked) as an additive one."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return ops.additive_mask(mask if allowed else ~mask, dtype)


def attend(keep: Tensor, mask: Tensor | None, query: Tensor, key: Tensor, value: Tensor,
           dropout_p: float = 0.0, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention with the keep-weighted softmax: ``(output, weights before dropout)``."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    weights = ops.keep_softmax(scores, keep)
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ value, weights


def sdpa_keep(keep: Tensor, mask: Tensor | None, query: Tensor, key: Tensor, value: Tensor,
              dropout_p: float = 0.0, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` with the keep-weighted softmax (``mask`` additive or None)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    return attend(keep, mask, query, key, value, dropout_p, scale)[0]


def _mha_mask(a: dict, b: int, h: int, lq: int, lk: int, dtype: torch.dtype, device) -> Tensor | None:
    mask = None
    attn_mask = a["attn_mask"]
    if attn_mask is None and a["is_causal"]:
        attn_mask = ~torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if attn_mask is not None:  # boolean: True where attending is NOT allowed
        add = _as_additive(attn_mask, dtype, allowed=False)
        mask = add.reshape(b, h, lq, lk) if add.dim() == 3 else add
    kpm = a["key_padding_mask"]
    if kpm is not None:
        add = (_as_additive(kpm, dtype, allowed=False) if kpm.dtype == torch.bool else kpm.to(dtype))
        add = add[:, None, None, :]
        mask = add if mask is None else mask + add
    return mask


def mha_keep(a: dict, keep: Tensor):
    """``F.multi_head_attention_forward`` (arguments ``a`` from :func:`bind_mha`) for seq-first batched
    inputs with the keep-weighted softmax over keys ``keep [B, Lk]``; None for the cases it does not cover
    (extra bias / zero-attention keys, static keys, unbatched inputs, a keep mask of another shape)."""
    q, k, v = a["query"], a["key"], a["value"]
    if (q.dim() != 3 or a["add_zero_attn"]
            or any(a[n] is not None for n in ("bias_k", "bias_v", "static_k", "static_v"))):
        return None
    lq, b, e = q.shape
    lk, h = k.shape[0], a["num_heads"]
    if tuple(keep.shape) != (b, lk):
        return None
    if a["use_separate_proj_weight"]:
        ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        ws = a["in_proj_weight"].chunk(3)
    bias = a["in_proj_bias"]
    bs = bias.chunk(3) if bias is not None else (None, None, None)

    def split(x, i):
        return F.linear(x, ws[i], bs[i]).reshape(x.shape[0], b, h, -1).permute(1, 2, 0, 3)

    qh, kh, vh = split(q, 0), split(k, 1), split(v, 2)
    mask = _mha_mask(a, b, h, lq, lk, qh.dtype, q.device)
    p = a["dropout_p"] if a["training"] else 0.0
    out, weights = attend(keep[:, None, None, :], mask, qh, kh, vh, p)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(lq, b, e), a["out_proj_weight"], a["out_proj_bias"])
    if not a["need_weights"]:
        return out, None
    return out, (weights.mean(1) if a["average_attn_weights"] else weights)


def _kept_head_mask(a: dict, d, b: int, h: int, hk: int, lq: int, lk: int, dtype: torch.dtype) -> Tensor | None:
    """The call's attention mask (``[B*H, Lq, Lk]`` cut to the kept heads) plus its key padding."""
    mask = _as_additive(a["attn_mask"], dtype, allowed=False)
    if mask is not None:
        mask = mask.to(dtype)
        if mask.dim() == 3:  # [B*H, Lq, Lk]: pick the kept heads
            mask = mask.view(b, h, lq, lk)
            if d.idx is not None:
                mask = mask.gather(1, d.idx[:, :, None, None].expand(b, hk, lq, lk))
    return mask


def mha_kept_heads(a: dict, heads: int, head_dim: int, d):
    """``F.multi_head_attention_forward`` (arguments ``a`` from :func:`bind_mha`) computing only the heads
    that decision ``d`` keeps (see :class:`~trimkit.attention.HeadDecision`)."""
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    x_q, x_k, x_v = (t.transpose(0, 1) for t in (query, key, value))  # batch first
    if a["use_separate_proj_weight"]:
        ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        ws = list(a["in_proj_weight"].chunk(3))
    bs = list(a["in_proj_bias"].chunk(3)) if a["in_proj_bias"] is not None else [None] * 3
    q, k, v = (ops.project_heads_in(x, w, bias, blocks=1, unit=head_dim, units=d.heads, idx=d.idx,
                                    valid=d.valid, uniform=d.uniform) for x, w, bias in zip((x_q, x_k, x_v), ws, bs))
    b, lq, lk = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    hk = d.kept
    q, k, v = (t.reshape(b, t.shape[1], hk, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    mask = _kept_head_mask(a, d, b, heads, hk, lq, lk, scores.dtype)
    if mask is not None:
        scores = scores + mask
    kpm = a["key_padding_mask"]
    if kpm is not None:
        scores = scores + _as_additive(kpm, scores.dtype, allowed=False).to(scores.dtype).view(b, 1, 1, lk)
    probs = F.softmax(scores, dim=-1)
    if a["training"] and a["dropout_p"] > 0:
        probs = F.dropout(probs, p=a["dropout_p"])
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, lq, hk * head_dim)
    out = ops.project_heads_out(ctx, a["out_proj_weight"], a["out_proj_bias"], unit=d.head_dim, units=d.heads,
                                idx=d.idx, valid=d.valid, uniform=d.uniform, mask=d.mask).transpose(0, 1)
    weights = None
    if a["need_weights"]:
        if d.valid is not None:
            w = d.valid.to(probs.dtype)[:, :, None, None]
            weights = (probs * w).sum(1) / w.sum(1) if a["average_attn_weights"] else probs
        else:
            weights = probs.mean(1) if a["average_attn_weights"] else probs
    if unbatched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights


def sdpa_probs(q: Tensor, k: Tensor, mask: Tensor | None, scale: float | None,
               rows: Tensor | None) -> Tensor:
    """Attention probabilities ``[B, H, R, Lk]`` of an SDPA call, in float32, for the queries ``rows
    [B, R]`` (None: every query). Grouped key heads are repeated to the query heads."""
    b, h, lq, hd = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    scale = scale if scale is not None else hd ** -0.5
    if rows is None:
        rows = torch.arange(lq, device=q.device).expand(b, -1)
    qs = torch.gather(q, 2, rows[:, None, :, None].expand(-1, h, -1, hd))
    logits = (qs.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        m = mask if mask.dtype != torch.bool else ops.additive_mask(mask.to(q.device))
        m = m.float().expand(b, h, lq, k.shape[-2])
        logits = logits + torch.gather(m, 2, rows[:, None, :, None].expand(-1, h, -1, k.shape[-2]))
    return logits.softmax(-1)
