"""The arithmetic of removing heads: decisions as index tensors, projections of the kept heads
(sliced weights, per-row weights, scaled outputs), shape repair, and the function mode that applies a
decision inside one attention call."""
from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trimkit.runtime.sites import SitePlan

__all__ = ["Decision", "HeadMode", "keep_rows", "repair_shape", "project_in", "project_out", "mha_forward",
           "keep_tensor", "row_index", "slice_in", "slice_out", "rows_in", "rows_out", "linear_rows",
           "linear_rows_out", "linear_scaled", "stamp", "set_forwards", "restore_forwards", "decision_from_rows"]


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



def unit_index(idx: torch.Tensor, unit: int, heads: int, blocks: int) -> torch.Tensor:
    """Feature indices ``[..., blocks * Hk * unit]`` of the kept heads in a ``[blocks, H, unit]`` layout."""
    base = (idx[..., None] * unit + torch.arange(unit, device=idx.device)).flatten(-2)
    return torch.cat([base + k * heads * unit for k in range(blocks)], dim=-1)


def unit_valid(valid: torch.Tensor, unit: int, blocks: int) -> torch.Tensor:
    return valid.repeat_interleave(unit, dim=-1).repeat(*([1] * (valid.dim() - 1)), blocks)


def project_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int,
                d: Decision) -> torch.Tensor:
    """A q/k/v projection (``blocks`` of ``units * unit`` rows) of batch-first ``x`` for the kept units only."""
    if d.idx is None:
        return F.linear(x, weight, bias)
    if d.uniform is not None:
        rows = unit_index(d.uniform, unit, d.heads, blocks)
        return F.linear(x, weight[rows], None if bias is None else bias[rows])
    b = d.idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"projection input has batch {x.shape[0]}, decisions have {b} rows")
    rows = unit_index(d.idx, unit, d.heads, blocks)  # [B, R]
    keep = unit_valid(d.valid, unit, blocks).to(weight.dtype)
    w = weight[rows] * keep[..., None]  # [B, R, Din]
    y = torch.bmm(x.reshape(b, -1, x.shape[-1]), w.transpose(1, 2))
    if bias is not None:
        y = y + (bias[rows] * keep)[:, None, :]
    return y.reshape(*x.shape[:-1], rows.shape[1])


def project_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d: Decision) -> torch.Tensor:
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
        return F.linear(x, weight[:, unit_index(d.uniform, d.head_dim, d.heads, 1)], bias)
    b = d.idx.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"output projection input has batch {x.shape[0]}, decisions have {b} rows")
    cols = unit_index(d.idx, d.head_dim, d.heads, 1)
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


def mha_forward(a: dict, plan: SitePlan, d: Decision):
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
    q, k, v = (project_in(x, w, bias, 1, dh, d) for x, w, bias in zip((x_q, x_k, x_v), ws, bs))
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
    out = project_out(ctx, a["out_proj_weight"], a["out_proj_bias"], d).transpose(0, 1)
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


class HeadMode(TorchFunctionMode):
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
                return project_out(x, w, bias, d)
            hit = self.ins.get(id(w))
            if hit is not None and hit[0] is w and d.idx is not None:
                bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
                return project_in(x, w, bias, hit[2], hit[3], d)
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
                return mha_forward(a, plan, d)
        return func(*args, **kwargs)



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


def keep_tensor(rows: list[tuple[int, ...]] | None, batch: int, units: int, device) -> torch.Tensor:
    if rows is None:
        return torch.ones(batch, units, dtype=torch.bool, device=device)
    keep = torch.zeros(batch, units, dtype=torch.bool)
    r = [i for i, row in enumerate(rows) for _ in row]
    keep[r, [j for row in rows for j in row]] = True
    return keep.to(device)


