"""What an :class:`~trimkit.attention.AttentionMode` does to the attention calls it sees.

An *action* sees every call of a registered kind's functions (see :mod:`trimkit.attention.registry`)
and the calls of the torch functions in its own ``functions`` (e.g. ``F.linear`` and reshapes for head
slicing). It has one method, ``apply(kind, func, args, kwargs, proceed)``, returning the call's result
(``kind``: the registered kind of ``func``, None for its own functions). ``proceed(args, kwargs)`` runs
the call through the actions after this one and finally the function itself; an action may change the
arguments, the result, or compute the call itself without proceeding.

For an attention call an action asks the kind (``kind.mask_keys`` / ``kind.slice_heads`` /
``kind.capture_probs``), so a new kind brings its own implementation of each action.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from trimkit import ops
from trimkit.attention.registry import AttentionKind

__all__ = ["Action", "KeyMask", "HeadDecision", "HeadSlice", "CaptureProbs"]

Proceed = Callable[[tuple, dict], Any]


class Action:
    """Base of the actions: sees the attention calls, leaves them unchanged."""

    functions: ClassVar[frozenset] = frozenset()

    def apply(self, kind: AttentionKind | None, func, args: tuple, kwargs: dict, proceed: Proceed):
        return proceed(args, kwargs)


class KeyMask(Action):
    """Masks keys of the attention calls whose key length matches.

    Without ``keep`` (inference) it adds the additive mask ``mask [B, 1, 1, Lk]`` to the scores. With
    ``keep`` (training: the straight-through 0/1 keep mask ``[B, Lk]``) the weights are computed with
    :func:`trimkit.ops.keep_softmax`, so dropped keys get exactly no weight and still a gradient; calls
    that cannot be written out that way get the additive mask. ``hits`` counts the calls it changed.
    """

    def __init__(self, mask: Tensor, keep: Tensor | None = None, site: str = ""):
        self.mask, self.keep, self.site = mask, keep, site
        self.hits = 0

    def apply(self, kind, func, args, kwargs, proceed):
        return kind.mask_keys(self, func, args, kwargs, proceed)

    def fit(self, shape: tuple, dtype: torch.dtype, m: Tensor | None = None) -> Tensor | None:
        """``m`` (default: the additive mask ``[B, 1, 1, Lk]``) shaped to broadcast over scores of
        ``shape`` (``[B, H, Lq, Lk]`` or ``[B*H, Lq, Lk]``), or None when it does not fit."""
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

    def fit_keep(self, shape: tuple, dtype: torch.dtype) -> Tensor | None:
        """The keep mask shaped like :meth:`fit`'s result, or None (no keep mask, or it does not fit)."""
        return None if self.keep is None else self.fit(shape, dtype, self.keep[:, None, None, :])

    @property
    def missed(self) -> bool:
        """A training mask that reached no call: the module computes its weights some other way."""
        return self.keep is not None and self.hits == 0

    def warn_missed(self, has_mask_arg: bool, stacklevel: int = 3) -> bool:
        """Warn once for this call when :attr:`missed`; ``has_mask_arg``: the module takes an
        ``attention_mask`` argument (later steps can mask exactly through it). Returns :attr:`missed`."""
        if not self.missed:
            return False
        later = ("later steps mask them exactly through its attention_mask argument, without a gradient to "
                 "them" if has_mask_arg else
                 "it has no attention_mask argument either, so they stay visible in training")
        warnings.warn(f"trimkit: the attention at {self.site!r} computes its weights without a softmax, "
                      "scaled_dot_product_attention or multi_head_attention_forward call, so this training "
                      f"step did not mask its dropped keys; {later}", RuntimeWarning, stacklevel=stacklevel)
        return True


@dataclasses.dataclass
class HeadDecision:
    """Which heads one attention call keeps.

    ``heads``: decision units (heads, or key/value groups under grouped-query attention); ``head_dim``:
    output-projection features per unit. Either ``mask [B, units]`` (every head computed, its output
    scaled: training and reference runs) or ``idx [B, Hk]`` kept units (0 where padded) with ``valid
    [B, Hk]``, and ``uniform [Hk]`` when every row keeps the same units.
    """

    heads: int
    head_dim: int
    mask: Tensor | None = None
    idx: Tensor | None = None
    valid: Tensor | None = None
    uniform: Tensor | None = None

    @property
    def kept(self) -> int:
        return self.heads if self.idx is None else self.idx.shape[1]


_VIEWS = (torch.Tensor.view, torch.Tensor.reshape)


