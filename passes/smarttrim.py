"""SmartTrim token trimming as a pass: ``smarttrim.tokens``.

Inserts one :class:`TokenTrimmer` (run by a :class:`SmartTrimDecider`) before every trimmed layer of every trimmed
stream (by default: all layers but the first of each stream whose tokens are not the task's
per-token outputs). Guidance for a stream comes from the stream it cross-attends to, or the stream
that cross-attends to it, or — for a fused single stream — the text input's embedding; dual
encoders fall back to same-modality guidance and the report says so.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trimkit.device import float32_logits
from trimkit.errors import ConfigError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.passes.registry import register_pass
from trimkit.runtime import (REMOVE, DecoderRuntime, SKIP, ScoreDecider, TokenRuntime, TokenStep, candidate_streams, capture_padded,
                             per_token_streams, probe_streams, side_by_side, state, stream_report, task_logits)

__all__ = ["SmartTrimTokensConfig", "TokenTrimmer", "SmartTrimDecider", "token_runtime"]


@dataclass(frozen=True)
class SmartTrimTokensConfig(PassConfig):
    """Per-input token trimming.

    target_ratio: the executed-FLOPs ratio training steers to (used by the trainer's cost loss).
    threshold: at inference a token is kept when its keep probability is above it (0 keeps all).
    streams: regex on stream names to trim ("" = every stream that can be trimmed).
    start_layer: first layer index (within each stream) that gets a trimmer.
    guidance: "cross" (other modality's global vector) or "self" (same modality only).
    hidden: width of the trimmer MLP (0 = width // 8, at least 8).
    tau: Gumbel temperature used in training.
    decoder_start: decoder VLMs: first language-model layer with a trimmer (-1: about 1/16 of the
    depth, at least 1, as FastV); image tokens only are trimmed there, text tokens always stay.
    vision: decoder VLMs: "whole" leaves the vision tower whole; "skip" trims its tokens in skip mode
    (a dropped patch skips the remaining vision layers and is carried through, so the splice into the
    language model still lines up), guided by the text input's embedding.
    """

    name: ClassVar[str] = "smarttrim.tokens"
    tags: ClassVar[tuple[str, ...]] = ("trim",)
    forbids_after: ClassVar[tuple[str, ...]] = ()

    target_ratio: float = 0.5
    threshold: float = 0.5
    streams: str = ""
    start_layer: int = 1
    guidance: str = "cross"
    hidden: int = 0
    tau: float = 1.0
    decoder_start: int = -1
    vision: str = "whole"

    def validate(self) -> None:
        if not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(f"smarttrim.tokens: target_ratio must be in (0, 1], got {self.target_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"smarttrim.tokens: threshold must be in [0, 1], got {self.threshold}")
        if self.guidance not in ("cross", "self"):
            raise ConfigError(f"smarttrim.tokens: guidance must be 'cross' or 'self', got {self.guidance!r}")
        if self.start_layer < 0 or self.hidden < 0 or self.tau <= 0:
            raise ConfigError("smarttrim.tokens: start_layer and hidden must be >= 0 and tau > 0, got "
                              f"start_layer={self.start_layer}, hidden={self.hidden}, tau={self.tau}")
        if self.vision not in ("whole", "skip"):
            raise ConfigError(f"smarttrim.tokens: vision must be 'whole' or 'skip', got {self.vision!r}")
        if self.decoder_start < -1:
            raise ConfigError(f"smarttrim.tokens: decoder_start must be >= 0 (or -1: automatic), "
                              f"got {self.decoder_start}")
        try:
            re.compile(self.streams)
        except re.error as exc:
            raise ConfigError(f"smarttrim.tokens: streams is not a valid regex: {exc}") from exc


class TokenTrimmer(nn.Module):
    """Scores tokens from their own state, their modality's global state and the other modality's.

    ``logit_i = w · gelu(A x_i + B g_self + C g_other) + b``; the bias starts high so a fresh
    trimmer keeps (almost) every token.
    """

    trimkit_role = state.TRIMMER_ROLE

    def __init__(self, width: int, other_width: int | None, hidden: int | None = None, init_keep: float = 0.98):
        super().__init__()
        hidden = hidden or max(8, width // 8)
        self.local = nn.Linear(width, hidden)
        self.glob = nn.Linear(width, hidden, bias=False)
        self.cross = nn.Linear(other_width, hidden, bias=False) if other_width else None
        self.score = nn.Linear(hidden, 1)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.constant_(self.score.bias, math.log(init_keep / (1 - init_keep)))

    @float32_logits
    def forward(self, x: torch.Tensor, g_self: torch.Tensor, g_other: torch.Tensor | None) -> torch.Tensor:
        h = self.local(x) + self.glob(g_self).unsqueeze(1)
        if self.cross is not None and g_other is not None:
            h = h + self.cross(g_other).unsqueeze(1)
        return self.score(F.gelu(h)).squeeze(-1)

    @float32_logits
    def fast_logits(self, x: torch.Tensor, g_self: torch.Tensor, g_other: torch.Tensor | None) -> torch.Tensor:
        """``forward`` for inference with fewer dispatches: functional linears, the two global terms
        summed before broadcasting, GELU in its erf form (on tiny tensors the library GELU's
        per-call cost is larger than the work)."""
        g = F.linear(g_self, self.glob.weight)
        if self.cross is not None and g_other is not None:
            g = g + F.linear(g_other, self.cross.weight)
        if x.shape[0] == 1:  # one fused multiply-add
            h = torch.addmm(self.local.bias + g, x[0], self.local.weight.T).unsqueeze(0)
        else:
            h = F.linear(x, self.local.weight, self.local.bias) + g.unsqueeze(1)
        h = h * 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        return F.linear(h, self.score.weight, self.score.bias).squeeze(-1)


class SmartTrimDecider(ScoreDecider):
    """Token decisions from one :class:`TokenTrimmer` per trimmed layer (``trimmers``: layer path -> trimmer)."""

    def __init__(self, trimmers: dict[str, TokenTrimmer]):
        self.trimmers = trimmers

    def logits(self, step: TokenStep, g_self: torch.Tensor, g_other: torch.Tensor | None, fast: bool) -> torch.Tensor:
        trimmer = self.trimmers[step.layer]
        quick = getattr(trimmer, "fast_logits", None) if fast else None
        return (quick or trimmer)(step.hidden, g_self, g_other)


def _text_embedding(model: nn.Module, cap, roles: dict[str, str]):
    """(input name, embedding module path) of the Embedding that reads a text input directly."""
    for n in cap.nodes:
        if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.Embedding):
            src = n.args[0] if n.args else None
            if getattr(src, "op", "") == "placeholder" and roles.get(src.target) == "text":
                return src.target, n.target
    return None


def _guidance(model_map: ModelMap, trimmed: list[str], mode: str, text_embed) -> tuple[dict, list[str]]:
    other: dict[str, str | None] = {}
    notes = []
    shared = side_by_side(model_map)  # their states are not recorded apart: no guidance from them
    for name in trimmed:
        s = model_map.stream(name)
        if mode == "self":
            other[name] = None
            continue
        keyed = [a.key_stream for lay in s.layers for a in lay.attention
                 if a.kind == "cross" and not a.key_stream.startswith("input:") and a.key_stream not in shared]
        keying = [t.name for t in model_map.streams for lay in t.layers for a in lay.attention
                  if a.kind == "cross" and a.key_stream == name and t.name not in shared]
        first = s.layers[0].index
        later = [k for k in keying if model_map.stream(k).layers[0].index > first]
        if keyed:
            other[name] = keyed[0]
        elif keying and not later:
            other[name] = keying[0]
        elif keying and text_embed is not None and model_map.stream(later[0]).modality in ("text", "fused"):
            # the guiding stream runs later: use the text input's embedding, available up front
            other[name] = "embed:" + text_embed[0]
        elif keying:
            other[name] = None
            notes.append(f"stream '{name}': the stream that attends to it runs later and no text embedding "
                         "was found: same-modality guidance")
        elif s.modality == "fused" and text_embed is not None:
            other[name] = "embed:" + text_embed[0]
        else:
            other[name] = None
            notes.append(f"stream '{name}' has no cross-modal signal (dual encoder or single modality): "
                         "same-modality guidance")
    return other, notes


def _other_width(model_map: ModelMap, model: nn.Module, other: str | None, text_embed) -> int | None:
    if other is None:
        return None
    if other.startswith("embed:"):
        return model.get_submodule(text_embed[1]).embedding_dim
    return model_map.stream(other).layers[-1].width or None


def _build(model: nn.Module, model_map: ModelMap, names: list[str], other: dict, text_embed,
           config: SmartTrimTokensConfig) -> dict[str, TokenTrimmer]:
    by_path: dict[str, TokenTrimmer] = {}
    for name in names:
        ow = _other_width(model_map, model, other[name], text_embed)
        for layer in model_map.stream(name).layers[config.start_layer:]:
            by_path[layer.path] = TokenTrimmer(layer.width, ow, hidden=config.hidden or None)
    return by_path


@register_pass(SmartTrimTokensConfig)
def smarttrim_tokens(model: nn.Module, model_map: ModelMap, config: SmartTrimTokensConfig,
                     context: PassContext) -> PassResult:
    if context.inputs is None:
        raise ConfigError("smarttrim.tokens needs example inputs to find each layer's sequence-aligned arguments")
    if state.get(model, state.TOKEN_TRIMMERS) is not None:
        raise ConfigError("smarttrim.tokens is already applied to this model")
    cap = capture_padded(model, context.inputs)
    if model_map.image_span:
        return _decoder_tokens(model, model_map, config, cap)
    per_token = per_token_streams(model_map, cap, task_logits(context.hints, cap.output))
    trimmed = candidate_streams(model_map, re.compile(config.streams), per_token, config.start_layer)
    text_embed = _text_embedding(model, cap, model_map.inputs)
    other, notes = _guidance(model_map, trimmed, config.guidance, text_embed)
    special = {name: list((context.hints or {}).get("special_tokens", {}).get(model_map.stream(name).modality, [0]))
               for name in trimmed}
    # Probe each stream with random decisions: a stream whose consumers read every layer's output
    # at full length (bridges) is trimmed in skip mode (pruned tokens carried through unchanged);
    # a stream whose consumers index tokens by position either way is left whole. The probe is
    # structural, so it runs the same way when a saved folder is rebuilt.
    layers = {n: [la.path for la in model_map.stream(n).layers[config.start_layer:]] for n in trimmed}
    modes, probe_notes = probe_streams(model, model_map, cap, layers, other, special, text_embed, context.inputs)
    notes += probe_notes
    kept = [n for n in trimmed if modes[n] in (REMOVE, SKIP)]
    skip = [n for n in kept if modes[n] == SKIP]
    skipped = [s.name for s in model_map.streams if s.name not in trimmed] + [n for n in trimmed if n not in kept]
    notes += [f"stream '{n}' runs inside the layers of stream '{first}' (one module call for both): left whole"
              for n, first in side_by_side(model_map).items()]
    by_path = _build(model, model_map, kept, other, text_embed, config)
    trimmers = state.Trimmers({p.replace(".", "__"): t for p, t in by_path.items()})
    trimmers.train(model.training)
    state.attach(model, state.TOKEN_TRIMMERS, trimmers)
    runtime = TokenRuntime(model, model_map, cap, SmartTrimDecider(by_path), by_path, other,
                           threshold=config.threshold, special=special, tau=config.tau, text_embed=text_embed,
                           skip=skip)
    state.put(model, state.TOKEN_RUNTIME, runtime)

    def undo():
        runtime.remove()
        state.drop(model, state.TOKEN_TRIMMERS)
        state.drop(model, state.TOKEN_RUNTIME)

    report = {**stream_report(kept, skip, skipped, per_token), "trimmers": len(by_path), "guidance": dict(other),
              "notes": notes, "trimmer_params": sum(p.numel() for p in trimmers.parameters())}
    return PassResult(model, report, undo, trainable=bool(by_path))


def decoder_start(config: SmartTrimTokensConfig, depth: int) -> int:
    """The first trimmed layer of a language model of ``depth`` layers."""
    start = config.decoder_start if config.decoder_start >= 0 else max(1, round(depth / 16))
    return min(start, depth - 1)


def _vision_skip(model: nn.Module, model_map: ModelMap, config: SmartTrimTokensConfig, cap, vision: list,
                 by_path: dict) -> TokenRuntime | None:
    """Skip-mode trimming of a decoder VLM's vision tower (the splice keeps every position)."""
    text_embed = _text_embedding(model, cap, model_map.inputs)
    guide = "embed:" + text_embed[0] if text_embed is not None else None
    ow = _other_width(model_map, model, guide, text_embed)
    layers = {la.path: TokenTrimmer(la.width, ow, hidden=config.hidden or None)
              for s in vision for la in s.layers[max(config.start_layer, 1):]}
    if not layers:
        return None
    by_path.update(layers)
    return TokenRuntime(model, model_map, cap, SmartTrimDecider(layers), layers, {s.name: guide for s in vision},
                        threshold=config.threshold, special={s.name: [0] for s in vision}, tau=config.tau,
                        text_embed=text_embed, skip=[s.name for s in vision])


def _decoder_tokens(model: nn.Module, model_map: ModelMap, config: SmartTrimTokensConfig, cap) -> PassResult:
    """Image-token trimming inside the language model of a decoder VLM (see trimkit.runtime.decoder)."""
    span = model_map.image_span
    lm = model_map.stream(span["stream"])
    vision = [s for s in model_map.streams if s.modality == "vision"]
    start = decoder_start(config, len(lm.layers))
    lm_trimmers = {la.path: TokenTrimmer(la.width, la.width, hidden=config.hidden or None) for la in lm.layers[start:]}
    by_path = dict(lm_trimmers)
    side = _vision_skip(model, model_map, config, cap, vision, by_path) if config.vision == "skip" else None
    trimmers = state.Trimmers({p.replace(".", "__"): t for p, t in by_path.items()})
    trimmers.train(model.training)
    state.attach(model, state.TOKEN_TRIMMERS, trimmers)
    runtime = DecoderRuntime(model, model_map, cap, SmartTrimDecider(lm_trimmers), lm.name,
                             [la.path for la in lm.layers], lm_trimmers, [la.path for s in vision for la in s.layers],
                             threshold=config.threshold, tau=config.tau)
    state.put(model, state.TOKEN_RUNTIME, runtime)

    def undo():
        runtime.remove()
        if side is not None:
            side.remove()
        state.drop(model, state.TOKEN_TRIMMERS)
        state.drop(model, state.TOKEN_RUNTIME)

    notes = [f"decoder VLM: image features are spliced into stream '{lm.name}' by {', '.join(span['ops']) or 'a splice'}; "
             f"its image tokens are trimmed from layer {start} on, guided by the text tokens of the same row; "
             "text tokens are never dropped"]
    if side is not None:
        notes += [f"stream '{s.name}' (vision tower): skip mode, so the splice keeps every position: a dropped patch "
                  "skips the remaining vision layers and is carried through" for s in vision]
    else:
        notes += [f"stream '{s.name}' (vision tower) left whole (vision=\"skip\" trims it in skip mode)" for s in vision]
    skip = [s.name for s in vision] if side is not None else []
    skipped = [s.name for s in model_map.streams if s.name != lm.name and s.name not in skip]
    report = {**stream_report([lm.name] + skip, skip, skipped, set()), "trimmers": len(by_path),
              "guidance": {lm.name: "text", **({s.name: side.guidance[s.name] for s in vision} if side else {})},
              "notes": notes, "trimmer_params": sum(p.numel() for p in trimmers.parameters()),
              "decoder": {"stream": lm.name, "start_layer": start, "splice": list(span["ops"]),
                          "vision": config.vision}}
    return PassResult(model, report, undo, trainable=True)


def token_runtime(model: nn.Module) -> TokenRuntime | None:
    """The runtime ``smarttrim.tokens`` installed on ``model`` (None when not applied)."""
    return state.get(model, state.TOKEN_RUNTIME)
