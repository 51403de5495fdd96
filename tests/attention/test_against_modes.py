"""The attention mode with each action against the three modes it replaces (``runtime._KeyMask``,
``heads._HeadMode``, ``baselines._ClsAttention``), on the attention modules of real backbones and on
``nn.MultiheadAttention``: identical outputs and gradients."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn

from trimkit import ops
from trimkit.attention import AttentionMode, CaptureProbs, HeadDecision, HeadSlice, KeyMask, get_kind
from trimkit.backbones import load_backbone
from trimkit.locate import locate

try:  # the modes this package replaces, while they exist
    from trimkit import heads
    from trimkit.passes import baselines
    from trimkit.runtime import _encoder_layer_padding, _KeyMask, _mha_key_padding
    _ = (heads._HeadMode, heads.Decision, heads.plan_site, baselines._ClsAttention)
except (ImportError, AttributeError):
    pytest.skip("the per-runtime attention modes are gone", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
TOYS = str(ROOT / "tests/models/toy_vlms.py")
BACKBONES = [("blip-vqa-tiny", None), ("vilt-vqa-tiny", None), ("bridgetower-itm-tiny", None),
             ("clip-tiny", "sdpa"), ("clip-tiny", "eager"), ("llava-tiny", "sdpa"), ("llava-tiny", "eager"),
             (TOYS + ":two_stream", None), (TOYS + ":single_stream", None)]


def _ids(case) -> str:
    ref, impl = case
    return f"{ref.rsplit(':', 1)[-1]}-{impl}"


_CACHE: dict = {}


def _setup(case):
    """(backbone, inputs, model map) of a backbone, loaded once per test session."""
    if case not in _CACHE:
        ref, impl = case
        bb = load_backbone(ref, attn_implementation=impl)
        inputs = bb.example_inputs(2)
        _CACHE[case] = (bb, inputs, locate(bb.model, inputs))
    return _CACHE[case]


def _floats(out) -> list[torch.Tensor]:
    flat = torch.utils._pytree.tree_flatten(out)[0]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _key_length(module: nn.Module, args: tuple, kwargs: dict, cross: bool) -> int | None:
    """The key length of an attention module call: its encoder states for cross-attention, else its
    (batch-first) hidden states."""
    tensors = [v for v in list(args) + list(kwargs.values())
               if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point()]
    if cross:
        enc = kwargs.get("encoder_hidden_states")
        if isinstance(enc, torch.Tensor):
            return enc.shape[1]
        tensors = tensors[1:]
    return tensors[0].shape[1] if tensors else None


def _run(bb, inputs, sites, make_mode, train: bool, seed: int = 0):
    """One forward (and backward when training) with ``make_mode(site, module, args, kwargs)`` entered
    around every site's module call. Returns outputs, parameter gradients and the per-site extras."""
    model = bb.model
    model.train(train)
    model.zero_grad(set_to_none=True)
    extras, open_modes, handles = {}, [], []

    def hooks(site):
        def pre(module, args, kwargs):
            made = make_mode(site, module, args, kwargs)
            if made is None:
                open_modes.append(None)
                return None
            mode, extra = made
            extras.setdefault(site.path, []).append(extra)
            mode.__enter__()
            open_modes.append(mode)
            return None

        def post(module, args, output):
            mode = open_modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)

        mod = model.get_submodule(site.path)
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, always_call=True))

    seen = set()
    for site in sites:
        if site.path not in seen:
            seen.add(site.path)
            hooks(site)
    try:
        torch.manual_seed(seed)
        with torch.set_grad_enabled(train):
            outs = _floats(model(**inputs))
            grads = {}
            if train:
                sum(o.float().sum() for o in outs).backward()
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return outs, grads, extras


def _changed(bb, inputs, train, got) -> bool:
    """Whether ``got`` (outputs of a run with modes) differs from a run without any."""
    plain = _run(bb, inputs, [], None, train)[0]
    return any(not torch.equal(x, y) for x, y in zip(plain, got[0]))


def _assert_same(a, b):
    outs_a, grads_a, _ = a
    outs_b, grads_b, _ = b
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert torch.equal(x, y)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _keep(batch: int, length: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + length)
    keep = (torch.rand(batch, length, generator=g) > 0.4).float()
    keep[:, 0] = 1.0
    return keep


