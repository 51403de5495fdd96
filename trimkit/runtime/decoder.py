"""Token trimming inside the language model of a decoder VLM, with its KV cache and generation.

A decoder VLM (LLaVA, Qwen2-VL, ...) splices image features into its language model's sequence;
:class:`~trimkit.splice.SpliceTracker` finds those positions in every forward. From the
first trimmed layer on, a token decider (the same interface as encoders, :class:`TokenStep`) decides
per *image* token, guided by the text tokens of the same row; text tokens are never dropped.

**Prefill** (a forward whose cache is empty): dropped tokens are removed from the hidden states, and
every sequence-aligned argument of the later layers (attention mask, position ids including 3-D
M-RoPE ids, rotary embeddings, found from the recorded forward) is gathered to the kept positions, so
kept tokens keep their original positions. Rows keeping different counts are padded at the end; the
padded slots are masked as keys (and attend to themselves only). After the last layer the kept
tokens' states are written back into the full-length sequence; dropped tokens carry the state they
had when dropped, so the model's head sees the usual shape.
A merging decider (``TokenDecision(merged=, index=)``) is followed the same way: survivors take
the merged states at their own positions, merged-away tokens are carried like dropped ones.

**Decoding** (a forward with a non-empty cache): the cache of a trimmed layer holds only what that
layer computed in the prefill (its kept tokens and padded slots), then one entry per new token. The
runtime remembers, per layer, the original positions of those entries, and gathers the key dim of
the attention mask accordingly (or builds the mask when the model passes none), so every decoding
step attends to exactly what the prefill kept.

**Training** keeps the full length: relaxed (straight-through) decisions multiply into a cumulative
keep mask, and the attention of the later layers computes its weights with the keep-weighted
softmax (dropped keys get no weight, the gradient still reaches them).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from trimkit import ops
from trimkit.attention import AttentionMode, KeyMask, ModeStack
from trimkit.errors import TrimkitError
from trimkit.graph import Capture
from trimkit.locate import ModelMap
from trimkit.runtime.args import get_arg, layer_arg_axes, mask_position, set_arg
from trimkit.runtime.control import register_runtime, unregister_runtime
from trimkit.runtime.deciders import TokenDecider, TokenStep
from trimkit.splice import SpliceTracker

__all__ = ["DecoderRuntime", "cache_length", "decoder_mask", "gather_seq"]


def cache_length(args: tuple, kwargs: dict) -> int | None:
    """Tokens already held by the KV cache passed to a forward (None: no cache object recognised).

    Recognises objects with ``get_seq_length()`` (transformers caches and look-alikes) and legacy
    tuples of per-layer ``(key, value)`` tensors; an explicit ``None`` cache argument counts as empty.
    """
    for name in ("past_key_values", "cache", "past_key_value"):
        if name in kwargs and kwargs[name] is None:
            return 0
    for value in list(kwargs.values()) + list(args):
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length())
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)) and value[0] \
                and isinstance(value[0][0], torch.Tensor) and value[0][0].dim() == 4:
            return int(value[0][0].shape[-2])
    return None


def decoder_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, q_valid: torch.Tensor | None,
                 like: torch.Tensor | None) -> torch.Tensor:
    """Causal mask ``[B, 1, Lq, Lk]`` from original positions: key ``j`` is visible to query ``i`` when
    ``pos_j <= pos_i`` and ``j`` is real; a padded query attends to itself only (no empty rows).

    Boolean (True: may attend) unless ``like`` is a floating mask, then additive in its dtype.
    """
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if q_valid is not None and not bool(q_valid.all()) and q_pos.shape[1] == k_pos.shape[1]:
        eye = torch.eye(q_pos.shape[1], dtype=torch.bool, device=q_pos.device)
        allowed = torch.where((~q_valid)[:, :, None], eye, allowed)
    allowed = allowed.unsqueeze(1)
    if like is not None and like.is_floating_point():
        return ops.additive_mask(allowed, like.dtype).clamp_min(torch.finfo(like.dtype).min)
    return allowed


def gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`trimkit.ops.gather_along` for tensors with one leading dim before the batch dim too,
    such as Qwen2-VL's 3-D M-RoPE position ids ``[3, B, L]``."""
    b = index.shape[0]
    if t.shape[0] in (1, b) or t.dim() < 3 or t.shape[1] not in (1, b):
        return ops.gather_along(t, index, dim)
    return ops.gather_along(t.transpose(0, 1), index, dim).transpose(0, 1)


