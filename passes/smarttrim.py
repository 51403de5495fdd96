"""SmartTrim token trimming as a pass: ``smarttrim.tokens``.

Inserts one :class:`~trimkit.runtime.TokenTrimmer` before every trimmed layer of every trimmed
stream (by default: all layers but the first of each stream whose tokens are not the task's
per-token outputs). Guidance for a stream comes from the stream it cross-attends to, or the stream
that cross-attends to it, or — for a fused single stream — the text input's embedding; dual
encoders fall back to same-modality guidance and the report says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from trimkit.errors import ConfigError
from trimkit.graph import capture
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.passes.registry import register_pass
from trimkit.runtime import TokenRuntime, TokenTrimmer

__all__ = ["SmartTrimTokensConfig", "token_runtime"]

_ATTR = "trimkit_token_trimmers"


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
        try:
            re.compile(self.streams)
        except re.error as exc:
            raise ConfigError(f"smarttrim.tokens: streams is not a valid regex: {exc}") from exc


def _per_token_streams(model_map: ModelMap, cap, logits: torch.Tensor | None) -> set[str]:
    """Streams whose length shows up in the task logits (their tokens are outputs: never trimmed)."""
    out = set()
    if logits is None or logits.dim() < 3:
        return out
    for s in model_map.streams:
        call = next((c for c in cap.calls if c.path == s.layers[-1].path), None)
        if call is None or not call.outputs:
            continue
        shape = call.outputs[0].meta["trimkit.shape"]
        if shape and len(shape) == 3 and logits.shape[1] == shape[1]:
            out.add(s.name)
    return out


def _with_padding(inputs: dict) -> dict:
    """``inputs`` with the last position of row 0 padded in every all-ones 2-D ``*mask*`` input."""
    out = dict(inputs)
    for name, v in inputs.items():
        if ("mask" in name and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] > 2
                and not v.is_floating_point() and bool((v == 1).all())):
            v = v.clone()
            v[0, -1] = 0
            out[name] = v
    return out


def _split_row(inputs: dict, i: int) -> dict:
    return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in inputs.items()}


def _rows_disagree(model: nn.Module, inputs: dict, batched, tol: float = 1e-4) -> str:
    """Name of the first output that differs between the batch and its rows run one by one ('' if none)."""
    flat_b = [t for t in tree_flatten(batched)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    n = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
    if n < 2:
        return ""
    rows = [[t for t in tree_flatten(model(**_split_row(inputs, i)))[0]
             if isinstance(t, torch.Tensor) and t.is_floating_point()] for i in range(n)]
    for j, tb in enumerate(flat_b):
        parts = [r[j] for r in rows if j < len(r)]
        if len(parts) != n or tb.dim() == 0 or tb.shape[0] != n or any(p.shape[1:] != tb.shape[1:] for p in parts):
            continue
        err = (torch.cat(parts) - tb).abs().max().item()
        if err > tol * max(1.0, tb.abs().max().item()):
            return f"output {j}: max difference {err:.3g}"
    return ""


class _ProbeTrimmer(nn.Module):
    """Random-looking decisions that depend on the tokens only (so a row decides the same alone
    and in a batch), with a keep rate that differs by row, so a padded batch mixes lengths."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def forward(self, x: torch.Tensor, g_self: torch.Tensor, g_other) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(x.shape[-1], 2, generator=gen).to(x.dtype)
        scale = x.shape[-1] ** 0.5
        token = torch.nn.functional.cosine_similarity(x, w[:, 0].expand_as(x), dim=-1) * scale
        offset = torch.nn.functional.cosine_similarity(g_self, w[:, 1].expand_as(g_self), dim=-1) * scale
        return 3 * token + 2 * torch.tanh(offset).unsqueeze(1)


def _probe(model: nn.Module, model_map: ModelMap, cap, layers, other: dict, special: dict, text_embed,
           inputs: dict, skip: list[str]) -> str:
    """Why removing tokens with random decisions at ``layers`` (paths) breaks the model ('' when it does not).
    The probe leaves the global random state as it found it (some models draw in their forward)."""
    with torch.random.fork_rng(devices=[]):
        return _probe_forward(model, model_map, cap, layers, other, special, text_embed, inputs, skip)


def _probe_forward(model: nn.Module, model_map: ModelMap, cap, layers, other: dict, special: dict, text_embed,
                   inputs: dict, skip: list[str]) -> str:
    trimmers = {p: _ProbeTrimmer(i) for i, p in enumerate(layers)}
    probe = TokenRuntime(model, model_map, cap, trimmers, other, threshold=0.5, special=special,
                         text_embed=text_embed, skip=skip)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            batched = model(**inputs)
            mismatch = _rows_disagree(model, inputs, batched)
            probe.threshold = 1.0
            model(**inputs)
            padded = _with_padding(inputs)  # a padded text row takes other paths in some models
            if padded is not inputs and any(padded[k] is not inputs[k] for k in inputs):
                for threshold in (0.5, 1.0):
                    probe.threshold = threshold
                    model(**padded)
        if mismatch:
            return (f"with tokens removed, a padded batch and row-by-row runs disagree ({mismatch}); "
                    "something reads its tokens by position")
        return ""
    except Exception as exc:  # the probe decides; any failure means "not trimmable this way"
        return f"removing its tokens breaks the forward ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    finally:
        probe.remove()
        model.train(was_training)


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
    for name in trimmed:
        s = model_map.stream(name)
        if mode == "self":
            other[name] = None
            continue
        keyed = [a.key_stream for lay in s.layers for a in lay.attention
                 if a.kind == "cross" and not a.key_stream.startswith("input:")]
        keying = [t.name for t in model_map.streams for lay in t.layers for a in lay.attention
                  if a.kind == "cross" and a.key_stream == name]
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