# ----------------------------------------------------------------------------------------------
# key masks
# ----------------------------------------------------------------------------------------------
def _key_mask_modes(new: bool, train: bool):
    def make(site, module, args, kwargs):
        lk = _key_length(module, args, kwargs, site.kind == "cross")
        batch = next(v.shape[0] for v in list(args) + list(kwargs.values())
                     if isinstance(v, torch.Tensor) and v.dim() == 3)
        if lk is None:
            return None
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            batch, lk = lk, batch
        keep = _keep(batch, lk, len(site.path))
        if train:
            keep.requires_grad_(True)
            mask = ops.additive_key_mask(keep.detach())
        else:
            keep, mask = None, ops.padding_key_mask(_keep(batch, lk, len(site.path)).bool())
        if new:
            action = KeyMask(mask, keep=keep, site=site.path)
            return AttentionMode(action), (action, keep)
        mode = _KeyMask(mask, keep=keep, site=site.path)
        return mode, (mode, keep)

    return make


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BACKBONES, ids=_ids)
def test_key_mask_matches_the_runtime_mode(case, train):
    bb, inputs, mm = _setup(case)
    sites = mm.sites()
    old = _run(bb, inputs, sites, _key_mask_modes(False, train), train)
    new = _run(bb, inputs, sites, _key_mask_modes(True, train), train)
    _assert_same(old, new)
    assert _changed(bb, inputs, train, new)
    hits_old = {p: [m.hits for m, _ in e] for p, e in old[2].items()}
    hits_new = {p: [a.hits for a, _ in e] for p, e in new[2].items()}
    assert hits_old == hits_new
    assert sum(sum(h) for h in hits_new.values()) > 0
    if train:
        for p in old[2]:
            for (_, k_old), (_, k_new) in zip(old[2][p], new[2][p]):
                assert (k_old.grad is None) == (k_new.grad is None)
                if k_old.grad is not None:
                    assert torch.equal(k_old.grad, k_new.grad)


