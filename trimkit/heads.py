"""Per-input attention-head trimming: the head trimmer module and the runtime that applies it.

One :class:`HeadTrimmer` per attention site scores the site's heads from the global vector (mean over
tokens) of the site's query input. Hooks on the attention module apply the decision:

* **train**: a straight-through Gumbel mask ``[B, H]`` scales each head's output before the output
  projection (every head is still computed, the gradient reaches the trimmer); the output projection
  module gets an instance-level ``forward`` that applies the scale for the call;
* **eval**: pruned heads are *not computed*. The decision is read back once per site as Python rows
  (threshold 0 keeps everything and skips the trimmer). For the call of the attention module, the
  q/k/v projection modules get an instance-level ``forward`` computing the kept rows only and the
  output projection one taking the kept columns only (restored by an always-called hook). When every
  row keeps the same heads (always at batch 1) that is a plain ``F.linear`` with sliced weights, cached
  per decision and rebuilt when a weight changes; otherwise batched matrix products with per-row
  gathered weights, padded to the row maximum with zero weights, so a padded head adds nothing.

The model's own code then has to accept fewer heads. Each site has a *layout*, chosen at apply time by
:func:`check_sites` (cheapest first) and stored in the trimmer's ``layout`` buffer, so saved models
restore it without probing:

* ``linear``: nothing else (code that reshapes with ``-1`` heads);
* ``linear+attributes``: the module's integer attributes equal to ``H`` or ``H * head_dim`` are set to
  the kept values for the call;
* ``reshape`` / ``attributes``: as the two above, and the call runs under a ``TorchFunctionMode`` that
  rewrites reshapes that would fail (``H`` next to ``head_dim`` becomes the kept count, ``H * head_dim``
  the kept width) and catches projections called as ``F.linear`` on the weights. It costs a Python
  call per torch function inside the module, so it is the fallback. ``nn.MultiheadAttention`` always
  uses it: :func:`_mha_forward` computes the kept heads with sliced weights.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import keystr, tree_flatten_with_path

from trimkit import ops
from trimkit.control import register_runtime, runtimes, unregister_runtime
from trimkit.locate import AttentionSite

__all__ = ["HeadTrimmer", "SitePlan", "plan_site", "HeadRuntime", "check_sites"]

LAYOUT_RESHAPE, LAYOUT_ATTRS, LAYOUT_LINEAR, LAYOUT_LINEAR_ATTRS = 0, 1, 2, 3
_SQRT_HALF = math.sqrt(0.5)
LAYOUT_NAMES = {LAYOUT_RESHAPE: "reshape", LAYOUT_ATTRS: "attributes", LAYOUT_LINEAR: "linear",
                LAYOUT_LINEAR_ATTRS: "linear+attributes"}


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
        return "trimmer" if bool(self.active) else "inactive"

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(g)))

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


# ----------------------------------------------------------------------------------------------
# What a site looks like
# ----------------------------------------------------------------------------------------------
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
    if site.op == "encoder_layer":
        return None, "runs inside the fused TransformerEncoderLayer kernel"
    if h < 2:
        return None, "a single head"
    mod = model.get_submodule(site.path)
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


# ----------------------------------------------------------------------------------------------
# One decision and the arithmetic that applies it
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Decision:
    heads: int  # decision units (heads, or key/value groups)
    head_dim: int  # output-projection features per unit
    mask: torch.Tensor | None = None  # [B, H] float: scale head outputs (train, reference)
    idx: torch.Tensor | None = None  # [B, Hk] kept heads (eval removal), 0 where padded
    valid: torch.Tensor | None = None  # [B, Hk] bool
    uniform: torch.Tensor | None = None  # [Hk] when every row keeps the same heads

    @property
    def kept(self) -> int:
        return self.heads if self.idx is None else self.idx.shape[1]


def _decision_from_keep(keep: torch.Tensor, head_dim: int) -> Decision:
    b, h = keep.shape
    if bool((keep == keep[:1]).all()):
        idx = ops.head_keep_index(keep[0])
        return Decision(h, head_dim, idx=idx.expand(b, -1), valid=torch.ones(b, idx.numel(), dtype=torch.bool,
                                                                          device=keep.device), uniform=idx)
    counts = keep.sum(1)
    hk = int(counts.max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :hk]
    valid = torch.arange(hk, device=keep.device) < counts[:, None]
    return Decision(h, head_dim, idx=torch.where(valid, order, torch.zeros_like(order)), valid=valid)


def _unit_index(idx: torch.Tensor, unit: int, heads: int, blocks: int) -> torch.Tensor:
    """Feature indices ``[..., blocks * Hk * unit]`` of the kept heads in a ``[blocks, H, unit]`` layout."""
    base = (idx[..., None] * unit + torch.arange(unit, device=idx.device)).flatten(-2)
    return torch.cat([base + k * heads * unit for k in range(blocks)], dim=-1)


def _unit_valid(valid: torch.Tensor, unit: int, blocks: int) -> torch.Tensor:
    return valid.repeat_interleave(unit, dim=-1).repeat(*([1] * (valid.dim() - 1)), blocks)


def _project_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int,
                d: Decision) -> torch.Tensor:
    """A q/k/v projection (``blocks`` of ``units * unit`` rows) of batch-first ``x`` for the kept units only."""
    if d.idx is None:
        return F.linear(x, weight, bias)
    if d.uniform is not None:
        rows = _unit_index(d.uniform, unit, d.heads, blocks)
        return F.linear(x, weight[rows], None if bias is None else bias[rows])
    b = d.idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"projection input has batch {x.shape[0]}, decisions have {b} rows")
    rows = _unit_index(d.idx, unit, d.heads, blocks)  # [B, R]
    keep = _unit_valid(d.valid, unit, blocks).to(weight.dtype)
    w = weight[rows] * keep[..., None]  # [B, R, Din]
    y = torch.bmm(x.reshape(b, -1, x.shape[-1]), w.transpose(1, 2))
    if bias is not None:
        y = y + (bias[rows] * keep)[:, None, :]
    return y.reshape(*x.shape[:-1], rows.shape[1])


def _project_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d: Decision) -> torch.Tensor:
    """The output projection of batch-first ``x`` (the kept heads' features, or all of them masked)."""
    if d.mask is not None:
        scale = d.mask.repeat_interleave(d.head_dim, dim=-1).to(x.dtype)
        if x.shape[0] != scale.shape[0]:
            raise ValueError(f"output projection input has batch {x.shape[0]}, masks have {scale.shape[0]} rows")
        x = x * scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1])
        return F.linear(x, weight, bias)
    if d.idx is None:
        return F.linear(x, weight, bias)
    if d.uniform is not None:
        return F.linear(x, weight[:, _unit_index(d.uniform, d.head_dim, d.heads, 1)], bias)
    b = d.idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"output projection input has batch {x.shape[0]}, decisions have {b} rows")
    cols = _unit_index(d.idx, d.head_dim, d.heads, 1)
    w = weight.t()[cols] * d.valid.repeat_interleave(d.head_dim, dim=-1).to(weight.dtype)[..., None]
    y = torch.bmm(x.reshape(b, -1, x.shape[-1]), w)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _valid_shape(shape: tuple, numel: int) -> bool:
    known = [s for s in shape if s != -1]
    prod = math.prod(known)
    if len(known) == len(shape):
        return prod == numel
    return len(shape) - len(known) == 1 and prod > 0 and numel % prod == 0