class HeadSlice(Action):
    """Computes only the heads ``decision`` keeps inside one attention module call.

    ``inputs``: ``[(weight, bias, blocks, unit)]`` of the q/k/v projections (``blocks = 3`` for a fused
    one, ``unit`` features per decision unit); ``out``: ``(weight, bias)`` of the output projection.
    ``F.linear`` on those weights computes the kept rows / columns only, reshapes that no longer fit are
    repaired to the kept head count, and ``F.multi_head_attention_forward`` (``mha=True``) runs with the
    kept heads. ``decision`` is a :class:`HeadDecision` or any object with its attributes.
    """

    functions = frozenset({F.linear, torch.reshape, *_VIEWS})

    def __init__(self, decision, *, heads: int, head_dim: int, group: int = 1, inputs=(), out=None,
                 mha: bool = False):
        self.decision, self.heads, self.head_dim, self.group = decision, heads, head_dim, group
        self.inputs, self.out, self.mha = list(inputs), out, mha
        self.ins = {id(w): (w, b, blocks, unit) for w, b, blocks, unit in self.inputs}
        self.out_id = id(out[0]) if out is not None else None

    @classmethod
    def for_site(cls, plan, decision) -> "HeadSlice":
        """From a site plan: any object with ``heads``, ``head_dim``, ``group``, ``inputs``, ``out``, ``mha``."""
        return cls(decision, heads=plan.heads, head_dim=plan.head_dim, group=plan.group, inputs=plan.inputs,
                   out=plan.out, mha=plan.mha)

    def apply(self, kind, func, args, kwargs, proceed):
        if kind is not None:
            return kind.slice_heads(self, func, args, kwargs, proceed)
        if func is F.linear:
            return self._linear(args, kwargs, proceed)
        d = self.decision
        if d.idx is None or len(args) < 2:
            return proceed(args, kwargs)
        if func is torch.reshape:
            shape = args[1]
        elif isinstance(args[1], torch.dtype):
            return proceed(args, kwargs)
        else:
            shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if not all(isinstance(s, int) for s in shape):
                return proceed(args, kwargs)
        new = ops.repair_head_shape(tuple(shape), args[0].numel(), self.heads, self.head_dim,
                                    d.kept * self.group)
        return proceed(args, kwargs) if new is None else proceed((args[0], new), {})

    def _linear(self, args, kwargs, proceed):
        d = self.decision
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        x = kwargs.get("input", args[0] if args else None)
        if id(w) == self.out_id and w is self.out[0]:
            bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
            return ops.project_heads_out(x, w, bias, unit=d.head_dim, units=d.heads, idx=d.idx, valid=d.valid,
                                         uniform=d.uniform, mask=d.mask)
        hit = self.ins.get(id(w))
        if hit is not None and hit[0] is w and d.idx is not None:
            bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
            return ops.project_heads_in(x, w, bias, blocks=hit[2], unit=hit[3], units=d.heads, idx=d.idx,
                                        valid=d.valid, uniform=d.uniform)
        return proceed(args, kwargs)


class CaptureProbs(Action):
    """Records the attention probabilities of the first self-attention call over ``length`` keys: the
    row of the query at ``cls_index`` (int, or ``[B]`` per row; None: the mean over every query), mean
    over heads, as float ``[B, Lk]`` passed to ``record``. ``batch`` is the batch size, used to read
    ``[B*H, L, L]`` scores. ``done`` turns True once recorded."""

    def __init__(self, length: int, cls_index: Tensor | int | None, batch: int, record: Callable[[Tensor], None]):
        self.length, self.cls, self.batch, self.record = length, cls_index, batch, record
        self.done = False

    def apply(self, kind, func, args, kwargs, proceed):
        if self.done:
            return proceed(args, kwargs)
        return kind.capture_probs(self, func, args, kwargs, proceed)

    def cls_rows(self, b: int, device) -> Tensor | None:
        """``[B]`` query positions whose rows are recorded (None: every query)."""
        if self.cls is None:
            return None
        if isinstance(self.cls, Tensor):
            return self.cls.to(device)
        return torch.full((b,), int(self.cls), dtype=torch.long, device=device)

    def rows(self, probs: Tensor) -> Tensor:
        """``probs [B, H, Lq, Lk]`` -> ``[B, Lk]``: the recorded query's row (or every query's), mean over heads."""
        if self.cls is None:
            return probs.mean(dim=(1, 2))
        b = probs.shape[0]
        return probs[torch.arange(b, device=probs.device), :, self.cls_rows(b, probs.device)].mean(1)

    def save(self, rows: Tensor) -> None:
        self.record(rows.detach().float())
        self.done = True
