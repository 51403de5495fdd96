"""``visionzip.tokens``: dominant image tokens by vision-side attention plus merged contextual tokens
(VisionZip-like).

Before language-model layer ``layer`` (default about 1/16 of the depth, at least 1: the first layer
keeps every token, since transformers takes a decoding step's positions from the length of its KV
cache) each row keeps its text tokens and
``max(1, round(n * keep))`` of its ``n`` image tokens, of two kinds:

* **dominant** tokens: the image tokens that receive the most attention in the vision tower's
  *feeding layer* (the last vision layer whose output reaches the splice, found at apply time by
  tracing the splice from each layer in turn; LLaVA's ``vision_feature_layer = -2`` gives the
  second-to-last). With a [CLS] token that the splice leaves out (one vision token more per image
  than image positions) the score is the [CLS] query's attention, else the attention each token
  receives averaged over queries; heads are averaged. Vision tokens map onto the image positions in
  order; a tower that emits ``g`` tokens per image position (patch merging, e.g. 2x2 in Qwen2-VL)
  has its scores averaged over consecutive groups of ``g``. Where neither maps (or the feeding
  layer has no readable self-attention), the scores fall back to the attention each image token
  receives in the language model's previous layer (averaged over queries); the report says which
  source is used.
* **contextual** tokens (``context``: their share of the kept image tokens, at least one when two or
  more are kept): the remaining image tokens are grouped around targets spaced evenly among them by
  position, each joining its most similar target (cosine of the hidden states entering the layer);
  a group's mean state is written in place of its target, at the target's position.

The probabilities are read at one attention site only (:class:`~trimkit.attention.CaptureProbs`),
so sdpa models keep sdpa. The budget and its FLOPs calibration are those of
:mod:`trimkit.passes.decoder_baselines`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trimkit.attention import AttentionMode, CaptureProbs, ModeStack
from trimkit.errors import ConfigError, TrimkitError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassContext, PassResult
from trimkit.passes.decoder_baselines import (DecoderBaselineConfig, ImageDecider, apply_decoder_baseline,
                                              check_decoder, default_layer, new_schedule, rank_keep)
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenDecision, TokenStep
from trimkit.splice import trace_splice

__all__ = ["VisionZipTokensConfig", "VisionZipDecider", "map_vision_scores", "zip_row", "context_counts"]


@dataclass(frozen=True)
class VisionZipTokensConfig(DecoderBaselineConfig):
    """Dominant image tokens by vision-side attention plus merged contextual tokens (VisionZip-like).

    context: share of the kept image tokens that are merged contextual tokens.
    """

    name: ClassVar[str] = "visionzip.tokens"
    context: float = 0.15

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.context < 1.0:
            raise ConfigError(f"{self.name}: context must be in [0, 1), got {self.context}")


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------
def map_vision_scores(rows: torch.Tensor, cls: bool, group: int, candidates: torch.Tensor) -> torch.Tensor | None:
    """Vision-token scores ``rows`` ``[images, Nv]`` -> ``[B, L]`` at the image positions ``candidates``
    (in order; the [CLS] column dropped when ``cls``; means over consecutive groups of ``group``).
    None when the counts do not match."""
    flat = (rows[:, 1:] if cls else rows).reshape(-1)
    n = int(candidates.sum())
    if group > 1 and flat.numel() == n * group:
        flat = flat.view(n, group).mean(1)
    if flat.numel() != n:
        return None
    out = torch.zeros(candidates.shape, dtype=flat.dtype, device=candidates.device)
    return out.masked_scatter(candidates, flat.to(candidates.device))


def context_counts(counts: torch.Tensor, share: float) -> torch.Tensor:
    """Contextual tokens among ``counts`` kept image tokens: ``round(count * share)``, at least 1 and
    at most ``count - 1`` when ``count >= 2`` and ``share > 0`` (0 otherwise)."""
    c = torch.floor(counts.double() * share + 0.5).long()
    c = torch.minimum(c.clamp_min(1), (counts - 1).clamp_min(0))
    return torch.where((counts >= 2) & (share > 0), c, torch.zeros_like(c))


def zip_row(hidden: torch.Tensor, candidates: torch.Tensor, dominant: torch.Tensor,
            contexts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: ``(index [K], states [K, D])`` of the survivors among ``hidden`` ``[L, D]``: every
    non-candidate, the ``dominant`` candidates, and ``contexts`` targets spaced evenly among the other
    candidates, each holding the mean of the tokens most similar to it (itself included)."""
    rest = (candidates & ~dominant).nonzero().view(-1)
    survivors = ~candidates | dominant
    states = hidden
    c = min(contexts, rest.numel())
    if c > 0:
        pick = (torch.arange(c, device=hidden.device) * rest.numel()) // c
        targets = rest[pick]
        members = hidden[rest]
        sim = F.normalize(members.float(), dim=-1) @ F.normalize(hidden[targets].float(), dim=-1).T
        assign = sim.argmax(1).index_put((pick,), torch.arange(c, device=hidden.device))
        sums = torch.zeros(c, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device).index_add(0, assign, members)
        sizes = torch.bincount(assign, minlength=c).to(hidden.dtype).unsqueeze(-1)
        states = hidden.index_copy(0, targets, sums / sizes)
        survivors = survivors.index_fill(0, targets, True)
    index = survivors.nonzero().view(-1)
    return index, states[index]