def repair_shape(shape: tuple, numel: int, heads: int, head_dim: int, kept: int) -> tuple | None:
    """``shape`` with the full head count (next to ``head_dim``) or full width replaced by the kept ones."""
    if _valid_shape(shape, numel):
        return None
    for i in range(len(shape) - 2, -1, -1):
        if shape[i] == heads and shape[i + 1] == head_dim:
            new = shape[:i] + (kept,) + shape[i + 1:]
            if _valid_shape(new, numel):
                return new
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] == heads * head_dim:
            new = shape[:i] + (kept * head_dim,) + shape[i + 1:]
            if _valid_shape(new, numel):
                return new
    return None


_VIEWS = (torch.Tensor.view, torch.Tensor.reshape)
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _mha_forward(a: dict, plan: SitePlan, d: Decision):
    """``F.multi_head_attention_forward`` (bound arguments ``a``) computing only the kept heads."""
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    x_q, x_k, x_v = (t.transpose(0, 1) for t in (query, key, value))  # batch first
    h, dh = plan.heads, plan.head_dim
    if a["use_separate_proj_weight"]:
        ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        ws = list(a["in_proj_weight"].chunk(3))
    bs = list(a["in_proj_bias"].chunk(3)) if a["in_proj_bias"] is not None else [None] * 3
    q, k, v = (_project_in(x, w, bias, 1, dh, d) for x, w, bias in zip((x_q, x_k, x_v), ws, bs))
    b, lq, lk = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    hk = d.kept
    q, k, v = (t.reshape(b, t.shape[1], hk, dh).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
    attn_mask = _additive(a["attn_mask"], scores.dtype)
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # [B*H, Lq, Lk]: pick the kept heads
            attn_mask = attn_mask.view(b, h, lq, lk)
            if d.idx is not None:
                attn_mask = attn_mask.gather(1, d.idx[:, :, None, None].expand(b, hk, lq, lk))
        scores = scores + attn_mask
    kpm = _additive(a["key_padding_mask"], scores.dtype)
    if kpm is not None:
        scores = scores + kpm.view(b, 1, 1, lk)
    probs = F.softmax(scores, dim=-1)
    if a["training"] and a["dropout_p"] > 0:
        probs = F.dropout(probs, p=a["dropout_p"])
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, lq, hk * dh)
    out = _project_out(ctx, a["out_proj_weight"], a["out_proj_bias"], d).transpose(0, 1)
    weights = None
    if a["need_weights"]:
        if d.valid is not None:
            w = d.valid.to(probs.dtype)[:, :, None, None]
            weights = (probs * w).sum(1) / w.sum(1) if a["average_attn_weights"] else probs
        else:
            weights = probs.mean(1) if a["average_attn_weights"] else probs
    if unbatched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights


