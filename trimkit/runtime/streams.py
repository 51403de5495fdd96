"""Per-forward state of the token runtime, and the small pure functions that read it."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["StreamState", "TrimState", "pool_states", "alive_tokens"]


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
    merged_full: torch.Tensor | None = None  # skip mode: full-length states with a merge written in


class TrimState:
    def __init__(self):
        self.streams: dict[str, StreamState] = {}
        self.embeds: dict[str, Any] = {}
        self.tokens: dict[str, torch.Tensor] = {}  # layer path -> [B, L] soft mask (train) or [B] counts
        self.keys: dict[str, torch.Tensor] = {}  # attention path -> the same, for its keys
        self.lengths: dict[str, int] = {}  # layer or attention path -> untrimmed length of those tokens
        self.packed: dict[str, tuple] = {}  # FFN path -> (flat index of kept tokens, leading shape) while packed


def pool_states(st: StreamState, h: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` ``[B, L, D]`` over the tokens of ``st`` really there (soft mask, padding, alive)."""
    if st.mask is not None and st.mask.shape[1] == h.shape[1]:
        w = st.mask.unsqueeze(-1)
    elif st.valid is not None and st.valid.shape[1] == h.shape[1]:
        w = st.valid.unsqueeze(-1).to(h.dtype)
    elif st.alive is not None and st.alive.shape[1] == h.shape[1]:  # a skip stream between its layers
        w = st.alive.unsqueeze(-1).to(h.dtype)
    else:
        return h.mean(1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1e-6)


def alive_tokens(st: StreamState) -> torch.Tensor | None:
    """Tokens the stream computes now: the soft mask in training, per-row counts after removal."""
    if st.mask is not None:
        return st.mask
    if st.valid is not None:
        return st.valid.sum(1)
    return None