# ----------------------------------------------------------------------------------------------
# The decider
# ----------------------------------------------------------------------------------------------
class VisionZipDecider(ImageDecider):
    """Reads attention at ``site`` (``source``: "vision" or "language"), keeps dominant tokens and
    merges the rest into contextual ones."""

    def __init__(self, schedule, site: str, source: str, cls: bool = False, group: int = 1, context: float = 0.15):
        super().__init__(schedule)
        self.site, self.source, self.cls, self.group, self.context = site, source, cls, group, context
        self._rows: torch.Tensor | None = None
        self._modes = ModeStack()

    def attach(self, runtime) -> list:
        super().attach(runtime)
        mod = runtime.model.get_submodule(self.site)
        return [mod.register_forward_pre_hook(self._pre, with_kwargs=True),
                mod.register_forward_hook(self._post, always_call=True)]

    def reset(self, args: tuple, kwargs: dict) -> None:
        self._rows = None

    def _pre(self, module, args, kwargs) -> None:
        rt = self.runtime
        hidden = args[0] if args else kwargs.get("hidden_states")
        wanted = rt.enabled and rt.threshold > 0 and self.schedule.is_active(rt.stream)
        if self.source == "language":
            wanted = wanted and rt.tracker.positions is not None
        if not wanted or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            self._modes.push(None)
            return
        cls = 0 if self.cls else None
        self._modes.push(AttentionMode(CaptureProbs(hidden.shape[1], cls, hidden.shape[0], self._record)))

    def _record(self, rows: torch.Tensor) -> None:
        self._rows = rows

    def _post(self, module, args, output) -> None:
        self._modes.pop()

    def close(self) -> None:
        self._modes.close()

    def scores(self, step: TokenStep) -> torch.Tensor:
        rows, self._rows = self._rows, None
        scores = None
        if rows is not None and self.source == "vision":
            scores = map_vision_scores(rows, self.cls, self.group, step.candidates)
        elif rows is not None and tuple(rows.shape) == (step.hidden.shape[0], step.length):
            scores = torch.gather(rows.to(step.hidden.device), 1, step.positions())
        if scores is None:
            raise TrimkitError(f"visionzip.tokens: no attention at {self.site} maps onto the "
                               f"{int(step.candidates.sum())} image tokens of this forward")
        return scores

    def choose(self, step: TokenStep, counts: torch.Tensor) -> TokenDecision:
        contexts = context_counts(counts, self.context)
        dominant = rank_keep(self.scores(step), step.candidates, counts - contexts) & step.candidates
        rows = [zip_row(step.hidden[b], step.candidates[b], dominant[b], int(contexts[b]))
                for b in range(step.hidden.shape[0])]
        k = max(i.numel() for i, _ in rows)
        index = torch.full((len(rows), k), -1, dtype=torch.long, device=step.hidden.device)
        merged = step.hidden.new_zeros(len(rows), k, step.hidden.shape[-1])
        for b, (i, s) in enumerate(rows):
            index[b, :i.numel()] = i
            merged[b, :i.numel()] = s
        return TokenDecision(merged=merged, index=index)


# ----------------------------------------------------------------------------------------------
# Where the scores come from (found at apply time, on the example inputs)
# ----------------------------------------------------------------------------------------------
def vision_layout(images: int, tokens: int, positions: int) -> tuple[bool, int] | None:
    """``(cls, group)`` mapping ``images x tokens`` vision tokens onto ``positions`` image positions:
    one [CLS] per image left out, and/or ``group`` vision tokens per position. None: no such map."""
    for cls in (True, False):
        total = images * (tokens - cls)
        if total == positions:
            return cls, 1
    for cls in (False, True):
        total = images * (tokens - cls)
        if positions and total % positions == 0 and total > positions:
            return cls, total // positions
    return None


