"""Per-input attention-head trimming: the runtime that applies a head decider's decisions.

A head decider (:class:`~trimkit.runtime.deciders.HeadDecider`) decides each site's heads from the
global vector (mean over tokens) of the site's query input. Hooks on the attention module apply the
decision:

* **train**: a straight-through Gumbel mask ``[B, H]`` scales each head's output before the output
  projection (every head is still computed, the gradient reaches the trimmer); the output projection
  module gets an instance-level ``forward`` that applies the scale for the call;
* **eval**: pruned heads are *not computed*. The decision is read back once per site as Python rows
  (threshold 0 keeps everything and skips the decider). For the call of the attention module, the
  q/k/v projection modules get an instance-level ``forward`` computing the kept rows only and the
  output projection one taking the kept columns only (restored by an always-called hook). When every
  row keeps the same heads (always at batch 1) that is a plain ``F.linear`` with sliced weights, cached
  per decision and rebuilt when a weight changes; otherwise batched matrix products with per-row
  gathered weights, padded to the row maximum with zero weights, so a padded head adds nothing.

The model's own code then has to accept fewer heads. Each site has a *layout*, chosen at apply time by
:func:`~trimkit.runtime.headcheck.check_sites` (cheapest first) and stored in the decider's ``layout`` buffer, so saved models
restore it without probing:

* ``linear``: nothing else (code that reshapes with ``-1`` heads);
* ``linear+attributes``: the module's integer attributes equal to ``H`` or ``H * head_dim`` are set to
  the kept values for the call;
* ``reshape`` / ``attributes``: as the two above, and the call runs under a ``TorchFunctionMode`` that
  rewrites reshapes that would fail (``H`` next to ``head_dim`` becomes the kept count, ``H * head_dim``
  the kept width) and catches projections called as ``F.linear`` on the weights. It costs a Python
  call per torch function inside the module, so it is the fallback. ``nn.MultiheadAttention`` always
  uses it (the :class:`~trimkit.attention.HeadSlice` action computes the kept heads with sliced weights).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from trimkit import ops
from trimkit.attention import AttentionMode, HeadSlice
from trimkit.attention import HeadDecision as SliceDecision
from trimkit.runtime.control import register_runtime, runtimes, unregister_runtime
from trimkit.runtime.deciders import HeadDecider, SiteStep
from trimkit.runtime.sites import LAYOUT_ATTRS, LAYOUT_LINEAR_ATTRS, LAYOUT_RESHAPE, SitePlan
from trimkit.runtime.slicing import (decision_from_rows, keep_tensor, linear_rows, linear_rows_out, linear_scaled,
                                     restore_forwards, row_index, rows_in, rows_out, set_forwards, stamp)

__all__ = ["HeadRuntime", "SlicedForwards", "relaxed_heads"]


def relaxed_heads(logits: torch.Tensor, tau: float, k: int) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid head mask ``[B, units]`` in which the ``k`` best units of each row
    count as kept (value 1 forward, the sample's gradient backward)."""
    mask = ops.gumbel_sigmoid(logits, tau=tau)
    if k:
        top = torch.zeros_like(mask).scatter(1, logits.topk(k, dim=1).indices, 1.0)
        mask = mask + top * (1.0 - mask.detach())
    return mask


def _main_input(args: tuple, kwargs: dict, width: int) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == width and v.is_floating_point():
            return v
    return None


