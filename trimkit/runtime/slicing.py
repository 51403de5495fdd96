"""The arithmetic of removing heads outside the attention call: decisions as Python rows and index
tensors, the kept heads' projections as sliced weights, per-row weights or scaled outputs (instance
``forward`` replacements of the projection modules). What happens inside the call is the
:class:`~trimkit.attention.HeadSlice` action of the attention mode."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trimkit.attention import HeadDecision as SliceDecision
from trimkit.runtime.sites import SitePlan

__all__ = ["keep_rows", "keep_tensor", "row_index", "rows_in", "rows_out", "linear_rows", "linear_rows_out",
           "linear_scaled", "stamp", "set_forwards", "restore_forwards", "decision_from_rows"]


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


def decision_from_rows(rows: list[tuple[int, ...]], units: int, head_dim: int, device) -> SliceDecision:
    first = rows[0]
    if all(r == first for r in rows):
        idx = torch.tensor(first, dtype=torch.long, device=device)
        return SliceDecision(units, head_dim, idx=idx.expand(len(rows), -1),
                        valid=torch.ones(len(rows), len(first), dtype=torch.bool, device=device), uniform=idx)
    idx, valid = row_index(rows, device)
    return SliceDecision(units, head_dim, idx=idx, valid=valid)

