"""Trimmer modules and the hooks that apply their decisions inside any located model.

Token trimming works per *stream* (see :mod:`trimkit.locate`). A forward pre-hook on each trimmed
layer scores the tokens of the layer's main input and

* in **eval** mode *removes* the pruned tokens: the hidden states and every sequence-aligned side
  argument of that layer and of the later layers in the stream (attention masks, position ids or
  embeddings, found from the recorded forward) are gathered to the kept positions. Rows with
  different keep counts are padded to the row maximum; the padded keys are masked out in every
  attention whose keys come from that stream;
  the feed-forward block of such a layer runs on the kept tokens only, packed across rows (its
  input projections read ``[N, D]`` instead of ``[B, Lmax, D]``), so padding costs nothing there;
* in **train** mode keeps the full length and multiplies a straight-through Gumbel mask into a
  per-stream cumulative keep mask; pruned tokens stop being keys of later attention: the attention
  weights are computed as ``exp(s) * keep / sum(exp(s) * keep)`` (:func:`trimkit.ops.keep_softmax`),
  so a pruned key gets exactly no weight, as at inference, and the gradient still reaches it.

Key masks are applied by a short-lived ``TorchFunctionMode`` that is active only inside the attention
modules whose keys come from a trimmed stream; it changes the attention softmax, the
``scaled_dot_product_attention`` call or ``multi_head_attention_forward``, whatever the model's own
code looks like.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from trimkit import ops
from trimkit.control import register_runtime, unregister_runtime
from trimkit.graph import Capture
from trimkit.locate import ModelMap

__all__ = ["TokenTrimmer", "TrimState", "TokenRuntime", "layer_arg_axes", "install_token_runtime"]


class TokenTrimmer(nn.Module):
    """Scores tokens from their own state, their modality's global state and the other modality's.

    ``logit_i = w · gelu(A x_i + B g_self + C g_other) + b``; the bias starts high so a fresh
    trimmer keeps (almost) every token.
    """

    trimkit_role = "trimmer"

    def __init__(self, width: int, other_width: int | None, hidden: int | None = None, init_keep: float = 0.98):
        super().__init__()
        hidden = hidden or max(8, width // 8)
        self.local = nn.Linear(width, hidden)
        self.glob = nn.Linear(width, hidden, bias=False)
        self.cross = nn.Linear(other_width, hidden, bias=False) if other_width else None
        self.score = nn.Linear(hidden, 1)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.constant_(self.score.bias, math.log(init_keep / (1 - init_keep)))

    def forward(self, x: torch.Tensor, g_self: torch.Tensor, g_other: torch.Tensor | None) -> torch.Tensor:
        h = self.local(x) + self.glob(g_self).unsqueeze(1)
        if self.cross is not None and g_other is not None:
            h = h + self.cross(g_other).unsqueeze(1)
        return self.score(F.gelu(h)).squeeze(-1)

    def fast_logits(self, x: torch.Tensor, g_self: torch.Tensor, g_other: torch.Tensor | None) -> torch.Tensor:
        """``forward`` for inference with fewer dispatches: functional linears, the two global terms
        summed before broadcasting, GELU in its erf form (on tiny tensors the library GELU's
        per-call cost is larger than the work)."""
        g = F.linear(g_self, self.glob.weight)
        if self.cross is not None and g_other is not None:
            g = g + F.linear(g_other, self.cross.weight)
        if x.shape[0] == 1:  # one fused multiply-add
            h = torch.addmm(self.local.bias + g, x[0], self.local.weight.T).unsqueeze(0)
        else:
            h = F.linear(x, self.local.weight, self.local.bias) + g.unsqueeze(1)
        h = h * 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        return F.linear(h, self.score.weight, self.score.bias).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Sequence-aligned arguments of a layer, from the recorded forward
# ----------------------------------------------------------------------------------------------
def _path_of(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


def _batch_size(cap: Capture) -> int:
    for t in cap.inputs.values():
        if t.dim() >= 2:
            return t.shape[0]
    return 1


def layer_arg_axes(cap: Capture, layer_path: str, other: Capture | None = None) -> dict[str, Any]:
    """Which arguments of a layer call are sequence-aligned with its main input, and on which dims.

    ``seq_first`` is True for ``[L, B, D]`` layouts. With a second capture whose lengths differ, a
    dim counts only if it follows the length in both.
    """
    def one(c: Capture):
        b = _batch_size(c)
        call = next((k for k in c.calls if k.path == layer_path), None)
        if call is None:
            return None
        main = None
        for n, name in zip(call.inputs, call.input_names):
            s, dt = n.meta["trimkit.shape"], n.meta["trimkit.dtype"]
            if s is not None and len(s) == 3 and dt is not None and dt.is_floating_point:
                seq_first = s[0] != b and s[1] == b
                main = (name, s[0] if seq_first else s[1], seq_first)
                break
        if main is None:
            return None
        axes = {}
        for n, name in zip(call.inputs, call.input_names):
            s = n.meta["trimkit.shape"]
            if name == main[0] or s is None:
                continue
            dims = [d for d in range(1, len(s)) if s[d] == main[1]]
            if dims:
                axes[name] = dims
        return main[0], axes, main[2]

    a = one(cap)
    if a is None:
        return {"main": None, "axes": {}, "seq_first": False}
    if other is not None:
        b = one(other)
        if b is not None and b[0] == a[0]:
            return {"main": a[0], "axes": {k: v for k, v in a[1].items() if b[1].get(k) == v}, "seq_first": a[2]}
    return {"main": a[0], "axes": a[1], "seq_first": a[2]}


def _get_arg(args, kwargs, name: str):
    first, *rest = name.split(".")
    value = args[int(first)] if first.isdigit() and int(first) < len(args) else kwargs.get(first)
    for r in rest:
        flat, _ = tree_flatten(value)
        value = [v for v in flat if isinstance(v, torch.Tensor)][int(r)]
    return value


def _set_arg(args, kwargs, name: str, new):
    first, *rest = name.split(".")
    if first.isdigit() and int(first) < len(args):
        old = args[int(first)]
    else:
        old = kwargs.get(first)
    if rest:
        flat, spec = tree_flatten(old)
        tpos = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)][int(rest[0])]
        flat = list(flat)
        flat[tpos] = new
        new = tree_unflatten(flat, spec)
    if first.isdigit() and int(first) < len(args):
        args = list(args)
        args[int(first)] = new
        args = tuple(args)
    else:
        kwargs = dict(kwargs)
        kwargs[first] = new
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# Per-forward state
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamState:
    length: int  # original length
    index: torch.Tensor | None = None  # [B, Lc] original positions alive (eval)
    valid: torch.Tensor | None = None  # [B, Lc] padding (eval)
    mask: torch.Tensor | None = None  # [B, L] cumulative soft keep mask (train)
    last: torch.Tensor | None = None  # latest hidden state (for guidance)
    kept: list = dataclasses.field(default_factory=list)  # tokens alive per trimmed layer, per row
    probs: list = dataclasses.field(default_factory=list)  # keep probabilities per trimmed layer (train)
    masks: list = dataclasses.field(default_factory=list)  # cumulative masks after each trimmed layer
    logits: list = dataclasses.field(default_factory=list)  # keep-logits of the scored tokens, flat (train)
    alive: torch.Tensor | None = None  # [B, L] bool tokens still computed (eval, skip streams)
    pending: Any = None  # what the post-hook of a skip stream's layer puts back


class TrimState:
    def __init__(self):
        self.streams: dict[str, StreamState] = {}
        self.embeds: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}  # layer path -> [B, L] soft mask (train) or [B] counts
        self.keys: dict[str, torch.Tensor] = {}  # attention path -> the same, for its keys
        self.lengths: dict[str, int] = {}  # layer or attention path -> untrimmed length of those tokens
        self.packed: dict[str, tuple] = {}  # FFN path -> (flat index of kept tokens, leading shape) while packed


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: may attend) as an additive one; float masks pass through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class _KeyMask(TorchFunctionMode):
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
                    kpm = _additive(~kpm, add.dtype)
                kwargs = dict(kwargs)
                kwargs["key_padding_mask"] = add.to(key.dtype) if kpm is None else kpm + add.to(key.dtype)
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            shape = (*q.shape[:-1], k.shape[-2])
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args))
            named.update(kwargs)
            mask = _additive(named.pop("attn_mask", None), q.dtype)
            causal = named.pop("is_causal", False)
            if causal:
                lq, lk = q.shape[-2], k.shape[-2]
                tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
                mask = _additive(tri, q.dtype) if mask is None else mask + _additive(tri, q.dtype)
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
            add = _additive(~attn_mask, qh.dtype) if attn_mask.dtype == torch.bool else attn_mask
            mask = add.reshape(b, h, lq, lk) if add.dim() == 3 else add
        kpm = a.get("key_padding_mask")
        if kpm is not None:
            add = (_additive(~kpm, qh.dtype) if kpm.dtype == torch.bool else kpm.to(qh.dtype))[:, None, None, :]
            mask = add if mask is None else mask + add
        p = a.get("dropout_p", 0.0) if a.get("training", True) else 0.0
        out, weights = self._attend(self.keep[:, None, None, :], mask, qh, kh, vh, p)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(lq, b, e), a["out_proj_weight"], a.get("out_proj_bias"))
        if not a.get("need_weights", True):
            return out, None
        return out, (weights.mean(1) if a.get("average_attn_weights", True) else weights)


def _encoder_layer_padding(module: nn.Module, args, kwargs, valid: torch.Tensor | None):
    """A ``TransformerEncoderLayer``'s fused eval kernel never calls its attention module: hand it
    the padding of a gathered batch as ``src_key_padding_mask``."""
    if not isinstance(module, nn.TransformerEncoderLayer) or valid is None or bool(valid.all()):
        return args, kwargs
    pad = ~valid
    old = kwargs.get("src_key_padding_mask")
    if old is None and len(args) > 2:
        old, args = args[2], args[:2]
    if old is not None:
        pad = (pad | old) if old.dtype == torch.bool else (
            old + torch.zeros(pad.shape, dtype=old.dtype, device=old.device).masked_fill(pad, float("-inf")))
    kwargs = dict(kwargs)
    kwargs["src_key_padding_mask"] = pad
    return args, kwargs


_MASK_POSITION: dict = {}


def _mask_position(module: nn.Module) -> int | None:
    """Position of ``attention_mask`` among the forward's positional parameters (None: no such parameter)."""
    cls = type(module)
    if cls not in _MASK_POSITION:
        import inspect

        try:
            params = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params]
        _MASK_POSITION[cls] = names.index("attention_mask") if "attention_mask" in names else None
    return _MASK_POSITION[cls]


