"""SmartTrim attention-head trimming as a pass: ``smarttrim.heads``.

Adds one :class:`~trimkit.heads.HeadTrimmer` per attention site (filtered by ``sites``) that scores
the site's heads from the global vector of its query input, per input. In training the decisions
are straight-through Gumbel masks on the heads' outputs; at inference the pruned heads are not
computed. Sites that cannot be sliced safely (found by a check with random decisions at apply time:
removal must equal masking, and a batch must equal its rows run one by one) are left whole and the
report says why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from trimkit.errors import ConfigError
from trimkit.heads import LAYOUT_NAMES, HeadRuntime, HeadTrimmer, check_sites, plan_site
from trimkit.locate import ModelMap
from trimkit.passes.base import PassConfig, PassContext, PassResult
from trimkit.passes.registry import register_pass

__all__ = ["SmartTrimHeadsConfig", "head_runtime"]

_ATTR = "trimkit_head_trimmers"
_RT_ATTR = "_trimkit_head_runtime"


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


@register_pass(SmartTrimHeadsConfig)
def smarttrim_heads(model: nn.Module, model_map: ModelMap, config: SmartTrimHeadsConfig,
                    context: PassContext) -> PassResult:
    if hasattr(model, _ATTR):
        raise ConfigError("smarttrim.heads is already applied to this model")
    pattern = re.compile(config.sites)
    plans, skipped, seen = {}, {}, set()
    for site in model_map.sites():
        if site.path in seen or not pattern.search(site.path):
            continue
        seen.add(site.path)
        plan, reason = plan_site(model, site)
        if plan is None:
            skipped[site.path] = reason
        else:
            plans[site.path] = plan
    by_path = {p: HeadTrimmer(plan.width, plan.units, hidden=config.hidden or None) for p, plan in plans.items()}
    trimmers = nn.ModuleDict({p.replace(".", "__"): t for p, t in by_path.items()})
    trimmers.train(model.training)
    model.add_module(_ATTR, trimmers)
    runtime = HeadRuntime(model, plans, by_path, threshold=config.threshold, tau=config.tau,
                          min_heads=config.min_heads, batched=config.batched)
    model.__dict__[_RT_ATTR] = runtime
    marked = []  # projections are sliced per input: int8.dynamic must leave them in float
    for plan in plans.values():
        for m in plan.linears:
            if not getattr(m, "trimkit_no_quant", False):
                m.trimkit_no_quant = True
                marked.append(m)
    notes = []
    if not context.restoring:
        if context.inputs is None:
            notes.append("no example inputs: sites were not checked")
        else:
            skipped.update(check_sites(model, runtime, context.inputs))

    def undo():
        runtime.remove()
        for m in marked:
            m.__dict__.pop("trimkit_no_quant", None)
        delattr(model, _ATTR)
        model.__dict__.pop(_RT_ATTR, None)

    active = runtime.active_sites()
    report = {"trimmed_sites": active, "skipped_sites": skipped,
              "layouts": {p: LAYOUT_NAMES[int(by_path[p].layout)] for p in active},
              "trimmers": len(active), "notes": notes,
              "trimmer_params": sum(q.numel() for p in active for q in by_path[p].parameters())}
    return PassResult(model, report, undo, trainable=True)


def head_runtime(model: nn.Module) -> HeadRuntime | None:
    return model.__dict__.get(_RT_ATTR)
