"""``fastv.tokens``: keep the image tokens the last text token attends to most (FastV-like).

Before language-model layer ``K`` (``layer``; default about 1/16 of the depth, at least 1) each row
keeps its text tokens and the image tokens with the highest attention from the row's *last real
position* (the last text token of the prompt), averaged over heads, in the self-attention of layer
``K - 1``. The probabilities are read at that one attention site only, for that one query row
(:class:`~trimkit.attention.CaptureProbs`: the softmax output of eager attention, the row recomputed
from the query and key arguments of ``scaled_dot_product_attention``), so the model keeps its own
attention implementation everywhere. The budget and its FLOPs calibration are those of
:mod:`trimkit.passes.decoder_baselines`.
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
from trimkit.passes.decoder_baselines import (DecoderBaselineConfig, ImageDecider, apply_decoder_baseline,
                                              check_decoder, default_layer, new_schedule, rank_keep)
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenDecision, TokenStep

__all__ = ["FastVTokensConfig", "LastTokenAttentionDecider", "last_positions"]


@dataclass(frozen=True)
class FastVTokensConfig(DecoderBaselineConfig):
    """Keep the image tokens the last text token attends to most in the previous layer (FastV-like)."""

    name: ClassVar[str] = "fastv.tokens"


def last_positions(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """``[B]`` the last real position of each row (``mask`` ``[B, L]``, 1 = real; None: ``L - 1``)."""
    if mask is None or tuple(mask.shape) != (batch, length):
        return torch.full((batch,), length - 1, dtype=torch.long)
    real = mask.bool()
    last = length - 1 - real.flip(1).to(torch.uint8).argmax(1)
    return torch.where(real.any(1), last, torch.full_like(last, length - 1)).long()


class LastTokenAttentionDecider(ImageDecider):
    """Scores image tokens by the attention the last real position pays them at attention ``site``."""

    def __init__(self, schedule, site: str):
        super().__init__(schedule)
        self.site = site
        self._mask: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._modes = ModeStack()

    def attach(self, runtime) -> list:
        super().attach(runtime)
        mod = runtime.model.get_submodule(self.site)
        return [mod.register_forward_pre_hook(self._pre), mod.register_forward_hook(self._post, always_call=True)]

    def reset(self, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._scores = None

    def _pre(self, module, args) -> None:
        rt = self.runtime
        image = rt.tracker.positions  # None in decoding steps and forwards without images
        if not rt.enabled or rt.threshold <= 0 or image is None or not self.schedule.is_active(rt.stream):
            self._modes.push(None)
            return
        b, length = image.shape
        last = last_positions(self._mask, b, length).to(image.device)
        self._modes.push(AttentionMode(CaptureProbs(length, last, b, self._record)))

    def _record(self, rows: torch.Tensor) -> None:
        self._scores = rows

    def _post(self, module, args, output) -> None:
        self._modes.pop()

    def close(self) -> None:
        self._modes.close()

    def choose(self, step: TokenStep, counts: torch.Tensor) -> TokenDecision:
        scores, self._scores = self._scores, None
        if scores is None or tuple(scores.shape) != (step.hidden.shape[0], step.length):
            raise TrimkitError(f"fastv.tokens: no attention probabilities over {step.length} tokens were seen "
                               f"at {self.site} (the self-attention of the layer before {step.layer})")
        scores = torch.gather(scores.to(step.hidden.device), 1, step.positions())
        return TokenDecision(keep=rank_keep(scores, step.candidates, counts))


@register_pass(FastVTokensConfig)
def fastv_tokens(model: nn.Module, model_map: ModelMap, config: FastVTokensConfig,
                 context: PassContext) -> PassResult:
    check_decoder(model, model_map, context, config.name)
    lm = model_map.stream(model_map.image_span["stream"])
    layer = default_layer(config.layer, len(lm.layers))
    site = next((a.path for a in lm.layers[layer - 1].attention if a.kind == "self"), None)
    if site is None:
        raise ConfigError(f"{config.name}: layer {layer - 1} of '{lm.name}' has no self-attention to read")
    decider = LastTokenAttentionDecider(new_schedule(model_map, config.keep), site)
    notes = [f"image tokens of '{lm.name}' are ranked before layer {layer} by the attention the last text "
             f"token of each row pays them in {site}; text tokens are never dropped"]
    return apply_decoder_baseline(model, model_map, config, context, decider, layer, "fastv", notes)
