"""Expected FLOPs of a trimmed model as a fraction of the full model's: differentiable, per forward.

The trainer's cost loss needs the FLOPs ratio as a function of the trimmers' decisions. This
module computes it from the ModelMap and what each trimming runtime kept in the last forward
(:func:`trimkit.runtime.runtimes`, ``cost_inputs()``), per row, then averages over the batch.

Per layer of a stream, with ``n`` tokens computed, ``n_k`` keys per attention site, ``D`` the
layer width, ``D_k`` the key stream's width, ``H·d`` the attention width and ``h`` the fraction
of heads kept::

    attention = 2·n·D·H·d·h  (q)  + 2·2·n_k·D_k·H·d·h  (k, v)  + 2·2·n·n_k·H·d·h  (q·kᵀ, a·v)
              + 2·n·H·d·h·D  (output projection)
    FFN       = 2·2·n·D·F

FLOPs outside the located blocks (embeddings, patch projection, task heads) and the trimmers'
own FLOPs are not functions of the decisions; :func:`calibrate` measures them once with the
profiler so the estimate is on the same scale as executed FLOPs::

    ratio = (rest + overhead + Σ trimmed blocks) / (rest + Σ full blocks)

In training mode ``n``, ``n_k`` and ``h`` are sums of straight-through masks (the gradient
reaches the trimmers); in eval mode they are the counts the runtimes actually kept, so the
estimate can be checked against :func:`trimkit.profile.count_flops`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from trimkit.errors import TrimkitError
from trimkit.locate import ModelMap
from trimkit.runtime import runtimes, set_threshold, state, trimming_off

__all__ = ["CostModel", "cost_model", "expected_ratio", "calibrate"]


def _first_batch(args, kwargs) -> int | None:
    for v in tree_flatten((args, kwargs))[0]:
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return v.shape[0]
    return None


def _main_length(args, kwargs, batch: int | None) -> int | None:
    for v in tree_flatten((args, kwargs))[0]:
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point():
            if batch is not None and v.shape[0] != batch and v.shape[1] == batch:
                return v.shape[0]
            return v.shape[1]
    return None


@dataclasses.dataclass
class _Site:
    path: str
    heads: int
    head_dim: int
    key_stream: str
    self_attention: bool


@dataclasses.dataclass
class _Layer:
    path: str
    stream: str
    width: int
    ffn_hidden: int
    sites: list


class CostModel:
    """Per-layer cost formulas of a located model plus hooks that observe executed lengths."""

    def __init__(self, model: nn.Module, model_map: ModelMap):
        self.model, self.map = model, model_map
        self.layers: list[_Layer] = []
        self.stream_width: dict[str, int] = {}
        self.stream_last: dict[str, str] = {}
        for s in model_map.streams:
            self.stream_width[s.name] = s.layers[-1].width if s.layers else 0
            if s.layers:
                self.stream_last[s.name] = s.layers[-1].path
            for layer in s.layers:
                sites = [_Site(a.path, a.heads or 1, a.head_dim or 0, a.key_stream, a.kind == "self")
                         for a in layer.attention]
                ffn = layer.ffn.hidden if layer.ffn is not None and layer.ffn.hidden else 0
                self.layers.append(_Layer(layer.path, s.name, layer.width or 0, ffn, sites))
        self.rest = 0.0  # FLOPs per sample outside the located blocks (from calibrate)
        self.overhead = 0.0  # FLOPs per sample of the trimmers themselves (from calibrate)
        self.calibrated = False
        self.seen: dict[str, int] = {}
        self._batch: int | None = None
        for rt in runtimes(model):
            if hasattr(rt, "record_cost"):
                rt.record_cost = True
        self.handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for layer in self.layers:
            mod = model.get_submodule(layer.path)
            self.handles.append(mod.register_forward_pre_hook(self._make_seen(layer.path), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _on_model(self, module, args, kwargs):
        self.seen = {}
        self._batch = _first_batch(args, kwargs)

    def _make_seen(self, path: str):
        def hook(module, args, kwargs):
            n = _main_length(args, kwargs, self._batch)
            if n is not None:
                self.seen[path] = n
        return hook

    # -- the formula --------------------------------------------------------------------------
    def _width_of(self, stream: str, fallback: int) -> int:
        if stream.startswith("input:"):
            return fallback
        return self.stream_width.get(stream, fallback) or fallback

    def layer_cost(self, layer: _Layer, n: torch.Tensor, keys: dict[str, torch.Tensor],
                   heads: dict[str, torch.Tensor]) -> torch.Tensor:
        d = layer.width
        total = 2.0 * 2.0 * n * d * layer.ffn_hidden
        for site in layer.sites:
            width = site.heads * site.head_dim or d
            h = heads.get(site.path)
            frac = h.sum(-1) / h.shape[-1] if h is not None else 1.0
            nk = keys[site.path]
            dk = d if site.self_attention else self._width_of(site.key_stream, d)
            attn = 2.0 * n * d * width + 2.0 * 2.0 * nk * dk * width + 2.0 * 2.0 * n * nk * width + 2.0 * n * width * d
            total = total + attn * frac
        return total

    def _gather(self) -> tuple[dict, dict, dict, dict]:
        tokens, keys, heads, lengths = {}, {}, {}, {}
        for rt in runtimes(self.model):
            if hasattr(rt, "record_cost"):
                rt.record_cost = True  # from now on (eval too)
            if not getattr(rt, "enabled", True) or not hasattr(rt, "cost_inputs"):
                continue
            got = rt.cost_inputs()
            tokens.update(got.get("tokens", {}))
            keys.update(got.get("keys", {}))
            heads.update(got.get("heads", {}))
            lengths.update(got.get("lengths", {}))
        return tokens, keys, heads, lengths

    @staticmethod
    def _count(value: Any) -> torch.Tensor:
        value = torch.as_tensor(value)
        if value.dim() == 2:  # [B, L] soft mask
            return value.sum(1)
        return value.to(torch.float32)  # [B] counts, or a 0-d count shared by every row

    def costs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(trimmed, full) block FLOPs per row of the last forward, ``[B]`` each."""
        if not self.seen:
            raise TrimkitError("no forward observed yet: run the model once before asking for its cost")
        tokens, keys, heads, lengths = self._gather()
        full_len: dict[str, float] = {}
        for layer in self.layers:
            full_len[layer.path] = float(lengths.get(layer.path, self.seen.get(layer.path, 0)))
        trimmed, full = torch.zeros(()), torch.zeros(())
        for layer in self.layers:
            if layer.path not in self.seen:
                continue
            n_full = torch.tensor(full_len[layer.path])
            n = self._count(tokens[layer.path]) if layer.path in tokens else n_full
            k_now, k_full = {}, {}
            for site in layer.sites:
                if site.path in keys:
                    k_now[site.path] = self._count(keys[site.path])
                    k_full[site.path] = torch.tensor(float(lengths.get(site.path, full_len[layer.path])))
                elif site.self_attention or site.key_stream not in self.stream_last:
                    k_now[site.path], k_full[site.path] = n, n_full
                else:
                    last = self.stream_last[site.key_stream]
                    k = torch.tensor(float(self.seen.get(last, full_len.get(last, 0.0))))
                    k_now[site.path] = self._count(tokens[last]) if last in tokens else k
                    k_full[site.path] = torch.tensor(full_len.get(last, 0.0))
            trimmed = trimmed + self.layer_cost(layer, n, k_now, heads)
            full = full + self.layer_cost(layer, n_full, k_full, {})
        return trimmed, full

    def ratio(self) -> torch.Tensor:
        """Expected executed-FLOPs ratio of the last forward (batch mean), a 0-d tensor."""
        trimmed, full = self.costs()
        rows = (self.rest + self.overhead + trimmed) / (self.rest + full)
        return rows.mean() if rows.dim() else rows


