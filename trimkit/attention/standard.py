"""The attention kinds trimkit knows, one registered class each.

* ``softmax``: eager attention, a softmax over the last dim of a query·key product (``matmul``, ``bmm``,
  ``baddbmm`` or ``einsum``, which runs as ``bmm``);
* ``sdpa``: ``F.scaled_dot_product_attention`` and its fused kernels;
* ``mha``: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` in training or when its fast
  path does not apply; in a captured graph it shows as the eager or SDPA kind);
* ``native_mha``: ``nn.MultiheadAttention``'s eval fast path, ``aten._native_multi_head_attention``;
* ``encoder_layer``: ``nn.TransformerEncoderLayer``'s fused eval kernel,
  ``aten._transformer_encoder_layer_fwd``.

The last two run no Python attention function: a mode cannot reach them, so their key masks go in
through the module's own arguments (:meth:`NativeMha.key_padding_args`, :meth:`EncoderLayer.padding_args`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimkit import ops
from trimkit.attention.eager import bind_mha, mha_keep, mha_kept_heads, sdpa_keep, sdpa_probs
from trimkit.attention.flops import encoder_layer_formula, native_mha_formula, sdpa_formula
from trimkit.attention.registry import AttentionKind, register_kind

__all__ = ["EagerSoftmax", "Sdpa", "MultiHeadAttention", "NativeMha", "EncoderLayer"]

aten = torch.ops.aten


def _softmax_dim(args: tuple, kwargs: dict):
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


@register_kind
class EagerSoftmax(AttentionKind):
    name = "softmax"
    functions = (torch.softmax, F.softmax, torch.Tensor.softmax)
    graph_ops = frozenset({aten._softmax.default, aten.softmax.int, aten._safe_softmax.default})
    pattern = "eager"  # FLOPs: its products count as matrix products, the softmax as elementwise work
    products = frozenset({aten.bmm.default, aten.mm.default, aten.matmul.default, aten.baddbmm.default})

    def mask_keys(self, action, func, args, kwargs, proceed):
        x, dim = args[0], _softmax_dim(args, kwargs)
        if dim in (-1, x.dim() - 1):
            keep = action.fit_keep(tuple(x.shape), x.dtype)
            if keep is not None:
                action.hits += 1
                dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)  # F.softmax: _stacklevel
                return ops.keep_softmax(x.to(dtype) if isinstance(dtype, torch.dtype) else x, keep)
            add = action.fit(tuple(x.shape), x.dtype)
            if add is not None:
                action.hits += 1
                args = (ops.add_key_mask(x, add),) + tuple(args[1:])
        return proceed(args, kwargs)

    def capture_probs(self, action, func, args, kwargs, proceed):
        out = proceed(args, kwargs)
        dim = _softmax_dim(args, kwargs)
        if (dim in (-1, out.dim() - 1) and out.dim() in (3, 4)
                and out.shape[-1] == out.shape[-2] == action.length):
            b = action.batch
            probs = out if out.dim() == 4 else (out.reshape(b, -1, *out.shape[1:]) if out.shape[0] % b == 0
                                                else None)
            if probs is not None:
                action.save(action.rows(probs))
        return out


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


@register_kind
class Sdpa(AttentionKind):
    name = "sdpa"
    functions = (F.scaled_dot_product_attention,)
    graph_ops = frozenset({
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_attention_math.default,
        aten.scaled_dot_product_attention.default,
    })
    pattern = "qkv"
    formulas = {name: sdpa_formula(mask) for name, mask in {
        "scaled_dot_product_attention": "attn_mask",
        "_scaled_dot_product_flash_attention_for_cpu": "attn_mask",
        "_scaled_dot_product_attention_math": "attn_mask",
        "_scaled_dot_product_attention_math_for_mps": "attn_mask",
        "_scaled_dot_product_efficient_attention": "attn_bias",
        "_scaled_dot_product_flash_attention": "attn_mask",
        "_scaled_dot_product_cudnn_attention": "attn_bias",
        "_scaled_dot_product_fused_attention_overrideable": "attn_bias",
    }.items()}
    family = "attention"

    @staticmethod
    def _mask(named: dict, q: torch.Tensor, lk: int):
        """Pops ``attn_mask`` and ``is_causal`` from ``named``: the call's mask as one additive tensor."""
        mask = named.pop("attn_mask", None)
        if mask is not None and mask.dtype == torch.bool:
            mask = ops.additive_mask(mask, q.dtype)
        if named.pop("is_causal", False):
            lq = q.shape[-2]
            tri = ops.additive_mask(torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq), q.dtype)
            mask = tri if mask is None else mask + tri
        return mask

    def mask_keys(self, action, func, args, kwargs, proceed):
        named = dict(zip(_SDPA_ARGS, args))
        named.update(kwargs)
        q, k = named["query"], named["key"]
        shape = (*q.shape[:-1], k.shape[-2])
        keep = action.fit_keep(shape, q.dtype)
        add = None if keep is not None else action.fit(shape, q.dtype)
        if keep is None and add is None:
            return proceed(args, kwargs)
        action.hits += 1
        mask = self._mask(named, q, k.shape[-2])
        if keep is not None:
            return sdpa_keep(keep, mask, **named)
        named["attn_mask"] = add if mask is None else mask + add
        return proceed((named.pop("query"), named.pop("key"), named.pop("value")), named)

    def capture_probs(self, action, func, args, kwargs, proceed):
        q, k = args[0], args[1]
        if q.dim() == 4 and q.shape[-2] == k.shape[-2] == action.length:
            rows = action.cls_rows(q.shape[0], q.device)
            probs = sdpa_probs(q, k, kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
                               kwargs.get("scale"), None if rows is None else rows[:, None])
            action.save(probs.mean(dim=(1, 2)))
        return proceed(args, kwargs)