def _merge_into_mask_arg(module: nn.Module, args, kwargs, mask: torch.Tensor):
    """``(args, kwargs)`` with the additive key mask ``[B, 1, 1, Lk]`` merged into the module's
    ``attention_mask`` argument, or None when that cannot be done safely (then a function mode adds it).

    Only floating (additive) masks of rank 4 whose last dim is the key length are merged; a missing
    mask is merged only for self-attention, where the keys are the module's own hidden states.
    """
    pos = _mask_position(module)
    if pos is None:
        return None
    in_kwargs = "attention_mask" in kwargs or pos >= len(args)
    current = kwargs.get("attention_mask") if in_kwargs else args[pos]
    lk = mask.shape[-1]
    if current is None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != lk:
            return None
        if any(isinstance(kwargs.get(k), torch.Tensor) for k in ("encoder_hidden_states", "key_value_states")):
            return None
        new = mask.to(hidden.dtype)
    elif (isinstance(current, torch.Tensor) and current.dim() == 4 and current.is_floating_point()
          and current.shape[-1] == lk and current.shape[0] in (1, mask.shape[0])):
        new = torch.clamp(current + mask.to(current.dtype), min=torch.finfo(current.dtype).min)
    else:
        return None
    if in_kwargs:
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
    else:
        args = tuple(args[:pos]) + (new,) + tuple(args[pos + 1:])
    return args, kwargs


