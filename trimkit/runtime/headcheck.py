"""Apply-time checks of head trimming: each site's layout is chosen by trying them, cheapest first,
with random decisions (removal must equal masking, a batch must equal its rows run one by one)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from trimkit.runtime.heads import HeadRuntime
from trimkit.runtime.sites import LAYOUT_ATTRS, LAYOUT_LINEAR, LAYOUT_LINEAR_ATTRS, LAYOUT_RESHAPE, SitePlan
from trimkit.rows import batch_size_of, take_rows

__all__ = ["check_sites"]


def _floats(out) -> dict:
    """Floating tensors of a model output by pytree key path."""
    flat, _ = tree_flatten_with_path(out)
    return {keystr(k): t for k, t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _row(inputs: dict, i: int) -> dict:
    return take_rows(inputs, [i])


def _batch(inputs: dict) -> int:
    return batch_size_of(inputs) if any(isinstance(v, torch.Tensor) and v.dim() for v in inputs.values()) else 1


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
            rt.decider.layout(p).fill_(LAYOUT_RESHAPE)
        undecided, pending = set(rt.plans) - mha, set(mha)
        reasons: dict[str, str] = {p: "" for p in rt.plans}
        for i, layout in enumerate(_LAYOUT_ORDER):
            if not undecided:
                break
            for p in undecided:
                rt.decider.layout(p).fill_(layout)
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
            rt.decider.active(p).fill_(0.0)
            rt.decider.layout(p).fill_(LAYOUT_RESHAPE)
        good = {p for p in rt.plans if p not in failed}
        reason = _check(model, rt, inputs, good, tol) if good else ""
        if reason:  # sites that only fail together: leave them all whole
            for p in good:
                failed[p] = f"fails together with the other sites ({reason})"
                rt.decider.active(p).fill_(0.0)
        return failed
    finally:
        model.train(was_training)