def cost_model(model: nn.Module) -> CostModel:
    """The model's CostModel, built on first use from the map that `apply_` recorded."""
    cm = state.get(model, state.COST)
    if cm is None:
        model_map = state.get(model, state.MAP)
        if model_map is None:
            raise TrimkitError("the model has no ModelMap: apply a trimming pass with trimkit.passes.apply_ first")
        cm = CostModel(model, model_map)
        state.put(model, state.COST, cm)
    return cm


def expected_ratio(model: nn.Module) -> torch.Tensor:
    """Expected executed-FLOPs ratio (trimmed / full) of the model's last forward.

    Differentiable with respect to the trimmers in training mode. Call :func:`calibrate` once to
    include the FLOPs outside the trimmed blocks; otherwise the ratio covers the blocks only.
    """
    cm = cost_model(model)
    return cm.ratio()


def calibrate(model: nn.Module, inputs: dict) -> CostModel:
    """Measure the FLOPs outside the located blocks and the trimmers' own FLOPs with the profiler.

    Runs three counted forwards in eval mode: full capacity, keep-everything (threshold 0) for
    the trimmer overhead, with ``inputs``.
    """
    from trimkit.profile import count_flops

    cm = cost_model(model)
    was = model.training
    saved = {id(rt): getattr(rt, "threshold", None) for rt in runtimes(model)}
    try:
        model.eval()
        with torch.no_grad(), trimming_off(model):
            full_report = count_flops(model, inputs)
        _, full_blocks = cm.costs()
        set_threshold(model, 0.0)
        with torch.no_grad():
            keep_report = count_flops(model, inputs)
        cm.rest = max(0.0, float(full_report.flops) - float(full_blocks.float().mean()))
        cm.overhead = max(0.0, float(keep_report.flops) - float(full_report.flops))
        cm.calibrated = True
    finally:
        for rt in runtimes(model):
            if saved.get(id(rt)) is not None:
                rt.threshold = saved[id(rt)]
        model.train(was)
    return cm
