"""Training-free token-reduction baselines: ``random.tokens``, ``topk.cls_attention``, ``tome.merge``.

All three remove tokens through the same machinery as ``smarttrim.tokens`` (a
:class:`~trimkit.runtime.TokenRuntime` subclass: a pre-hook on each trimmed layer shrinks the
hidden states and slices every sequence-aligned side argument of the later layers), but decide
without any trained module, and identically in train and eval mode (a hard selection; gradients
reach the backbone through the kept or merged tokens).

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

**Methods.**

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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trimkit import ops
from trimkit.control import trimming_off
from trimkit.errors import ConfigError, TrimkitError
from trimkit.graph import capture
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.passes.registry import register_pass
from trimkit.passes.smarttrim import _per_token_streams, _probe, _split_row, _with_padding, token_runtime
from trimkit.runtime import StreamState, TokenRuntime

__all__ = ["RandomTokensConfig", "TopKClsAttentionConfig", "ToMeMergeConfig", "BaselineRuntime",
           "BaselineSchedule", "keep_counts", "schedule_points", "bipartite_merge",
           "baseline_runtime"]

_ATTR = "trimkit_baseline_tokens"
_RT_ATTR = "_trimkit_baseline_runtime"
_PASSES = ("random.tokens", "topk.cls_attention", "tome.merge", "smarttrim.tokens")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BaselineConfig(PassConfig):
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


@dataclass(frozen=True)
class RandomTokensConfig(_BaselineConfig):
    """Keep a seeded random subset of the prunable tokens at each trimmed layer."""

    name: ClassVar[str] = "random.tokens"
    seed: int = 0


@dataclass(frozen=True)
class TopKClsAttentionConfig(_BaselineConfig):
    """Keep the tokens the [CLS] query attends to most in the previous layer (EViT-like)."""

    name: ClassVar[str] = "topk.cls_attention"

    def validate(self) -> None:
        super().validate()
        if self.start_layer < 1:
            raise ConfigError(f"{self.name}: start_layer must be >= 1 (the [CLS] attention comes from the "
                              f"previous layer), got {self.start_layer}")


@dataclass(frozen=True)
class ToMeMergeConfig(_BaselineConfig):
    """Merge similar tokens by bipartite soft matching (ToMe-like); proportional: add log(size) to keys."""

    name: ClassVar[str] = "tome.merge"
    proportional: bool = True


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


def _topk_keep(scores: torch.Tensor, special: torch.Tensor, count: int) -> torch.Tensor:
    """Bool ``[B, L]``: the special tokens plus the ``count`` highest-scoring other tokens of each row."""
    s = scores.float().masked_fill(special, float("-inf"))
    top = s.topk(count, dim=1).indices
    return special | torch.zeros_like(special).scatter(1, top, True)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, prunable: torch.Tensor, merge: int,
                    group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on ``x`` ``[B, L, D]`` with token sizes ``size`` ``[B, L]``.

    The prunable tokens (bool ``[B, L]``, the same count ``n`` in every row) are split alternately
    into A (even) and B (odd); the ``merge`` A tokens (at most ``ceil(n / 2)``) whose best cosine
    match in B is highest are folded into it with a size-weighted average. Tokens of different
    ``group`` (e.g. padding vs real) never match unless a row has nothing else left. Returns
    ``(x', size', keep)``: merged states and sizes at full length, and the bool ``[B, L]`` mask of
    the surviving tokens (``merge`` fewer per row).
    """
    b, length, d = x.shape
    n = int(prunable[0].sum())
    if bool((prunable.sum(1) != n).any()):
        raise ValueError(f"every row needs the same number of prunable tokens, got {prunable.sum(1).tolist()}")
    if not 0 <= merge <= (n + 1) // 2 or (merge and n < 2):
        raise ValueError(f"cannot merge {merge} of {n} prunable tokens in one round")
    keep = torch.ones(b, length, dtype=torch.bool, device=x.device)
    if merge == 0:
        return x, size, keep
    order = torch.sort((~prunable).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    with torch.no_grad():
        metric = F.normalize(x.detach().float(), dim=-1)
        scores = ops.gather_along(metric, a_idx, 1) @ ops.gather_along(metric, b_idx, 1).transpose(1, 2)
        if group is not None:
            ga, gb = torch.gather(group, 1, a_idx), torch.gather(group, 1, b_idx)
            scores = scores.masked_fill(ga[:, :, None] != gb[:, None, :], float("-inf"))
        best, partner = scores.max(-1)
        src = best.argsort(dim=1, descending=True, stable=True)[:, :merge]
    src_pos = torch.gather(a_idx, 1, src)
    dst_pos = torch.gather(b_idx, 1, torch.gather(partner, 1, src))
    weighted = x * size.unsqueeze(-1).to(x.dtype)
    weighted = weighted.scatter_add(1, dst_pos.unsqueeze(-1).expand(-1, -1, d), ops.gather_along(weighted, src_pos, 1))
    new_size = size.scatter_add(1, dst_pos, torch.gather(size, 1, src_pos))
    touched = torch.zeros_like(keep).scatter(1, dst_pos, True)
    merged = torch.where(touched.unsqueeze(-1), weighted / new_size.unsqueeze(-1).to(x.dtype), x)
    return merged, new_size, keep.scatter(1, src_pos, False)


# ----------------------------------------------------------------------------------------------
# What the runtime keeps between the passes' apply and a saved folder
# ----------------------------------------------------------------------------------------------
class BaselineSchedule(nn.Module):
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
# [CLS] attention, read where the attention computes it
# ----------------------------------------------------------------------------------------------
class _ClsAttention(TorchFunctionMode):
    """Records the [CLS] row of the self-attention probabilities (mean over heads) as ``[B, Lk]``."""

    def __init__(self, length: int, cls_index: torch.Tensor | int | None, batch: int,
                 record: Callable[[torch.Tensor], None]):
        super().__init__()
        self.length, self.cls, self.batch, self.record = length, cls_index, batch, record
        self.done = False

    def _cls_rows(self, b: int, device) -> torch.Tensor:
        if isinstance(self.cls, torch.Tensor):
            return self.cls.to(device)
        return torch.full((b,), int(self.cls), dtype=torch.long, device=device)

    def _rows(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[B, H, Lq, Lk]`` -> ``[B, Lk]``: the CLS query's row (or all queries'), mean over heads."""
        if self.cls is None:
            return probs.mean(dim=(1, 2))
        b = probs.shape[0]
        return probs[torch.arange(b, device=probs.device), :, self._cls_rows(b, probs.device)].mean(1)

    def _save(self, rows: torch.Tensor) -> None:
        self.record(rows.detach().float())
        self.done = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.done:
            return func(*args, **kwargs)
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            out = func(*args, **kwargs)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, out.dim() - 1) and out.dim() in (3, 4) and out.shape[-1] == out.shape[-2] == self.length:
                b = self.batch
                probs = out if out.dim() == 4 else (out.reshape(b, -1, *out.shape[1:]) if out.shape[0] % b == 0
                                                    else None)
                if probs is not None:
                    self._save(self._rows(probs))
            return out
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            if q.dim() == 4 and q.shape[-2] == k.shape[-2] == self.length:
                probs = self._sdpa_probs(q, k, kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
                                         kwargs.get("scale"))
                self._save(probs.mean(dim=(1, 2)))
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            key = args[1]
            if key.shape[0] == self.length:
                wanted, averaged = kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True)
                kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
                out, weights = func(*args, **kwargs)
                if weights.dim() == 4:
                    self._save(self._rows(weights))
                if not wanted:
                    return out, None
                return out, (weights.mean(1) if averaged else weights)
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa_probs(self, q, k, mask, scale) -> torch.Tensor:
        """Attention probabilities ``[B, H, R, Lk]`` of the CLS query (R = 1) or of every query."""
        b, h, lq, hd = q.shape
        if k.shape[1] != h:
            k = k.repeat_interleave(h // k.shape[1], dim=1)
        scale = scale if scale is not None else hd ** -0.5
        if self.cls is None:
            rows = torch.arange(lq, device=q.device).expand(b, -1)
        else:
            rows = self._cls_rows(b, q.device)[:, None]
        qs = torch.gather(q, 2, rows[:, None, :, None].expand(-1, h, -1, hd))
        logits = (qs.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            m = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, device=q.device).masked_fill(
                ~mask, float("-inf"))
            m = m.float().expand(b, h, lq, k.shape[-2])
            logits = logits + torch.gather(m, 2, rows[:, None, :, None].expand(-1, h, -1, k.shape[-2]))
        return logits.softmax(-1)


# ----------------------------------------------------------------------------------------------
# The runtime
# ----------------------------------------------------------------------------------------------
class BaselineRuntime(TokenRuntime):
    """A token runtime whose decisions come from a fixed rule (random, [CLS] attention, merging).

    ``layers`` maps each trimmed layer path to its ordinal ``j`` (1, 2, ...) within its stream.
    ``pad_inputs`` maps model input names to the modality whose padding they mark (1 = real token).
    """

    def __init__(self, model: nn.Module, model_map: ModelMap, cap, layers: dict[str, int], schedule: BaselineSchedule,
                 *, method: str, special: dict[str, list[int]], pad_inputs: dict[str, str] | None = None,
                 threshold: float = 0.5, seed: int = 0, proportional: bool = True):
        if method not in ("random", "topk", "tome"):
            raise ValueError(f"method must be 'random', 'topk' or 'tome', got {method!r}")
        self.method, self.schedule, self.seed, self.proportional = method, schedule, seed, proportional
        self.pad_inputs = dict(pad_inputs or {})
        self._sizes: dict[str, torch.Tensor] = {}
        self._skip_states: dict[str, torch.Tensor] = {}
        self._cls: dict[str, torch.Tensor] = {}
        self._pads: dict[str, torch.Tensor] = {}
        self._probe_sites: dict[str, str] = {}
        self._batch = 1
        self.lengths: dict[str, int] = {}  # stream -> untrimmed length seen by the latest trimming forward
        super().__init__(model, model_map, cap, layers, {}, threshold=threshold, special=special)

    @property
    def skip_streams(self) -> set[str]:
        """Streams in skip mode: read from the schedule, so a restored state dict sets them."""
        return set(self.schedule.skipped()) | self._skip_extra

    @skip_streams.setter
    def skip_streams(self, value) -> None:
        self._skip_extra = set(value)

    def _soft_skip(self) -> bool:
        return False  # decisions are hard in training too

    # -- installation -------------------------------------------------------------------------
    def _install(self):
        super()._install()
        if self.method != "topk":
            return
        for stream in self.trimmed_streams:
            layers = self.map.stream(stream).layers
            for i, layer in enumerate(layers[1:], start=1):
                if layer.path not in self.trimmers:
                    continue
                site = next((a for a in layers[i - 1].attention if a.kind == "self" and a.key_stream == stream), None)
                if site is None:  # the forward check then finds no scores and leaves the stream whole
                    continue
                self._probe_sites[site.path] = stream
                mod = self.model.get_submodule(site.path)
                self.handles.append(mod.register_forward_pre_hook(self._make_cls_pre(stream)))
                self.handles.append(mod.register_forward_hook(self._attn_post, always_call=True))

    def _make_cls_pre(self, stream: str):
        def pre(module, args):
            st = self.state.streams.get(stream)
            if not self.enabled or st is None or self.threshold <= 0 or not self.schedule.is_active(stream):
                self._modes.append(None)
                return None
            index, full = st.index, st.length
            length = index.shape[1] if index is not None else full
            firsts = self._special_positions(stream, full)
            cls = None
            if firsts:
                cls = (index == firsts[0]).to(torch.uint8).argmax(1) if index is not None else firsts[0]

            def record(rows, stream=stream):  # scores at the original positions (-inf: not computed)
                if index is not None and rows.shape == index.shape:
                    rows = torch.full((rows.shape[0], full), float("-inf"), device=rows.device).scatter(1, index, rows)
                self._cls[stream] = rows

            mode = _ClsAttention(length, cls, self._batch, record)
            mode.__enter__()
            self._modes.append(mode)
            return None

        return pre

    # -- per forward ------------------------------------------------------------------------------
    def _reset(self, module, args, kwargs):
        super()._reset(module, args, kwargs)
        self._sizes, self._cls, self._pads, self._skip_states = {}, {}, {}, {}
        self._batch = next((v.shape[0] for v in list(args) + list(kwargs.values())
                            if isinstance(v, torch.Tensor) and v.dim()), 1)
        for name, modality in self.pad_inputs.items():
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                self._pads[modality] = t == 0

    def _alive(self, st: StreamState) -> torch.Tensor | None:
        return st.valid.sum(1) if st.valid is not None else None

    def _key_mask(self, stream: str, st: StreamState, cross: bool = False) -> torch.Tensor | None:
        # a skip stream's carried tokens stay keys of other streams' attention here (merged tokens of
        # a skip stream have no full-length alive mask)
        mask = super()._key_mask(stream, st)
        size = self._sizes.get(stream)
        if self.method != "tome" or not self.proportional or size is None:
            return mask
        return ops.combine_masks(mask, size.log()[:, None, None, :])

    # -- decisions ------------------------------------------------------------------------------
    def _special_positions(self, stream: str, length: int) -> list[int]:
        out = []
        for p in self.special.get(stream, [0]):
            q = p % length if -length <= p < length else None
            if q is not None and q not in out:
                out.append(q)
        return out

    def _decide(self, stream: str, st: StreamState, ordinal: int, hidden: torch.Tensor) -> torch.Tensor:
        b, length = hidden.shape[:2]
        self.lengths[stream] = st.length
        positions = st.index if st.index is not None else torch.arange(length, device=hidden.device).expand(b, -1)
        firsts = self._special_positions(stream, st.length)
        special = torch.zeros(b, length, dtype=torch.bool, device=hidden.device)
        for p in firsts:
            special |= positions == p
        n_special = len(firsts)
        alive = st.valid  # skip mode: the tokens still computed, at full length (None: all)
        current = int((alive[0] & ~special[0]).sum()) if alive is not None else length - n_special
        count = keep_counts(st.length - n_special, float(self.schedule.keep_ratio), ordinal)[-1]
        if self.threshold <= 0 or not self.schedule.is_active(stream) or count >= current:
            st.kept.append(alive.sum(1) if alive is not None else torch.full((b,), length, device=hidden.device))
            return hidden
        pads = self._pads.get(self.map.stream(stream).modality)
        if pads is not None and (pads.shape[1] != st.length or pads.shape[0] != b):
            pads = None
        pad_now = torch.gather(pads.to(hidden.device), 1, positions) if pads is not None else None
        if self.method == "tome" and stream in self.skip_streams:
            hidden, index = self._merge_alive(stream, hidden, alive, special, pad_now, current - count)
        elif self.method == "tome":
            hidden, index = self._merge(stream, hidden, special, pad_now, current - count)
        else:
            scores = self._scores(stream, ordinal, st, positions, hidden)
            if pad_now is not None:
                scores = scores.float().masked_fill(pad_now, float("-inf"))
            if alive is not None:
                scores = scores.float().masked_fill(~alive, float("-inf"))
            keep = _topk_keep(scores, special, count)
            hidden, index, _ = ops.gather_tokens(hidden, keep)
        st.index = torch.gather(positions, 1, index)
        st.valid = torch.ones(st.index.shape, dtype=torch.bool, device=hidden.device)
        st.kept.append(st.valid.sum(1))
        return hidden

    def _scores(self, stream: str, ordinal: int, st: StreamState, positions: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        if self.method == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ordinal)
            table = torch.rand(st.length, generator=gen).to(hidden.device)
            return table[positions]
        scores = self._cls.pop(stream, None)
        if scores is None or tuple(scores.shape) != (positions.shape[0], st.length):
            sites = [p for p, s in self._probe_sites.items() if s == stream]
            raise TrimkitError(f"topk.cls_attention: no attention probabilities over {positions.shape[1]} tokens "
                               f"were seen in the self-attention of the previous layer (stream '{stream}'; "
                               f"sites read: {sites or 'none'})")
        return torch.gather(scores, 1, positions)

    def _merge(self, stream: str, hidden: torch.Tensor, special: torch.Tensor, pads: torch.Tensor | None,
               merge: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, length = hidden.shape[:2]
        size = self._sizes.get(stream)
        if size is None or size.shape != (b, length):
            size = torch.ones(b, length, device=hidden.device)
        index = torch.arange(length, device=hidden.device).expand(b, -1)
        prunable = ~special
        while merge > 0:
            n = int(prunable[0].sum())
            step = min(merge, (n + 1) // 2)
            hidden, size, keep = bipartite_merge(hidden, size, prunable, step, group=pads)
            hidden, idx, _ = ops.gather_tokens(hidden, keep)
            size, prunable, index = (torch.gather(t, 1, idx) for t in (size, prunable, index))
            pads = torch.gather(pads, 1, idx) if pads is not None else None
            merge -= step
        self._sizes[stream] = size
        return hidden, index

    def _merge_alive(self, stream: str, hidden: torch.Tensor, alive: torch.Tensor | None, special: torch.Tensor,
                     pads: torch.Tensor | None, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Skip mode: merge among the alive tokens of the full-length ``hidden``; the merged states of
        the survivors are what the layer computes from (:meth:`_skip_input`), while merged-away
        tokens carry their earlier state through like pruned ones."""
        if alive is None:
            alive = torch.ones(special.shape, dtype=torch.bool, device=hidden.device)
        small, at, _ = ops.gather_tokens(hidden, alive)
        pads = torch.gather(pads, 1, at) if pads is not None else None
        merged, index = self._merge(stream, small, torch.gather(special, 1, at), pads, merge)
        index = torch.gather(at, 1, index)
        self._skip_states[stream] = hidden.scatter(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), merged)
        return merged, index

    def _skip_input(self, stream: str, hidden: torch.Tensor) -> torch.Tensor:
        return self._skip_states.pop(stream, hidden)

    def sizes(self) -> dict[str, torch.Tensor]:
        """Token sizes ``[B, L]`` of each merged stream after the last forward (tome only)."""
        return dict(self._sizes)


