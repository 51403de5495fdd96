"""The token runtime: hooks that apply a token decider's decisions inside any located model.

Token trimming works per *stream* (see :mod:`trimkit.locate`). A forward pre-hook on each trimmed
layer asks the decider (:mod:`trimkit.runtime.deciders`) what to keep of the tokens of the layer's
main input, and

* for **hard** decisions (inference, or deciders that are hard in training too) *removes* the
  dropped tokens: the hidden states and every sequence-aligned side argument of that layer and of
  the later layers in the stream (attention masks, position ids or embeddings, found from the
  recorded forward) are gathered to the kept positions. Rows with different keep counts are padded
  to the row maximum; the padded keys are masked out in every attention whose keys come from that
  stream; the feed-forward block of such a layer runs on the kept tokens only, packed across rows;
* for **relaxed** decisions (training) keeps the full length and multiplies the straight-through
  mask into a per-stream cumulative keep mask; dropped tokens stop being keys of later attention
  (:func:`trimkit.ops.keep_softmax`): they get exactly no weight, and the gradient still reaches them;
* for **merges** follows the surviving positions with the merged states.

A stream whose every layer output is read at full length (bridges) runs in *skip mode*: its layers
compute only the tokens still alive and write their new states back into the full sequence, where
dropped tokens keep the state they had when dropped.

Key masks are applied by a short-lived ``TorchFunctionMode`` active only inside the attention
modules whose keys come from a trimmed stream (:mod:`trimkit.runtime.keys`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from trimkit import ops
from trimkit.graph import Capture
from trimkit.locate import ModelMap
from trimkit.attention import get_kind
from trimkit.runtime.args import get_arg, layer_arg_axes, set_arg
from trimkit.runtime.keys import KeyMasking
from trimkit.runtime.control import register_runtime, unregister_runtime
from trimkit.runtime.deciders import TokenDecider, TokenDecision, TokenStep
from trimkit.runtime.packing import install_packing
from trimkit.runtime.streams import StreamState, TrimState, alive_tokens, pool_states

__all__ = ["TokenRuntime", "apply_decision"]


def apply_decision(st: StreamState, hidden: torch.Tensor, d: TokenDecision | None) -> torch.Tensor:
    """Apply one decision to stream state ``st`` and batch-first ``hidden``; returns the new states."""
    b, length = hidden.shape[:2]
    if d is None:
        st.kept.append(st.valid.sum(1) if st.valid is not None
                       else torch.full((b,), length, device=hidden.device))
        return hidden
    if d.relaxed is not None:
        prev = st.mask if st.mask is not None else torch.ones_like(d.relaxed)
        st.mask = prev * d.relaxed
        if d.probs is not None:
            st.probs.append(d.probs)
        if d.logits is not None:
            st.logits.append(d.logits)
        st.masks.append(st.mask)
        st.kept.append(st.mask.detach().sum(1))
        return hidden
    if d.merged is not None:
        st.index = d.index if st.index is None else torch.gather(st.index, 1, d.index)
        st.valid = torch.ones(st.index.shape, dtype=torch.bool, device=hidden.device)
        st.kept.append(st.valid.sum(1))
        return d.merged
    counts = d.keep.sum(1)
    if int(counts.min()) == length and st.valid is None:
        st.kept.append(counts)
        return hidden
    if b == 1:
        idx = d.keep[0].nonzero().view(1, -1)
        new_hidden = hidden.index_select(1, idx[0])
        valid = torch.ones_like(idx, dtype=torch.bool)
    else:
        new_hidden, idx, valid = ops.gather_tokens(hidden, d.keep)
    st.index = idx if st.index is None else torch.gather(st.index, 1, idx)
    st.valid = valid
    st.kept.append(counts)
    return new_hidden


class TokenRuntime:
    """Installs token trimming on a model from its ModelMap; ``remove()`` undoes everything.

    ``layers``: the paths of the layers where ``decider`` decides (each stream's trimmed layers).
    ``guidance``: stream -> the stream (or ``"embed:<input>"``) whose global vector guides it.
    ``special``: stream -> special token positions (never dropped). ``skip``: the streams in skip
    mode, or a function returning them (read on every forward).
    """

    def __init__(self, model: nn.Module, model_map: ModelMap, cap: Capture, decider: TokenDecider,
                 layers: Iterable[str], guidance: dict[str, str | None] | None = None, *, threshold: float = 0.5,
                 special: dict[str, list[int]] | None = None, other_cap: Capture | None = None, tau: float = 1.0,
                 text_embed: tuple[str, str] | None = None, skip: Iterable[str] | Callable[[], Iterable[str]] = ()):
        self.model, self.map, self.decider = model, model_map, decider
        self._skip = skip if callable(skip) else frozenset(skip)
        self.guidance = dict(guidance or {})
        self._uses_embed = any(str(v).startswith("embed:") for v in self.guidance.values())
        self._embed_module: nn.Module | None = None
        self.record_cost = False  # set by trimkit.cost when it reads cost_inputs()
        self.threshold, self.tau = threshold, tau
        self.special = special or {}
        self.text_embed = text_embed
        self.enabled = True
        self.state = TrimState()
        self.stream_of: dict[str, str] = {}
        self.axes: dict[str, dict] = {}
        for s in model_map.streams:
            for layer in s.layers:
                if layer.path not in self.stream_of:  # a module running two streams follows the first
                    self.stream_of[layer.path] = s.name
                    self.axes[layer.path] = layer_arg_axes(cap, layer.path, other_cap)
        wanted = set(layers)
        self.layers: dict[str, int] = {}  # trimmed layer path -> ordinal within its stream (1, 2, ...)
        for s in model_map.streams:
            for layer in (la for la in s.layers if la.path in wanted):
                self.layers[layer.path] = sum(1 for p in self.layers if self.stream_of[p] == s.name) + 1
        self.trimmed_streams = {self.stream_of[p] for p in self.layers}
        self.handles: list = []
        self.keys = KeyMasking(self)
        self._install()
        register_runtime(model, self)

    @property
    def skip_streams(self) -> set[str]:
        """Streams whose dropped tokens are carried through at full length, not removed."""
        return set(self._skip() if callable(self._skip) else self._skip)

    @contextmanager
    def stream_whole(self, stream: str) -> Iterator["TokenRuntime"]:
        """Within the block ``stream``'s layers stop deciding, so its tokens all stay; every other
        decision runs as before (an ablation switch: which stream's trimming costs accuracy)."""
        if stream not in self.trimmed_streams:
            raise ValueError(f"{stream!r} is not a trimmed stream; trimmed: {sorted(self.trimmed_streams)}")
        saved = self.layers
        self.layers = {p: o for p, o in saved.items() if self.stream_of[p] != stream}
        try:
            yield self
        finally:
            self.layers = saved

    # -- installation -------------------------------------------------------------------------
    def _install(self):
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._reset, with_kwargs=True))
        for path, stream in self.stream_of.items():
            if stream not in self.trimmed_streams and stream not in self.guidance.values():
                continue
            mod = m.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            # first among the forward hooks: hooks that record layer outputs (transformers' output
            # recorders) then see the full-length states of a skip-mode stream
            self.handles.append(mod.register_forward_hook(self._make_post(path), prepend=True))
        for s in self.map.streams:
            if s.name in self.trimmed_streams:
                for layer in s.layers:
                    if layer.ffn is not None:
                        self.handles += install_packing(m, layer.ffn, s.name, lambda: self.state,
                                                        lambda: not self.model.training and self.enabled)
        self.handles += self.keys.install()
        self.handles += self.decider.attach(self)

    def remove(self):
        self.decider.close()  # modes a decider opened sit inside the key masks' modes
        self.keys.close()
        unregister_runtime(self.model, self)
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- hooks --------------------------------------------------------------------------------
    def _reset(self, module, args, kwargs):
        self.decider.close()  # a forward that raised inside an attention module left modes open
        self.keys.close()
        self.state = TrimState()
        if self.enabled and self.text_embed and self._uses_embed:
            name = self.text_embed[0]
            ids = kwargs.get(name)
            if isinstance(ids, torch.Tensor):  # pooled lazily, when a decider first asks for it
                self.state.embeds["embed:" + name] = (ids, kwargs.get("attention_mask"))
        self.decider.reset(args, kwargs)

    def _make_pre(self, path: str):
        stream = self.stream_of[path]
        spec = self.axes[path]

        def pre(module, args, kwargs):
            if not self.enabled or spec["main"] is None:
                return None
            hidden = get_arg(args, kwargs, spec["main"])
            if spec["seq_first"]:
                hidden = hidden.transpose(0, 1)
            st = self.state.streams.get(stream)
            if st is None:
                st = self.state.streams[stream] = StreamState(hidden.shape[1])
            decides = path in self.layers
            if stream in self.skip_streams:
                return self._skip_pre(module, path, spec, st, decides, hidden, args, kwargs)
            if decides:
                hidden = self._decide(path, st, hidden, skip=False)
                if spec["seq_first"]:
                    hidden = hidden.transpose(0, 1)
                args, kwargs = set_arg(args, kwargs, spec["main"], hidden)
            alive = alive_tokens(st)
            if alive is not None:
                self.state.tokens[path] = alive
                self.state.lengths[path] = st.length
            args, kwargs = self._slice_side(spec, st, args, kwargs)
            return get_kind("encoder_layer").padding_args(module, args, kwargs, st.valid)

        return pre

    def _slice_side(self, spec: dict, st: StreamState, args, kwargs):
        if st.index is not None:
            for name, dims in spec["axes"].items():
                t = get_arg(args, kwargs, name)
                if t is None:
                    continue
                for d in dims:
                    if t.shape[d] == st.length:
                        t = ops.gather_along(t, st.index, d)
                args, kwargs = set_arg(args, kwargs, name, t)
        return args, kwargs

    def _skip_pre(self, module, path: str, spec: dict, st: StreamState, decides: bool, hidden: torch.Tensor,
                  args, kwargs):
        """A layer of a skip-mode stream: it computes only the tokens still alive; its post-hook
        writes their new states back into the full sequence (relaxed decisions: blends them)."""
        if decides:
            st.valid, st.index = st.alive, None
            self._decide(path, st, hidden, skip=True)
            if st.index is not None:
                st.alive = ops.scatter_tokens(st.valid.unsqueeze(-1), st.index, st.valid, st.length)[..., 0]
            st.index, st.valid = None, None
        if st.mask is not None:  # relaxed decisions
            st.pending = hidden
            self.state.tokens[path], self.state.lengths[path] = st.mask, st.length
            return None
        if st.alive is None or bool(st.alive.all()):
            st.merged_full = None
            return None
        full, st.merged_full = (hidden if st.merged_full is None else st.merged_full), None
        small, st.index, st.valid = ops.gather_tokens(full, st.alive)
        st.pending = hidden
        self.state.tokens[path], self.state.lengths[path] = st.valid.sum(1), st.length
        if spec["seq_first"]:
            small = small.transpose(0, 1)
        args, kwargs = set_arg(args, kwargs, spec["main"], small)
        args, kwargs = self._slice_side(spec, st, args, kwargs)
        return get_kind("encoder_layer").padding_args(module, args, kwargs, st.valid)

    def _skip_post(self, path: str, st: StreamState, output):
        full, st.pending = st.pending, None
        flat, tree = tree_flatten(output)
        pos = next(i for i, v in enumerate(flat) if isinstance(v, torch.Tensor))
        out = flat[pos].transpose(0, 1) if self.axes[path]["seq_first"] else flat[pos]
        if st.mask is not None:
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

    # -- what the last forward kept -------------------------------------------------------------
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
        """Keep-logits the decider gave the scored tokens in the last training forward (flat, with
        gradient); empty after an inference forward."""
        return [z for st in self.state.streams.values() for z in st.logits]

    def key_mask(self, stream: str, st: StreamState, cross: bool = False) -> torch.Tensor | None:
        """Additive mask ``[B, 1, 1, Lk]`` for attention whose keys are ``stream``'s tokens (None: none)."""
        return self.keys.mask(stream, st, cross)

    # -- decisions ------------------------------------------------------------------------------
    def _global(self, stream: str | None) -> torch.Tensor | None:
        if stream is None:
            return None
        if stream.startswith("embed:"):
            return self._text_guidance(stream)
        st = self.state.streams.get(stream)
        if st is None or st.last is None:
            return None
        return pool_states(st, st.last)

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

    def _guide(self, stream: str, hidden: torch.Tensor) -> torch.Tensor | None:
        g = self._global(self.guidance.get(stream))
        return None if g is not None and g.shape[0] != hidden.shape[0] else g

    def _decide(self, path: str, st: StreamState, hidden: torch.Tensor, skip: bool) -> torch.Tensor:
        stream = self.stream_of[path]
        step = TokenStep(stream, path, self.layers[path], hidden, st.length, st.index, st.valid, st.mask,
                         self.special.get(stream, [0]), self.model.training, self.threshold, self.tau, skip,
                         pool=lambda: pool_states(st, hidden), guide=lambda: self._guide(stream, hidden))
        decision = self.decider.decide(step)
        if skip and decision is not None and decision.merged is not None:
            d = hidden.shape[-1]
            st.merged_full = hidden.scatter(1, decision.index.unsqueeze(-1).expand(-1, -1, d), decision.merged)
        return apply_decision(st, hidden, decision)