def feeding_layer(model: nn.Module, vision_layers: list[str], lm_first: str, inputs: dict) -> str | None:
    """The last vision layer whose output reaches the splice (one traced forward per layer tried)."""
    for path in reversed(vision_layers):
        if trace_splice(model, inputs, [path], lm_first).positions is not None:
            return path
    return None


def _probe_rows(model: nn.Module, site: str, vision_layers: list[str], lm_first: str,
                inputs: dict) -> tuple[torch.Tensor | None, int]:
    """Mean attention received at ``site`` ``[images, Nv]`` and the image positions, on one forward."""
    seen: dict = {}
    modes: list = []

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and "rows" not in seen:
            modes.append(AttentionMode(CaptureProbs(hidden.shape[1], None, hidden.shape[0],
                                                    lambda r: seen.setdefault("rows", r))))
            modes[-1].__enter__()

    def post(module, args, output):
        while modes:
            modes.pop().__exit__(None, None, None)

    mod = model.get_submodule(site)
    handles = [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post, always_call=True)]
    try:
        tracker = trace_splice(model, inputs, vision_layers, lm_first)
    finally:
        post(None, None, None)
        for h in handles:
            h.remove()
    return seen.get("rows"), int(tracker.positions.sum()) if tracker.positions is not None else 0


def _self_site(model_map: ModelMap, path: str) -> str | None:
    layer = next((la for s in model_map.streams for la in s.layers if la.path == path), None)
    return None if layer is None else next((a.path for a in layer.attention if a.kind == "self"), None)


def _vision_source(model: nn.Module, model_map: ModelMap, lm_first: str, inputs: dict) -> tuple[dict | None, str]:
    """``({"site", "cls", "group"}, note)`` for vision-side scores, or ``(None, why not)``."""
    vision = [la.path for s in model_map.streams if s.modality == "vision" for la in s.layers]
    was = model.training
    model.eval()
    try:
        layer = feeding_layer(model, vision, lm_first, inputs)
        site = _self_site(model_map, layer) if layer else None
        if site is None:
            return None, "no vision layer with a self-attention feeds the splice"
        rows, positions = _probe_rows(model, site, vision, lm_first, inputs)
    finally:
        model.train(was)
    if rows is None:
        return None, f"no attention probabilities could be read at {site}"
    layout = vision_layout(rows.shape[0], rows.shape[1], positions)
    if layout is None:
        return None, (f"{rows.shape[0]} x {rows.shape[1]} vision tokens at {site} do not map onto "
                      f"{positions} image positions")
    cls, group = layout
    how = "the [CLS] query's attention" if cls else "the attention each token receives"
    pooled = f", averaged over groups of {group} vision tokens per image position" if group > 1 else ""
    return {"site": site, "cls": cls, "group": group}, f"dominant tokens by {how} in {site}{pooled}"


@register_pass(VisionZipTokensConfig)
def visionzip_tokens(model: nn.Module, model_map: ModelMap, config: VisionZipTokensConfig,
                     context: PassContext) -> PassResult:
    check_decoder(model, model_map, context, config.name)
    lm = model_map.stream(model_map.image_span["stream"])
    layer = default_layer(config.layer, len(lm.layers))
    source, why = _vision_source(model, model_map, lm.layers[0].path, context.inputs)
    schedule = new_schedule(model_map, config.keep)
    if source is not None:
        decider = VisionZipDecider(schedule, source["site"], "vision", source["cls"], source["group"], config.context)
        notes = [f"image tokens of '{lm.name}' are chosen before layer {layer}: {why}; the rest merged into "
                 "contextual tokens; text tokens are never dropped"]
    else:
        site = _self_site(model_map, lm.layers[layer - 1].path)
        if site is None:
            raise ConfigError(f"{config.name}: {why}, and layer {layer - 1} of '{lm.name}' has no self-attention")
        decider = VisionZipDecider(schedule, site, "language", context=config.context)
        notes = [f"vision-side scores unavailable ({why}): dominant tokens by the attention each token "
                 f"receives in {site}, chosen before layer {layer}"]
    result = apply_decoder_baseline(model, model_map, config, context, decider, layer, "visionzip", notes)
    result.report["scores"] = "vision" if source is not None else "language"
    return result
