"""Running the feed-forward block of a padded batch on the kept tokens only (packed across rows)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trimkit.runtime.streams import TrimState

__all__ = ["install_packing"]


def install_packing(model: nn.Module, ffn, stream: str, state: Callable[[], TrimState],
                    active: Callable[[], bool]) -> list:
    """Hooks on the FFN's input and output projections (handles returned): while a stream's rows are
    padded in eval mode, the input projections read ``[N, D]`` (the real tokens of every row) instead
    of ``[B, Lmax, D]`` and the output projection scatters back. ``state`` gives the runtime's
    per-forward state, ``active`` whether packing applies now."""
    try:
        fc_in = [model.get_submodule(p) for p in ffn.fc_in]
        fc_out = model.get_submodule(ffn.fc_out)
    except AttributeError:
        return []
    if not fc_in or not all(isinstance(m, nn.Linear) for m in (*fc_in, fc_out)):
        return []
    first = fc_in[0]

    def start(x: torch.Tensor, trim: TrimState) -> None:
        trim.packed.pop(ffn.path, None)
        st = trim.streams.get(stream)
        if st is None or st.valid is None or x.dim() != 3 or bool(st.valid.all()):
            return
        if model.get_submodule(ffn.fc_out) is not fc_out:  # replaced by a later pass
            return
        if tuple(x.shape[:2]) == tuple(st.valid.shape):
            valid = st.valid
        elif tuple(x.shape[:2]) == tuple(st.valid.shape[::-1]):
            valid = st.valid.transpose(0, 1)
        else:
            return
        index = valid.reshape(-1).nonzero().squeeze(1)
        trim.packed[ffn.path] = (index, tuple(x.shape[:2]))

    def pack(module, args):
        if not active() or not args or not isinstance(args[0], torch.Tensor):
            return None
        x, trim = args[0], state()
        if module is first:
            start(x, trim)
        got = trim.packed.get(ffn.path)
        if got is None or x.dim() != 3 or tuple(x.shape[:2]) != got[1]:
            return None
        return (x.reshape(-1, x.shape[-1]).index_select(0, got[0]), *args[1:])

    def unpack(module, args, output):
        got = state().packed.pop(ffn.path, None)
        if got is None or not isinstance(output, torch.Tensor) or output.dim() != 2:
            return None
        index, lead = got
        full = output.new_zeros(lead[0] * lead[1], output.shape[-1]).index_copy_(0, index, output)
        return full.view(*lead, output.shape[-1])

    handles = [m.register_forward_pre_hook(pack) for m in fc_in]
    handles.append(fc_out.register_forward_hook(unpack))
    return handles
