"""Key masks of the token runtime: hooks on every attention whose keys come from a trimmed stream."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from trimkit import ops
from trimkit.attention import AttentionMode, KeyMask, get_kind
from trimkit.runtime.args import mask_position, merge_into_mask_arg
from trimkit.runtime.streams import StreamState, alive_tokens

__all__ = ["KeyMasking"]


class KeyMasking:
    """Masks dropped and padded keys inside the attention sites of a token runtime's trimmed streams.

    In training (relaxed decisions) the attention weights are computed with the keep-weighted softmax
    under a :class:`~trimkit.attention.KeyMask` action; at inference the padding mask is merged into
    the module's own ``attention_mask`` argument where that is safe, else added by the function mode.
    """

    def __init__(self, runtime: Any):
        self.rt = runtime
        self._modes: list = []
        self.exact_only: set[str] = set()  # attention sites the training-mode keep softmax cannot reach

    def install(self) -> list:
        handles, seen = [], set()
        for site in self.rt.map.sites():
            if site.key_stream in self.rt.trimmed_streams and site.path not in seen:
                seen.add(site.path)
                mod = self.rt.model.get_submodule(site.path)
                handles.append(mod.register_forward_pre_hook(
                    self._make_pre(site.key_stream, site.path, site.kind == "cross"), with_kwargs=True))
                handles.append(mod.register_forward_hook(self._post, always_call=True))
        return handles

    def close(self) -> None:
        while self._modes:
            entry = self._modes.pop()
            if entry is not None:
                entry[0].__exit__(None, None, None)

    def _make_pre(self, key_stream: str, site_path: str, cross: bool = False):
        rt = self.rt

        def pre(module, args, kwargs):
            st = rt.state.streams.get(key_stream)
            if not rt.enabled or st is None:
                self._modes.append(None)
                return None
            if rt.record_cost or rt.model.training:
                rt.state.keys[site_path] = self._keys_alive(st, args, kwargs, cross)
                rt.state.lengths[site_path] = st.length
            mask = self.mask(key_stream, st, cross)
            if mask is None:
                self._modes.append(None)
                return None
            if rt.model.training and st.mask is not None and site_path not in self.exact_only:
                return self._enter(KeyMask(mask, keep=st.mask, site=site_path))
            if isinstance(module, nn.MultiheadAttention):  # its fast path never calls the functions
                self._modes.append(None)
                return get_kind("native_mha").key_padding_args(module, args, kwargs, mask)
            merged = merge_into_mask_arg(module, args, kwargs, mask)
            if merged is not None:  # the module's own attention_mask carries it: no function mode needed
                self._modes.append(None)
                return merged
            return self._enter(KeyMask(mask))

        return pre

    def _enter(self, action: KeyMask) -> None:
        mode = AttentionMode(action)
        mode.__enter__()
        self._modes.append((mode, action))
        return None

    def mask(self, stream: str, st: StreamState, cross: bool = False) -> torch.Tensor | None:
        """Additive mask ``[B, 1, 1, Lk]`` for attention whose keys are ``stream``'s tokens (None: none)."""
        rt = self.rt
        if rt.model.training and st.mask is not None:
            mask = ops.additive_key_mask(st.mask)
        elif st.valid is not None and not bool(st.valid.all()):
            mask = ops.padding_key_mask(st.valid)
        elif (cross and rt.decider.carried_keys_masked and st.alive is not None
              and not bool(st.alive.all())):
            mask = ops.padding_key_mask(st.alive)  # a skip stream's dropped tokens, carried along at full length
        else:
            mask = None
        bias = rt.decider.key_bias(stream)
        return mask if bias is None else ops.combine_masks(mask, bias)

    def _post(self, module, args, output):
        entry = self._modes.pop() if self._modes else None
        if entry is not None:
            mode, action = entry
            mode.__exit__(None, None, None)
            if action.warn_missed(has_mask_arg=mask_position(module) is not None):
                self.exact_only.add(action.site)
        return None

    def _keys_alive(self, st: StreamState, args, kwargs, cross: bool):
        """Keys an attention call sees: the stream's alive tokens, unless its key tensor is an
        earlier (longer) state of the stream, as when a later layer's trimming already ran."""
        alive = alive_tokens(st)
        full = torch.tensor(float(st.length))
        if not cross:
            return full if alive is None else alive
        seen = [v for v in tree_flatten((args, kwargs))[0]
                if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point()]
        if len(seen) < 2:
            return full if alive is None else alive
        key = seen[1]
        lk = key.shape[0] if _seq_first(st, key) else key.shape[1]
        now = st.mask.shape[1] if self.rt.model.training and st.mask is not None else (
            st.valid.shape[1] if st.valid is not None else st.length)
        if lk == now:
            return full if alive is None else alive
        return torch.tensor(float(lk))


def _seq_first(st: StreamState, key: torch.Tensor) -> bool:
    return st.last is not None and key.shape[0] == st.last.shape[1] and key.shape[1] == st.last.shape[0] \
        and key.shape[0] != key.shape[1]
