"""Models whose forward runs every child they hold (an ``nn.Sequential`` top level, a loop over
``self.children()``): trimkit's submodules pass through, stay in the state dict, and go with remove_."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trimkit.backbones import load_backbone
from trimkit.io import load_folder, save_folder
from trimkit.passes import apply_, remove_
from trimkit.passes.random_tokens import RandomTokensConfig
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig
from trimkit.profile import count_flops
from trimkit.runtime import set_threshold, state
from trimkit.train import TrainConfig, train

SEQUENTIAL = "tests/models/toy_vlms.py:sequential"
CHILD_LOOP = "tests/models/toy_vlms.py:child_loop"
REFS = [SEQUENTIAL, CHILD_LOOP]


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _smarttrim(threshold):
    return [SmartTrimTokensConfig(threshold=threshold), SmartTrimHeadsConfig(threshold=threshold)]


def _sharpen(model):
    """Trimmer scores that differ from token to token, so a threshold of 0.5 keeps about half."""
    torch.manual_seed(1)
    for module in model.modules():
        if state.role(module) == state.TRIMMER_ROLE and hasattr(module, "score"):
            with torch.no_grad():
                module.score.weight.normal_(std=1.0)
                module.score.bias.zero_()


def test_pass_through_returns_its_first_argument():
    x, mask = torch.randn(2, 5, 4), torch.zeros(2, 5)
    trimmers = state.Trimmers({"a": nn.Linear(4, 4)})
    assert trimmers(x) is x and trimmers(x, mask) is x and trimmers(hidden=x) is x
    assert trimmers() is None
    seq = nn.Sequential(nn.Linear(4, 3))
    state.attach(seq, state.TOKEN_TRIMMERS, trimmers)
    assert torch.equal(seq(x), seq[0](x)) and list(seq.state_dict()) == [
        "0.weight", "0.bias", "trimkit_token_trimmers.a.weight", "trimkit_token_trimmers.a.bias"]


def test_attach_refuses_a_module_that_would_change_the_forward():
    with pytest.raises(TypeError, match="PassThrough modules only, got ModuleDict"):
        state.attach(nn.Sequential(), state.TOKEN_TRIMMERS, nn.ModuleDict())


@pytest.mark.parametrize("ref", REFS)
@pytest.mark.slow
def test_smarttrim_keep_all_is_exact_trimming_saves_flops_and_remove_restores(ref):
    bb = load_backbone(ref)
    inputs = bb.example_inputs(3)
    before_keys = list(bb.model.state_dict())
    children = len(list(bb.model.children()))
    ref_out = _out(bb.model, inputs)
    full = count_flops(bb.model, inputs).flops
    report = apply_(bb.model, _smarttrim(0.0), inputs=inputs, hints=bb.hints)
    assert report.model is bb.model and report.results[0].report["trimmed_streams"]
    assert report.results[1].report["trimmed_sites"]
    keys = list(bb.model.state_dict())
    assert any(k.startswith(state.TOKEN_TRIMMERS + ".") for k in keys)
    assert any(k.startswith(state.HEAD_TRIMMERS + ".") for k in keys)
    trainable = {n for n, p in bb.model.named_parameters()} - set(before_keys)
    assert trainable and all(n.startswith(("trimkit_token_trimmers.", "trimkit_head_trimmers.")) for n in trainable)
    assert (_out(bb.model, inputs) - ref_out).abs().max().item() <= 1e-5
    _sharpen(bb.model)
    set_threshold(bb.model, 0.5)
    trimmed = count_flops(bb.model, inputs).flops
    assert trimmed < 0.95 * full, (trimmed, full)
    remove_(bb.model)
    assert list(bb.model.state_dict()) == before_keys and len(list(bb.model.children())) == children
    assert (_out(bb.model, inputs) - ref_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ref", REFS)
def test_random_tokens_off_is_exact_on_saves_flops_and_remove_restores(ref):
    bb = load_backbone(ref)
    inputs = bb.example_inputs(3)
    ref_out = _out(bb.model, inputs)
    full = count_flops(bb.model, inputs).flops
    report = apply_(bb.model, [RandomTokensConfig(threshold=0.0)], inputs=inputs, hints=bb.hints)
    assert report.results[0].report["trimmed_streams"]
    assert "trimkit_baseline_tokens.keep_ratio" in bb.model.state_dict()
    assert (_out(bb.model, inputs) - ref_out).abs().max().item() <= 1e-5
    set_threshold(bb.model, 0.5)
    assert count_flops(bb.model, inputs).flops < 0.95 * full
    remove_(bb.model)
    assert not hasattr(bb.model, state.BASELINE_TOKENS)
    assert (_out(bb.model, inputs) - ref_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ref,configs", [(SEQUENTIAL, _smarttrim(0.5)), (CHILD_LOOP, _smarttrim(0.5)),
                                         (SEQUENTIAL, [RandomTokensConfig(seed=3, keep_ratio=0.5)])])
@pytest.mark.slow
def test_saved_folder_restores_exactly(tmp_path, ref, configs):
    bb = load_backbone(ref)
    inputs = bb.example_inputs(2)
    apply_(bb.model, configs, inputs=inputs, hints=bb.hints)
    _sharpen(bb.model)
    expected = _out(bb.model, inputs)
    restored = load_folder(save_folder(tmp_path / "saved", base_ref=ref, model=bb.model))
    assert list(restored.model.state_dict()) == list(bb.model.state_dict())
    assert torch.equal(_out(restored.model, inputs), expected)


@pytest.mark.slow
def test_child_loop_model_trains():
    recipe = "[[pass]]\nname = \"smarttrim.tokens\"\ntarget_ratio = 0.5\n[[pass]]\nname = \"smarttrim.heads\"\n"
    result = train(CHILD_LOOP, "synthetic:truefalse?n=16", target_ratio=0.7, steps=2, recipe=recipe,
                   config=TrainConfig(batch_size=8, measure_every=0, calibrate=0), progress=False)
    assert len(result.history) == 2 and all(np.isfinite(r["loss"]) for r in result.history)
    assert any(n.startswith(state.HEAD_TRIMMERS + ".") for n, _ in result.model.named_parameters())
