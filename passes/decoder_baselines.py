"""What the training-free baselines for decoder VLMs share (``fastv.tokens``, ``visionzip.tokens``).

Both run as token deciders of :class:`~trimkit.runtime.DecoderRuntime`: they decide once, before one
layer of the language model (``layer``), over the row's *image* tokens only (the positions
:mod:`trimkit.splice` traces in every forward); text tokens always stay. Removed (or merged-away)
tokens leave the hidden states and every sequence-aligned argument of the later layers, kept tokens
keep their original positions, and the KV cache holds only what was kept, so ``model.generate()``
works on the trimmed model, batched or not.

**Budget.** A row with ``n`` image tokens keeps ``max(1, round(n * keep))`` of them (all when
``keep = 1``); rows with different ``n`` keep different counts and are padded by the runtime. With
``flops_ratio > 0`` the pass calibrates ``keep`` at apply time: it measures, with
:func:`trimkit.profile.count_flops`, the executed FLOPs of the whole model on one row of the example
inputs against the untrimmed model, at one keep value per distinct kept count (a binary search: the
FLOPs never decrease with the count), and keeps the closest. The calibrated value lives in a buffer
(``model.trimkit_baseline_tokens.keep_ratio``), so saved folders restore it without calibrating.

**threshold.** These passes have no keep probabilities: ``threshold = 0.0`` keeps every token (the
contract of every trimming pass), any other value applies the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from trimkit.errors import ConfigError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.passes.baselines import BaselineSchedule, closest_at, install_baseline, schedule_points
from trimkit.profile import count_flops
from trimkit.runtime import DecoderRuntime, TokenDecider, TokenDecision, TokenStep, capture_padded, split_row, state, \
    trimming_off

__all__ = ["DecoderBaselineConfig", "ImageDecider", "image_counts", "rank_keep", "default_layer",
           "check_decoder", "new_schedule", "apply_decoder_baseline"]

_PASSES = ("random.tokens", "topk.cls_attention", "tome.merge", "smarttrim.tokens", "fastv.tokens",
           "visionzip.tokens")


@dataclass(frozen=True)
class DecoderBaselineConfig(PassConfig):
    """Fields shared by the decoder baselines.

    keep: fraction of each row's image tokens kept (at least one).
    flops_ratio: when > 0, calibrate keep at apply time to this executed-FLOPs ratio of the model.
    layer: the language-model layer before which the tokens are chosen (-1: about depth/16, at least 1).
    threshold: 0.0 keeps every token; any other value applies the budget.
    """

    tags: ClassVar[tuple[str, ...]] = ("trim",)
    forbids_after: ClassVar[tuple[str, ...]] = _PASSES

    keep: float = 0.5
    flops_ratio: float = 0.0
    layer: int = -1
    threshold: float = 0.5

    def validate(self) -> None:
        n = self.name
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"{n}: keep must be in (0, 1], got {self.keep}")
        if not 0.0 <= self.flops_ratio <= 1.0:
            raise ConfigError(f"{n}: flops_ratio must be in [0, 1] (0 = no calibration), got {self.flops_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{n}: threshold must be in [0, 1], got {self.threshold}")
        if self.layer < -1:
            raise ConfigError(f"{n}: layer must be >= 0 (or -1 for the default), got {self.layer}")


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------
def default_layer(layer: int, depth: int) -> int:
    """The deciding layer: ``layer``, or about 1/16 of ``depth`` (FastV's K=2 of 32) when -1, at least 1.

    The first layer always keeps every token: transformers derives the positions and the causal mask
    of a decoding step from the length of the first layer's KV cache.
    """
    if layer >= depth:
        raise ConfigError(f"layer {layer} is out of range: the language model has {depth} layers")
    if layer == 0:
        raise ConfigError("layer must be >= 1: the language model's first layer keeps every token (decoding "
                          "steps take their positions from the length of its KV cache)")
    return layer if layer > 0 else min(max(1, round(depth / 16)), depth - 1)


def image_counts(n: torch.Tensor, keep: float) -> torch.Tensor:
    """Image tokens each row keeps: ``max(1, round(n * keep))``, at most ``n`` (0 for a row without any)."""
    k = torch.floor(n.double() * keep + 0.5).long().clamp_min(1)
    return torch.minimum(k, n.long())


def rank_keep(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: every non-candidate plus the ``counts[b]`` best-scoring candidates of row ``b``."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return ~candidates | (candidates & (rank < counts[:, None]))


# ----------------------------------------------------------------------------------------------
# The decider both baselines derive from
# ----------------------------------------------------------------------------------------------
class ImageDecider(TokenDecider):
    """Decides over the image tokens with the budget of ``schedule.keep_ratio``; subclasses say how
    (:meth:`choose`). ``runtime`` is the :class:`DecoderRuntime` once attached."""

    def __init__(self, schedule: BaselineSchedule):
        self.schedule = schedule
        self.runtime: DecoderRuntime | None = None

    def attach(self, runtime) -> list:
        self.runtime = runtime
        return []

    def decide(self, step: TokenStep) -> TokenDecision | None:
        if step.threshold <= 0 or step.candidates is None or not self.schedule.is_active(step.stream):
            return None
        n = step.candidates.sum(1)
        counts = image_counts(n, float(self.schedule.keep_ratio))
        if bool((counts >= n).all()):
            return None
        return self.choose(step, counts)

    def choose(self, step: TokenStep, counts: torch.Tensor) -> TokenDecision:
        """The decision keeping ``counts[b]`` of row ``b``'s candidates (text tokens all kept)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Applying one
# ----------------------------------------------------------------------------------------------
def _image_tokens(model: nn.Module, runtime: DecoderRuntime, row: dict) -> int:
    """Image tokens of the one-row input ``row`` (one forward, nothing trimmed)."""
    saved = runtime.threshold
    runtime.threshold = 0.0
    try:
        with torch.no_grad():
            model(**row)
    finally:
        runtime.threshold = saved
    image = runtime.tracker.positions
    return int(image.sum()) if image is not None else 0


def _calibrate(model: nn.Module, runtime: DecoderRuntime, schedule: BaselineSchedule, row: dict, full: float,
               target: float) -> list[str]:
    """Set ``keep`` so the executed-FLOPs ratio on ``row`` is the closest to ``target`` the budget allows."""
    n0 = _image_tokens(model, runtime, row)
    if n0 == 0:
        return [f"flops_ratio {target}: the example has no image tokens; keep left at {float(schedule.keep_ratio)}"]
    points = [0.0] + schedule_points({"image": (n0, 1)}) + [1.0]
    values = [(a + b) / 2 for a, b in zip(points, points[1:])] + [1.0]
    saved = runtime.threshold
    runtime.threshold = 0.5

    def measure(keep: float) -> float:
        schedule.keep_ratio.fill_(keep)
        return count_flops(model, row).flops / full

    try:
        keep, ratio = closest_at(values, measure, target)
    finally:
        runtime.threshold = saved
    schedule.keep_ratio.fill_(keep)
    if abs(ratio - target) > 0.02:
        return [f"flops_ratio {target}: the closest the image tokens allow is {ratio:.3f} (keep {keep:.4f})"]
    return []


def apply_decoder_baseline(model: nn.Module, model_map: ModelMap, config: DecoderBaselineConfig,
                           context: PassContext, decider: ImageDecider, layer: int, method: str,
                           notes: list[str]) -> PassResult:
    """Install ``decider`` before language-model layer ``layer``, calibrate, report."""
    lm = model_map.stream(model_map.image_span["stream"])
    vision = [la.path for s in model_map.streams if s.modality == "vision" for la in s.layers]
    cap = capture_padded(model, context.inputs)
    schedule = decider.schedule
    runtime, undo = install_baseline(model, schedule, lambda: DecoderRuntime(
        model, model_map, cap, decider, lm.name, [la.path for la in lm.layers], [lm.layers[layer].path], vision,
        threshold=config.threshold))

    measured = None
    if not context.restoring:
        try:
            row = split_row(context.inputs, 0)
            with trimming_off(model):
                full = count_flops(model, row).flops
            if config.flops_ratio > 0:
                notes = notes + _calibrate(model, runtime, schedule, row, full, config.flops_ratio)
            measured = count_flops(model, row).flops / full
        except Exception:
            undo()
            raise
    report = {"method": method, "stream": lm.name, "layer": layer, "layer_path": lm.layers[layer].path,
              "keep": float(schedule.keep_ratio), "flops_ratio": measured, "notes": notes}
    return PassResult(model, report, undo, trainable=False)


def check_decoder(model: nn.Module, model_map: ModelMap, context: PassContext, name: str) -> None:
    """Clear errors for what a decoder baseline cannot work without."""
    if context.inputs is None:
        raise ConfigError(f"{name} needs example inputs to find each layer's sequence-aligned arguments")
    if not model_map.image_span:
        raise ConfigError(f"{name} trims image tokens inside a decoder VLM's language model, and this model "
                          "splices no image features into a language model (use topk.cls_attention or tome.merge)")
    if state.has_module(model, state.BASELINE_TOKENS) or state.get(model, state.TOKEN_RUNTIME) is not None:
        raise ConfigError(f"{name}: the model already has a token-trimming pass")


def new_schedule(model_map: ModelMap, keep: float) -> BaselineSchedule:
    """The buffers of a decoder baseline: ``keep_ratio`` and the language-model stream's mode."""
    return BaselineSchedule([model_map.image_span["stream"]], keep)