class SlicedForwards:
    """Instance-level ``forward`` replacements of a site's projections that compute the kept units only.

    ``cache_budget``: sliced projection weights are kept for decisions seen before (when no gradient
    is recorded), up to this many times a site's own projection weights (0 turns the cache off).
    """

    def __init__(self, cache_budget: float = 2.0):
        self.cache_budget = cache_budget
        self._cache: dict[str, dict] = {}
        self._stamps: dict[str, tuple] = {}

    def clear(self) -> None:
        self._cache.clear()

    def _site_cache(self, plan: SitePlan) -> dict | None:
        if self.cache_budget <= 0 or torch.is_grad_enabled():
            return None
        key = (stamp(plan), torch.is_inference_mode_enabled())
        if self._stamps.get(plan.path) != key:
            self._stamps[plan.path] = key
            self._cache[plan.path] = {}
        return self._cache[plan.path]

    def uniform(self, plan: SitePlan, key: tuple[int, ...], device) -> tuple[list, SliceDecision]:
        """(module, forward) pairs computing the units ``key`` only, and the matching decision."""
        cache = self._site_cache(plan)
        if cache is not None:
            hit = cache.pop(key, None)
            if hit is not None:
                cache[key] = hit  # most recently used last
                return hit[0], hit[1]
        idx = torch.tensor(key, dtype=torch.long, device=device)
        pairs, size = [], 0
        for m, blocks, unit in plan.in_mods:
            w, b = ops.slice_head_rows(m.weight, m.bias, idx, unit, blocks)
            pairs.append((m, functools.partial(F.linear, weight=w, bias=b)))
            size += w.numel() + (0 if b is None else b.numel())
        o = plan.out_mod
        w = ops.slice_head_cols(o.weight, idx, plan.head_dim * plan.group)
        pairs.append((o, functools.partial(F.linear, weight=w, bias=o.bias)))
        size += w.numel()
        d = SliceDecision(plan.units, plan.head_dim * plan.group, idx=idx[None],
                     valid=torch.ones(1, len(key), dtype=torch.bool, device=device), uniform=idx)
        if cache is not None:
            budget = self.cache_budget * sum(t.numel() for m in [m for m, _, _ in plan.in_mods] + [o]
                                             for t in (m.weight, m.bias) if t is not None)
            used = sum(e[2] for e in cache.values())
            while cache and used + size > budget:
                used -= cache.pop(next(iter(cache)))[2]
            if size <= budget:
                cache[key] = (pairs, d, size)
        return pairs, d

    def union(self, plan: SitePlan, rows: list[tuple[int, ...]], device) -> tuple[list, SliceDecision]:
        """Rows that keep different heads: compute the union of their heads with plain sliced
        projections and zero, per row, the outputs of the heads that row dropped before the output
        projection (exactly what leaving them out does; no per-row weight copies)."""
        union = tuple(sorted(set().union(*rows)))
        pairs, d = self.uniform(plan, union, device)
        keep = [set(row) for row in rows]
        scale = torch.tensor([[1.0 if u in k else 0.0 for u in union] for k in keep], device=device)
        scale = scale.repeat_interleave(plan.head_dim * plan.group, dim=1)
        o, out = pairs[-1]
        pairs = pairs[:-1] + [(o, functools.partial(linear_scaled, scale=scale, weight=out.keywords["weight"],
                                                     bias=out.keywords["bias"]))]
        d = dataclasses.replace(d, idx=d.uniform.expand(len(rows), -1), valid=d.valid.expand(len(rows), -1))
        return pairs, d

    @staticmethod
    def per_row(plan: SitePlan, rows: list[tuple[int, ...]], device) -> tuple[list, SliceDecision]:
        """Each row's own heads, with per-row gathered weights (batched matrix products)."""
        idx, valid = row_index(rows, device)
        padded = valid if any(len(r) < idx.shape[1] for r in rows) else None
        pairs = []
        for m, blocks, unit in plan.in_mods:
            w, b = rows_in(m.weight, m.bias, blocks, unit, idx, padded)
            pairs.append((m, functools.partial(linear_rows, weight=w, bias=b)))
        o = plan.out_mod
        w = rows_out(o.weight, plan.head_dim * plan.group, idx, padded)
        pairs.append((o, functools.partial(linear_rows_out, weight=w, bias=o.bias)))
        return pairs, SliceDecision(plan.units, plan.head_dim * plan.group, idx=idx, valid=valid)


def _close(entry) -> None:
    mode, saved, saved_fw = entry
    try:
        for m, name, value in saved:
            setattr(m, name, value)
        restore_forwards(saved_fw)
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)


def _enter(plan: SitePlan, decision: SliceDecision) -> AttentionMode:
    """The attention mode that applies ``decision`` inside the site's attention call, entered."""
    mode = AttentionMode(HeadSlice.for_site(plan, decision))
    mode.__enter__()
    return mode


