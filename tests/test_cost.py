"""The expected-FLOPs ratio agrees with the profiler's executed FLOPs and carries gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trimkit.backbones import load_backbone
from trimkit.cost import calibrate, expected_ratio
from trimkit.errors import TrimkitError
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.profile import count_flops
from trimkit.runtime import set_threshold, trimming_off

REFS = ["blip-vqa-tiny", "vilt-vqa-tiny", "bridgetower-itm-tiny", "tests/models/toy_vlms.py:two_stream",
        "tests/models/toy_vlms.py:single_stream"]


def _trimmed(ref: str):
    torch.manual_seed(0)
    bb = load_backbone(ref)
    model = bb.model.eval()
    inputs = bb.example_inputs(4)
    apply_(model, [SmartTrimTokensConfig(threshold=0.5)], inputs=inputs, hints=bb.hints)
    # random decisions so rows keep different counts
    gen = torch.Generator().manual_seed(1)
    for t in model.trimkit_token_trimmers.values():
        with torch.no_grad():
            t.score.weight.copy_(torch.randn(t.score.weight.shape, generator=gen) * 3)
            t.score.bias.zero_()
    calibrate(model, inputs)
    return model, inputs


@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.slow
def test_eval_estimate_matches_profiler(ref, threshold):
    model, inputs = _trimmed(ref)
    set_threshold(model, threshold)
    with torch.no_grad():
        model(**inputs)
        estimate = float(expected_ratio(model))
        # per input: rows one by one (a padded batch also computes the padding)
        rows = [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in inputs.items()}
                for i in range(4)]
        executed = sum(count_flops(model, r).flops for r in rows)
        with trimming_off(model):
            full = sum(count_flops(model, r).flops for r in rows)
    assert estimate == pytest.approx(executed / full, abs=0.02)
    if threshold == 1.0:
        assert estimate < 0.8


def test_train_estimate_has_gradients_and_follows_masks():
    model, inputs = _trimmed("tests/models/toy_vlms.py:two_stream")
    model.train()
    model(**inputs)
    r = expected_ratio(model)
    assert 0.0 < float(r.detach()) < 1.0  # random trimmers prune a good part in training too
    r.backward()
    grads = [p.grad for p in model.trimkit_token_trimmers.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_needs_a_map_and_a_forward():
    with pytest.raises(TrimkitError, match="apply a trimming pass"):
        expected_ratio(nn.Linear(2, 2))
    bb = load_backbone("vilt-vqa-tiny")
    inputs = bb.example_inputs(2)
    apply_(bb.model, [SmartTrimTokensConfig()], inputs=inputs, hints=bb.hints)
    with pytest.raises(TrimkitError, match="no forward observed"):
        expected_ratio(bb.model)
