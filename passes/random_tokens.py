"""``random.tokens``: keep a seeded random subset of the prunable tokens at each trimmed layer.

The random scores come from a generator seeded by ``seed`` and the layer's ordinal, and belong to
the original token positions, so every row and every forward keeps the same positions (a batch gives
the results of its rows run one by one). Padding tokens of a text stream (from the backbone's
``masks`` hint) are dropped first. The schedule is that of :mod:`trimkit.passes.baselines`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from trimkit.locate import ModelMap
from trimkit.passes.base import PassContext, PassResult
from trimkit.passes.baselines import BaselineConfig, ScheduleDecider, apply_baseline
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenStep

__all__ = ["RandomTokensConfig", "RandomDecider"]


@dataclass(frozen=True)
class RandomTokensConfig(BaselineConfig):
    """Keep a seeded random subset of the prunable tokens at each trimmed layer."""

    name: ClassVar[str] = "random.tokens"
    seed: int = 0


class RandomDecider(ScheduleDecider):
    """Scores each original position with a draw of a generator seeded by ``seed`` and the layer."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def scores(self, step: TokenStep) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step.ordinal)
        table = torch.rand(step.length, generator=gen).to(step.hidden.device)
        return table[step.positions()]


@register_pass(RandomTokensConfig)
def random_tokens(model: nn.Module, model_map: ModelMap, config: RandomTokensConfig,
                  context: PassContext) -> PassResult:
    def make(*args):
        return RandomDecider(*args, seed=config.seed)

    return apply_baseline(model, model_map, config, context, make, "random")