class HeadRuntime:
    """Head trimming hooks on the attention sites of ``plans``; ``remove()`` undoes everything.

    ``decider`` decides each site's units (:class:`~trimkit.runtime.deciders.HeadDecider`) and holds
    the sites' saved ``active`` and ``layout`` switches. ``forced`` ({site path: bool ``[B, H]``})
    overrides decisions and ``reference=True`` applies eval decisions as masks instead of removing
    heads: both exist for checks (see :func:`~trimkit.runtime.headcheck.check_sites`).
    ``batched``: rows keeping different heads run as the "union" (sliced projections + per-row zeroing)
    or per "rows" (batched matrix products).
    """

    def __init__(self, model: nn.Module, plans: dict[str, SitePlan], decider: HeadDecider, *,
                 threshold: float = 0.5, tau: float = 1.0, min_heads: int = 1, cache_budget: float = 2.0,
                 batched: str = "union"):
        self.model, self.plans, self.decider = model, plans, decider
        self.batched = batched
        self.threshold, self.tau, self.min_heads = threshold, tau, min_heads
        self.forwards = SlicedForwards(cache_budget)
        self.enabled = True
        self.forced: dict[str, torch.Tensor] | None = None
        self.reference = False
        self.only: set[str] | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._kept: dict[str, torch.Tensor] = {}
        self._rows: dict[str, tuple] = {}  # eval decisions not yet turned into tensors
        self._logits: dict[str, torch.Tensor] = {}  # keep-logits of the last training forward
        self._open: list = []
        self.handles: list = [model.register_forward_pre_hook(self._reset)]
        for path in plans:
            mod = model.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._make_post(), always_call=True))
        register_runtime(model, self)

    @property
    def cache_budget(self) -> float:
        return self.forwards.cache_budget

    @cache_budget.setter
    def cache_budget(self, value: float) -> None:
        self.forwards.cache_budget = value

    # -- control protocol -------------------------------------------------------------------------
    def remove(self) -> None:
        self._close_all()
        unregister_runtime(self.model, self)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.forwards.clear()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{site: ``[B, units]``} decisions of the last forward (float; relaxed masks in training)."""
        self._materialise()
        return self._masks

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        self._materialise()
        return self._kept

    def stats(self) -> dict:
        return {"heads": {p: {"heads": self.plans[p].heads, "kept": float(k.float().mean()) * self.plans[p].group}
                          for p, k in self.kept.items()}}

    def cost_inputs(self) -> dict:
        return {"heads": {p: (m.repeat_interleave(self.plans[p].group, dim=1) if self.plans[p].group > 1 else m)
                          for p, m in self.masks.items()}}

    def train_logits(self) -> list[torch.Tensor]:
        """Keep-logits the decider gave the heads in the last training forward (flat, with gradient)."""
        return [z.reshape(-1) for z in self._logits.values()]

    def active_sites(self) -> list[str]:
        return [p for p in self.plans if bool(self.decider.active(p))]

    # -- decisions ------------------------------------------------------------------------------------
    def _materialise(self) -> None:
        for path, (rows, batch, units, device, dtype) in self._rows.items():
            keep = keep_tensor(rows, batch, units, device)
            self._masks[path] = keep.to(dtype)
            self._kept[path] = keep.sum(1)
        self._rows.clear()

    def _step(self, plan: SitePlan, x: torch.Tensor, training: bool) -> SiteStep:
        min_units = min(-(-max(self.min_heads, 0) // plan.group), plan.units)
        return SiteStep(plan.path, self._pool(plan, x), plan.units, min_units, training, self.threshold, self.tau)

    def _train_mask(self, plan: SitePlan, x: torch.Tensor) -> torch.Tensor:
        d = self.decider.decide(self._step(plan, x, True))
        self._masks[plan.path] = d.mask
        self._kept[plan.path] = d.mask.detach().sum(1)
        self._logits[plan.path] = d.logits
        return d.mask

    def _eval_rows(self, plan: SitePlan, x: torch.Tensor, forced: torch.Tensor | None) -> list[tuple[int, ...]] | None:
        """Kept units per row, or None when every row keeps every unit; recorded for stats and costs."""
        if forced is not None:
            rows, dtype = [tuple(i for i, v in enumerate(r) if v) for r in forced.tolist()], x.dtype
        elif self.threshold <= 0:  # keeps everything whatever the decider says: not asked
            rows, dtype = None, x.dtype
        else:
            d = self.decider.decide(self._step(plan, x, False))
            rows, dtype = d.rows, d.dtype or x.dtype
        if rows is not None and all(len(r) == plan.units for r in rows):
            rows = None
        self._rows[plan.path] = (rows, x.shape[0], plan.units, x.device, dtype)
        return rows

    def _pool(self, plan: SitePlan, x: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens that are really there (padding of a token runtime excluded)."""
        for rt in runtimes(self.model):
            st = getattr(getattr(rt, "state", None), "streams", {}).get(plan.query_stream)
            if st is None:
                continue
            w = None
            if self.model.training and getattr(st, "mask", None) is not None and st.mask.shape == x.shape[:2]:
                w = st.mask.unsqueeze(-1).to(x.dtype)
            elif getattr(st, "valid", None) is not None and st.valid.shape == x.shape[:2]:
                w = st.valid.unsqueeze(-1).to(x.dtype)
            if w is not None:
                return (x * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return x.mean(1)

    # -- applying a decision --------------------------------------------------------------------------
    def _removal(self, plan: SitePlan, rows: list[tuple[int, ...]], layout: int, device) -> tuple:
        """The open entry ``(mode, saved attributes, saved forwards)`` that removes the pruned units."""
        if plan.mha:
            return _enter(plan, decision_from_rows(rows, plan.units, plan.head_dim * plan.group, device)), [], []
        first = rows[0]
        if all(r == first for r in rows):
            pairs, d = self.forwards.uniform(plan, first, device)
            if len(rows) > 1:
                d = dataclasses.replace(d, idx=d.uniform.expand(len(rows), -1), valid=d.valid.expand(len(rows), -1))
        elif self.batched == "union":
            pairs, d = self.forwards.union(plan, rows, device)
        else:
            pairs, d = self.forwards.per_row(plan, rows, device)
        saved_fw = set_forwards(pairs)
        saved = []
        if layout in (LAYOUT_ATTRS, LAYOUT_LINEAR_ATTRS):
            kept = d.kept * plan.group
            for m, name, kind in plan.attrs:
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, kept if kind == "heads" else kept * plan.head_dim)
        mode = _enter(plan, d) if layout in (LAYOUT_RESHAPE, LAYOUT_ATTRS) else None
        return mode, saved, saved_fw

    @staticmethod
    def _masking(plan: SitePlan, mask: torch.Tensor) -> tuple:
        """The open entry that scales each head's output by ``mask [B, units]`` (train, reference)."""
        if plan.mha:
            return _enter(plan, SliceDecision(plan.units, plan.head_dim * plan.group, mask=mask)), [], []
        o = plan.out_mod
        scale = mask.repeat_interleave(plan.head_dim * plan.group, dim=-1)
        return None, [], set_forwards([(o, functools.partial(linear_scaled, scale=scale, weight=o.weight,
                                                               bias=o.bias))])

    # -- hooks ----------------------------------------------------------------------------------------
    def _close_all(self) -> None:
        while self._open:
            entry = self._open.pop()
            if entry is not None:
                _close(entry)

    def _reset(self, module, args):
        self._close_all()
        self._masks, self._kept, self._rows, self._logits = {}, {}, {}, {}

    def _make_pre(self, path: str):
        plan = self.plans[path]

        def pre(module, args, kwargs):
            if not self.enabled or (self.only is not None and path not in self.only) or not bool(
                    self.decider.active(path)):
                self._open.append(None)
                return None
            x = _main_input(args, kwargs, plan.width)
            if x is None:
                raise ValueError(f"head trimming at {path}: no [B, L, {plan.width}] input found")
            if plan.seq_first:
                x = x.transpose(0, 1)
            forced = self.forced.get(path) if self.forced else None
            entry = None
            if self.model.training and forced is None:
                entry = self._masking(plan, self._train_mask(plan, x))
            else:
                rows = self._eval_rows(plan, x, forced)
                if rows is not None:
                    if self.reference or self.model.training:
                        entry = self._masking(plan, keep_tensor(rows, x.shape[0], plan.units, x.device).to(x.dtype))
                    else:
                        entry = self._removal(plan, rows, int(self.decider.layout(path)), x.device)
            self._open.append(entry)
            return None

        return pre

    def _make_post(self):
        def post(module, args, output):
            entry = self._open.pop() if self._open else None
            if entry is not None:
                _close(entry)
            return None

        return post