@register_kind
class MultiHeadAttention(AttentionKind):
    name = "mha"
    functions = (F.multi_head_attention_forward,)

    def mask_keys(self, action, func, args, kwargs, proceed):
        a = bind_mha(args, kwargs)
        if action.keep is not None:
            out = mha_keep(a, action.keep)
            if out is not None:
                action.hits += 1
                return out
        key = a["key"]
        add = action.mask[:, 0, 0, :]
        if add.shape[-1] != key.shape[0]:
            return proceed(args, kwargs)
        action.hits += 1
        kpm = a["key_padding_mask"]
        if kpm is not None and kpm.dtype == torch.bool:  # True where a key is ignored
            kpm = ops.additive_mask(~kpm, add.dtype)
        a["key_padding_mask"] = add.to(key.dtype) if kpm is None else kpm + add.to(key.dtype)
        return proceed((), a)

    def slice_heads(self, action, func, args, kwargs, proceed):
        if not action.mha:
            return proceed(args, kwargs)
        a = bind_mha(args, kwargs)
        if a["bias_k"] is None and not a["add_zero_attn"] and a["static_k"] is None and a["static_v"] is None:
            return mha_kept_heads(a, action.heads, action.head_dim, action.decision)
        return proceed(args, kwargs)

    def capture_probs(self, action, func, args, kwargs, proceed):
        a = bind_mha(args, kwargs)
        if a["key"].shape[0] != action.length:
            return proceed(args, kwargs)
        wanted, averaged = a["need_weights"], a["average_attn_weights"]
        a.update(need_weights=True, average_attn_weights=False)
        out, weights = proceed((), a)
        if weights.dim() == 4:
            action.save(action.rows(weights))
        if not wanted:
            return out, None
        return out, (weights.mean(1) if averaged else weights)


@register_kind
class NativeMha(AttentionKind):
    name = "native_mha"
    graph_ops = frozenset({aten._native_multi_head_attention.default})
    pattern = "mha_kernel"
    formulas = {"_native_multi_head_attention": native_mha_formula}
    family = "multi_head_attention"

    @staticmethod
    def key_padding_args(module: nn.MultiheadAttention, args: tuple, kwargs: dict, mask: torch.Tensor):
        """``(args, kwargs)`` of an ``nn.MultiheadAttention`` call with the additive key mask ``mask
        [B, 1, 1, Lk]`` added to its key padding (None: the key length does not match)."""
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if key is None:
            return None
        lk = key.shape[1] if (module.batch_first and key.dim() == 3) else key.shape[0]
        add = mask[:, 0, 0, :]
        if add.shape[-1] != lk:
            return None
        add = add.to(key.dtype)
        kpm = kwargs.get("key_padding_mask")
        if kpm is None and len(args) > 3:
            kpm = args[3]
            args = args[:3]
        if kpm is not None and kpm.dtype == torch.bool:
            kpm = ops.additive_mask(~kpm, add.dtype)
        kwargs = dict(kwargs)
        kwargs["key_padding_mask"] = add if kpm is None else kpm + add
        return args, kwargs


@register_kind
class EncoderLayer(AttentionKind):
    name = "encoder_layer"
    graph_ops = frozenset({aten._transformer_encoder_layer_fwd.default})
    pattern = "layer_kernel"
    formulas = {"_transformer_encoder_layer_fwd": encoder_layer_formula}
    family = "encoder_layer"

    @staticmethod
    def padding_args(module: nn.Module, args: tuple, kwargs: dict, valid: torch.Tensor | None):
        """``(args, kwargs)`` of a ``TransformerEncoderLayer`` call with the padding of a gathered batch
        (``valid [B, L]``, False: padding) added to ``src_key_padding_mask``; unchanged for other modules."""
        if not isinstance(module, nn.TransformerEncoderLayer) or valid is None or bool(valid.all()):
            return args, kwargs
        pad = ~valid
        old = kwargs.get("src_key_padding_mask")
        if old is None and len(args) > 2:
            old, args = args[2], args[:2]
        if old is not None:
            pad = (pad | old) if old.dtype == torch.bool else old + ops.additive_mask(~pad, old.dtype)
        kwargs = dict(kwargs)
        kwargs["src_key_padding_mask"] = pad
        return args, kwargs