@register_pass(SmartTrimTokensConfig)
def smarttrim_tokens(model: nn.Module, model_map: ModelMap, config: SmartTrimTokensConfig,
                     context: PassContext) -> PassResult:
    if context.inputs is None:
        raise ConfigError("smarttrim.tokens needs example inputs to find each layer's sequence-aligned arguments")
    if hasattr(model, _ATTR):
        raise ConfigError("smarttrim.tokens is already applied to this model")
    # a padded row makes models that skip their attention mask on unpadded batches show it
    cap = capture(model, _with_padding(context.inputs))
    logits = None
    task = context.hints.get("task") if context.hints else None
    try:
        logits = task.logits(cap.output) if task is not None else None
    except Exception:
        logits = None
    if logits is None:
        first = getattr(cap.output, "logits", None)
        logits = first if isinstance(first, torch.Tensor) else None
    per_token = _per_token_streams(model_map, cap, logits)
    pattern = re.compile(config.streams)
    trimmed = [s.name for s in model_map.streams if pattern.search(s.name) and s.name not in per_token
               and len(s.layers) > config.start_layer]
    skipped = [s.name for s in model_map.streams if s.name not in trimmed]
    text_embed = _text_embedding(model, cap, model_map.inputs)
    other, notes = _guidance(model_map, trimmed, config.guidance, text_embed)
    def build(names: list[str]):
        by_path: dict[str, TokenTrimmer] = {}
        for name in names:
            s = model_map.stream(name)
            ow = _other_width(model_map, model, other[name], text_embed)
            for layer in s.layers[config.start_layer:]:
                by_path[layer.path] = TokenTrimmer(layer.width, ow, hidden=config.hidden or None)
        return by_path

    special = {name: list((context.hints or {}).get("special_tokens", {}).get(model_map.stream(name).modality, [0]))
               for name in trimmed}
    # Probe each stream with random decisions: a stream whose consumers read every layer's output
    # at full length (bridges) is trimmed in skip mode (pruned tokens carried through unchanged);
    # a stream whose consumers index tokens by position either way is left whole. The probe is
    # structural, so it runs the same way when a saved folder is rebuilt.
    kept_streams, skip = [], []
    for name in trimmed:
        verdict = ""
        layers = [layer.path for layer in model_map.stream(name).layers[config.start_layer:]]
        for mode in ("remove", "skip"):
            verdict = _probe(model, model_map, cap, layers, other, special, text_embed, context.inputs,
                             skip=[name] if mode == "skip" else [])
            if not verdict:
                kept_streams.append(name)
                if mode == "skip":
                    skip.append(name)
                    notes.append(f"stream '{name}': every layer's output is read at full length, so pruned "
                                 "tokens skip the layers and are carried through (skip mode)")
                break
        if verdict:
            notes.append(f"stream '{name}' left whole: {verdict}")
    # Streams that work alone can still break each other (a cross-modal layer reading two trimmed
    # streams): probe them together and leave out, last first, the streams the joint run needs whole.
    def joint(names: list[str]) -> str:
        layers = [layer.path for n in names for layer in model_map.stream(n).layers[config.start_layer:]]
        return _probe(model, model_map, cap, layers, other, special, text_embed, context.inputs,
                      skip=[n for n in skip if n in names]) if names else ""

    verdict = joint(kept_streams)
    while verdict:
        for name in reversed(kept_streams):
            rest = [n for n in kept_streams if n != name]
            if not joint(rest):
                break
        else:
            name = kept_streams[-1]
        notes.append(f"stream '{name}' left whole: trimmed together with the others, {verdict}")
        kept_streams.remove(name)
        verdict = joint(kept_streams)
    skip = [n for n in skip if n in kept_streams]
    skipped += [n for n in trimmed if n not in kept_streams]
    trimmed = kept_streams
    by_path = build(trimmed)
    trimmers = nn.ModuleDict({p.replace(".", "__"): t for p, t in by_path.items()})
    trimmers.train(model.training)
    model.add_module(_ATTR, trimmers)
    runtime = TokenRuntime(model, model_map, cap, by_path, other, threshold=config.threshold, special=special,
                           tau=config.tau, text_embed=text_embed, skip=skip)
    model._trimkit_token_runtime = runtime

    def undo():
        runtime.remove()
        delattr(model, _ATTR)
        del model._trimkit_token_runtime

    report = {"trimmed_streams": trimmed, "skip_mode_streams": skip, "skipped_streams": skipped, "per_token_streams": sorted(per_token),
              "trimmers": len(by_path), "guidance": {k: v for k, v in other.items()}, "notes": notes,
              "trimmer_params": sum(p.numel() for p in trimmers.parameters())}
    return PassResult(model, report, undo, trainable=bool(by_path))


def token_runtime(model: nn.Module) -> TokenRuntime | None:
    return getattr(model, "_trimkit_token_runtime", None)
