"""Schedules of SmartTrim training: the target ratio and the Gumbel temperature at each step."""
from __future__ import annotations

import math

__all__ = ["target_at", "tau_at"]


def target_at(step: int, steps: int, final: float, anneal: float, schedule: str = "linear") -> float:
    """The target ratio at `step` (0-based) of `steps`: 1.0 annealed to `final` over `anneal` of them."""
    span = anneal * steps
    progress = 1.0 if span <= 0 else min(1.0, (step + 1) / span)
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return 1.0 - (1.0 - final) * progress


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """Gumbel temperature at `step`: linear from `start` (first step) to `end` (last step)."""
    progress = step / max(1, steps - 1)
    return start + (end - start) * progress