class _HeadMode(TorchFunctionMode):
    """Active inside one attention module call: applies ``decision`` to its projections and reshapes."""

    def __init__(self, plan: SitePlan, decision: Decision):
        super().__init__()
        self.plan, self.d = plan, decision
        self.ins = {id(w): (w, b, blocks, unit) for w, b, blocks, unit in plan.inputs}
        self.out_id = id(plan.out[0]) if plan.out is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d, plan = self.d, self.plan
        if func is F.linear:
            w = kwargs.get("weight", args[1] if len(args) > 1 else None)
            x = kwargs.get("input", args[0] if args else None)
            if id(w) == self.out_id and w is plan.out[0]:
                bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
                return _project_out(x, w, bias, d)
            hit = self.ins.get(id(w))
            if hit is not None and hit[0] is w and d.idx is not None:
                bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
                return _project_in(x, w, bias, hit[2], hit[3], d)
        elif func in _VIEWS and d.idx is not None and len(args) > 1 and not isinstance(args[1], torch.dtype):
            shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if all(isinstance(s, int) for s in shape):
                new = repair_shape(tuple(shape), args[0].numel(), plan.heads, plan.head_dim, d.kept * plan.group)
                if new is not None:
                    return func(args[0], new)
        elif func is torch.reshape and d.idx is not None and len(args) > 1:
            new = repair_shape(tuple(args[1]), args[0].numel(), plan.heads, plan.head_dim, d.kept * plan.group)
            if new is not None:
                return func(args[0], new)
        elif func is F.multi_head_attention_forward and plan.mha:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            if a["bias_k"] is None and not a["add_zero_attn"] and a["static_k"] is None and a["static_v"] is None:
                return _mha_forward(a, plan, d)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Decisions as Python rows, and the projections that apply them
# ----------------------------------------------------------------------------------------------
def keep_rows(logits: list[list[float]], threshold: float, k: int) -> list[tuple[int, ...]]:
    """Kept units of each row: probability ``sigmoid(logit)`` above ``threshold``, at least the ``k`` best."""
    if threshold <= 0:
        return [tuple(range(len(r))) for r in logits]
    cut = math.inf if threshold >= 1 else math.log(threshold) - math.log1p(-threshold)
    out = []
    for row in logits:
        kept = [i for i, v in enumerate(row) if v > cut]
        if len(kept) < k:
            top = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
            kept = sorted(set(kept).union(top))
        out.append(tuple(kept))
    return out


def _keep_tensor(rows: list[tuple[int, ...]] | None, batch: int, units: int, device) -> torch.Tensor:
    if rows is None:
        return torch.ones(batch, units, dtype=torch.bool, device=device)
    keep = torch.zeros(batch, units, dtype=torch.bool)
    r = [i for i, row in enumerate(rows) for _ in row]
    keep[r, [j for row in rows for j in row]] = True
    return keep.to(device)


