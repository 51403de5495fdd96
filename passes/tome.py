"""``tome.merge``: merge similar tokens by bipartite soft matching (ToMe-like), as a merging decider.

Before each trimmed layer the prunable tokens are split alternately into sets A and B, each A token
is matched to its most similar B token (cosine of the hidden states entering the layer), and the
best-matched A tokens are merged into their partners with a size-weighted average, in as many rounds
as the schedule of :mod:`trimkit.passes.baselines` needs. Sizes are tracked per row (they sum to the
original length); with ``proportional = True`` every attention whose keys are the stream's tokens
gets ``log(size)`` added to its logits. Special tokens are never merged; padding tokens only merge
with padding tokens. Side arguments follow the surviving positions, in their original order.

In skip mode the decider merges among the alive tokens; the layer computes from the merged states of
the survivors, and merged-away tokens are carried through like pruned ones (bridges still read them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trimkit import ops
from trimkit.locate import ModelMap
from trimkit.passes.base import PassContext, PassResult
from trimkit.passes.baselines import BaselineConfig, ScheduleDecider, apply_baseline
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenDecision, TokenStep

__all__ = ["ToMeMergeConfig", "ToMeDecider", "bipartite_merge"]


@dataclass(frozen=True)
class ToMeMergeConfig(BaselineConfig):
    """Merge similar tokens by bipartite soft matching (ToMe-like); proportional: add log(size) to keys."""

    name: ClassVar[str] = "tome.merge"
    proportional: bool = True


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, prunable: torch.Tensor, merge: int,
                    group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on ``x`` ``[B, L, D]`` with token sizes ``size`` ``[B, L]``.

    The prunable tokens (bool ``[B, L]``, the same count ``n`` in every row) are split alternately
    into A (even) and B (odd); the ``merge`` A tokens (at most ``ceil(n / 2)``) whose best cosine
    match in B is highest are folded into it with a size-weighted average. Tokens of different
    ``group`` (e.g. padding vs real) never match unless a row has nothing else left. Returns
    ``(x', size', keep)``: merged states and sizes at full length, and the bool ``[B, L]`` mask of
    the surviving tokens (``merge`` fewer per row).
    """
    b, length, d = x.shape
    n = int(prunable[0].sum())
    if bool((prunable.sum(1) != n).any()):
        raise ValueError(f"every row needs the same number of prunable tokens, got {prunable.sum(1).tolist()}")
    if not 0 <= merge <= (n + 1) // 2 or (merge and n < 2):
        raise ValueError(f"cannot merge {merge} of {n} prunable tokens in one round")
    keep = torch.ones(b, length, dtype=torch.bool, device=x.device)
    if merge == 0:
        return x, size, keep
    order = torch.sort((~prunable).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    with torch.no_grad():
        metric = F.normalize(x.detach().float(), dim=-1)
        scores = ops.gather_along(metric, a_idx, 1) @ ops.gather_along(metric, b_idx, 1).transpose(1, 2)
        if group is not None:
            ga, gb = torch.gather(group, 1, a_idx), torch.gather(group, 1, b_idx)
            scores = scores.masked_fill(ga[:, :, None] != gb[:, None, :], float("-inf"))
        best, partner = scores.max(-1)
        src = best.argsort(dim=1, descending=True, stable=True)[:, :merge]
    src_pos = torch.gather(a_idx, 1, src)
    dst_pos = torch.gather(b_idx, 1, torch.gather(partner, 1, src))
    weighted = x * size.unsqueeze(-1).to(x.dtype)
    weighted = weighted.scatter_add(1, dst_pos.unsqueeze(-1).expand(-1, -1, d), ops.gather_along(weighted, src_pos, 1))
    new_size = size.scatter_add(1, dst_pos, torch.gather(size, 1, src_pos))
    touched = torch.zeros_like(keep).scatter(1, dst_pos, True)
    merged = torch.where(touched.unsqueeze(-1), weighted / new_size.unsqueeze(-1).to(x.dtype), x)
    return merged, new_size, keep.scatter(1, src_pos, False)


class ToMeDecider(ScheduleDecider):
    """Merges ``current - count`` tokens per layer; tracks each stream's token sizes per forward."""

    def __init__(self, *args, proportional: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.proportional = proportional
        self._sizes: dict[str, torch.Tensor] = {}

    def reset(self, args: tuple, kwargs: dict) -> None:
        super().reset(args, kwargs)
        self._sizes = {}

    def sizes(self) -> dict[str, torch.Tensor]:
        """Token sizes ``[B, L]`` of each merged stream after the last forward."""
        return dict(self._sizes)

    def key_bias(self, stream: str) -> torch.Tensor | None:
        size = self._sizes.get(stream)
        if not self.proportional or size is None:
            return None
        return size.log()[:, None, None, :]

    def choose(self, step: TokenStep, special: torch.Tensor, pads: torch.Tensor | None, count: int,
               current: int) -> TokenDecision:
        if step.skip:
            merged, index = self._merge_alive(step.stream, step.hidden, step.valid, special, pads, current - count)
        else:
            merged, index = self._merge(step.stream, step.hidden, special, pads, current - count)
        return TokenDecision(merged=merged, index=index)

    def _merge(self, stream: str, hidden: torch.Tensor, special: torch.Tensor, pads: torch.Tensor | None,
               merge: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, length = hidden.shape[:2]
        size = self._sizes.get(stream)
        if size is None or size.shape != (b, length):
            size = torch.ones(b, length, device=hidden.device)
        index = torch.arange(length, device=hidden.device).expand(b, -1)
        prunable = ~special
        while merge > 0:
            n = int(prunable[0].sum())
            step = min(merge, (n + 1) // 2)
            hidden, size, keep = bipartite_merge(hidden, size, prunable, step, group=pads)
            hidden, idx, _ = ops.gather_tokens(hidden, keep)
            size, prunable, index = (torch.gather(t, 1, idx) for t in (size, prunable, index))
            pads = torch.gather(pads, 1, idx) if pads is not None else None
            merge -= step
        self._sizes[stream] = size
        return hidden, index

    def _merge_alive(self, stream: str, hidden: torch.Tensor, alive: torch.Tensor | None, special: torch.Tensor,
                     pads: torch.Tensor | None, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Skip mode: merge among the alive tokens of the full-length ``hidden``; returns the survivors'
        merged states and their positions in the full sequence."""
        if alive is None:
            alive = torch.ones(special.shape, dtype=torch.bool, device=hidden.device)
        small, at, _ = ops.gather_tokens(hidden, alive)
        pads = torch.gather(pads, 1, at) if pads is not None else None
        merged, index = self._merge(stream, small, torch.gather(special, 1, at), pads, merge)
        return merged, torch.gather(at, 1, index)


@register_pass(ToMeMergeConfig)
def tome_merge(model: nn.Module, model_map: ModelMap, config: ToMeMergeConfig, context: PassContext) -> PassResult:
    def make(*args):
        return ToMeDecider(*args, proportional=config.proportional)

    return apply_baseline(model, model_map, config, context, make, "tome")
