"""smarttrim.tokens on every family: exact at threshold 0, real removal, batched == row by row, grads."""
from __future__ import annotations

import warnings

import pytest
import torch

from trimkit.backbones import load_backbone
from trimkit.passes import apply_, remove_
from trimkit.passes.smarttrim import SmartTrimTokensConfig, token_runtime
from trimkit.profile import count_flops

HF = ["blip-vqa-tiny", "blip-itm-tiny", "bridgetower-itm-tiny", "vilt-vqa-tiny", "clip-tiny", "siglip-tiny"]
TOYS = ["tests/models/toy_vlms.py:two_stream", "tests/models/toy_vlms.py:single_stream"]
CROSS = {"blip-vqa-tiny", "blip-itm-tiny", "bridgetower-itm-tiny", "vilt-vqa-tiny", TOYS[0], TOYS[1]}


def _setup(ref, threshold=0.0, batch=3):
    bb = load_backbone(ref)
    inputs = bb.example_inputs(batch)
    return bb, inputs


def _out(bb, inputs):
    with torch.no_grad():
        out = bb.model(**inputs)
    if bb.task.kind == "contrastive":  # rows of a contrastive batch are not independent
        return torch.cat([out.image_embeds, out.text_embeds], dim=-1)
    return bb.task.logits(out)


def _randomise(model, scale=3.0):
    g = torch.Generator().manual_seed(1)
    for t in model.trimkit_token_trimmers.values():
        with torch.no_grad():
            t.local.weight.copy_(torch.randn(t.local.weight.shape, generator=g) / t.local.weight.shape[1] ** 0.5)
            t.score.weight.copy_(torch.randn(t.score.weight.shape, generator=g) * scale)
            t.score.bias.zero_()


@pytest.mark.parametrize("ref", HF + TOYS)
@pytest.mark.slow
def test_threshold_zero_is_exact_and_remove_restores(ref):
    bb, inputs = _setup(ref)
    ref_out = _out(bb, inputs)
    report = apply_(bb.model, [SmartTrimTokensConfig(threshold=0.0)], inputs=inputs, hints=bb.hints)
    _randomise(bb.model)
    res = report.results[0].report
    assert res["trimmed_streams"], res
    if ref in CROSS:
        assert any(v is not None for v in res["guidance"].values()), res
    assert (_out(bb, inputs) - ref_out).abs().max().item() <= 1e-5
    remove_(bb.model)
    assert not hasattr(bb.model, "trimkit_token_trimmers")
    assert (_out(bb, inputs) - ref_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ref", HF + TOYS)
@pytest.mark.slow
def test_removal_cuts_executed_flops_and_batches_agree(ref):
    bb, inputs = _setup(ref)
    full = count_flops(bb.model, inputs).flops
    apply_(bb.model, [SmartTrimTokensConfig(threshold=0.5)], inputs=inputs, hints=bb.hints)
    _randomise(bb.model)
    rt = token_runtime(bb.model)
    half = count_flops(bb.model, inputs).flops
    rt.threshold = 1.0
    harsh = count_flops(bb.model, inputs).flops
    assert harsh < half < full
    assert harsh < full * (2 / 3), (ref, harsh / full)
    # rows keep different numbers of tokens at 0.5: padded batch equals row-by-row runs
    rt.threshold = 0.5
    batched = _out(bb, inputs)
    kept = [k for s in rt.state.streams.values() for k in s.kept]
    assert any(len(set(k.tolist())) > 1 for k in kept), "rows should differ in keep counts"
    rows = [_out(bb, {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() else v) for k, v in inputs.items()})
            for i in range(inputs[next(iter(inputs))].shape[0])]
    assert (torch.cat(rows) - batched).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ref", ["blip-vqa-tiny", "vilt-vqa-tiny", "bridgetower-itm-tiny", TOYS[0], TOYS[1]])
@pytest.mark.slow
def test_train_mode_masks_and_every_trimmer_gets_gradient(ref):
    bb, inputs = _setup(ref)
    apply_(bb.model, [SmartTrimTokensConfig()], inputs=inputs, hints=bb.hints)
    model = bb.model.train()
    for t in model.trimkit_token_trimmers.values():  # keep about half, so masks matter
        with torch.no_grad():
            t.score.bias.zero_()
    torch.manual_seed(0)
    out = model(**inputs)
    logits = bb.task.logits(out)
    loss = logits.float().pow(2).mean()
    rt = token_runtime(model)
    # cost of kept tokens feeds the gradient as well (what the trainer's cost loss does)
    loss = loss + sum(m.sum() for s in rt.state.streams.values() for m in s.masks) * 1e-3
    loss.backward()
    for name, p in model.trimkit_token_trimmers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # training keeps every token (masks, no removal)
    for s in rt.state.streams.values():
        for m in s.masks:
            assert m.shape[1] == s.length


def test_dual_encoder_reports_same_modality_guidance():
    bb, inputs = _setup("clip-tiny")
    report = apply_(bb.model, [SmartTrimTokensConfig()], inputs=inputs, hints=bb.hints).results[0].report
    assert "vision_model.encoder.layers" in report["trimmed_streams"]
    assert any("same-modality guidance" in n for n in report["notes"])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("other", [None, 24])
