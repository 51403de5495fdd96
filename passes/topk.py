"""``topk.cls_attention``: keep the tokens the [CLS] query attends to most (EViT-like).

Before each trimmed layer of a stream the decider keeps the special tokens and the tokens with the
highest [CLS] attention, averaged over heads, in the self-attention of the *previous* layer of the
stream (so ``start_layer >= 1``; the schedule is that of :mod:`trimkit.passes.baselines`). The
probabilities are read where that attention computes them: the softmax output of eager attention,
the CLS row recomputed from the query and key arguments of ``scaled_dot_product_attention`` (its
mask included), or the averaged weights of ``multi_head_attention_forward``. A stream without a
special token uses the attention every key receives, averaged over queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trimkit.errors import ConfigError, TrimkitError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassContext, PassResult
from trimkit.passes.baselines import BaselineConfig, ScheduleDecider, apply_baseline
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenStep

__all__ = ["TopKClsAttentionConfig", "ClsAttentionDecider", "ClsAttention"]


@dataclass(frozen=True)
class TopKClsAttentionConfig(BaselineConfig):
    """Keep the tokens the [CLS] query attends to most in the previous layer (EViT-like)."""

    name: ClassVar[str] = "topk.cls_attention"

    def validate(self) -> None:
        super().validate()
        if self.start_layer < 1:
            raise ConfigError(f"{self.name}: start_layer must be >= 1 (the [CLS] attention comes from the "
                              f"previous layer), got {self.start_layer}")


class ClsAttention(TorchFunctionMode):
    """Records the [CLS] row of the self-attention probabilities (mean over heads) as ``[B, Lk]``."""

    def __init__(self, length: int, cls_index: torch.Tensor | int | None, batch: int,
                 record: Callable[[torch.Tensor], None]):
        super().__init__()
        self.length, self.cls, self.batch, self.record = length, cls_index, batch, record
        self.done = False

    def _cls_rows(self, b: int, device) -> torch.Tensor:
        if isinstance(self.cls, torch.Tensor):
            return self.cls.to(device)
        return torch.full((b,), int(self.cls), dtype=torch.long, device=device)

    def _rows(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[B, H, Lq, Lk]`` -> ``[B, Lk]``: the CLS query's row (or all queries'), mean over heads."""
        if self.cls is None:
            return probs.mean(dim=(1, 2))
        b = probs.shape[0]
        return probs[torch.arange(b, device=probs.device), :, self._cls_rows(b, probs.device)].mean(1)

    def _save(self, rows: torch.Tensor) -> None:
        self.record(rows.detach().float())
        self.done = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.done:
            return func(*args, **kwargs)
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            out = func(*args, **kwargs)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, out.dim() - 1) and out.dim() in (3, 4) and out.shape[-1] == out.shape[-2] == self.length:
                b = self.batch
                probs = out if out.dim() == 4 else (out.reshape(b, -1, *out.shape[1:]) if out.shape[0] % b == 0
                                                    else None)
                if probs is not None:
                    self._save(self._rows(probs))
            return out
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            if q.dim() == 4 and q.shape[-2] == k.shape[-2] == self.length:
                probs = self._sdpa_probs(q, k, kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
                                         kwargs.get("scale"))
                self._save(probs.mean(dim=(1, 2)))
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            key = args[1]
            if key.shape[0] == self.length:
                wanted, averaged = kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True)
                kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
                out, weights = func(*args, **kwargs)
                if weights.dim() == 4:
                    self._save(self._rows(weights))
                if not wanted:
                    return out, None
                return out, (weights.mean(1) if averaged else weights)
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa_probs(self, q, k, mask, scale) -> torch.Tensor:
        """Attention probabilities ``[B, H, R, Lk]`` of the CLS query (R = 1) or of every query."""
        b, h, lq, hd = q.shape
        if k.shape[1] != h:
            k = k.repeat_interleave(h // k.shape[1], dim=1)
        scale = scale if scale is not None else hd ** -0.5
        if self.cls is None:
            rows = torch.arange(lq, device=q.device).expand(b, -1)
        else:
            rows = self._cls_rows(b, q.device)[:, None]
        qs = torch.gather(q, 2, rows[:, None, :, None].expand(-1, h, -1, hd))
        logits = (qs.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            m = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, device=q.device).masked_fill(
                ~mask, float("-inf"))
            m = m.float().expand(b, h, lq, k.shape[-2])
            logits = logits + torch.gather(m, 2, rows[:, None, :, None].expand(-1, h, -1, k.shape[-2]))
        return logits.softmax(-1)


class ClsAttentionDecider(ScheduleDecider):
    """Scores tokens by the [CLS] attention recorded in the previous layer's self-attention."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cls: dict[str, torch.Tensor] = {}
        self._sites: dict[str, str] = {}  # attention site read -> its stream
        self._modes: list = []

    def attach(self, runtime) -> list:
        handles = []
        for stream in runtime.trimmed_streams:
            layers = runtime.map.stream(stream).layers
            for i, layer in enumerate(layers[1:], start=1):
                if layer.path not in runtime.layers:
                    continue
                site = next((a for a in layers[i - 1].attention if a.kind == "self" and a.key_stream == stream), None)
                if site is None:  # the forward check then finds no scores and leaves the stream whole
                    continue
                self._sites[site.path] = stream
                mod = runtime.model.get_submodule(site.path)
                handles.append(mod.register_forward_pre_hook(self._make_pre(runtime, stream)))
                handles.append(mod.register_forward_hook(self._post, always_call=True))
        return handles

    def _make_pre(self, runtime, stream: str):
        def pre(module, args):
            st = runtime.state.streams.get(stream)
            if not runtime.enabled or st is None or runtime.threshold <= 0 or not self.schedule.is_active(stream):
                self._modes.append(None)
                return None
            index, full = st.index, st.length
            length = index.shape[1] if index is not None else full
            firsts = self.special_positions(stream, full)
            cls = None
            if firsts:
                cls = (index == firsts[0]).to(torch.uint8).argmax(1) if index is not None else firsts[0]

            def record(rows):  # scores at the original positions (-inf: not computed)
                if index is not None and rows.shape == index.shape:
                    rows = torch.full((rows.shape[0], full), float("-inf"), device=rows.device).scatter(1, index, rows)
                self._cls[stream] = rows

            mode = ClsAttention(length, cls, self.batch, record)
            mode.__enter__()
            self._modes.append(mode)
            return None

        return pre

    def _post(self, module, args, output):
        mode = self._modes.pop() if self._modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    def close(self) -> None:
        while self._modes:
            mode = self._modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)

    def reset(self, args: tuple, kwargs: dict) -> None:
        super().reset(args, kwargs)
        self._cls = {}

    def scores(self, step: TokenStep) -> torch.Tensor:
        positions = step.positions()
        scores = self._cls.pop(step.stream, None)
        if scores is None or tuple(scores.shape) != (positions.shape[0], step.length):
            sites = [p for p, s in self._sites.items() if s == step.stream]
            raise TrimkitError(f"topk.cls_attention: no attention probabilities over {positions.shape[1]} tokens "
                               f"were seen in the self-attention of the previous layer (stream '{step.stream}'; "
                               f"sites read: {sites or 'none'})")
        return torch.gather(scores, 1, positions)


@register_pass(TopKClsAttentionConfig)
def topk_cls_attention(model: nn.Module, model_map: ModelMap, config: TopKClsAttentionConfig,
                       context: PassContext) -> PassResult:
    return apply_baseline(model, model_map, config, context, ClsAttentionDecider, "topk")
