"""A token-trimming pass in one file: keep the tokens whose hidden state has the largest norm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from trimkit.passes import PassConfig, PassResult, register_pass
from trimkit.runtime import ScoreDecider, TokenRuntime, TokenStep, capture_padded


@dataclass(frozen=True)
class NormTokensConfig(PassConfig):
    """Keep a token when the sigmoid of its norm, standardised over its row, is above ``threshold``."""

    name: ClassVar[str] = "example.norm_tokens"
    tags: ClassVar[tuple[str, ...]] = ("trim",)
    threshold: float = 0.5
    start_layer: int = 1  # first layer of each stream that trims


class NormDecider(ScoreDecider):
    def logits(self, step: TokenStep, g_self, g_other, fast: bool) -> torch.Tensor:
        norm = step.hidden.norm(dim=-1)  # [B, L]
        return (norm - norm.mean(1, keepdim=True)) / norm.std(1, keepdim=True).clamp_min(1e-6)


@register_pass(NormTokensConfig)
def norm_tokens(model, model_map, config: NormTokensConfig, context) -> PassResult:
    layers = [layer.path for s in model_map.streams for layer in s.layers[config.start_layer:]]
    runtime = TokenRuntime(model, model_map, capture_padded(model, context.inputs), NormDecider(), layers,
                           threshold=config.threshold)
    return PassResult(model, {"trimmed_layers": len(layers)}, undo=runtime.remove)
