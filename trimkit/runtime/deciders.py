"""The decider interface: a pass says WHAT to keep, the runtime knows HOW to apply it.

A **token decider** is asked once per trimmed layer of a stream, in every forward. The runtime
hands it a :class:`TokenStep` (the states entering the layer and what is known about them) and
applies the :class:`TokenDecision` it returns: removal of the dropped tokens (with every
sequence-aligned side argument sliced, rows padded and keys masked), skip mode for streams read at
full length, packed FFNs, the relaxed masks of training. Returning ``None`` keeps every token.

A decision is one of

* ``keep``: bool ``[B, Lc]`` over the current tokens, hard (removed at once, also in training);
* ``relaxed``: ``[B, Lc]`` straight-through keep sample (training): multiplied into the stream's
  cumulative keep mask, which masks the dropped keys of later attention with a gradient;
* ``merged`` + ``index``: the survivors' new states ``[B, K, D]`` and their positions ``[B, K]``
  among the current tokens (token merging); the runtime follows those positions.

Besides :meth:`TokenDecider.decide`, a decider may override the hooks of :class:`TokenDecider`
(all optional): ``reset`` at the start of each forward, ``attach`` to add hooks of its own,
``key_bias`` to add to the logits of attention whose keys are a stream's tokens, and the
``carried_keys_masked`` flag.

:class:`ScoreDecider` covers the common case of per-token keep-logits (threshold at inference,
Gumbel-sigmoid in training); ``examples/norm_tokens.py`` is a whole pass written on it.

A **head decider** is asked once per attention site and forward with a :class:`SiteStep` (the
pooled query input) and returns a :class:`HeadDecision`: relaxed ``[B, units]`` masks in training,
the kept units of each row at inference (the runtime turns those into the index form,
:class:`trimkit.attention.HeadDecision`, that slices one attention call). It also holds each site's
saved ``active`` and ``layout`` switches.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from trimkit import ops

__all__ = ["TokenStep", "TokenDecision", "TokenDecider", "ScoreDecider", "threshold_keep", "relaxed_decision",
           "SiteStep", "HeadDecision", "HeadDecider"]


@dataclasses.dataclass
class TokenStep:
    """What a token decider sees at one trimmed layer.

    ``hidden`` is batch-first ``[B, Lc, D]``; ``index`` ``[B, Lc]`` the original position of each
    current token (None: the tokens are in their original order, ``Lc == length``); ``valid`` the
    real tokens (False: padding of a batch whose rows keep different counts; in skip mode: the
    tokens still alive); ``mask`` the cumulative relaxed keep mask of training (None outside it).
    ``special`` are the configured special positions (negative: from the end), never to drop.
    ``candidates`` ``[B, Lc]`` (None: every token) are the only tokens that may be dropped: a
    decoder's image tokens, while its text tokens always stay.
    """

    stream: str
    layer: str
    ordinal: int  # 1, 2, ... among the stream's trimmed layers
    hidden: torch.Tensor
    length: int
    index: torch.Tensor | None
    valid: torch.Tensor | None
    mask: torch.Tensor | None
    special: list[int]
    training: bool
    threshold: float
    tau: float
    skip: bool
    pool: Callable[[], torch.Tensor] = dataclasses.field(repr=False, default=None)
    guide: Callable[[], torch.Tensor | None] = dataclasses.field(repr=False, default=None)
    candidates: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        """``[B, Lc]`` original positions of the current tokens."""
        if self.index is not None:
            return self.index
        b, length = self.hidden.shape[:2]
        return torch.arange(length, device=self.hidden.device).expand(b, -1)

    def pooled(self) -> torch.Tensor:
        """The stream's global vector ``[B, D]``: mean of the tokens really there."""
        return self.pool()

    def guidance(self) -> torch.Tensor | None:
        """The guiding modality's global vector ``[B, D']`` at this depth (None: none)."""
        return self.guide()


@dataclasses.dataclass
class TokenDecision:
    """What to keep at one layer (see the module docstring); set exactly one kind."""

    keep: torch.Tensor | None = None
    relaxed: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    index: torch.Tensor | None = None
    probs: torch.Tensor | None = None  # keep probabilities [B, Lc] (relaxed decisions, for reports)
    logits: torch.Tensor | None = None  # flat keep-logits of the scored tokens (relaxed, for penalties)


