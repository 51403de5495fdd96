"""Attention sites as head trimming sees them: which projections hold a site's heads, and how.

:func:`plan_site` returns a :class:`SitePlan` (the q/k/v and output projections and their head
layout, the module's integer attributes that count heads) or the reason the site cannot be trimmed.
A site's *layout* says what else its code needs when heads are removed (see
:mod:`trimkit.runtime.heads`).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from trimkit.locate import AttentionSite

__all__ = ["SitePlan", "plan_site", "LAYOUT_RESHAPE", "LAYOUT_ATTRS", "LAYOUT_LINEAR", "LAYOUT_LINEAR_ATTRS",
           "LAYOUT_NAMES"]

LAYOUT_RESHAPE, LAYOUT_ATTRS, LAYOUT_LINEAR, LAYOUT_LINEAR_ATTRS = 0, 1, 2, 3
LAYOUT_NAMES = {LAYOUT_RESHAPE: "reshape", LAYOUT_ATTRS: "attributes", LAYOUT_LINEAR: "linear",
                LAYOUT_LINEAR_ATTRS: "linear+attributes"}


@dataclasses.dataclass
class SitePlan:
    path: str
    heads: int
    head_dim: int
    width: int  # query input width
    query_stream: str
    mha: bool = False
    seq_first: bool = False
    inputs: list = dataclasses.field(default_factory=list)  # [(weight, bias, blocks, unit)] q/k/v projections
    out: tuple | None = None  # (weight, bias) output projection
    attrs: list = dataclasses.field(default_factory=list)  # [(module, name, "heads" | "inner")]
    group: int = 1  # query heads per decision unit (grouped-query attention: per key/value head)
    linears: list = dataclasses.field(default_factory=list)  # projection modules (sliced per input: stay float)
    in_mods: list = dataclasses.field(default_factory=list)  # [(module, blocks, unit)] q/k/v, a fused one once
    out_mod: nn.Module | None = None  # output projection module (None: nn.MultiheadAttention)

    @property
    def units(self) -> int:
        """What a trimmer decides on: heads, or key/value groups under grouped-query attention."""
        return self.heads // self.group


def _inner_attrs(mod: nn.Module, skip: set[int], heads: int, head_dim: int) -> list:
    if heads == head_dim or head_dim == 1:
        return []  # values would be ambiguous
    found = []
    for m in mod.modules():
        if id(m) in skip:
            continue
        for name, value in vars(m).items():
            if isinstance(value, bool) or not isinstance(value, int) or name.startswith("_"):
                continue
            if value == heads:
                found.append((m, name, "heads"))
            elif value == heads * head_dim:
                found.append((m, name, "inner"))
    return found


def plan_site(model: nn.Module, site: AttentionSite) -> tuple[SitePlan | None, str]:
    """How to trim one site's heads, or ``(None, reason)`` when it cannot be done safely."""
    h, dh = site.heads, site.head_dim
    if h < 2:
        return None, "a single head"
    mod = model.get_submodule(site.path)
    if site.op == "encoder_layer" and not isinstance(mod, nn.MultiheadAttention):
        return None, "runs inside a fused encoder-layer kernel"
    # An nn.TransformerEncoderLayer whose attention module carries hooks (the head runtime's) runs its
    # Python path, so its fused-kernel site is sliced as the nn.MultiheadAttention it calls.
    inner = h * dh
    if isinstance(mod, nn.MultiheadAttention):
        if mod.bias_k is not None or mod.add_zero_attn:
            return None, "nn.MultiheadAttention with bias_k/bias_v or add_zero_attn"
        if mod.num_heads != h or mod.embed_dim != inner:
            return None, f"module has {mod.num_heads} heads of width {mod.embed_dim}, map says {h} x {dh}"
        if mod._qkv_same_embed_dim:
            w, b = mod.in_proj_weight, mod.in_proj_bias
            inputs = [(w, b, 3, dh)]
        else:
            inputs = [(p, None, 1, dh) for p in (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)]
        plan = SitePlan(site.path, h, dh, mod.embed_dim, site.query_stream, mha=True, seq_first=not mod.batch_first,
                        inputs=inputs, out=(mod.out_proj.weight, mod.out_proj.bias), linears=[mod.out_proj])
        return plan, ""
    names = [site.q, site.k, site.v, site.o]
    if any(n is None for n in names):
        return None, "q/k/v/output projections not all found"
    mods = {n: model.get_submodule(n) for n in names}
    if not all(type(m) is nn.Linear for m in mods.values()):
        kinds = sorted({type(m).__name__ for m in mods.values() if type(m) is not nn.Linear})
        return None, f"projections are not plain nn.Linear ({', '.join(kinds)})"
    if not site.o.startswith(site.path + "."):
        return None, "the output projection runs outside the attention module"
    q, k, v, o = (mods[n] for n in names)
    if o.in_features != inner:
        return None, f"output projection takes {o.in_features} features, not {h} heads x {dh}"
    group = 1
    if k is not q and k.out_features % inner:  # grouped-query attention: decide per key/value head
        kv = k.out_features // dh
        if q.out_features != inner or v.out_features != k.out_features or k.out_features % dh or h % max(kv, 1):
            return None, f"keys have {k.out_features} features for {h} heads of {dh}: no head grouping found"
        if kv < 2:
            return None, "a single key/value head"
        group = h // kv
    inputs, in_mods, seen = [], [], set()
    for n in names[:3]:
        m = mods[n]
        if id(m) in seen:
            continue
        seen.add(id(m))
        unit = group * dh if m is q else dh
        if m.out_features % (unit * (h // group)):
            return None, f"{n} has {m.out_features} outputs, not a multiple of {h} heads x {dh}"
        inputs.append((m.weight, m.bias, m.out_features // (unit * (h // group)), unit))
        in_mods.append((m, m.out_features // (unit * (h // group)), unit))
    if id(o) in seen:
        return None, "the output projection is also a q/k/v projection"
    attrs = _inner_attrs(mod, {id(m) for m in mods.values()}, h, dh)
    plan = SitePlan(site.path, h, dh, q.in_features, site.query_stream, inputs=inputs, out=(o.weight, o.bias),
                    attrs=attrs, group=group, linears=list({id(m): m for m in mods.values()}.values()),
                    in_mods=in_mods, out_mod=o)
    return plan, ""