def row_index(rows: list[tuple[int, ...]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx [B, Hk]`` (kept units, 0 where padded) and bool ``valid [B, Hk]``, Hk the row maximum."""
    hk = max(len(r) for r in rows)
    idx = torch.tensor([list(r) + [0] * (hk - len(r)) for r in rows], dtype=torch.long, device=device)
    valid = torch.tensor([[True] * len(r) + [False] * (hk - len(r)) for r in rows], device=device)
    return idx, valid


def slice_in(weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int, idx: torch.Tensor):
    """Rows of the kept units (``idx [Hk]``) of a ``[blocks, units, unit]``-laid-out projection."""
    din = weight.shape[1]
    w = weight.view(blocks, -1, unit, din)[:, idx].reshape(-1, din)
    b = None if bias is None else bias.view(blocks, -1, unit)[:, idx].reshape(-1)
    return w, b


def slice_out(weight: torch.Tensor, unit: int, idx: torch.Tensor) -> torch.Tensor:
    dout = weight.shape[0]
    return weight.view(dout, -1, unit)[:, idx].reshape(dout, -1)


def rows_in(weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, unit: int, idx: torch.Tensor,
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


def rows_out(weight: torch.Tensor, unit: int, idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-row output weights ``[B, Hk * unit, Dout]``, zero where ``valid`` is not."""
    dout, (b, hk) = weight.shape[0], idx.shape
    w = weight.view(dout, -1, unit)[:, idx]  # [Dout, B, Hk, unit]
    if valid is not None:
        w = w * valid.to(weight.dtype)[None, :, :, None]
    return w.permute(1, 2, 3, 0).reshape(b, hk * unit, dout)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [B, ..., Din]`` times its row's ``weight [B, R, Din]`` (a q/k/v projection of one row's heads)."""
    b = weight.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"projection input has batch {x.shape[0]}, decisions have {b} rows")
    x3 = x.reshape(b, -1, x.shape[-1])
    y = torch.bmm(x3, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias[:, None], x3,
                                                                                   weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


def linear_rows_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [B, ..., R]`` times its row's output weight ``[B, R, Dout]``."""
    b = weight.shape[0]
    if x.shape[0] != b:
        raise ValueError(f"output projection input has batch {x.shape[0]}, decisions have {b} rows")
    x3 = x.reshape(b, -1, x.shape[-1])
    y = torch.bmm(x3, weight) if bias is None else torch.baddbmm(bias, x3, weight)
    return y.reshape(*x.shape[:-1], weight.shape[2])


def linear_scaled(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The output projection of ``x`` with each head's features scaled by its row's mask (``[B, H*dh]``)."""
    if x.shape[0] != scale.shape[0]:
        raise ValueError(f"output projection input has batch {x.shape[0]}, masks have {scale.shape[0]} rows")
    x = x * scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1]).to(x.dtype)
    return F.linear(x, weight, bias)


def stamp(plan: SitePlan) -> tuple:
    """Changes whenever a projection weight is updated in place, replaced or moved."""
    mods = [m for m, _, _ in plan.in_mods] + [plan.out_mod]
    return tuple((t._version, t.data_ptr()) for m in mods for t in (m.weight, m.bias) if t is not None)



def set_forwards(pairs: list) -> list:
    """Give each module an instance-level ``forward``; returns what to restore."""
    saved = []
    for m, fw in pairs:
        saved.append((m, m.__dict__.get("forward")))
        m.__dict__["forward"] = fw
    return saved


def restore_forwards(saved: list) -> None:
    for m, prev in reversed(saved):
        if prev is None:
            m.__dict__.pop("forward", None)
        else:
            m.__dict__["forward"] = prev


def decision_from_rows(rows: list[tuple[int, ...]], units: int, head_dim: int, device) -> Decision:
    first = rows[0]
    if all(r == first for r in rows):
        idx = torch.tensor(first, dtype=torch.long, device=device)
        return Decision(units, head_dim, idx=idx.expand(len(rows), -1),
                        valid=torch.ones(len(rows), len(first), dtype=torch.bool, device=device), uniform=idx)
    idx, valid = row_index(rows, device)
    return Decision(units, head_dim, idx=idx, valid=valid)

