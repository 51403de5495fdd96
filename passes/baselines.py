"""What the training-free token baselines share: the keep schedule, its saved buffers, and applying one.

The baselines (``random.tokens`` in :mod:`.random_tokens`, ``topk.cls_attention`` in :mod:`.topk`,
``tome.merge`` in :mod:`.tome`) are token deciders (:class:`ScheduleDecider`) run by the same
:class:`~trimkit.runtime.TokenRuntime` as ``smarttrim.tokens`` (a pre-hook on each trimmed layer
shrinks the hidden states and slices every sequence-aligned side argument of the later layers), but
decide without any trained module, and identically in train and eval mode (a hard selection;
gradients reach the backbone through the kept or merged tokens).

**Schedule.** Let ``n0`` be the prunable tokens entering a stream (all tokens but the special ones,
``hints["special_tokens"]``; negative positions count from the end). Before the ``j``-th trimmed
layer of the stream (``j = 1, 2, ...``; the layers from ``start_layer`` on) every row keeps its
special tokens and ``max(1, round(n0 * keep_ratio ** j))`` prunable tokens, i.e. about
``keep_ratio`` of the prunable tokens entering that layer. Every row keeps the same number, so no
padding is ever needed. With ``flops_ratio > 0`` the pass bisects ``keep_ratio`` at apply time, with
:func:`trimkit.profile.count_flops` on one row of the example inputs, until the executed-FLOPs ratio
against the untrimmed model is as close to ``flops_ratio`` as the token granularity allows; the
calibrated ratio lives in a buffer (``model.trimkit_baseline_tokens.keep_ratio``), so saved folders
restore it without calibrating again.

**threshold.** These passes have no keep probabilities; ``threshold = 0.0`` keeps every token (the
contract of every trimming pass), any other value applies the schedule.

**Methods** (each in its own module).

* ``random.tokens`` keeps a random subset drawn from a generator seeded by ``seed`` and the layer;
  the random scores belong to the original token positions, so every row and every forward keeps the
  same positions (a batch gives the results of its rows run one by one). Padding tokens of a text
  stream (from the backbone's ``masks`` hint) are dropped first, here and in ``topk.cls_attention``.
* ``topk.cls_attention`` (EViT-like) keeps the tokens the first special token ([CLS]) attends to
  most, averaged over heads, in the self-attention of the *previous* layer of the stream (so
  ``start_layer >= 1``). The probabilities are read where that attention computes them: the softmax
  output of eager attention, the CLS row recomputed from the query and key arguments of
  ``scaled_dot_product_attention`` (its mask included), or the averaged weights of
  ``multi_head_attention_forward``. A stream without a special token uses the attention every key
  receives, averaged over queries.
* ``tome.merge`` (ToMe-like bipartite soft matching) splits the prunable tokens alternately into
  sets A and B, matches each A token to its most similar B token (cosine of the hidden states
  entering the layer), and merges the best-matched A tokens into their partners with a size-weighted
  average, in as many rounds as the schedule needs. Sizes are tracked per row (they sum to the
  original length); with ``proportional = True`` every attention whose keys are the stream's tokens
  gets ``log(size)`` added to its logits. Special tokens are never merged; padding tokens only merge
  with padding tokens. Side arguments follow the surviving positions, in their original order.

**Skip mode.** A stream whose every layer output is read at full length (BridgeTower's towers feed
each layer to a bridge) cannot shrink. As in ``smarttrim.tokens``, its layers then compute only the
tokens still alive and write their new states back into the full-length sequence, where pruned
tokens carry the state they had when pruned. ``random.tokens`` and ``topk.cls_attention`` choose
among the alive tokens only (the [CLS] attention is that of the alive tokens in the previous
layer); ``tome.merge`` merges among the alive tokens, the layer computes from the merged states of
the survivors, and merged-away tokens are carried through like pruned ones (bridges still read them).

Which mode a stream gets is found at apply time: the token pass's structural probe (removal first,
then skip mode), then a forward check of the baseline itself at a few keep ratios (a stream where
removal breaks the forward is moved to skip mode, one where both do is left whole). Streams that
cannot lose tokens either way (the task's per-token outputs, consumers that read tokens by
position) are left whole. The modes live in the schedule's buffers, so saved folders restore them.

**ViLT.** ``ViltEmbeddings`` draws a permutation of its patch tokens from the global generator on
every forward (``torch.multinomial`` over all patches, even when none is dropped). ``random.tokens``
and ``tome.merge`` choose by sequence position, so they keep or merge different patches on each
forward, and a row alone draws a different permutation than in a batch: their outputs repeat only
when the global generator is seeded before each forward, and batched runs equal one-by-one runs only
for the first row. ``topk.cls_attention`` follows the patches and repeats up to rounding.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from trimkit.errors import ConfigError
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.profile import count_flops
from trimkit.runtime import (REMOVE, SKIP, WHOLE, TokenDecider, TokenDecision, TokenRuntime, TokenStep,
                             candidate_streams, capture_padded, per_token_streams, probe_streams, split_row, state,
                             stream_report, task_logits, trimming_off)

__all__ = ["BaselineConfig", "BaselineSchedule", "closest_at", "install_baseline", "ScheduleDecider", "keep_counts", "schedule_points", "topk_keep",
           "apply_baseline", "baseline_runtime"]

_PASSES = ("random.tokens", "topk.cls_attention", "tome.merge", "smarttrim.tokens")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaselineConfig(PassConfig):
    """Fields shared by the three baselines (see the module docstring for the schedule).

    keep_ratio: fraction of the prunable tokens entering each trimmed layer that it keeps.
    flops_ratio: when > 0, calibrate keep_ratio at apply time to this executed-FLOPs ratio.
    start_layer: first layer index (within each stream) that trims.
    streams: regex on stream names to trim ("" = every stream that can be trimmed).
    threshold: 0.0 keeps every token; any other value applies the schedule.
    """

    tags: ClassVar[tuple[str, ...]] = ("trim",)
    forbids_after: ClassVar[tuple[str, ...]] = _PASSES

    keep_ratio: float = 0.5
    flops_ratio: float = 0.0
    start_layer: int = 1
    streams: str = ""
    threshold: float = 0.5

    def validate(self) -> None:
        n = self.name
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"{n}: keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.flops_ratio <= 1.0:
            raise ConfigError(f"{n}: flops_ratio must be in [0, 1] (0 = no calibration), got {self.flops_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{n}: threshold must be in [0, 1], got {self.threshold}")
        if self.start_layer < 0:
            raise ConfigError(f"{n}: start_layer must be >= 0, got {self.start_layer}")
        try:
            re.compile(self.streams)
        except re.error as exc:
            raise ConfigError(f"{n}: streams is not a valid regex: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------
def keep_counts(n0: int, keep_ratio: float, layers: int) -> list[int]:
    """Prunable tokens kept before each of ``layers`` trimmed layers: ``max(1, round(n0 * r ** j))``.

    ``n0 = 0`` (nothing prunable) keeps 0 everywhere.
    """
    if n0 <= 0:
        return [0] * layers
    return [min(n0, max(1, math.floor(n0 * keep_ratio ** j + 0.5))) for j in range(1, layers + 1)]


def topk_keep(scores: torch.Tensor, special: torch.Tensor, count: int) -> torch.Tensor:
    """Bool ``[B, L]``: the special tokens plus the ``count`` highest-scoring other tokens of each row."""
    s = scores.float().masked_fill(special, float("-inf"))
    top = s.topk(count, dim=1).indices
    return special | torch.zeros_like(special).scatter(1, top, True)


# ----------------------------------------------------------------------------------------------
# What the runtime keeps between the passes' apply and a saved folder
# ----------------------------------------------------------------------------------------------
class BaselineSchedule(state.PassThrough):
    """Buffers that fix a baseline's behaviour: the keep ratio and how each candidate stream trims.

    ``active`` holds one mode per candidate stream: ``WHOLE`` (left whole), ``REMOVE`` (pruned
    tokens are removed) or ``SKIP`` (pruned tokens skip the later layers and are carried through at
    full length). Being buffers, they are saved with the model's state dict, so a restored folder
    reuses the calibrated ratio and the probed streams exactly.
    """

    WHOLE, REMOVE, SKIP = 0, 1, 2
    trimkit_no_quant = True

    def __init__(self, streams: list[str], keep_ratio: float):
        super().__init__()
        self.streams = list(streams)
        self.register_buffer("keep_ratio", torch.tensor(float(keep_ratio), dtype=torch.float64))
        self.register_buffer("active", torch.ones(len(streams), dtype=torch.uint8))

    def mode(self, stream: str) -> int:
        return int(self.active[self.streams.index(stream)]) if stream in self.streams else self.WHOLE

    def is_active(self, stream: str) -> bool:
        return self.mode(stream) != self.WHOLE

    def set_mode(self, stream: str, mode: int) -> None:
        if mode not in (self.WHOLE, self.REMOVE, self.SKIP):
            raise ValueError(f"mode must be 0 (whole), 1 (remove) or 2 (skip), got {mode}")
        self.active[self.streams.index(stream)] = mode

    def set_active(self, stream: str, on: bool) -> None:
        """Leave ``stream`` whole (False) or trim it by removal (True)."""
        self.set_mode(stream, self.REMOVE if on else self.WHOLE)

    def trimmed(self) -> list[str]:
        return [s for s in self.streams if self.is_active(s)]

    def skipped(self) -> list[str]:
        """The trimmed streams in skip mode."""
        return [s for s in self.streams if self.mode(s) == self.SKIP]


# ----------------------------------------------------------------------------------------------
# The decider every baseline derives from
# ----------------------------------------------------------------------------------------------
class ScheduleDecider(TokenDecider):
    """Keeps, before the ``j``-th trimmed layer of a stream, the special tokens and
    ``keep_counts(n0, keep_ratio, j)[-1]`` others; subclasses say which (:meth:`choose`).

    ``special``: stream -> special positions; ``modality``: stream -> its modality; ``pad_inputs``:
    model input names -> the modality whose padding they mark (1 = real token). Padding tokens are
    offered to :meth:`choose` as ``pads`` (True: padding).
    """

    carried_keys_masked = False  # a skip stream's carried tokens stay keys of other streams' attention

    def __init__(self, schedule: BaselineSchedule, special: dict[str, list[int]], modality: dict[str, str],
                 pad_inputs: dict[str, str] | None = None):
        self.schedule, self.special, self.modality = schedule, special, modality
        self.pad_inputs = dict(pad_inputs or {})
        self.lengths: dict[str, int] = {}  # stream -> untrimmed length seen by the latest trimming forward
        self._pads: dict[str, torch.Tensor] = {}
        self.batch = 1

    def special_positions(self, stream: str, length: int) -> list[int]:
        """The stream's special positions in ``[0, length)`` (negative ones counted from the end), once each."""
        out = []
        for p in self.special.get(stream, [0]):
            q = p % length if -length <= p < length else None
            if q is not None and q not in out:
                out.append(q)
        return out

    def reset(self, args: tuple, kwargs: dict) -> None:
        self._pads = {}
        self.batch = next((v.shape[0] for v in list(args) + list(kwargs.values())
                           if isinstance(v, torch.Tensor) and v.dim()), 1)
        for name, modality in self.pad_inputs.items():
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                self._pads[modality] = t == 0

    def decide(self, step: TokenStep) -> TokenDecision | None:
        b, length = step.hidden.shape[:2]
        self.lengths[step.stream] = step.length
        positions = step.positions()
        firsts = self.special_positions(step.stream, step.length)
        special = torch.zeros(b, length, dtype=torch.bool, device=step.hidden.device)
        for p in firsts:
            special |= positions == p
        alive = step.valid  # skip mode: the tokens still computed, at full length (None: all)
        current = int((alive[0] & ~special[0]).sum()) if alive is not None else length - len(firsts)
        count = keep_counts(step.length - len(firsts), float(self.schedule.keep_ratio), step.ordinal)[-1]
        if step.threshold <= 0 or not self.schedule.is_active(step.stream) or count >= current:
            return None
        pads = self._pads.get(self.modality.get(step.stream))
        if pads is not None and (pads.shape[1] != step.length or pads.shape[0] != b):
            pads = None
        pad_now = torch.gather(pads.to(step.hidden.device), 1, positions) if pads is not None else None
        return self.choose(step, special, pad_now, count, current)

    def choose(self, step: TokenStep, special: torch.Tensor, pads: torch.Tensor | None, count: int,
               current: int) -> TokenDecision:
        """The decision at a layer that keeps ``count`` of the ``current`` prunable tokens (the special
        ones come on top). The default keeps the ``count`` best of :meth:`scores`."""
        scores = self.scores(step)
        if pads is not None:
            scores = scores.float().masked_fill(pads, float("-inf"))
        if step.valid is not None:
            scores = scores.float().masked_fill(~step.valid, float("-inf"))
        return TokenDecision(keep=topk_keep(scores, special, count))

    def scores(self, step: TokenStep) -> torch.Tensor:
        """``[B, Lc]`` scores of the current tokens (higher: kept first)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Applying a baseline
# ----------------------------------------------------------------------------------------------
def _probe_modes(model: nn.Module, model_map: ModelMap, cap, names: list[str], start_layer: int,
                 special: dict, inputs: dict) -> tuple[dict[str, int], list[str]]:
    """How each stream can lose tokens, by the token passes' probe (random per-row keep counts: a
    padded batch must equal its rows run one by one): removal first, then skip mode, else whole."""
    layers = {n: [la.path for la in model_map.stream(n).layers[start_layer:]] for n in names}
    modes, notes = probe_streams(model, model_map, cap, layers, {n: None for n in names}, special, None, inputs,
                                 joint=False, skip_note="every layer's output is read at full length, so pruned "
                                 "tokens skip the later layers and are carried through (skip mode)")
    return {n: {WHOLE: BaselineSchedule.WHOLE, REMOVE: BaselineSchedule.REMOVE, SKIP: BaselineSchedule.SKIP}[m]
            for n, m in modes.items()}, notes


def _measure(model: nn.Module, runtime: TokenRuntime, schedule: BaselineSchedule, config: BaselineConfig,
             inputs: dict) -> tuple[float, list[str]]:
    """Check the method on each stream, calibrate ``keep_ratio`` when asked; the executed-FLOPs ratio."""
    notes = _check_method(model, runtime, schedule, inputs, config.name)
    row = split_row(inputs, 0)
    with trimming_off(model):
        full = count_flops(model, row).flops
    if config.flops_ratio > 0:
        notes += _calibrate(model, runtime, schedule, row, full, config.flops_ratio)[1]
    return _flops_ratio(model, row, full), notes


_CHECK_RATIOS = (0.3, 0.6)  # a harsh schedule, and one that drops tokens at nearly every layer


def _check_method(model: nn.Module, runtime: TokenRuntime, schedule: BaselineSchedule, inputs: dict,
                  method: str) -> list[str]:
    """Run the baseline on each active stream alone at a few keep ratios; a stream where removal
    fails is tried in skip mode, and one where that fails too is left whole."""
    notes = []
    saved_ratio, saved_threshold = float(schedule.keep_ratio), runtime.threshold
    modes = {name: schedule.mode(name) for name in schedule.streams}
    active = schedule.trimmed()
    was_training = model.training

    def failure(name: str, mode: int) -> str:
        for other in schedule.streams:
            schedule.set_mode(other, mode if other == name else BaselineSchedule.WHOLE)
        for ratio in _CHECK_RATIOS:
            schedule.keep_ratio.fill_(ratio)
            try:
                with torch.no_grad():
                    model(**inputs)
            except Exception as exc:  # the check decides; any failure rules this mode out
                return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return ""

    try:
        model.eval()
        runtime.threshold = 0.5
        for name in active:
            why = failure(name, modes[name])
            if why and modes[name] == BaselineSchedule.REMOVE and not failure(name, BaselineSchedule.SKIP):
                modes[name] = BaselineSchedule.SKIP
                notes.append(f"stream '{name}': {method} breaks the forward when tokens are removed ({why}); "
                             "trimmed in skip mode")
            elif why:
                modes[name] = BaselineSchedule.WHOLE
                notes.append(f"stream '{name}' left whole: {method} fails on it ({why})")
    finally:
        for name, mode in modes.items():
            schedule.set_mode(name, mode)
        schedule.keep_ratio.fill_(saved_ratio)
        runtime.threshold = saved_threshold
        model.train(was_training)
    return notes


def _flops_ratio(model: nn.Module, row: dict, full: float) -> float:
    return count_flops(model, row).flops / full


def schedule_points(streams: dict[str, tuple[int, int]]) -> list[float]:
    """Keep ratios in (0, 1) at which some layer's kept count changes, ascending.

    ``streams`` maps each trimmed stream to ``(n0, layers)``: its prunable tokens and trimmed layers.
    Between two consecutive points every layer keeps the same number of tokens.
    """
    points = set()
    for n0, layers in streams.values():
        for j in range(1, layers + 1):
            points.update(((c + 0.5) / n0) ** (1.0 / j) for c in range(1, n0))
    return sorted(p for p in points if 0.0 < p < 1.0)


def _calibrate(model: nn.Module, runtime: TokenRuntime, schedule: BaselineSchedule, row: dict, full: float,
               target: float) -> tuple[float, list[str]]:
    """Set keep_ratio so the executed-FLOPs ratio on ``row`` is the closest to ``target`` the schedule allows.

    FLOPs only change where a layer's kept count does (:func:`schedule_points`), and never decrease
    with the ratio, so a binary search over one ratio per distinct schedule needs ``log2`` of their
    number of forwards.
    """
    sizes = {}
    decider = runtime.decider
    for name in schedule.trimmed():
        length = decider.lengths.get(name)
        if length is not None:
            n0 = length - len(decider.special_positions(name, length))
            sizes[name] = (n0, sum(1 for p in runtime.layers if runtime.stream_of[p] == name))
    points = [0.0] + schedule_points(sizes) + [1.0]
    ratios = [(a + b) / 2 for a, b in zip(points, points[1:])] + [1.0]
    def measure(ratio: float) -> float:
        schedule.keep_ratio.fill_(ratio)
        return _flops_ratio(model, row, full)

    saved = runtime.threshold
    runtime.threshold = 0.5
    try:
        best, reached = closest_at(ratios, measure, target)
        schedule.keep_ratio.fill_(best)
        notes = []
        if abs(reached - target) > 0.02:
            notes.append(f"flops_ratio {target}: the closest this schedule reaches on these streams is "
                         f"{reached:.3f} (keep_ratio {best:.4f})")
        return best, notes
    finally:
        runtime.threshold = saved


def _tokens_kept(runtime: TokenRuntime, schedule: BaselineSchedule) -> dict[str, dict]:
    """Per trimmed stream: its length on the example inputs and the tokens each trimmed layer keeps."""
    out = {}
    for name in schedule.trimmed():
        length = runtime.decider.lengths.get(name)
        if length is None:
            continue
        special = len(runtime.decider.special_positions(name, length))
        layers = sum(1 for p in runtime.layers if runtime.stream_of[p] == name)
        out[name] = {"length": length,
                     "kept": [special + k for k in keep_counts(length - special, float(schedule.keep_ratio), layers)]}
    return out


def closest_at(values: list[float], measure: Callable[[float], float], target: float) -> tuple[float, float]:
    """``(value, measure(value))`` closest to ``target`` among ascending ``values``, ``measure``
    non-decreasing: a binary search with about ``log2(len(values))`` calls."""
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = measure(values[i])
        return seen[i]

    lo, hi = 0, len(values) - 1
    if at(lo) >= target:
        hi = lo
    elif at(hi) <= target:
        lo = hi
    while hi - lo > 1:  # invariant: at(lo) < target < at(hi)
        mid = (lo + hi) // 2
        if at(mid) > target:
            hi = mid
        else:
            lo = mid
    best = lo if abs(at(lo) - target) <= abs(at(hi) - target) else hi
    return values[best], seen[best]


def install_baseline(model: nn.Module, schedule, make_runtime):
    """Attach a baseline's ``schedule`` (saved with the weights) and install the runtime
    ``make_runtime()`` builds; returns ``(runtime, undo)``. Nothing stays attached when it fails."""
    state.attach(model, state.BASELINE_TOKENS, schedule)
    try:
        runtime = make_runtime()
    except Exception:
        state.drop(model, state.BASELINE_TOKENS)
        raise
    state.put(model, state.BASELINE_RUNTIME, runtime)

    def undo():
        runtime.remove()
        state.drop(model, state.BASELINE_TOKENS)
        state.drop(model, state.BASELINE_RUNTIME)

    return runtime, undo


def apply_baseline(model: nn.Module, model_map: ModelMap, config: BaselineConfig, context: PassContext,
                   make_decider, method: str) -> PassResult:
    """Apply a schedule baseline: ``make_decider(schedule, special, modality, pad_inputs)`` builds its decider."""
    name = config.name
    if context.inputs is None:
        raise ConfigError(f"{name} needs example inputs to find each layer's sequence-aligned arguments")
    if state.has_module(model, state.BASELINE_TOKENS) or state.get(model, state.TOKEN_RUNTIME) is not None:
        raise ConfigError(f"{name}: the model already has a token-trimming pass")
    cap = capture_padded(model, context.inputs)
    hints = context.hints or {}
    per_token = per_token_streams(model_map, cap, task_logits(context.hints, cap.output))
    candidates = candidate_streams(model_map, re.compile(config.streams), per_token, config.start_layer)
    special = {s: list(hints.get("special_tokens", {}).get(model_map.stream(s).modality, [0])) for s in candidates}
    pad_inputs = {k: v for k, v in hints.get("masks", {}).items() if v in ("text", "vision")}
    notes: list[str] = []
    schedule = BaselineSchedule(candidates, config.keep_ratio)
    if not context.restoring:
        modes, notes = _probe_modes(model, model_map, cap, candidates, config.start_layer, special, context.inputs)
        for s in candidates:
            schedule.set_mode(s, modes[s])
    layers = [layer.path for s in candidates for layer in model_map.stream(s).layers[config.start_layer:]]
    runtime, undo = install_baseline(model, schedule, lambda: TokenRuntime(
        model, model_map, cap, make_decider(schedule, special, {s.name: s.modality for s in model_map.streams},
                                            pad_inputs),
        layers, special=special, threshold=config.threshold, skip=schedule.skipped))

    measured = None
    if not context.restoring:
        try:
            measured, more = _measure(model, runtime, schedule, config, context.inputs)
            notes += more
        except Exception:
            undo()
            raise
    whole = [s.name for s in model_map.streams if s.name not in schedule.trimmed()]
    report = {"method": method, **stream_report(schedule.trimmed(), schedule.skipped(), whole, per_token),
              "trimmed_layers": sum(1 for p in layers if runtime.stream_of[p] in schedule.trimmed()),
              "keep_ratio": float(schedule.keep_ratio), "tokens_kept": _tokens_kept(runtime, schedule),
              "flops_ratio": measured, "notes": notes}
    return PassResult(model, report, undo, trainable=False)


def baseline_runtime(model: nn.Module) -> TokenRuntime | None:
    """The token runtime of the baseline applied to ``model`` (None when there is none)."""
    return state.get(model, state.BASELINE_RUNTIME)
