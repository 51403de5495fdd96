"""The function mode that masks the keys of one attention call (padding at inference, the
keep-weighted softmax in training)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trimkit import ops

__all__ = ["KeyMask", "additive_allowed"]


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def additive_allowed(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: may attend) as an additive one; float masks pass through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class KeyMask(TorchFunctionMode):
    """Masks the keys of the attention softmax / SDPA / ``multi_head_attention_forward`` calls whose
    key length matches, inside one attention module.

    Without ``keep`` (inference) it adds the additive mask ``[B, 1, 1, Lk]``. With ``keep``
    (training: the straight-through 0/1 keep mask ``[B, Lk]``) it computes those calls' weights with
    :func:`trimkit.ops.keep_softmax`: dropped keys get exactly no weight, and still a gradient.
    ``hits`` counts the calls it changed.
    """

    def __init__(self, mask: torch.Tensor, keep: torch.Tensor | None = None, site: str = ""):
        super().__init__()
        self.mask, self.keep, self.site = mask, keep, site
        self.hits = 0

    def _fit(self, shape: tuple, dtype: torch.dtype, m: torch.Tensor | None = None):
        """``m`` (default: the additive mask, ``[B, 1, 1, Lk]``) shaped to broadcast over scores of
        ``shape`` ([B,H,Lq,Lk] or [B*H,Lq,Lk]), or None."""
        m = self.mask if m is None else m
        lk = m.shape[-1]
        if shape[-1] != lk:
            return None
        if len(shape) == 4 and shape[0] in (m.shape[0], 1):
            return m.to(dtype)
        if len(shape) == 3 and shape[0] % m.shape[0] == 0:
            heads = shape[0] // m.shape[0]
            return m.to(dtype).repeat_interleave(heads, 0)[:, 0]
        return None

    def _fit_keep(self, shape: tuple, dtype: torch.dtype):
        return None if self.keep is None else self._fit(shape, dtype, self.keep[:, None, None, :])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax, torch.nn.functional.softmax):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            x = args[0]
            if dim in (-1, x.dim() - 1):
                keep = self._fit_keep(tuple(x.shape), x.dtype)
                if keep is not None:
                    self.hits += 1
                    dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)  # F.softmax: _stacklevel
                    return ops.keep_softmax(x.to(dtype) if isinstance(dtype, torch.dtype) else x, keep)
                add = self._fit(tuple(x.shape), x.dtype)
                if add is not None:
                    self.hits += 1
                    args = (torch.clamp(x + add, min=torch.finfo(x.dtype).min),) + tuple(args[1:])
        elif func is F.multi_head_attention_forward:
            if self.keep is not None:
                out = self._mha_keep(args, kwargs)
                if out is not None:
                    self.hits += 1
                    return out
            key = args[1]
            lk = key.shape[0]
            add = self.mask[:, 0, 0, :]
            if add.shape[-1] == lk:
                self.hits += 1
                kpm = kwargs.get("key_padding_mask")
                if kpm is not None and kpm.dtype == torch.bool:  # True where a key is ignored
                    kpm = additive_allowed(~kpm, add.dtype)
                kwargs = dict(kwargs)
                kwargs["key_padding_mask"] = add.to(key.dtype) if kpm is None else kpm + add.to(key.dtype)
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            shape = (*q.shape[:-1], k.shape[-2])
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args))
            named.update(kwargs)
            mask = additive_allowed(named.pop("attn_mask", None), q.dtype)
            causal = named.pop("is_causal", False)
            if causal:
                lq, lk = q.shape[-2], k.shape[-2]
                tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
                mask = additive_allowed(tri, q.dtype) if mask is None else mask + additive_allowed(tri, q.dtype)
            keep = self._fit_keep(shape, q.dtype)
            if keep is not None:
                self.hits += 1
                return self._sdpa_keep(keep, mask, **named)
            add = self._fit(shape, q.dtype)
            if add is not None:
                self.hits += 1
                named["attn_mask"] = add if mask is None else mask + add
                return func(named.pop("query"), named.pop("key"), named.pop("value"), **named)
        return func(*args, **kwargs)

    @staticmethod
    def _attend(keep, mask, query, key, value, dropout_p=0.0, scale=None):
        """Attention written out with the keep-weighted softmax: ``(output, weights before dropout)``."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = (query @ key.transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores + mask
        weights = ops.keep_softmax(scores, keep)
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
        return dropped @ value, weights

    @classmethod
    def _sdpa_keep(cls, keep, mask, query, key, value, dropout_p=0.0, scale=None, enable_gqa=False):
        """``scaled_dot_product_attention`` written out, with the keep-weighted softmax."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        return cls._attend(keep, mask, query, key, value, dropout_p, scale)[0]

    def _mha_keep(self, args, kwargs):
        """``F.multi_head_attention_forward`` written out for seq-first batched inputs, with the
        keep-weighted softmax; None for the cases it does not cover (extra bias / zero-attention keys,
        static keys, unbatched inputs), which then get the exact additive mask instead."""
        a = dict(zip(_MHA_ARGS, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if (q.dim() != 3 or a.get("add_zero_attn")
                or any(a.get(n) is not None for n in ("bias_k", "bias_v", "static_k", "static_v"))):
            return None
        lq, b, e = q.shape
        lk, h = k.shape[0], a["num_heads"]
        if tuple(self.keep.shape) != (b, lk):
            return None
        if a.get("use_separate_proj_weight"):
            ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        else:
            ws = a["in_proj_weight"].chunk(3)
        bias = a.get("in_proj_bias")
        bs = bias.chunk(3) if bias is not None else (None, None, None)

        def split(x, i):
            return F.linear(x, ws[i], bs[i]).reshape(x.shape[0], b, h, -1).permute(1, 2, 0, 3)

        qh, kh, vh = split(q, 0), split(k, 1), split(v, 2)
        mask = None
        attn_mask = a.get("attn_mask")
        if attn_mask is None and a.get("is_causal"):
            attn_mask = ~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:  # boolean: True where attending is NOT allowed
            add = additive_allowed(~attn_mask, qh.dtype) if attn_mask.dtype == torch.bool else attn_mask
            mask = add.reshape(b, h, lq, lk) if add.dim() == 3 else add
        kpm = a.get("key_padding_mask")
        if kpm is not None:
            add = (additive_allowed(~kpm, qh.dtype) if kpm.dtype == torch.bool else kpm.to(qh.dtype))[:, None, None, :]
            mask = add if mask is None else mask + add
        p = a.get("dropout_p", 0.0) if a.get("training", True) else 0.0
        out, weights = self._attend(self.keep[:, None, None, :], mask, qh, kh, vh, p)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(lq, b, e), a["out_proj_weight"], a.get("out_proj_bias"))
        if not a.get("need_weights", True):
            return out, None
        return out, (weights.mean(1) if a.get("average_attn_weights", True) else weights)