def _row_index(rows: list[tuple[int, ...]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx [B, Hk]`` (kept units, 0 where padded) and bool ``valid [B, Hk]``, Hk the row maximum."""
    hk = max(len(r) for r in rows)
    idx = torch.tensor([list(r) + [0] * (hk - len(r)) for r in rows], dtype=torch.long, device=device)
    valid = torch.tensor([[True] * len(r) + [False] * (hk - len(r)) for r in rows], device=device)
    return idx, valid


def _slice_in(weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int, idx: torch.Tensor):
    """Rows of the kept units (``idx [Hk]``) of a ``[blocks, units, unit]``-laid-out projection."""
    din = weight.shape[1]
    w = weight.view(blocks, -1, unit, din)[:, idx].reshape(-1, din)
    b = None if bias is None else bias.view(blocks, -1, unit)[:, idx].reshape(-1)
    return w, b


def _slice_out(weight: torch.Tensor, unit: int, idx: torch.Tensor) -> torch.Tensor:
    dout = weight.shape[0]
    return weight.view(dout, -1, unit)[:, idx].reshape(dout, -1)


def _rows_in(weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int, idx: torch.Tensor,
             valid: torch.Tensor | None):
    """Per-row weights ``[B, R, Din]`` (and biases ``[B, R]``) of the kept units, zero where ``valid`` is not."""
    din, (b, hk) = weight.shape[1], idx.shape
    keep = None if valid is None else valid.to(weight.dtype)
    w = weight.view(blocks, -1, unit, din)[:, idx]  # [blocks, B, Hk, unit, Din]
    if keep is not None:
        w = w * keep[None, :, :, None, None]
    w = w.transpose(0, 1).reshape(b, blocks * hk * unit, din)
    if bias is None:
        return w, None
    bb = bias.view(blocks, -1, unit)[:, idx]
    if keep is not None:
        bb = bb * keep[None, :, :, None]
    return w, bb.transpose(0, 1).reshape(b, blocks * hk * unit)


def _rows_out(weight: torch.Tensor, unit: int, idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-row output weights ``[B, Hk * unit, Dout]``, zero where ``valid`` is not."""
    dout, (b, hk) = weight.shape[0], idx.shape
    w = weight.view(dout, -1, unit)[:, idx]  # [Dout, B, Hk, unit]
    if valid is not None:
        w = w * valid.to(weight.dtype)[None, :, :, None]
    return w.permute(1, 2, 3, 0).reshape(b, hk * unit, dout)


def _linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [B, ..., Din]`` times its row's ``weight [B, R, Din]`` (a q/k/v projection of one row's heads)."""
    b = weight.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"projection input has batch {x.shape[0]}, decisions have {b} rows")
    x3 = x.reshape(b, -1, x.shape[-1])
    y = torch.bmm(x3, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias[:, None], x3,
                                                                                   weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


def _linear_rows_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [B, ..., R]`` times its row's output weight ``[B, R, Dout]``."""
    b = weight.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"output projection input has batch {x.shape[0]}, decisions have {b} rows")
    x3 = x.reshape(b, -1, x.shape[-1])
    y = torch.bmm(x3, weight) if bias is None else torch.baddbmm(bias, x3, weight)
    return y.reshape(*x.shape[:-1], weight.shape[2])