def _mha_key_padding(module: nn.MultiheadAttention, args, kwargs, mask: torch.Tensor):
    """``(args, kwargs)`` of an ``nn.MultiheadAttention`` call with ``mask`` added as key padding."""
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
        kpm = torch.zeros(kpm.shape, dtype=add.dtype, device=add.device).masked_fill(kpm, float("-inf"))
    kwargs = dict(kwargs)
    kwargs["key_padding_mask"] = add if kpm is None else kpm + add
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# The runtime: hooks on layers and attention modules
# ----------------------------------------------------------------------------------------------
class TokenRuntime:
    """Installs token trimming on a model from its ModelMap; ``remove()`` undoes everything."""

    def __init__(self, model: nn.Module, model_map: ModelMap, cap: Capture, trimmers: dict[str, TokenTrimmer],
                 guidance: dict[str, str | None], *, threshold: float = 0.5, special: dict[str, list[int]] | None = None,
                 other_cap: Capture | None = None, tau: float = 1.0, text_embed: tuple[str, str] | None = None,
                 skip: Any = ()):
        self.model, self.map = model, model_map
        self.skip_streams = set(skip)  # streams whose pruned tokens are carried through, not removed
        self._uses_embed = any(str(v).startswith("embed:") for v in guidance.values())
        self._embed_module: nn.Module | None = None
        self.record_cost = False  # set by trimkit.cost when it reads cost_inputs()
        self.trimmers = trimmers  # layer path -> trimmer
        self.guidance = guidance  # stream -> other stream whose global vector guides it (or None)
        self.threshold, self.tau = threshold, tau
        self.special = special or {}
        self.text_embed = text_embed
        self.enabled = True
        self.state = TrimState()
        self.stream_of: dict[str, str] = {}
        self.first_layer: dict[str, str] = {}
        self.axes: dict[str, dict] = {}
        for s in model_map.streams:
            for i, layer in enumerate(s.layers):
                self.stream_of[layer.path] = s.name
                if i == 0:
                    self.first_layer[s.name] = layer.path
                self.axes[layer.path] = layer_arg_axes(cap, layer.path, other_cap)
        self.trimmed_streams = {self.stream_of[p] for p in trimmers}
        self.handles: list = []
        self._modes: list = []
        self._exact_only: set[str] = set()  # attention sites the training-mode keep softmax cannot reach
        self._install()
        register_runtime(model, self)

    # -- installation -------------------------------------------------------------------------
    def _install(self):
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._reset, with_kwargs=True))
        for path, stream in self.stream_of.items():
            if stream not in self.trimmed_streams and stream not in self.guidance.values():
                continue
            mod = m.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._make_post(path)))
        for s in self.map.streams:
            if s.name not in self.trimmed_streams:
                continue
            for layer in s.layers:
                if layer.ffn is not None:
                    self._install_packing(s.name, layer.ffn)
        seen = set()
        for site in self.map.sites():
            if site.key_stream in self.trimmed_streams and site.path not in seen:
                seen.add(site.path)
                mod = m.get_submodule(site.path)
                self.handles.append(mod.register_forward_pre_hook(
                    self._make_attn_pre(site.key_stream, site.path, site.kind == "cross"), with_kwargs=True))
                self.handles.append(mod.register_forward_hook(self._attn_post, always_call=True))

    def _install_packing(self, stream: str, ffn) -> None:
        """Hooks that run the feed-forward block of a padded eval batch on the kept tokens only."""
        try:
            fc_in = [self.model.get_submodule(p) for p in ffn.fc_in]
            fc_out = self.model.get_submodule(ffn.fc_out)
        except AttributeError:
            return
        if not fc_in or not all(isinstance(m, nn.Linear) for m in (*fc_in, fc_out)):
            return
        first = fc_in[0]

        def pack(module, args):
            if self.model.training or not self.enabled or not args or not isinstance(args[0], torch.Tensor):
                return None
            st = self.state.streams.get(stream)
            x = args[0]
            if module is first:
                self.state.packed.pop(ffn.path, None)
                if st is None or st.valid is None or x.dim() != 3 or bool(st.valid.all()):
                    return None
                if self.model.get_submodule(ffn.fc_out) is not fc_out:  # replaced by a later pass
                    return None
                if tuple(x.shape[:2]) == tuple(st.valid.shape):
                    valid = st.valid
                elif tuple(x.shape[:2]) == tuple(st.valid.shape[::-1]):
                    valid = st.valid.transpose(0, 1)
                else:
                    return None
                index = valid.reshape(-1).nonzero().squeeze(1)
                self.state.packed[ffn.path] = (index, tuple(x.shape[:2]))
            got = self.state.packed.get(ffn.path)
            if got is None or x.dim() != 3 or tuple(x.shape[:2]) != got[1]:
                return None
            return (x.reshape(-1, x.shape[-1]).index_select(0, got[0]), *args[1:])

        def unpack(module, args, output):
            got = self.state.packed.pop(ffn.path, None)
            if got is None or not isinstance(output, torch.Tensor) or output.dim() != 2:
                return None
            index, lead = got
            full = output.new_zeros(lead[0] * lead[1], output.shape[-1]).index_copy_(0, index, output)
            return full.view(*lead, output.shape[-1])

        for m in fc_in:
            self.handles.append(m.register_forward_pre_hook(pack))
        self.handles.append(fc_out.register_forward_hook(unpack))

    def _close_modes(self):
        while self._modes:
            mode = self._modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)

    def remove(self):
        self._close_modes()
        unregister_runtime(self.model, self)
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- hooks --------------------------------------------------------------------------------
    def _reset(self, module, args, kwargs):
        self._close_modes()  # a forward that raised inside an attention module left one open
        self.state = TrimState()
        if self.enabled and self.text_embed and self._uses_embed:
            name = self.text_embed[0]
            ids = kwargs.get(name)
            if isinstance(ids, torch.Tensor):  # pooled lazily, when a trimmer first asks for it
                self.state.embeds["embed:" + name] = (ids, kwargs.get("attention_mask"))

    def _text_guidance(self, key: str) -> torch.Tensor | None:
        got = self.state.embeds.get(key)
        if not isinstance(got, tuple):
            return got
        ids, mask = got
        if self._embed_module is None:
            self._embed_module = self.model.get_submodule(self.text_embed[1])
        emb = self._embed_module(ids)
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            weight = mask.unsqueeze(-1).to(emb.dtype)
        else:
            weight = (ids != 0).unsqueeze(-1).to(emb.dtype)
        pooled = (emb * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        self.state.embeds[key] = pooled
        return pooled

    def _make_pre(self, path: str):
        stream = self.stream_of[path]
        spec = self.axes[path]

        def pre(module, args, kwargs):
            if not self.enabled or spec["main"] is None:
                return None
            hidden = _get_arg(args, kwargs, spec["main"])
            if spec["seq_first"]:
                hidden = hidden.transpose(0, 1)
            st = self.state.streams.get(stream)
            if st is None:
                st = self.state.streams[stream] = StreamState(hidden.shape[1])
            trimmer = self.trimmers.get(path) if stream in self.trimmed_streams else None
            if stream in self.skip_streams:
                return self._skip_pre(module, path, spec, st, trimmer, hidden, args, kwargs)
            if trimmer is not None:
                hidden = self._decide(stream, st, trimmer, hidden)
                if spec["seq_first"]:
                    hidden = hidden.transpose(0, 1)
                args, kwargs = _set_arg(args, kwargs, spec["main"], hidden)
            alive = self._alive(st)
            if alive is not None:
                self.state.tokens[path] = alive
                self.state.lengths[path] = st.length
            args, kwargs = self._slice_side(spec, st, args, kwargs)
            return _encoder_layer_padding(module, args, kwargs, st.valid)

        return pre

    def _slice_side(self, spec: dict, st: StreamState, args, kwargs):
        if st.index is not None:
            for name, dims in spec["axes"].items():
                t = _get_arg(args, kwargs, name)
                if t is None:
                    continue
                for d in dims:
                    if t.shape[d] == st.length:
                        t = ops.gather_along(t, st.index, d)
                args, kwargs = _set_arg(args, kwargs, name, t)
        return args, kwargs

    def _skip_pre(self, module, path: str, spec: dict, st: StreamState, trimmer, hidden: torch.Tensor, args, kwargs):
        """A layer of a stream whose every layer output is read at full length (skip mode).

        The layer computes only the tokens still alive; its post-hook writes their new states back
        into the full sequence, where pruned tokens keep the state they had when pruned.
        """
        stream = self.stream_of[path]
        if self._soft_skip():
            if trimmer is not None:
                self._decide(stream, st, trimmer, hidden)
            if st.mask is not None:
                st.pending = hidden
                self.state.tokens[path], self.state.lengths[path] = st.mask, st.length
            return None
        if trimmer is not None:
            st.valid, st.index = st.alive, None
            self._decide(stream, st, trimmer, hidden)
            if st.index is not None:
                st.alive = ops.scatter_tokens(st.valid.unsqueeze(-1), st.index, st.valid, st.length)[..., 0]
            st.index, st.valid = None, None
        if st.alive is None or bool(st.alive.all()):
            return None
        small, st.index, st.valid = ops.gather_tokens(self._skip_input(stream, hidden), st.alive)
        st.pending = hidden
        self.state.tokens[path], self.state.lengths[path] = st.valid.sum(1), st.length
        if spec["seq_first"]:
            small = small.transpose(0, 1)
        args, kwargs = _set_arg(args, kwargs, spec["main"], small)
        args, kwargs = self._slice_side(spec, st, args, kwargs)
        return _encoder_layer_padding(module, args, kwargs, st.valid)

    def _skip_input(self, stream: str, hidden: torch.Tensor) -> torch.Tensor:
        """The full-length states whose alive tokens a skip-mode layer computes: ``hidden`` itself,
        unless a runtime's decision also changed the states of the tokens it kept (merging)."""
        return hidden

    def _soft_skip(self) -> bool:
        """Whether skip streams blend states with the soft keep mask now (training) rather than
        computing only the alive tokens; a runtime whose decisions are always hard says False."""
        return self.model.training

    def _skip_post(self, path: str, st: StreamState, output):
        full, st.pending = st.pending, None
        flat, tree = tree_flatten(output)
        pos = next(i for i, v in enumerate(flat) if isinstance(v, torch.Tensor))
        out = flat[pos].transpose(0, 1) if self.axes[path]["seq_first"] else flat[pos]
        if self._soft_skip():
            m = st.mask.unsqueeze(-1).to(out.dtype)
            new = out * m + full * (1 - m)
        else:
            new = torch.where(ops.scatter_tokens(st.valid.unsqueeze(-1), st.index, st.valid, st.length),
                              ops.scatter_tokens(out, st.index, st.valid, st.length), full)
            st.index, st.valid = None, None
        flat = list(flat)
        flat[pos] = new.transpose(0, 1) if self.axes[path]["seq_first"] else new
        return tree_unflatten(flat, tree)

    def _make_post(self, path: str):
        stream = self.stream_of[path]

        def post(module, args, output):
            st = self.state.streams.get(stream)
            if st is not None and st.pending is not None:
                output = self._skip_post(path, st, output)
            if st is not None:
                flat = [v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)]
                if flat:
                    st.last = flat[0].transpose(0, 1) if self.axes[path]["seq_first"] else flat[0]
            return output

        return post

    def _make_attn_pre(self, key_stream: str, site_path: str, cross: bool = False):
        def pre(module, args, kwargs):
            st = self.state.streams.get(key_stream)
            if not self.enabled or st is None:
                self._modes.append(None)
                return None
            if self.record_cost or self.model.training:
                self.state.keys[site_path] = self._keys_alive(st, args, kwargs, cross)
                self.state.lengths[site_path] = st.length
            mask = self._key_mask(key_stream, st, cross)
            if mask is None:
                self._modes.append(None)
                return None
            if self.model.training and st.mask is not None and site_path not in self._exact_only:
                mode = _KeyMask(mask, keep=st.mask, site=site_path)
                mode.__enter__()
                self._modes.append(mode)
                return None
            if isinstance(module, nn.MultiheadAttention):  # its fast path never calls the functions
                self._modes.append(None)
                return _mha_key_padding(module, args, kwargs, mask)
            merged = _merge_into_mask_arg(module, args, kwargs, mask)
            if merged is not None:  # the module's own attention_mask carries it: no function mode needed
                self._modes.append(None)
                return merged
            mode = _KeyMask(mask)
            mode.__enter__()
            self._modes.append(mode)
            return None

        return pre

    def _key_mask(self, stream: str, st: StreamState, cross: bool = False) -> torch.Tensor | None:
        """Additive mask ``[B, 1, 1, Lk]`` for attention whose keys are ``stream``'s tokens (None: none)."""
        if self.model.training and st.mask is not None:
            return ops.additive_key_mask(st.mask)
        if st.valid is not None and not bool(st.valid.all()):
            return ops.padding_key_mask(st.valid)
        if cross and st.alive is not None and not bool(st.alive.all()):
            return ops.padding_key_mask(st.alive)  # a skip stream's pruned tokens, carried along at full length
        return None

    def _attn_post(self, module, args, output):
        mode = self._modes.pop() if self._modes else None
        if mode is not None:
            mode.__exit__(None, None, None)
            if isinstance(mode, _KeyMask) and mode.keep is not None and mode.hits == 0:
                self._exact_only.add(mode.site)
                later = ("later steps mask them exactly through its attention_mask argument, without a gradient to "
                         "them" if _mask_position(module) is not None else
                         "it has no attention_mask argument either, so they stay visible in training")
                warnings.warn(f"trimkit: the attention at {mode.site!r} computes its weights without a softmax, "
                              "scaled_dot_product_attention or multi_head_attention_forward call, so this training "
                              f"step did not mask its dropped keys; {later}", RuntimeWarning, stacklevel=2)
        return None

    # -- what the last forward kept -------------------------------------------------------------
    def _alive(self, st: StreamState) -> torch.Tensor | None:
        """Tokens the stream computes now: the soft mask in training, per-row counts in eval."""
        if self.model.training:
            return st.mask
        if st.valid is not None:
            return st.valid.sum(1)
        return None

    def _keys_alive(self, st: StreamState, args, kwargs, cross: bool):
        """Keys an attention call sees: the stream's alive tokens, unless its key tensor is an
        earlier (longer) state of the stream, as when a later layer's trimming already ran."""
        alive = self._alive(st)
        full = torch.tensor(float(st.length))
        if not cross:
            return full if alive is None else alive
        seen = [v for v in tree_flatten((args, kwargs))[0]
                if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point()]
        if len(seen) < 2:
            return full if alive is None else alive
        key = seen[1]
        lk = key.shape[0] if self._seq_first_stream(st, key) else key.shape[1]
        now = st.mask.shape[1] if self.model.training and st.mask is not None else (
            st.valid.shape[1] if st.valid is not None else st.length)
        if lk == now:
            return full if alive is None else alive
        return torch.tensor(float(lk))

    @staticmethod
    def _seq_first_stream(st: StreamState, key: torch.Tensor) -> bool:
        return st.last is not None and key.shape[0] == st.last.shape[1] and key.shape[1] == st.last.shape[0] \
            and key.shape[0] != key.shape[1]

    def stats(self) -> dict:
        """Tokens alive after each trimmed layer, per stream, as the batch mean of the last forward."""
        out = {}
        for name, st in self.state.streams.items():
            if st.kept:
                out[name] = {"length": st.length, "kept": [float(k.float().mean()) for k in st.kept]}
        return {"tokens": out}

    def cost_inputs(self) -> dict:
        return {"tokens": dict(self.state.tokens), "keys": dict(self.state.keys),
                "lengths": dict(self.state.lengths)}

    def train_logits(self) -> list[torch.Tensor]:
        """Keep-logits the trimmers gave the scored tokens in the last training forward (flat, with
        gradient); empty after an inference forward."""
        return [z for st in self.state.streams.values() for z in st.logits]

    # -- decisions ------------------------------------------------------------------------------
    def _global(self, stream: str | None, like: torch.Tensor) -> torch.Tensor | None:
        if stream is None:
            return None
        if stream.startswith("embed:"):
            return self._text_guidance(stream)
        st = self.state.streams.get(stream)
        if st is None or st.last is None:
            return None
        return self._pool(st, st.last)

    @staticmethod
    def _pool(st: StreamState, h: torch.Tensor) -> torch.Tensor:
        if st.mask is not None and st.mask.shape[1] == h.shape[1]:
            w = st.mask.unsqueeze(-1)
        elif st.valid is not None and st.valid.shape[1] == h.shape[1]:
            w = st.valid.unsqueeze(-1).to(h.dtype)
        elif st.alive is not None and st.alive.shape[1] == h.shape[1]:  # a skip stream between its layers
            w = st.alive.unsqueeze(-1).to(h.dtype)
        else:
            return h.mean(1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1e-6)

    def _decide(self, stream: str, st: StreamState, trimmer: TokenTrimmer, hidden: torch.Tensor) -> torch.Tensor:
        g_self = self._pool(st, hidden)
        g_other = self._global(self.guidance.get(stream), hidden)
        if g_other is not None and g_other.shape[0] != hidden.shape[0]:
            g_other = None
        if not self.model.training:
            if self.threshold <= 0:  # keeps everything: the trimmer cannot change the result
                b = hidden.shape[0]
                st.kept.append(st.valid.sum(1) if st.valid is not None else torch.full((b,), hidden.shape[1]))
                return hidden
            fast = getattr(trimmer, "fast_logits", None)
            logits = fast(hidden, g_self, g_other) if fast is not None else trimmer(hidden, g_self, g_other)
            return self._decide_eval(stream, st, logits, hidden)
        logits = trimmer(hidden, g_self, g_other)
        b, length = logits.shape
        special = torch.zeros(b, length, dtype=torch.bool, device=hidden.device)
        positions = st.index if st.index is not None else torch.arange(length, device=hidden.device).expand(b, -1)
        for p in self.special.get(stream, [0]):
            special |= positions == (p % st.length)
        sample = ops.gumbel_sigmoid(logits, tau=self.tau)
        sample = torch.where(special, torch.ones_like(sample), sample)
        prev = st.mask if st.mask is not None else torch.ones_like(sample)
        st.mask = prev * sample
        st.probs.append(torch.sigmoid(logits).masked_fill(special, 1.0) * prev)
        st.logits.append(logits[~special])
        st.masks.append(st.mask)
        st.kept.append(st.mask.detach().sum(1))
        return hidden

    def _decide_eval(self, stream: str, st: StreamState, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Inference decisions with as few small ops as possible (they run once per trimmed layer;
        threshold 0 never gets here)."""
        b, length = logits.shape
        if self.threshold >= 1:
            keep = torch.zeros(b, length, dtype=torch.bool, device=hidden.device)
        else:
            keep = logits > math.log(self.threshold / (1 - self.threshold))
        specials = sorted({p % st.length for p in self.special.get(stream, [0])})
        if st.index is None:
            keep[:, specials] = True
        else:
            keep |= torch.isin(st.index, torch.tensor(specials, device=hidden.device))
        if st.valid is not None:
            keep &= st.valid
        counts = keep.sum(1)
        low, high = int(counts.min()), int(counts.max())
        if low == 0:  # a row keeps at least its most likely token
            empty = counts == 0
            best = logits.masked_fill(~st.valid, float("-inf")) if st.valid is not None else logits
            keep[empty] |= F.one_hot(best[empty].argmax(1), length).bool()
            counts = keep.sum(1)
        if low == length and st.valid is None:
            st.kept.append(counts)
            return hidden
        if b == 1:
            idx = keep[0].nonzero().view(1, -1)
            new_hidden = hidden.index_select(1, idx[0])
            valid = torch.ones_like(idx, dtype=torch.bool)
        else:
            new_hidden, idx, valid = ops.gather_tokens(hidden, keep)
        st.index = idx if st.index is None else torch.gather(st.index, 1, idx)
        st.valid = valid
        st.kept.append(counts)
        return new_hidden


def install_token_runtime(*args, **kwargs) -> TokenRuntime:
    return TokenRuntime(*args, **kwargs)