@pytest.mark.parametrize("with_keep", [True, False])
def test_key_mask_on_batch_times_heads_scores(with_keep):
    """Attention written with ``bmm`` on ``[B*H, L, hd]``: the mask is repeated per head."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * 3, 5, 4, generator=g) for _ in range(3))
    keep = _keep(2, 5, 9)
    results = []
    for make in (lambda m, kp: (_KeyMask(m, keep=kp),) * 2, lambda m, kp: (AttentionMode(KeyMask(m, keep=kp)),)):
        kp = keep.clone().requires_grad_(True) if with_keep else None
        qq = q.clone().requires_grad_(True)
        mode, *action = make(ops.additive_key_mask(keep), kp)
        with mode:
            out = torch.bmm(torch.softmax(torch.bmm(qq, k.transpose(1, 2)), dim=-1), v)
        out.sum().backward()
        hits = (action[0] if action else mode.actions[0]).hits
        results.append((out, qq.grad, None if kp is None else kp.grad, hits))
    (o1, g1, k1, h1), (o2, g2, k2, h2) = results
    assert torch.equal(o1, o2) and torch.equal(g1, g2) and h1 == h2 == 1
    assert (k1 is None and k2 is None) or torch.equal(k1, k2)


# ----------------------------------------------------------------------------------------------
# head slicing
# ----------------------------------------------------------------------------------------------
def _decision(plan, batch: int, style: str, salt: int):
    units, unit = plan.units, plan.head_dim * plan.group
    g = torch.Generator().manual_seed(salt)
    if style == "mask":
        return dict(heads=units, head_dim=unit, mask=(torch.rand(batch, units, generator=g) > 0.5).float())
    if style == "uniform":
        idx = torch.tensor([u for u in range(units) if u % 2 == 0])
        return dict(heads=units, head_dim=unit, idx=idx.expand(batch, -1),
                    valid=torch.ones(batch, idx.numel(), dtype=torch.bool), uniform=idx)
    rows = [tuple(u for u in range(units) if (u + r) % 2 == 0) or (0,) for r in range(batch)]
    hk = max(len(r) for r in rows)
    idx = torch.tensor([list(r) + [0] * (hk - len(r)) for r in rows])
    valid = torch.tensor([[True] * len(r) + [False] * (hk - len(r)) for r in rows])
    return dict(heads=units, head_dim=unit, idx=idx, valid=valid)


def _head_modes(plans: dict, new: bool, style: str):
    def make(site, module, args, kwargs):
        plan = plans.get(site.path)
        if plan is None:
            return None
        batch = next(v.shape[0 if (not plan.seq_first) else 1] for v in list(args) + list(kwargs.values())
                     if isinstance(v, torch.Tensor) and v.dim() == 3)
        fields = _decision(plan, batch, style, len(site.path))
        if new:
            return AttentionMode(HeadSlice.for_site(plan, HeadDecision(**fields))), None
        return heads._HeadMode(plan, heads.Decision(**fields)), None

    return make


@pytest.mark.parametrize("style", ["mask", "uniform", "rows"])
@pytest.mark.parametrize("case", BACKBONES, ids=_ids)
def test_head_slice_matches_the_head_mode(case, style):
    bb, inputs, mm = _setup(case)
    plans = {}
    for site in mm.sites():
        plan, _ = heads.plan_site(bb.model, site)
        if plan is not None:
            plans[site.path] = plan
    if not plans:
        pytest.skip("no site whose heads can be sliced")
    train = style == "mask"
    sites = [s for s in mm.sites() if s.path in plans]
    old = _run(bb, inputs, sites, _head_modes(plans, False, style), train)
    new = _run(bb, inputs, sites, _head_modes(plans, True, style), train)
    _assert_same(old, new)
    assert _changed(bb, inputs, train, new)


# ----------------------------------------------------------------------------------------------
# probability capture
# ----------------------------------------------------------------------------------------------
def _capture_modes(new: bool, cls):
    def make(site, module, args, kwargs):
        if site.kind != "self":
            return None
        lk = _key_length(module, args, kwargs, False)
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            batch, lk = lk, args[0].shape[0]
        else:
            batch = args[0].shape[0] if args else next(v.shape[0] for v in kwargs.values()
                                                         if isinstance(v, torch.Tensor) and v.dim() == 3)
        seen: list = []
        if new:
            return AttentionMode(CaptureProbs(lk, cls, batch, seen.append)), seen
        return baselines._ClsAttention(lk, cls, batch, seen.append), seen

    return make


@pytest.mark.parametrize("cls", [0, None], ids=["cls", "mean"])
@pytest.mark.parametrize("case", BACKBONES, ids=_ids)
def test_capture_matches_the_cls_attention_mode(case, cls):
    bb, inputs, mm = _setup(case)
    sites = mm.sites()
    old = _run(bb, inputs, sites, _capture_modes(False, cls), False)
    new = _run(bb, inputs, sites, _capture_modes(True, cls), False)
    _assert_same(old, new)
    assert old[2].keys() == new[2].keys()
    recorded = 0
    for p in old[2]:
        for a, b in zip(old[2][p], new[2][p]):
            assert len(a) == len(b)
            recorded += len(a)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    assert recorded > 0


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention, every argument combination
# ----------------------------------------------------------------------------------------------
def _mha_call(batch_first: bool, masks: str, seed: int = 0, lq: int = 4):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, dropout=0.0)
    b, lk = 2, 5
    q = torch.randn(b, lq, 16, requires_grad=True)
    kv = torch.randn(b, lk, 16, requires_grad=True)
    if not batch_first:
        q, kv = q.detach().transpose(0, 1).requires_grad_(True), kv.detach().transpose(0, 1).requires_grad_(True)
    kwargs = {}
    if masks in ("bool", "both"):
        pad = torch.zeros(b, lk, dtype=torch.bool)
        pad[1, 2] = True
        kwargs["key_padding_mask"] = pad
    if masks in ("float", "both"):
        am = torch.zeros(b * 4, lq, lk) if masks == "both" else torch.zeros(lq, lk)
        am[..., 3] = -2.5
        kwargs["attn_mask"] = am
    if masks == "bool_attn":
        am = torch.zeros(lq, lk, dtype=torch.bool)
        am[:, 1] = True
        kwargs["attn_mask"] = am
    return mha, q, kv, kwargs, (b, lk)


def _mha_run(mode, mha, q, kv, kwargs, train, need_weights, average):
    mha.train(train)
    mha.zero_grad(set_to_none=True)
    q.grad, kv.grad = None, None
    with mode:
        out, weights = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kwargs)
    loss = out.sum() + (weights.sum() if weights is not None else 0)
    if train:
        loss.backward()
    grads = [mha.in_proj_weight.grad, mha.out_proj.weight.grad, q.grad, kv.grad] if train else []
    return [out, weights], grads


def _same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


MHA_CASES = [(bf, masks, nw, avg) for bf in (True, False) for masks in ("none", "bool", "float", "both", "bool_attn")
             for nw, avg in ((False, True), (True, True), (True, False))]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_first,masks,need_weights,average", MHA_CASES)
def test_mha_key_mask(batch_first, masks, need_weights, average, train):
    mha, q, kv, kwargs, (b, lk) = _mha_call(batch_first, masks)
    keep = _keep(b, lk, 3)
    for with_keep in (True, False):
        k_old = keep.clone().requires_grad_(True) if with_keep and train else None
        k_new = keep.clone().requires_grad_(True) if with_keep and train else None
        mask = ops.additive_key_mask(keep)
        old_mode = _KeyMask(mask, keep=k_old)
        new_action = KeyMask(mask, keep=k_new)
        old = _mha_run(old_mode, mha, q, kv, kwargs, train, need_weights, average)
        new = _mha_run(AttentionMode(new_action), mha, q, kv, kwargs, train, need_weights, average)
        _same(old, new)
        assert old_mode.hits == new_action.hits == 1
        if k_old is not None:
            assert torch.equal(k_old.grad, k_new.grad)


@pytest.mark.parametrize("style", ["mask", "uniform", "rows"])
@pytest.mark.parametrize("batch_first,masks,need_weights,average", MHA_CASES)
def test_mha_head_slice(batch_first, masks, need_weights, average, style):
    mha, q, kv, kwargs, (b, lk) = _mha_call(batch_first, masks)
    plan = types.SimpleNamespace(heads=4, head_dim=4, group=1, units=4, seq_first=not batch_first, mha=True,
                                 inputs=[(mha.in_proj_weight, mha.in_proj_bias, 3, 4)],
                                 out=(mha.out_proj.weight, mha.out_proj.bias))
    fields = _decision(plan, b, style, 5)
    train = style == "mask"
    old = _mha_run(heads._HeadMode(plan, heads.Decision(**fields)), mha, q, kv, kwargs, train, need_weights,
                   average)
    new = _mha_run(AttentionMode(HeadSlice.for_site(plan, HeadDecision(**fields))), mha, q, kv, kwargs, train,
                   need_weights, average)
    _same(old, new)


@pytest.mark.parametrize("cls", [torch.tensor([0, 3]), 2, None], ids=["rows", "int", "mean"])
@pytest.mark.parametrize("batch_first,masks,need_weights,average", MHA_CASES)
def test_mha_capture(batch_first, masks, need_weights, average, cls):
    mha, _, kv, kwargs, (b, lk) = _mha_call(batch_first, masks, lq=5)
    q = kv  # self-attention: CLS rows exist only where queries are keys
    seen_old, seen_new = [], []
    old = _mha_run(baselines._ClsAttention(lk, cls, b, seen_old.append), mha, q, kv, kwargs, False,
                   need_weights, average)
    new = _mha_run(AttentionMode(CaptureProbs(lk, cls, b, seen_new.append)), mha, q, kv, kwargs, False,
                   need_weights, average)
    _same(old, new)
    assert len(seen_old) == len(seen_new) == 1 and torch.equal(seen_old[0], seen_new[0])


# ----------------------------------------------------------------------------------------------
# kinds a mode cannot reach: masks through the module's arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("pad", ["none", "bool_kw", "float_kw", "bool_positional"])
def test_native_mha_key_padding_matches_the_runtime(batch_first, pad):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    mask = ops.padding_key_mask(_keep(2, 5, 7).bool())
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 3] = True
    args, kwargs = (x, x, x), {}
    if pad == "bool_kw":
        kwargs["key_padding_mask"] = kpm
    elif pad == "float_kw":
        kwargs["key_padding_mask"] = ops.additive_mask(~kpm)
    elif pad == "bool_positional":
        args = (x, x, x, kpm)
    old = _mha_key_padding(mha, args, kwargs, mask)
    new = get_kind("native_mha").key_padding_args(mha, args, kwargs, mask)
    assert len(old[0]) == len(new[0]) and old[1].keys() == new[1].keys()
    assert torch.equal(old[1]["key_padding_mask"], new[1]["key_padding_mask"])
    with torch.no_grad():
        assert torch.equal(mha(*old[0], **old[1])[0], mha(*new[0], **new[1])[0])
    assert get_kind("native_mha").key_padding_args(mha, args, kwargs, mask[..., :4]) is None


@pytest.mark.parametrize("old_mask", ["none", "bool", "float", "positional"])
def test_encoder_layer_padding_matches_the_runtime(old_mask):
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    valid = _keep(2, 5, 8).bool()
    src = torch.zeros(2, 5, dtype=torch.bool)
    src[1, 4] = True
    args, kwargs = (x,), {}
    if old_mask == "bool":
        kwargs["src_key_padding_mask"] = src
    elif old_mask == "float":
        kwargs["src_key_padding_mask"] = ops.additive_mask(~src)
    elif old_mask == "positional":
        args = (x, None, src)
    old = _encoder_layer_padding(layer, args, kwargs, valid)
    new = get_kind("encoder_layer").padding_args(layer, args, kwargs, valid)
    assert len(old[0]) == len(new[0]) and torch.equal(old[1]["src_key_padding_mask"], new[1]["src_key_padding_mask"])
    assert get_kind("encoder_layer").padding_args(nn.Linear(2, 2), args, kwargs, valid) == (args, kwargs)
    assert get_kind("encoder_layer").padding_args(layer, args, kwargs, torch.ones(2, 5, dtype=torch.bool)) == (
        args, kwargs)