class TokenDecider:
    """Base of token deciders: :meth:`decide` is required, the rest are optional hooks."""

    #: mask a skip-mode stream's carried (pruned) tokens as keys of other streams' cross-attention
    carried_keys_masked: bool = True

    def decide(self, step: TokenStep) -> TokenDecision | None:
        raise NotImplementedError

    def reset(self, args: tuple, kwargs: dict) -> None:
        """Called at the start of every forward of the model with its arguments."""

    def attach(self, runtime: Any) -> list:
        """Install hooks of the decider's own (returns their handles); called once by the runtime."""
        return []

    def key_bias(self, stream: str) -> torch.Tensor | None:
        """Additive ``[B, 1, 1, Lk]`` bias for attention whose keys are ``stream``'s tokens."""
        return None

    def close(self) -> None:
        """Called when a forward starts or the runtime is removed: close anything left open."""


@dataclasses.dataclass
class SiteStep:
    """What a head decider sees at one attention site: ``pooled`` ``[B, D]`` query-side global vector."""

    site: str
    pooled: torch.Tensor
    units: int  # decision units: heads, or key/value groups
    min_units: int  # units every row keeps
    training: bool
    threshold: float
    tau: float


@dataclasses.dataclass
class HeadDecision:
    """``mask`` ``[B, units]`` relaxed (training), or ``rows``: kept units per row (None: all)."""

    mask: torch.Tensor | None = None
    rows: list[tuple[int, ...]] | None = None
    logits: torch.Tensor | None = None  # keep-logits (training, for penalties)
    dtype: torch.dtype | None = None  # of the masks reported for the rows


@runtime_checkable
class HeadDecider(Protocol):
    """Decides the heads of attention sites; ``active``/``layout`` are per-site saved switches."""

    def decide(self, step: SiteStep) -> HeadDecision: ...

    def active(self, site: str) -> torch.Tensor: ...

    def layout(self, site: str) -> torch.Tensor: ...


class ScoreDecider(TokenDecider):
    """A token decider from keep-logits: at inference a token is kept when ``sigmoid(logit)`` is above
    the threshold (``threshold = 0`` keeps all without scoring); in training the decision is a
    straight-through Gumbel-sigmoid sample. Subclasses implement :meth:`logits`."""

    def logits(self, step: TokenStep, g_self: torch.Tensor, g_other: torch.Tensor | None,
               fast: bool) -> torch.Tensor:
        """Keep-logits ``[B, Lc]`` of the current tokens (``fast``: inference, no gradient needed)."""
        raise NotImplementedError

    def decide(self, step: TokenStep) -> TokenDecision | None:
        g_self, g_other = step.pooled(), step.guidance()
        if not step.training:
            if step.threshold <= 0:  # keeps everything: the scores cannot change the result
                return None
            return TokenDecision(keep=threshold_keep(step, self.logits(step, g_self, g_other, True)))
        return relaxed_decision(step, self.logits(step, g_self, g_other, False))


def threshold_keep(step: TokenStep, logits: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Lc]``: tokens whose keep probability is above ``step.threshold``, the special ones,
    not the padding; a row that would keep nothing keeps its most likely token."""
    b, length = logits.shape
    if step.threshold >= 1:
        keep = torch.zeros(b, length, dtype=torch.bool, device=logits.device)
    else:
        keep = logits > math.log(step.threshold / (1 - step.threshold))
    specials = sorted({p % step.length for p in step.special})
    if step.index is None:
        keep[:, specials] = True
    else:
        keep |= torch.isin(step.index, torch.tensor(specials, device=logits.device))
    if step.candidates is not None:
        keep |= ~step.candidates
    if step.valid is not None:
        keep &= step.valid
    counts = keep.sum(1)
    if int(counts.min()) == 0:
        empty = counts == 0
        best = logits.masked_fill(~step.valid, float("-inf")) if step.valid is not None else logits
        keep[empty] |= F.one_hot(best[empty].argmax(1), length).bool()
    return keep


def relaxed_decision(step: TokenStep, logits: torch.Tensor) -> TokenDecision:
    """Straight-through Gumbel-sigmoid keep sample of ``logits`` ``[B, Lc]``; special tokens kept."""
    b, length = logits.shape
    special = torch.zeros(b, length, dtype=torch.bool, device=logits.device)
    positions = step.index if step.index is not None else torch.arange(length, device=logits.device).expand(b, -1)
    for p in step.special:
        special |= positions == (p % step.length)
    if step.candidates is not None:
        special |= ~step.candidates
    sample = ops.gumbel_sigmoid(logits, tau=step.tau)
    sample = torch.where(special, torch.ones_like(sample), sample)
    prev = step.mask if step.mask is not None else torch.ones_like(sample)
    return TokenDecision(relaxed=sample, probs=torch.sigmoid(logits).masked_fill(special, 1.0) * prev,
                         logits=logits[~special])