def _linear_scaled(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The output projection of ``x`` with each head's features scaled by its row's mask (``[B, H*dh]``)."""
    if x.shape[0] != scale.shape[0]:
        raise ValueError(f"output projection input has batch {x.shape[0]}, masks have {scale.shape[0]} rows")
    x = x * scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1]).to(x.dtype)
    return F.linear(x, weight, bias)


def _stamp(plan: SitePlan) -> tuple:
    """Changes whenever a projection weight is updated in place, replaced or moved."""
    mods = [m for m, _, _ in plan.in_mods] + [plan.out_mod]
    return tuple((t._version, t.data_ptr()) for m in mods for t in (m.weight, m.bias) if t is not None)


# ----------------------------------------------------------------------------------------------
# The runtime
# ----------------------------------------------------------------------------------------------
def _main_input(args: tuple, kwargs: dict, width: int) -> torch.Tensor | None:
    for v in args:
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == width and v.is_floating_point():
            return v
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == width and v.is_floating_point():
            return v
    return None


class HeadRuntime:
    """Head trimming hooks on the attention sites of ``plans``; ``remove()`` undoes everything.

    ``forced`` ({site path: bool ``[B, H]``}) overrides decisions and ``reference=True`` applies eval
    decisions as masks instead of removing heads: both exist for checks (see :func:`check_sites`).
    ``cache_budget``: sliced projection weights are kept for decisions seen before (when no gradient is
    recorded), up to this many times a site's own projection weights (0 turns the cache off).
    """

    def __init__(self, model: nn.Module, plans: dict[str, SitePlan], trimmers: dict[str, HeadTrimmer], *,
                 threshold: float = 0.5, tau: float = 1.0, min_heads: int = 1, cache_budget: float = 2.0,
                 batched: str = "union"):
        self.model, self.plans, self.trimmers = model, plans, trimmers
        self.batched = batched  # rows keeping different heads: "union" (sliced + per-row zeroing) or "rows" (bmm)
        self.threshold, self.tau, self.min_heads = threshold, tau, min_heads
        self.cache_budget = cache_budget
        self.enabled = True
        self.forced: dict[str, torch.Tensor] | None = None
        self.reference = False
        self.only: set[str] | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._kept: dict[str, torch.Tensor] = {}
        self._rows: dict[str, tuple] = {}  # eval decisions not yet turned into tensors
        self._logits: dict[str, torch.Tensor] = {}  # keep-logits of the last training forward
        self._cache: dict[str, dict] = {}
        self._stamps: dict[str, tuple] = {}
        self._open: list = []
        self.handles: list = []
        self.handles.append(model.register_forward_pre_hook(self._reset))
        for path in plans:
            mod = model.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._make_post(path), always_call=True))
        register_runtime(model, self)

    # -- control protocol -------------------------------------------------------------------------
    def remove(self) -> None:
        self._close_all()
        unregister_runtime(self.model, self)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._cache.clear()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{site: ``[B, units]``} decisions of the last forward (float; relaxed masks in training)."""
        self._materialise()
        return self._masks

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        self._materialise()
        return self._kept

    def stats(self) -> dict:
        return {"heads": {p: {"heads": self.plans[p].heads, "kept": float(k.float().mean()) * self.plans[p].group}
                          for p, k in self.kept.items()}}

    def cost_inputs(self) -> dict:
        return {"heads": {p: (m.repeat_interleave(self.plans[p].group, dim=1) if self.plans[p].group > 1 else m)
                          for p, m in self.masks.items()}}

    def train_logits(self) -> list[torch.Tensor]:
        """Keep-logits the trimmers gave the heads in the last training forward (flat, with gradient)."""
        return [z.reshape(-1) for z in self._logits.values()]

    def active_sites(self) -> list[str]:
        return [p for p in self.plans if bool(self.trimmers[p].active)]

    # -- decisions ------------------------------------------------------------------------------------
    def _materialise(self) -> None:
        for path, (rows, batch, units, device, dtype) in self._rows.items():
            keep = _keep_tensor(rows, batch, units, device)
            self._masks[path] = keep.to(dtype)
            self._kept[path] = keep.sum(1)
        self._rows.clear()

    def _min_units(self, plan: SitePlan) -> int:
        return min(-(-max(self.min_heads, 0) // plan.group), plan.units)

    def _train_mask(self, plan: SitePlan, logits: torch.Tensor) -> torch.Tensor:
        mask = ops.gumbel_sigmoid(logits, tau=self.tau)
        k = self._min_units(plan)
        if k:
            top = torch.zeros_like(mask).scatter(1, logits.topk(k, dim=1).indices, 1.0)
            mask = mask + top * (1.0 - mask.detach())
        self._masks[plan.path] = mask
        self._kept[plan.path] = mask.detach().sum(1)
        self._logits[plan.path] = logits
        return mask

    def _eval_rows(self, plan: SitePlan, trimmer: HeadTrimmer, x: torch.Tensor,
                   forced: torch.Tensor | None) -> list[tuple[int, ...]] | None:
        """Kept units per row, or None when every row keeps every unit; recorded for stats and costs."""
        if forced is not None:
            rows = [tuple(i for i, v in enumerate(r) if v) for r in forced.tolist()]
            dtype = x.dtype
        elif self.threshold <= 0:  # keeps everything whatever the trimmer says: not computed
            rows, dtype = None, x.dtype
        else:
            logits = trimmer.logits(self._pool(plan, x))
            rows = keep_rows(logits.tolist(), self.threshold, self._min_units(plan))
            dtype = logits.dtype
        if rows is not None and all(len(r) == plan.units for r in rows):
            rows = None
        self._rows[plan.path] = (rows, x.shape[0], plan.units, x.device, dtype)
        return rows

    def _pool(self, plan: SitePlan, x: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens that are really there (padding of a token runtime excluded)."""
        for rt in runtimes(self.model):
            st = getattr(getattr(rt, "state", None), "streams", {}).get(plan.query_stream)
            if st is None:
                continue
            w = None
            if self.model.training and getattr(st, "mask", None) is not None and st.mask.shape == x.shape[:2]:
                w = st.mask.unsqueeze(-1).to(x.dtype)
            elif getattr(st, "valid", None) is not None and st.valid.shape == x.shape[:2]:
                w = st.valid.unsqueeze(-1).to(x.dtype)
            if w is not None:
                return (x * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return x.mean(1)

    # -- applying a decision --------------------------------------------------------------------------
    def _uniform_forwards(self, plan: SitePlan, key: tuple[int, ...], device) -> tuple[list, Decision]:
        """(module, forward) pairs computing the units ``key`` only, and the matching decision."""
        cache = None
        if self.cache_budget > 0 and not torch.is_grad_enabled():
            stamp = (_stamp(plan), torch.is_inference_mode_enabled())
            if self._stamps.get(plan.path) != stamp:
                self._stamps[plan.path] = stamp
                self._cache[plan.path] = {}
            cache = self._cache[plan.path]
            hit = cache.pop(key, None)
            if hit is not None:
                cache[key] = hit  # most recently used last
                return hit[0], hit[1]
        idx = torch.tensor(key, dtype=torch.long, device=device)
        pairs, size = [], 0
        for m, blocks, unit in plan.in_mods:
            w, b = _slice_in(m.weight, m.bias, blocks, unit, idx)
            pairs.append((m, functools.partial(F.linear, weight=w, bias=b)))
            size += w.numel() + (0 if b is None else b.numel())
        o = plan.out_mod
        w = _slice_out(o.weight, plan.head_dim * plan.group, idx)
        pairs.append((o, functools.partial(F.linear, weight=w, bias=o.bias)))
        size += w.numel()
        d = Decision(plan.units, plan.head_dim * plan.group, idx=idx[None], valid=torch.ones(1, len(key), dtype=torch.bool,
                                                                                          device=device), uniform=idx)
        if cache is not None:
            budget = self.cache_budget * sum(t.numel() for m in [m for m, _, _ in plan.in_mods] + [o]
                                             for t in (m.weight, m.bias) if t is not None)
            used = sum(e[2] for e in cache.values())
            while cache and used + size > budget:
                used -= cache.pop(next(iter(cache)))[2]
            if size <= budget:
                cache[key] = (pairs, d, size)
        return pairs, d

    def _union_forwards(self, plan: SitePlan, rows: list[tuple[int, ...]], device) -> tuple[list, Decision]:
        """Rows that keep different heads: compute the union of their heads with plain sliced
        projections and zero, per row, the outputs of the heads that row dropped before the output
        projection (exactly what leaving them out does; no per-row weight copies)."""
        union = tuple(sorted(set().union(*rows)))
        pairs, d = self._uniform_forwards(plan, union, device)
        keep = [set(row) for row in rows]
        scale = torch.tensor([[1.0 if u in k else 0.0 for u in union] for k in keep], device=device)
        scale = scale.repeat_interleave(plan.head_dim * plan.group, dim=1)
        o, out = pairs[-1]
        pairs = pairs[:-1] + [(o, functools.partial(_linear_scaled, scale=scale, weight=out.keywords["weight"],
                                                     bias=out.keywords["bias"]))]
        d = dataclasses.replace(d, idx=d.uniform.expand(len(rows), -1), valid=d.valid.expand(len(rows), -1))
        return pairs, d

    def _row_forwards(self, plan: SitePlan, rows: list[tuple[int, ...]], device) -> tuple[list, Decision]:
        idx, valid = _row_index(rows, device)
        padded = valid if any(len(r) < idx.shape[1] for r in rows) else None
        pairs = []
        for m, blocks, unit in plan.in_mods:
            w, b = _rows_in(m.weight, m.bias, blocks, unit, idx, padded)
            pairs.append((m, functools.partial(_linear_rows, weight=w, bias=b)))
        o = plan.out_mod
        w = _rows_out(o.weight, plan.head_dim * plan.group, idx, padded)
        pairs.append((o, functools.partial(_linear_rows_out, weight=w, bias=o.bias)))
        return pairs, Decision(plan.units, plan.head_dim * plan.group, idx=idx, valid=valid)

    def _removal(self, plan: SitePlan, rows: list[tuple[int, ...]], layout: int, device) -> tuple:
        """The open entry ``(mode, saved attributes, saved forwards)`` that removes the pruned units."""
        if plan.mha:
            d = _decision_from_rows(rows, plan.units, plan.head_dim * plan.group, device)
            mode = _HeadMode(plan, d)
            mode.__enter__()
            return mode, [], []
        first = rows[0]
        if all(r == first for r in rows):
            pairs, d = self._uniform_forwards(plan, first, device)
            if len(rows) > 1:
                d = dataclasses.replace(d, idx=d.uniform.expand(len(rows), -1),
                                        valid=d.valid.expand(len(rows), -1))
        elif self.batched == "union":
            pairs, d = self._union_forwards(plan, rows, device)
        else:
            pairs, d = self._row_forwards(plan, rows, device)
        saved_fw = _set_forwards(pairs)
        saved = []
        if layout in (LAYOUT_ATTRS, LAYOUT_LINEAR_ATTRS):
            kept = d.kept * plan.group
            for m, name, kind in plan.attrs:
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, kept if kind == "heads" else kept * plan.head_dim)
        mode = None
        if layout in (LAYOUT_RESHAPE, LAYOUT_ATTRS):
            mode = _HeadMode(plan, d)
            mode.__enter__()
        return mode, saved, saved_fw

    def _masking(self, plan: SitePlan, mask: torch.Tensor) -> tuple:
        """The open entry that scales each head's output by ``mask [B, units]`` (train, reference)."""
        d = Decision(plan.units, plan.head_dim * plan.group, mask=mask)
        if plan.mha:
            mode = _HeadMode(plan, d)
            mode.__enter__()
            return mode, [], []
        o = plan.out_mod
        scale = mask.repeat_interleave(plan.head_dim * plan.group, dim=-1)
        return None, [], _set_forwards([(o, functools.partial(_linear_scaled, scale=scale, weight=o.weight,
                                                                bias=o.bias))])

    # -- hooks ----------------------------------------------------------------------------------------
    def _close_all(self) -> None:
        while self._open:
            entry = self._open.pop()
            if entry is not None:
                self._close(entry)

    @staticmethod
    def _close(entry) -> None:
        mode, saved, saved_fw = entry
        try:
            for m, name, value in saved:
                setattr(m, name, value)
            _restore_forwards(saved_fw)
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)

    def _reset(self, module, args):
        self._close_all()
        self._masks, self._kept, self._rows, self._logits = {}, {}, {}, {}

    def _make_pre(self, path: str):
        plan = self.plans[path]
        trimmer = self.trimmers[path]

        def pre(module, args, kwargs):
            if not self.enabled or (self.only is not None and path not in self.only) or not bool(trimmer.active):
                self._open.append(None)
                return None
            x = _main_input(args, kwargs, plan.width)
            if x is None:
                raise ValueError(f"head trimming at {path}: no [B, L, {plan.width}] input found")
            if plan.seq_first:
                x = x.transpose(0, 1)
            forced = self.forced.get(path) if self.forced else None
            entry = None
            if self.model.training and forced is None:
                mask = self._train_mask(plan, trimmer(self._pool(plan, x)))
                entry = self._masking(plan, mask)
            else:
                rows = self._eval_rows(plan, trimmer, x, forced)
                if rows is not None:
                    if self.reference or self.model.training:
                        entry = self._masking(plan, _keep_tensor(rows, x.shape[0], plan.units, x.device).to(x.dtype))
                    else:
                        entry = self._removal(plan, rows, int(trimmer.layout), x.device)
            self._open.append(entry)
            return None

        return pre

    def _make_post(self, path: str):
        def post(module, args, output):
            entry = self._open.pop() if self._open else None
            if entry is not None:
                self._close(entry)
            return None

        return post


def _set_forwards(pairs: list) -> list:
    """Give each module an instance-level ``forward``; returns what to restore."""
    saved = []
    for m, fw in pairs:
        saved.append((m, m.__dict__.get("forward")))
        m.__dict__["forward"] = fw
    return saved


def _restore_forwards(saved: list) -> None:
    for m, prev in reversed(saved):
        if prev is None:
            m.__dict__.pop("forward", None)
        else:
            m.__dict__["forward"] = prev


def _decision_from_rows(rows: list[tuple[int, ...]], units: int, head_dim: int, device) -> Decision:
    first = rows[0]
    if all(r == first for r in rows):
        idx = torch.tensor(first, dtype=torch.long, device=device)
        return Decision(units, head_dim, idx=idx.expand(len(rows), -1),
                        valid=torch.ones(len(rows), len(first), dtype=torch.bool, device=device), uniform=idx)
    idx, valid = _row_index(rows, device)
    return Decision(units, head_dim, idx=idx, valid=valid)


# ----------------------------------------------------------------------------------------------
# Checks at apply time
# ----------------------------------------------------------------------------------------------
def _floats(out) -> dict:
    """Floating tensors of a model output by pytree key path."""
    flat, _ = tree_flatten_with_path(out)
    return {keystr(k): t for k, t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _row(inputs: dict, i: int) -> dict:
    return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in inputs.items()}


def _batch(inputs: dict) -> int:
    return next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 1)


def _head_axis_only(a: torch.Size, b: torch.Size, heads: set[int]) -> bool:
    """Shapes that differ in one dim only, where ``b`` has a site's head count (attention maps)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] if len(a) == len(b) else [-1, -2]
    return len(diff) == 1 and b[diff[0]] in heads and a[diff[0]] < b[diff[0]]


def _differ(got: dict, ref: dict, tol: float, heads: set[int]) -> str:
    if set(got) != set(ref):
        return f"outputs {sorted(set(got) ^ set(ref))[:3]} appear in one run only"
    for key, y in ref.items():
        x = got[key]
        if x.shape != y.shape:
            if _head_axis_only(x.shape, y.shape, heads):
                continue  # attention probabilities of the kept heads
            return f"output {key}: shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        err = (x - y).abs().max().item() if x.numel() else 0.0
        if not err <= tol * max(1.0, y.abs().max().item() if y.numel() else 0.0):
            return f"output {key}: max difference {err:.3g}"
    return ""


def _random_keep(plans: dict[str, SitePlan], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """About half of each site's heads per row, at least one, rows that differ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, plan in plans.items():
        r = torch.rand(batch, plan.units, generator=g)
        keep = r < 0.5
        keep[torch.arange(batch), r.argmin(1)] = True
        keep[torch.arange(batch), r.argmax(1)] = False
        if batch > 1 and bool((keep == keep[:1]).all()):
            keep[1] = ~keep[0]
            keep[1, r[1].argmax()] = True
        out[path] = keep
    return out


def _check(model: nn.Module, rt: HeadRuntime, inputs: dict, paths: set[str], tol: float) -> str:
    """'' when removal equals masking and the batch equals its rows; else what differs."""
    batch = _batch(inputs)
    forced = _random_keep({p: rt.plans[p] for p in paths}, batch)
    rt.forced, rt.only = forced, paths
    try:
        with torch.no_grad():
            rt.reference = True
            ref = _floats(model(**inputs))
            rt.reference = False
            got = _floats(model(**inputs))
            heads = {rt.plans[p].heads for p in paths}
            diff = _differ(got, ref, tol, heads)
            if diff:
                return f"removing heads changes the result ({diff})"
            for i in range(batch if batch > 1 else 0):
                rt.forced = {p: k[i:i + 1] for p, k in forced.items()}
                row = _floats(model(**_row(inputs, i)))
                keys = [k for k, t in got.items()  # contrastive scores mix rows: skipped
                        if k in row and t.dim() and t.shape[0] == batch and row[k].shape == t[i:i + 1].shape]
                diff = _differ({k: row[k] for k in keys}, {k: got[k][i:i + 1] for k in keys}, tol, heads)
                if diff:
                    return f"batched and row-by-row runs disagree ({diff})"
        return ""
    except Exception as exc:  # the check decides; any failure means "not trimmable"
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    finally:
        rt.forced, rt.only, rt.reference = None, None, False


_LAYOUT_ORDER = (LAYOUT_LINEAR, LAYOUT_LINEAR_ATTRS, LAYOUT_RESHAPE, LAYOUT_ATTRS)


def check_sites(model: nn.Module, rt: HeadRuntime, inputs: dict, tol: float = 1e-4) -> dict[str, str]:
    """Pick each site's layout by trying them, cheapest first; deactivate the sites where none works.

    The linear layouts only replace the projection modules' forwards for the call (and set the head
    count attributes); the reshape layouts also run the call under a ``TorchFunctionMode`` that repairs
    reshapes. ``nn.MultiheadAttention`` always uses the mode. Returns {site path: reason} of the sites
    left whole.
    """
    was_training = model.training
    model.eval()
    failed: dict[str, str] = {}
    try:
        mha = {p for p, plan in rt.plans.items() if plan.mha}
        for p in rt.plans:
            rt.trimmers[p].layout.fill_(LAYOUT_RESHAPE)
        undecided, pending = set(rt.plans) - mha, set(mha)
        reasons: dict[str, str] = {p: "" for p in rt.plans}
        for i, layout in enumerate(_LAYOUT_ORDER):
            if not undecided:
                break
            for p in undecided:
                rt.trimmers[p].layout.fill_(layout)
            if not _check(model, rt, inputs, undecided | pending, tol):
                if i == 0:
                    return failed  # every site works in the cheapest layout
                undecided, pending = set(), set()
                break
            for p in sorted(undecided):  # one at a time: the sites this layout works for
                reasons[p] = _check(model, rt, inputs, {p}, tol)
                if not reasons[p]:
                    undecided.discard(p)
        for p in sorted(pending):
            reasons[p] = _check(model, rt, inputs, {p}, tol)
            if reasons[p]:
                undecided.add(p)
        for p in undecided:
            failed[p] = reasons[p]
            rt.trimmers[p].active.fill_(0.0)
            rt.trimmers[p].layout.fill_(LAYOUT_RESHAPE)
        good = {p for p in rt.plans if p not in failed}
        reason = _check(model, rt, inputs, good, tol) if good else ""
        if reason:  # sites that only fail together: leave them all whole
            for p in good:
                failed[p] = f"fails together with the other sites ({reason})"
                rt.trimmers[p].active.fill_(0.0)
        return failed
    finally:
        model.train(was_training)