def test_trimmer_fast_logits_match_forward(batch, other):
    from trimkit.passes.smarttrim import TokenTrimmer

    torch.manual_seed(batch)
    t = TokenTrimmer(32, other)
    x, g = torch.randn(batch, 9, 32), torch.randn(batch, 32)
    o = torch.randn(batch, other) if other else None
    with torch.no_grad():
        torch.testing.assert_close(t.fast_logits(x, g, o), t(x, g, o), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ref", ["blip-vqa-tiny", "vilt-vqa-tiny"])
@pytest.mark.slow
def test_feed_forward_of_a_padded_batch_runs_on_kept_tokens_only(ref):
    """Rows keeping different counts are padded for attention, but the FFN reads the kept tokens
    packed across rows: its first projection sees [N, D] with N = the tokens kept, and the batch
    still equals its rows run one by one."""
    from trimkit.locate import locate

    bb, inputs = _setup(ref)
    model_map = locate(bb.model, inputs)
    apply_(bb.model, [SmartTrimTokensConfig(threshold=0.5)], inputs=inputs, hints=bb.hints)
    _randomise(bb.model)
    rt = token_runtime(bb.model)
    seen = {}
    hooks = []
    for s in model_map.streams:
        if s.name in rt.trimmed_streams:
            for layer in s.layers:
                if layer.ffn is not None:
                    fc = bb.model.get_submodule(layer.ffn.fc_in[0])
                    hooks.append(fc.register_forward_hook(
                        lambda m, a, o, path=layer.path: seen.__setitem__(path, tuple(a[0].shape))))
    batched = _out(bb, inputs)
    for h in hooks:
        h.remove()
    packed = {p: shape for p, shape in seen.items() if len(shape) == 2}
    assert packed, seen
    for path, shape in packed.items():
        kept = rt.state.tokens[path]  # per-row counts of the tokens the layer computes
        assert shape[0] == int(kept.sum()) < len(kept) * int(kept.max()), (path, shape, kept)
    rows = [_out(bb, {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() else v) for k, v in inputs.items()})
            for i in range(inputs[next(iter(inputs))].shape[0])]
    assert (torch.cat(rows) - batched).abs().max().item() <= 1e-4


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


@pytest.mark.parametrize("ref", ["blip-vqa-tiny", "vilt-vqa-tiny", "bridgetower-itm-tiny", TOYS[0], TOYS[1]])
@pytest.mark.slow
def test_train_mode_forward_equals_inference_with_the_same_decisions(ref, monkeypatch):
    """Training masks keys, inference removes tokens: with the same decisions both give the same output
    (a key the mask drops must not leak into attention)."""
    bb, inputs = _setup(ref)
    apply_(bb.model, [SmartTrimTokensConfig(threshold=0.5)], inputs=inputs, hints=bb.hints)
    _randomise(bb.model)
    _no_dropout(bb.model)

    def noiseless(logits, tau=1.0, hard=True, generator=None):  # the eval decision, logit > 0
        soft = torch.sigmoid(logits)
        return (logits > 0).to(soft.dtype) + (soft - soft.detach())

    monkeypatch.setattr("trimkit.ops.gumbel_sigmoid", noiseless)
    rt = token_runtime(bb.model)
    eval_out = _out(bb, inputs)
    kept_eval = [k.clone() for s in rt.state.streams.values() for k in s.kept]
    bb.model.train()
    with torch.no_grad():
        train_out = bb.task.logits(bb.model(**inputs))
    kept_train = [k for s in rt.state.streams.values() for k in s.kept]
    assert [k.tolist() for k in kept_train] == [k.tolist() for k in kept_eval]
    assert any(k.min() < s.length for s in rt.state.streams.values() for k in s.kept), "nothing was dropped"
    assert (train_out - eval_out).abs().max().item() <= 1e-4, (train_out - eval_out).abs().max()


def test_attention_the_training_mask_cannot_reach_is_reported_once(monkeypatch):
    def manual(self, x, context=None, key_mask=None):  # weights without a softmax call
        b, n, d = x.shape
        if self.cross:
            q, k, v = self.to_q(x), *self.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        out = torch.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdim=True), v).reshape(b, n, d)
        return self.proj(out)

    bb, inputs = _setup(TOYS[0])
    apply_(bb.model, [SmartTrimTokensConfig()], inputs=inputs, hints=bb.hints)
    monkeypatch.setattr(type(bb.model.text[0].attn), "forward", manual)
    bb.model.train()
    with pytest.warns(RuntimeWarning, match="did not mask its dropped keys.*no attention_mask argument"):
        bb.model(**inputs)
    assert "text.1.attn" in token_runtime(bb.model).keys.exact_only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb.model(**inputs)


def test_stream_whole_keeps_one_stream_and_restores():
    from trimkit.runtime import trim_stats
    bb, inputs = _setup(TOYS[0])
    apply_(bb.model, [SmartTrimTokensConfig(threshold=1.0)], inputs=inputs, hints=bb.hints)
    _randomise(bb.model)
    rt = token_runtime(bb.model)
    streams = sorted(rt.trimmed_streams)
    assert len(streams) == 2, streams

    def kept():
        _out(bb, inputs)
        return {s: v["kept"] for s, v in trim_stats(bb.model)["tokens"].items()}

    before = kept()
    assert all(k < rt.state.streams[s].length for s in streams for k in before[s]), before
    with rt.stream_whole(streams[0]):
        during = kept()
        assert rt.state.streams[streams[0]].kept == []  # no layer of the stream decided: all stay
    assert streams[0] not in during and during[streams[1]] == before[streams[1]], (during, before)
    assert kept() == before
    with pytest.raises(ValueError, match="not a trimmed stream"):
        with rt.stream_whole("no such stream"):
            pass