# ----------------------------------------------------------------------------------------------
# Applying a baseline
# ----------------------------------------------------------------------------------------------
def _task_logits(context: PassContext, output) -> torch.Tensor | None:
    task = context.hints.get("task") if context.hints else None
    try:
        logits = task.logits(output) if task is not None else None
    except Exception:
        logits = None
    if logits is None:
        first = getattr(output, "logits", None)
        logits = first if isinstance(first, torch.Tensor) else None
    return logits


def _probe_modes(model: nn.Module, model_map: ModelMap, cap, names: list[str], start_layer: int,
                 special: dict, inputs: dict) -> tuple[dict[str, int], list[str]]:
    """How each stream can lose tokens, by the token pass's probe (random per-row keep counts: a
    padded batch must equal its rows run one by one): removal first, then skip mode, else whole."""
    modes, notes = {}, []
    for name in names:
        trimmers = {layer.path: None for layer in model_map.stream(name).layers[start_layer:]}
        why = ""
        modes[name] = BaselineSchedule.WHOLE
        for mode, skip in ((BaselineSchedule.REMOVE, []), (BaselineSchedule.SKIP, [name])):
            why = _probe(model, model_map, cap, trimmers, {name: None}, special, None, inputs, skip)
            if not why:
                modes[name] = mode
                break
        if why:
            notes.append(f"stream '{name}' left whole: {why}")
        elif modes[name] == BaselineSchedule.SKIP:
            notes.append(f"stream '{name}': every layer's output is read at full length, so pruned tokens "
                         "skip the later layers and are carried through (skip mode)")
    return modes, notes


