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
from typing import ClassVar

import torch
from torch import nn

from trimkit.attention import AttentionMode, CaptureProbs, ModeStack
from trimkit.errors import ConfigError, TrimkitError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassContext, PassResult
from trimkit.passes.baselines import BaselineConfig, ScheduleDecider, apply_baseline
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenStep

__all__ = ["TopKClsAttentionConfig", "ClsAttentionDecider"]


@dataclass(frozen=True)
class TopKClsAttentionConfig(BaselineConfig):
    """Keep the tokens the [CLS] query attends to most in the previous layer (EViT-like)."""

    name: ClassVar[str] = "topk.cls_attention"

    def validate(self) -> None:
        super().validate()
        if self.start_layer < 1:
            raise ConfigError(f"{self.name}: start_layer must be >= 1 (the [CLS] attention comes from the "
                              f"previous layer), got {self.start_layer}")


class ClsAttentionDecider(ScheduleDecider):
    """Scores tokens by the [CLS] attention recorded in the previous layer's self-attention."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cls: dict[str, torch.Tensor] = {}
        self._sites: dict[str, str] = {}  # attention site read -> its stream
        self._modes = ModeStack()

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
                self._modes.push(None)
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

            self._modes.push(AttentionMode(CaptureProbs(length, cls, self.batch, record)))
            return None

        return pre

    def _post(self, module, args, output):
        self._modes.pop()

    def close(self) -> None:
        self._modes.close()

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
