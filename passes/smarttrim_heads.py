"""SmartTrim attention-head trimming as a pass: ``smarttrim.heads``.

Adds one :class:`HeadTrimmer` per attention site (filtered by ``sites``) that scores
the site's heads from the global vector of its query input, per input. In training the decisions
are straight-through Gumbel masks on the heads' outputs; at inference the pruned heads are not
computed. Sites that cannot be sliced safely (found by a check with random decisions at apply time:
removal must equal masking, and a batch must equal its rows run one by one) are left whole and the
report says why.
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
from trimkit.runtime import (LAYOUT_NAMES, HeadDecision, HeadRuntime, SiteStep, check_sites, keep_rows, plan_site,
                             relaxed_heads, state)

__all__ = ["SmartTrimHeadsConfig", "HeadTrimmer", "SmartTrimHeadDecider", "head_runtime"]

_SQRT_HALF = math.sqrt(0.5)


@dataclass(frozen=True)
class SmartTrimHeadsConfig(PassConfig):
    """Per-input attention-head trimming.

    target_ratio: the executed-FLOPs ratio training steers to (used by the trainer's cost loss).
    threshold: at inference a head is kept when its keep probability is above it (0 keeps all).
    sites: regex on attention site paths to trim ("" = every site that can be trimmed).
    min_heads: heads every row keeps at each site, whatever the threshold.
    hidden: width of the trimmer MLP (0 = width // 8, at least 8).
    tau: Gumbel temperature used in training.
    batched: rows of a batch that keep different heads: "union" computes the heads any row keeps
      with sliced projections and zeroes each row's dropped heads before the output projection
      (cheap on CPU); "rows" computes each row's own heads with per-row weights (batched matmuls;
      fewer FLOPs, more memory traffic). Both equal running the rows one by one.
    decoder_lm: also trim the heads of a decoder VLM's language model. Off by default: its KV cache
      keeps the heads of the prefill, so heads chosen anew at each decoding step would not line up with
      it (``generate`` with a cache fails); on, for models run one forward at a time.
    """

    name: ClassVar[str] = "smarttrim.heads"
    tags: ClassVar[tuple[str, ...]] = ("trim",)

    target_ratio: float = 0.5
    threshold: float = 0.5
    sites: str = ""
    min_heads: int = 1
    hidden: int = 0
    tau: float = 1.0
    batched: str = "union"
    decoder_lm: bool = False

    def validate(self) -> None:
        if self.batched not in ("union", "rows"):
            raise ConfigError(f"smarttrim.heads: batched must be 'union' or 'rows', got {self.batched!r}")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(f"smarttrim.heads: target_ratio must be in (0, 1], got {self.target_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"smarttrim.heads: threshold must be in [0, 1], got {self.threshold}")
        if self.min_heads < 1 or self.hidden < 0 or self.tau <= 0:
            raise ConfigError("smarttrim.heads: min_heads must be >= 1, hidden >= 0 and tau > 0, got "
                              f"min_heads={self.min_heads}, hidden={self.hidden}, tau={self.tau}")
        try:
            re.compile(self.sites)
        except re.error as exc:
            raise ConfigError(f"smarttrim.heads: sites is not a valid regex: {exc}") from exc


class HeadTrimmer(nn.Module):
    """``logits = W2 gelu(W1 g + b1) + b2`` over the heads of one site; starts close to keep-all."""

    def __init__(self, width: int, heads: int, hidden: int | None = None, init_keep: float = 0.98):
        super().__init__()
        hidden = hidden or max(8, width // 8)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, heads)
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.fc2.bias, math.log(init_keep / (1 - init_keep)))
        self.register_buffer("active", torch.ones(()))
        self.register_buffer("layout", torch.zeros((), dtype=torch.long))

    @property
    def trimkit_role(self) -> str:
        """"trimmer" while the site is trimmed: an inactive trimmer is not a trainable parameter."""
        return state.TRIMMER_ROLE if bool(self.active) else "inactive"

    @float32_logits
    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(g)))

    @float32_logits
    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """``forward`` for inference, cheaper on tiny inputs: no module calls of the two plain linears, and
        GELU as ``(x + x erf(x / sqrt 2)) / 2`` (the half folded into the second product) (CPU ``F.gelu`` costs ~20 us a call in oneDNN)."""
        fc1, fc2 = self.fc1, self.fc2
        if torch.is_grad_enabled() or type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or any(
                m._forward_hooks or m._forward_pre_hooks for m in (self, fc1, fc2)):
            return self(g)
        h = F.linear(g, fc1.weight, fc1.bias)
        t = torch.addcmul(h, h, (h * _SQRT_HALF).erf_())  # 2 gelu(h)
        return torch.addmm(fc2.bias, t, fc2.weight.t(), alpha=0.5) if fc2.bias is not None and t.dim() == 2 \
            else F.linear(t * 0.5, fc2.weight, fc2.bias)


class SmartTrimHeadDecider:
    """Head decisions from one :class:`HeadTrimmer` per site (``trimmers``: site path -> trimmer), whose
    buffers hold the site's saved switches."""

    def __init__(self, trimmers: dict[str, HeadTrimmer]):
        self.trimmers = trimmers

    def decide(self, step: SiteStep) -> HeadDecision:
        trimmer = self.trimmers[step.site]
        if step.training:
            logits = trimmer(step.pooled)
            return HeadDecision(mask=relaxed_heads(logits, step.tau, step.min_units), logits=logits)
        logits = trimmer.logits(step.pooled)
        return HeadDecision(rows=keep_rows(logits.tolist(), step.threshold, step.min_units), dtype=logits.dtype)

    def active(self, site: str) -> torch.Tensor:
        return self.trimmers[site].active

    def layout(self, site: str) -> torch.Tensor:
        return self.trimmers[site].layout


def _kv_cached_sites(model_map: ModelMap) -> set[str]:
    """Attention sites of a decoder VLM's language model (the stream its image span enters)."""
    stream = (model_map.image_span or {}).get("stream")
    if not stream:
        return set()
    return {a.path for layer in model_map.stream(stream).layers for a in layer.attention}


@register_pass(SmartTrimHeadsConfig)
def smarttrim_heads(model: nn.Module, model_map: ModelMap, config: SmartTrimHeadsConfig,
                    context: PassContext) -> PassResult:
    if state.get(model, state.HEAD_TRIMMERS) is not None:
        raise ConfigError("smarttrim.heads is already applied to this model")
    pattern = re.compile(config.sites)
    plans, skipped, seen = {}, {}, set()
    cached = set() if config.decoder_lm else _kv_cached_sites(model_map)
    for site in model_map.sites():
        if site.path in seen or not pattern.search(site.path):
            continue
        seen.add(site.path)
        if site.path in cached:
            skipped[site.path] = ("decoder language model: its KV cache holds every head of the prefill, so heads "
                                  "chosen per forward would not line up with it in decoding (decoder_lm=true trims them for single "
                                  "forwards)")
            continue
        plan, reason = plan_site(model, site)
        if plan is None:
            skipped[site.path] = reason
        else:
            plans[site.path] = plan
    by_path = {p: HeadTrimmer(plan.width, plan.units, hidden=config.hidden or None) for p, plan in plans.items()}
    trimmers = state.Trimmers({p.replace(".", "__"): t for p, t in by_path.items()})
    trimmers.train(model.training)
    state.attach(model, state.HEAD_TRIMMERS, trimmers)
    runtime = HeadRuntime(model, plans, SmartTrimHeadDecider(by_path), threshold=config.threshold, tau=config.tau,
                          min_heads=config.min_heads, batched=config.batched)
    state.put(model, state.HEAD_RUNTIME, runtime)
    # projections are sliced per input: int8.dynamic must leave them in float
    marked = [m for plan in plans.values() for m in plan.linears if state.mark_no_quant(m)]
    notes = []
    if not context.restoring:
        if context.inputs is None:
            notes.append("no example inputs: sites were not checked")
        else:
            skipped.update(check_sites(model, runtime, context.inputs))

    def undo():
        runtime.remove()
        for m in marked:
            state.unmark_no_quant(m)
        state.drop(model, state.HEAD_TRIMMERS)
        state.drop(model, state.HEAD_RUNTIME)

    active = runtime.active_sites()
    report = {"trimmed_sites": active, "skipped_sites": skipped,
              "layouts": {p: LAYOUT_NAMES[int(by_path[p].layout)] for p in active},
              "trimmers": len(active), "notes": notes,
              "trimmer_params": sum(q.numel() for p in active for q in by_path[p].parameters())}
    return PassResult(model, report, undo, trainable=True)


def head_runtime(model: nn.Module) -> HeadRuntime | None:
    """The runtime ``smarttrim.heads`` installed on ``model`` (None when not applied)."""
    return state.get(model, state.HEAD_RUNTIME)