_CHECK_RATIOS = (0.3, 0.6)  # a harsh schedule, and one that drops tokens at nearly every layer


def _check_method(model: nn.Module, runtime: BaselineRuntime, schedule: BaselineSchedule, inputs: dict,
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
    from trimkit.profile import count_flops

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


def _calibrate(model: nn.Module, runtime: BaselineRuntime, schedule: BaselineSchedule, row: dict, full: float,
               target: float) -> tuple[float, list[str]]:
    """Set keep_ratio so the executed-FLOPs ratio on ``row`` is the closest to ``target`` the schedule allows.

    FLOPs only change where a layer's kept count does (:func:`schedule_points`), and never decrease
    with the ratio, so a binary search over one ratio per distinct schedule needs ``log2`` of their
    number of forwards.
    """
    sizes = {}
    for name in schedule.trimmed():
        length = runtime.lengths.get(name)
        if length is not None:
            n0 = length - len(runtime._special_positions(name, length))
            sizes[name] = (n0, sum(1 for p in runtime.trimmers if runtime.stream_of[p] == name))
    points = [0.0] + schedule_points(sizes) + [1.0]
    ratios = [(a + b) / 2 for a, b in zip(points, points[1:])] + [1.0]
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            schedule.keep_ratio.fill_(ratios[i])
            seen[i] = _flops_ratio(model, row, full)
        return seen[i]

    saved = runtime.threshold
    runtime.threshold = 0.5
    try:
        lo, hi = 0, len(ratios) - 1
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
        schedule.keep_ratio.fill_(ratios[best])
        notes = []
        if abs(seen[best] - target) > 0.02:
            notes.append(f"flops_ratio {target}: the closest this schedule reaches on these streams is "
                         f"{seen[best]:.3f} (keep_ratio {ratios[best]:.4f})")
        return ratios[best], notes
    finally:
        runtime.threshold = saved


def _tokens_kept(runtime: BaselineRuntime, schedule: BaselineSchedule) -> dict[str, dict]:
    """Per trimmed stream: its length on the example inputs and the tokens each trimmed layer keeps."""
    out = {}
    for name in schedule.trimmed():
        length = runtime.lengths.get(name)
        if length is None:
            continue
        special = len(runtime._special_positions(name, length))
        layers = sum(1 for p in runtime.trimmers if runtime.stream_of[p] == name)
        out[name] = {"length": length,
                     "kept": [special + k for k in keep_counts(length - special, float(schedule.keep_ratio), layers)]}
    return out


def _apply_baseline(model: nn.Module, model_map: ModelMap, config: _BaselineConfig, context: PassContext,
                    method: str) -> PassResult:
    name = config.name
    if context.inputs is None:
        raise ConfigError(f"{name} needs example inputs to find each layer's sequence-aligned arguments")
    if hasattr(model, _ATTR) or token_runtime(model) is not None:
        raise ConfigError(f"{name}: the model already has a token-trimming pass")
    # a padded row makes models that skip their attention mask on unpadded batches show it
    cap = capture(model, _with_padding(context.inputs))
    hints = context.hints or {}
    per_token = _per_token_streams(model_map, cap, _task_logits(context, cap.output))
    pattern = re.compile(config.streams)
    candidates = [s.name for s in model_map.streams if pattern.search(s.name) and s.name not in per_token
                  and len(s.layers) > config.start_layer]
    special = {s: list(hints.get("special_tokens", {}).get(model_map.stream(s).modality, [0])) for s in candidates}
    pad_inputs = {k: v for k, v in hints.get("masks", {}).items() if v in ("text", "vision")}
    notes: list[str] = []
    schedule = BaselineSchedule(candidates, config.keep_ratio)
    if not context.restoring:
        modes, probe_notes = _probe_modes(model, model_map, cap, candidates, config.start_layer, special,
                                          context.inputs)
        notes += probe_notes
        for s in candidates:
            schedule.set_mode(s, modes[s])
    layers = {layer.path: j for s in candidates
              for j, layer in enumerate(model_map.stream(s).layers[config.start_layer:], start=1)}
    model.add_module(_ATTR, schedule)
    try:
        runtime = BaselineRuntime(model, model_map, cap, layers, schedule, method=method, special=special,
                                  pad_inputs=pad_inputs, threshold=config.threshold,
                                  seed=getattr(config, "seed", 0), proportional=getattr(config, "proportional", True))
    except Exception:
        delattr(model, _ATTR)
        raise
    setattr(model, _RT_ATTR, runtime)

    def undo():
        runtime.remove()
        delattr(model, _ATTR)
        delattr(model, _RT_ATTR)

    measured = None
    if not context.restoring:
        try:
            notes += _check_method(model, runtime, schedule, context.inputs, name)
            row = _split_row(context.inputs, 0)
            from trimkit.profile import count_flops

            with trimming_off(model):
                full = count_flops(model, row).flops
            if config.flops_ratio > 0:
                _, cal_notes = _calibrate(model, runtime, schedule, row, full, config.flops_ratio)
                notes += cal_notes
            measured = _flops_ratio(model, row, full)
        except Exception:
            undo()
            raise
    report = {"method": method, "trimmed_streams": schedule.trimmed(), "skip_mode_streams": schedule.skipped(),
              "skipped_streams": [s.name for s in model_map.streams if s.name not in schedule.trimmed()],
              "per_token_streams": sorted(per_token),
              "trimmed_layers": sum(1 for p in layers if runtime.stream_of[p] in schedule.trimmed()),
              "keep_ratio": float(schedule.keep_ratio), "tokens_kept": _tokens_kept(runtime, schedule),
              "flops_ratio": measured, "notes": notes}
    return PassResult(model, report, undo, trainable=False)


@register_pass(RandomTokensConfig)
def random_tokens(model: nn.Module, model_map: ModelMap, config: RandomTokensConfig,
                  context: PassContext) -> PassResult:
    return _apply_baseline(model, model_map, config, context, "random")


@register_pass(TopKClsAttentionConfig)
def topk_cls_attention(model: nn.Module, model_map: ModelMap, config: TopKClsAttentionConfig,
                       context: PassContext) -> PassResult:
    return _apply_baseline(model, model_map, config, context, "topk")


@register_pass(ToMeMergeConfig)
def tome_merge(model: nn.Module, model_map: ModelMap, config: ToMeMergeConfig, context: PassContext) -> PassResult:
    return _apply_baseline(model, model_map, config, context, "tome")


def baseline_runtime(model: nn.Module) -> BaselineRuntime | None:
    """The runtime of the baseline applied to ``model`` (None when there is none)."""
    return getattr(model, _RT_ATTR, None)