@dataclasses.dataclass
class _Prefill:
    """One prefill forward's trimming state."""

    length: int  # L, the full sequence length
    image: torch.Tensor  # [B, L] image positions
    text: torch.Tensor  # [B, L] real text positions (image and padding excluded)
    index: torch.Tensor | None = None  # [B, Lc] original positions of the current tokens (eval)
    valid: torch.Tensor | None = None  # [B, Lc] real slots (eval)
    mask: torch.Tensor | None = None  # [B, L] cumulative relaxed keep mask (training)
    full: torch.Tensor | None = None  # [B, L, D] latest state of every token (eval, for the write-back)
    kept: list = dataclasses.field(default_factory=list)
    probs: list = dataclasses.field(default_factory=list)
    logits: list = dataclasses.field(default_factory=list)
    masks: list = dataclasses.field(default_factory=list)
    layout: dict = dataclasses.field(default_factory=dict)  # layer -> (index, valid) it ran with


@dataclasses.dataclass
class _Generation:
    """What decoding steps need from the prefill: per layer, the positions its cache holds."""

    length: int
    layout: dict  # layer path -> (index [B, Lc], valid [B, Lc])
    seen: int = 0  # tokens appended after the prefill


class DecoderRuntime:
    """Installs image-token trimming in the language model of a decoder VLM; ``remove()`` undoes it.

    ``lm_layers``: the language model's layers in order; ``layers``: those where ``decider`` decides;
    ``vision_layers``: the vision streams' layers (their outputs are what the splice tracker follows).
    """

    kind = "decoder"

    def __init__(self, model: nn.Module, model_map: ModelMap, cap: Capture, decider: TokenDecider,
                 stream: str, lm_layers: list[str], layers: Iterable[str], vision_layers: list[str], *,
                 threshold: float = 0.5, tau: float = 1.0, other_cap: Capture | None = None):
        self.model, self.map, self.decider, self.stream = model, model_map, decider, stream
        self.lm_layers = list(lm_layers)
        wanted = set(layers)
        self.layers = {p: i + 1 for i, p in enumerate(p for p in self.lm_layers if p in wanted)}
        if not self.layers:
            raise TrimkitError("decoder trimming: no language-model layer to trim")
        self.first = min(self.lm_layers.index(p) for p in self.layers)
        self.affected = self.lm_layers[self.first:]
        self.axes = {p: layer_arg_axes(cap, p, other_cap) for p in self.affected}
        self.threshold, self.tau = threshold, tau
        self.enabled = True
        self.record_cost = False
        self.pre: _Prefill | None = None
        self.gen: _Generation | None = None
        self._last: _Prefill | None = None  # the last prefill (its stats outlive the decoding steps)
        self._fresh = True
        self._pad: torch.Tensor | None = None
        self._q = 0
        self._cache_len: int | None = None
        self._modes = ModeStack()
        self.tracker = SpliceTracker(model, vision_layers, self.lm_layers[0])
        self.handles: list = []
        self._install()
        register_runtime(model, self)

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._after_forward, always_call=True))
        for path in self.affected:
            mod = m.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
        last = m.get_submodule(self.lm_layers[-1])
        self.handles.append(last.register_forward_hook(self._write_back))
        affected = set(self.affected)
        for s in self.map.streams:
            if s.name != self.stream:
                continue
            for layer in s.layers:
                if layer.path in affected:
                    for site in layer.attention:
                        mod = m.get_submodule(site.path)
                        self.handles.append(mod.register_forward_pre_hook(self._make_key_mask(site.path)))
                        self.handles.append(mod.register_forward_hook(self._close_mode, always_call=True))
        self.handles += self.decider.attach(self)

    def remove(self) -> None:
        self.decider.close()
        self._modes.close()
        self.tracker.remove()
        unregister_runtime(self.model, self)
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- per forward ------------------------------------------------------------------------------
    def _on_forward(self, module, args, kwargs) -> None:
        self.decider.close()
        self._modes.close()
        self.pre = None
        self._fresh = True
        self._cache_len = cache_length(args, kwargs)
        mask = kwargs.get("attention_mask")
        self._pad = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.tracker.enabled = self.enabled
        self.decider.reset(args, kwargs)

    def _after_forward(self, module, args, output) -> None:
        self._modes.close()
        if self.gen is not None and not self._fresh:
            self.gen.seen += self._q

    def _is_fresh(self, module, spec: dict, args, kwargs) -> bool:
        """A prefill (images spliced in this forward, or no generation to continue) rather than a
        decoding step of the last prefill's generation."""
        if self.tracker.positions is not None or self.gen is None or self._cache_len == 0:
            return True
        name = self._mask_name(module, spec, args, kwargs)
        mask = get_arg(args, kwargs, name) if name is not None else None
        if mask is not None and mask.shape[-1] != self.gen.length + self.gen.seen + self._q:
            return True
        if self.first == 0:
            raise TrimkitError("decoding with a KV cache after trimming the language model's first layer: models "
                               "take a decoding step's positions and mask from that layer's cache length; start "
                               "trimming at layer 1 or later (decoder_start / layer), or run single forwards")
        return False

    def _start(self, hidden: torch.Tensor) -> _Prefill | None:
        """The prefill state at the first trimmed layer (None: no image in this forward)."""
        image = self.tracker.positions
        if image is None or image.shape != hidden.shape[:2]:
            return None
        text = ~image
        if self._pad is not None and self._pad.shape == image.shape:
            text = text & self._pad.bool()
        return _Prefill(hidden.shape[1], image, text)

    def _make_pre(self, path: str):
        spec = self.axes[path]
        decides = path in self.layers
        is_first = self.lm_layers.index(path) == self.first

        def pre(module, args, kwargs):
            if not self.enabled or spec["main"] is None:
                return None
            hidden = get_arg(args, kwargs, spec["main"])
            if is_first:
                self._q = hidden.shape[1]
                self._fresh = self._is_fresh(module, spec, args, kwargs)
                if self._fresh:
                    self.gen = None
                    self.pre = self._start(hidden)
            if not self._fresh:
                return self._decode_args(module, path, spec, args, kwargs)
            st = self.pre
            if st is None:
                return None
            if decides:
                hidden = self._decide(path, st, hidden)
                args, kwargs = set_arg(args, kwargs, spec["main"], hidden)
            if self.model.training:
                return args, kwargs
            st.layout[path] = (st.index, st.valid)
            return self._prefill_args(module, spec, st, args, kwargs)

        return pre

    # -- decisions --------------------------------------------------------------------------------
    def _current(self, st: _Prefill, full: torch.Tensor) -> torch.Tensor:
        return full if st.index is None else torch.gather(full, 1, st.index)

    def _pool(self, st: _Prefill, hidden: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        w = self._current(st, which).to(hidden.dtype)
        if st.valid is not None:
            w = w * st.valid.to(hidden.dtype)
        if st.mask is not None:
            w = w * self._current(st, st.mask)
        w = w.unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-6)

    def _decide(self, path: str, st: _Prefill, hidden: torch.Tensor) -> torch.Tensor:
        candidates = self._current(st, st.image)
        if st.valid is not None:
            candidates = candidates & st.valid
        step = TokenStep(self.stream, path, self.layers[path], hidden, st.length, st.index, st.valid, st.mask,
                         [], self.model.training, self.threshold, self.tau, False,
                         pool=lambda: self._pool(st, hidden, st.image),
                         guide=lambda: self._pool(st, hidden, st.text), candidates=candidates)
        d = self.decider.decide(step)
        if d is None:
            st.kept.append(st.valid.sum(1) if st.valid is not None
                           else torch.full((hidden.shape[0],), st.length, device=hidden.device))
            return hidden
        if d.relaxed is not None:
            st.mask = (st.mask if st.mask is not None else torch.ones_like(d.relaxed)) * d.relaxed
            st.masks.append(st.mask)
            st.kept.append(st.mask.detach().sum(1))
            if d.probs is not None:
                st.probs.append(d.probs)
            if d.logits is not None:
                st.logits.append(d.logits)
            return hidden
        if d.merged is not None:
            return self._merge(path, st, hidden, d.merged, d.index)
        if d.keep is None:
            raise TrimkitError(f"decoder trimming at {path}: the decider must keep, drop or merge tokens")
        return self._remove(st, hidden, d.keep)

    def _remove(self, st: _Prefill, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        counts = keep.sum(1)
        st.kept.append(counts)
        if int(counts.min()) == keep.shape[1] and st.valid is None:
            return hidden
        st.full = self._carry(st, hidden)
        if hidden.shape[0] == 1:
            idx = keep[0].nonzero().view(1, -1)
            small, valid = hidden.index_select(1, idx[0]), torch.ones_like(idx, dtype=torch.bool)
        else:
            small, idx, valid = ops.gather_tokens(hidden, keep)
        st.index = idx if st.index is None else torch.gather(st.index, 1, idx)
        st.valid = valid
        return small

    def _merge(self, path: str, st: _Prefill, hidden: torch.Tensor, merged: torch.Tensor,
               index: torch.Tensor | None) -> torch.Tensor:
        """Survivors' new states ``merged`` ``[B, K, D]`` at ``index`` ``[B, K]`` among the current
        tokens (``-1``: a padding slot of a row that keeps fewer); merged-away tokens are carried like
        dropped ones, survivors are put back in position order."""
        b, _, d = hidden.shape
        if index is None or merged.dim() != 3 or tuple(index.shape) != tuple(merged.shape[:2]) \
                or merged.shape[0] != b or merged.shape[2] != d:
            raise TrimkitError(f"decoder trimming at {path}: a merge needs states [B, K, D] = [{b}, K, {d}] and "
                               f"positions [B, K], got {tuple(merged.shape)} and "
                               f"{None if index is None else tuple(index.shape)}")
        pad = index < 0
        index, order = torch.where(pad, hidden.shape[1], index).sort(1)
        merged = torch.gather(merged, 1, order.unsqueeze(-1).expand(-1, -1, d))
        pad = index >= hidden.shape[1]
        index = index.masked_fill(pad, 0)
        valid = ~pad if st.valid is None else torch.gather(st.valid, 1, index) & ~pad
        st.kept.append(valid.sum(1))
        st.full = self._carry(st, hidden)
        st.index = index if st.index is None else torch.gather(st.index, 1, index)
        st.valid = valid
        return merged.masked_fill(~valid.unsqueeze(-1), 0)

    def _carry(self, st: _Prefill, hidden: torch.Tensor) -> torch.Tensor:
        """Full-length states with the current tokens written in (dropped ones keep their last state)."""
        if st.index is None:
            return hidden
        valid = st.valid if st.valid is not None else torch.ones_like(st.index, dtype=torch.bool)
        placed = ops.scatter_tokens(valid.unsqueeze(-1), st.index, valid, st.length)
        return torch.where(placed, ops.scatter_tokens(hidden, st.index, valid, st.length), st.full)

    # -- side arguments ---------------------------------------------------------------------------
    def _prefill_args(self, module, spec: dict, st: _Prefill, args, kwargs):
        if st.index is None:
            return args, kwargs
        mask_name = self._mask_name(module, spec, args, kwargs)
        for name, dims in spec["axes"].items():
            t = get_arg(args, kwargs, name)
            if t is None or name == mask_name:
                continue
            for d in dims:
                if t.shape[d] == st.length:
                    t = gather_seq(t, st.index, d)
            args, kwargs = set_arg(args, kwargs, name, t)
        if mask_name is None:
            return args, kwargs
        old = get_arg(args, kwargs, mask_name)
        padded = st.valid is not None and not bool(st.valid.all())
        if old is None and not padded:
            return args, kwargs  # causal among the kept tokens, in order: the model's own rule holds
        new = decoder_mask(st.index, st.index, st.valid, st.valid, old)
        if old is not None:
            old = ops.gather_along(ops.gather_along(old, st.index, old.dim() - 1), st.index, old.dim() - 2)
            new = (old & new) if old.dtype == torch.bool else torch.minimum(old, new.to(old.dtype))
        return set_arg(args, kwargs, mask_name, new)

    def _decode_args(self, module, path: str, spec: dict, args, kwargs):
        gen = self.gen
        if gen is None or path not in gen.layout:
            return None
        index, valid = gen.layout[path]
        if index is None:
            return None
        b = index.shape[0]
        q = self._q
        appended = gen.length + torch.arange(gen.seen + q, device=index.device)  # every token since the prefill
        k_pos = torch.cat([index, appended.expand(b, -1)], 1)
        k_valid = torch.cat([valid, torch.ones(b, gen.seen + q, dtype=torch.bool, device=index.device)], 1)
        new_pos = appended[gen.seen:]
        mask_name = self._mask_name(module, spec, args, kwargs)
        if mask_name is None:
            return None
        old = get_arg(args, kwargs, mask_name)
        full_k = gen.length + gen.seen + q
        if old is not None and old.shape[-1] != full_k:
            raise TrimkitError(f"decoder trimming at {path}: the attention mask has {old.shape[-1]} keys, "
                               f"expected {full_k}; only caches that append (dynamic caches) are supported")
        if old is None and bool(valid.all()) and q == 1:
            return None
        new = decoder_mask(new_pos.expand(b, -1), k_pos, k_valid, None, old)
        if old is not None:
            old = ops.gather_along(old, k_pos, old.dim() - 1)
            new = (old & new) if old.dtype == torch.bool else torch.minimum(old, new.to(old.dtype))
        return set_arg(args, kwargs, mask_name, new)

    @staticmethod
    def _mask_name(module, spec: dict, args, kwargs) -> str | None:
        """The argument holding the attention mask: ``attention_mask`` by name or position, else the
        4-D argument recorded with both its last dims sequence-aligned."""
        if "attention_mask" in kwargs:
            return "attention_mask"
        pos = mask_position(module)
        if pos is not None and pos < len(args):
            return str(pos)
        for name, dims in spec["axes"].items():
            t = get_arg(args, kwargs, name)
            if isinstance(t, torch.Tensor) and t.dim() == 4 and {2, 3} <= set(dims):
                return name
        return None

    # -- after the last layer ---------------------------------------------------------------------
    def _write_back(self, module, args, output):
        st = self.pre
        if st is None or not self._fresh or self.model.training:
            return output
        self._last = st
        if st.layout:
            self.gen = _Generation(st.length, dict(st.layout))
        if st.index is None:
            return output
        flat, tree = tree_flatten(output)
        pos = next(i for i, v in enumerate(flat) if isinstance(v, torch.Tensor))
        out = flat[pos]
        valid = st.valid if st.valid is not None else torch.ones_like(st.index, dtype=torch.bool)
        placed = ops.scatter_tokens(valid.unsqueeze(-1), st.index, valid, st.length)
        flat = list(flat)
        flat[pos] = torch.where(placed, ops.scatter_tokens(out, st.index, valid, st.length), st.full)
        return tree_unflatten(flat, tree)

    # -- training: keep-weighted attention --------------------------------------------------------
    def _make_key_mask(self, site: str):
        def pre(module, args):
            st = self.pre
            if not (self.enabled and self.model.training and st is not None and st.mask is not None):
                self._modes.push(None)
                return None
            self._modes.push(AttentionMode(KeyMask(ops.additive_key_mask(st.mask), keep=st.mask, site=site)))
            return None

        return pre

    def _close_mode(self, module, args, output):
        self._modes.pop()

    # -- what the last forward kept ---------------------------------------------------------------
    def stats(self) -> dict:
        """Image tokens alive after each trimmed layer in the last prefill (batch mean)."""
        st = self.pre if self.pre is not None else self._last
        if st is None or not st.kept:
            return {"tokens": {}}
        images = float(st.image.sum(1).float().mean())
        return {"tokens": {self.stream: {"length": st.length, "image_tokens": images,
                                         "kept": [float(k.float().mean()) for k in st.kept]}}}

    def cost_inputs(self) -> dict:
        st = self.pre
        if st is None or not st.kept:
            return {}
        soft = self.model.training and len(st.masks) == len(st.kept)
        tokens, lengths, current = {}, {}, None
        for path in self.affected:
            k = self.layers.get(path, 0) - 1
            if 0 <= k < len(st.kept):
                current = st.masks[k] if soft else st.kept[k]
            if current is not None:
                tokens[path], lengths[path] = current, st.length
        keys = {site.path: tokens[layer.path] for s in self.map.streams if s.name == self.stream
                for layer in s.layers if layer.path in tokens for site in layer.attention}
        lengths.update({p: st.length for p in keys})
        return {"tokens": tokens, "keys": keys, "lengths": lengths}

    def train_logits(self) -> list[torch.Tensor]:
        return list(self.pre.logits) if self.pre is not None else []
