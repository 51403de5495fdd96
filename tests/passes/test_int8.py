"""int8.dynamic: the quantized Linear, which layers the pass picks, accuracy, undo, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import toy_vlms
from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes import Int8DynamicConfig, Int8DynamicLinear, applied_passes, apply_, remove_
from trimkit.passes.int8 import quantizable_linears


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(64, 48)


@pytest.fixture
def x():
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))


def test_weights_are_int8_per_row(linear):
    q = Int8DynamicLinear.from_float(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (48, 64)
    assert q.weight_scale.shape == (48,) and q.weight_int8.abs().max() == 127
    err = (q.weight - linear.weight).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()
    assert set(q.state_dict()) == {"weight_int8", "weight_scale", "bias"}
    assert "bias" not in Int8DynamicLinear.from_float(nn.Linear(4, 3, bias=False)).state_dict()


def test_output_close_to_float(linear, x):
    q = Int8DynamicLinear.from_float(linear)
    with torch.no_grad():
        out = q(x)
        assert out.shape == (3, 5, 48) and out.dtype == torch.float32
        assert 0 < rel_err(out, linear(x)) < 0.03


def test_fallback_path_agrees(linear, x, monkeypatch):
    q = Int8DynamicLinear.from_float(linear)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(Int8DynamicLinear, "_packing_ok", False)
        slow = q(x)
    assert not torch.equal(fast, slow)  # the fast path quantizes activations too
    assert rel_err(slow, linear(x)) < 0.01 and rel_err(fast, slow) < 0.03


def test_grad_mode_same_values_and_input_gradient(linear, x):
    q = Int8DynamicLinear.from_float(linear)
    with torch.no_grad():
        expected = q(x)
    xg = x.clone().requires_grad_()
    out = q(xg)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.allclose(xg.grad, q.weight.sum(0).expand_as(x), atol=1e-5)


def test_state_dict_round_trip_rebuilds_packed_weight(linear, x):
    q = Int8DynamicLinear.from_float(linear)
    other = Int8DynamicLinear.from_float(nn.Linear(64, 48))
    with torch.no_grad():
        expected = q(x)
        other(x)  # builds other's packed weight before its buffers change
        other.load_state_dict(q.state_dict(), strict=True)
        assert torch.equal(other(x), expected)
        fresh = Int8DynamicLinear(64, 48)
        fresh.load_state_dict(q.state_dict(), strict=True)
        assert torch.equal(fresh(x), expected)


def test_pass_on_toy_model_skips_head_and_mha(two_stream_map):
    model, inputs, model_map = two_stream_map
    with torch.no_grad():
        before = model(**inputs)
    report = apply_(model, Int8DynamicConfig(), model_map=model_map)
    (result,) = report.results
    quantized = [n for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)]
    linears = [n for n, m in toy_vlms.two_stream()[0].named_modules() if isinstance(m, nn.Linear)]
    assert result.report["quantized"] == len(quantized) == len(linears) - 1
    assert result.report["skipped"] == ["head"] and isinstance(model.head, nn.Linear)
    assert result.report["weight_bytes_after"] < 0.3 * result.report["weight_bytes_before"]
    with torch.no_grad():
        after = model(**inputs)
    assert 0 < rel_err(after, before) < 0.05
    remove_(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), before)


def test_filter_skip_and_no_quant_marks():
    model, _ = toy_vlms.two_stream()
    model.text[1].trimkit_no_quant = True
    model.vision[0].mlp.trimkit_role = "trimmer"
    chosen, skipped = quantizable_linears(model, Int8DynamicConfig(filter=r"^(text|vision)\.", skip=r"\.proj$"))
    assert all(p.startswith(("text.", "vision.")) for p in chosen)
    assert not any(p.startswith("text.1.") or p.startswith("vision.0.mlp.") or p.endswith(".proj") for p in chosen)
    assert {"text.1.mlp.0", "vision.0.mlp.0", "text.0.attn.proj"} <= set(skipped)
    assert "text.0.attn.to_qkv" in chosen and "head" in skipped


def test_multihead_attention_out_proj_is_left_alone():
    model, inputs = toy_vlms.single_stream()
    with torch.no_grad():
        before = model(**inputs)
    apply_(model, Int8DynamicConfig(skip=""), model_map={})
    assert type(model.blocks[0].mha.out_proj) is not Int8DynamicLinear
    assert isinstance(model.blocks[0].ff[0], Int8DynamicLinear) and isinstance(model.head, Int8DynamicLinear)
    with torch.no_grad():
        assert rel_err(model(**inputs), before) < 0.05


def test_keep_float_false_cannot_be_undone():
    model, _ = toy_vlms.single_stream()
    apply_(model, Int8DynamicConfig(keep_float=False), model_map={})
    assert applied_passes(model)[0].result.undo is None
    with pytest.raises(TrimkitError, match="cannot be undone"):
        remove_(model)


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'filter': invalid regex '\['"):
        Int8DynamicConfig(filter="[")


@pytest.fixture(scope="module")
def _two_stream_map():
    from trimkit.locate import locate

    model, inputs = toy_vlms.two_stream()
    return locate(model, inputs)


@pytest.fixture
def two_stream_map(_two_stream_map):
    model, inputs = toy_vlms.two_stream()
    return model, inputs, _two_stream_map
