"""The attention-kind registry and the mode's action chain."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trimkit.attention import (
    Action, AttentionKind, AttentionMode, CaptureProbs, KeyMask, attention_formulas, get_kind, kind_of_function,
    kind_of_op, kind_of_op_name, kinds, register_kind,
)
from trimkit.attention import registry

aten = torch.ops.aten


def test_builtin_kinds_and_their_entry_points():
    assert [k.name for k in kinds()] == ["softmax", "sdpa", "mha", "native_mha", "encoder_layer"]
    assert kind_of_function(F.softmax) is kind_of_function(torch.Tensor.softmax) is get_kind("softmax")
    assert kind_of_function(F.scaled_dot_product_attention) is get_kind("sdpa")
    assert kind_of_function(F.multi_head_attention_forward) is get_kind("mha")
    assert kind_of_function(F.linear) is None
    assert kind_of_op(aten._softmax.default) is get_kind("softmax")
    assert kind_of_op(aten._scaled_dot_product_flash_attention_for_cpu.default) is get_kind("sdpa")
    assert kind_of_op(aten._native_multi_head_attention.default) is get_kind("native_mha")
    assert kind_of_op(aten._transformer_encoder_layer_fwd.default) is get_kind("encoder_layer")
    assert kind_of_op(aten.mm.default) is None


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered: softmax, sdpa, mha"):
        get_kind("flash")


@pytest.fixture
def scratch_registry(monkeypatch):
    for name in ("_KINDS", "_BY_FUNCTION", "_BY_OP", "_BY_NAME"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))


def test_adding_a_kind_is_one_entry(scratch_registry):
    def my_attention(q, k, v):
        """An attention function that dispatches like the torch.nn.functional ones."""
        if torch.overrides.has_torch_function((q, k, v)):
            return torch.overrides.handle_torch_function(my_attention, (q, k, v), q, k, v)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v

    @register_kind
    class Mine(AttentionKind):
        name = "mine"
        functions = (my_attention,)

        def capture_probs(self, action, func, args, kwargs, proceed):
            q, k = args[0], args[1]
            action.save(action.rows((q @ k.transpose(-1, -2)).softmax(-1)))
            return proceed(args, kwargs)

    assert get_kind("mine") is kind_of_function(my_attention)
    q = torch.randn(2, 3, 4, 5)
    seen = []
    with AttentionMode(CaptureProbs(4, 0, 2, seen.append)):
        out = my_attention(q, q, q)
    assert torch.equal(out, my_attention(q, q, q))
    assert len(seen) == 1 and seen[0].shape == (2, 4)


def test_registering_twice_or_a_taken_function_fails(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_kind(type(get_kind("softmax")))

    class Other(AttentionKind):
        name = "other"
        functions = (F.softmax,)

    with pytest.raises(ValueError, match="already belongs to 'softmax'"):
        register_kind(Other)


def test_actions_chain_in_order():
    """The first action sees the call first and the result last: a capture placed before a training key
    mask records the masked probabilities; placed after it, it never sees the call, which the key mask
    computes itself."""
    x = torch.randn(2, 3, 4, 4)
    keep = torch.ones(2, 4)
    keep[:, 2] = 0
    mask = torch.zeros(2, 1, 1, 4)
    mask[..., 2] = float("-inf")
    seen = []
    with AttentionMode(CaptureProbs(4, None, 2, seen.append), KeyMask(mask, keep=keep)):
        out = x.softmax(-1)
    assert torch.allclose(out, (x + mask).softmax(-1))
    assert len(seen) == 1 and bool((seen[0][:, 2] == 0).all())
    seen.clear()
    with AttentionMode(KeyMask(mask, keep=keep), CaptureProbs(4, None, 2, seen.append)):
        x.softmax(-1)
    assert seen == []
    with AttentionMode(KeyMask(mask), CaptureProbs(4, None, 2, seen.append)):  # changes the arguments only
        x.softmax(-1)
    assert len(seen) == 1 and bool((seen[0][:, 2] == 0).all())


def test_a_mode_needs_an_action_and_plain_actions_change_nothing():
    with pytest.raises(ValueError):
        AttentionMode()
    x = torch.randn(2, 5)
    with AttentionMode(Action()):
        y = x.softmax(-1)
    assert torch.equal(y, x.softmax(-1))


def test_missed_training_mask_warns():
    keep = torch.ones(1, 3)
    action = KeyMask(torch.zeros(1, 1, 1, 3), keep=keep, site="enc.attn")
    with AttentionMode(action):
        torch.randn(2, 2) @ torch.randn(2, 2)
    assert action.missed
    with pytest.warns(RuntimeWarning, match="'enc.attn' computes its weights without a softmax"):
        assert action.warn_missed(has_mask_arg=True)
    hit = KeyMask(torch.zeros(1, 1, 1, 3), keep=keep)
    with AttentionMode(hit):
        torch.randn(1, 2, 3).softmax(-1)
    assert not hit.missed and not hit.warn_missed(has_mask_arg=False)


def test_formulas_and_families_by_op_name():
    assert kind_of_op_name("_native_multi_head_attention") is get_kind("native_mha")
    assert kind_of_op_name("_scaled_dot_product_efficient_attention").family == "attention"
    assert kind_of_op_name("mm") is None
    formulas = attention_formulas()
    assert formulas["_transformer_encoder_layer_fwd"] is get_kind("encoder_layer").formulas[
        "_transformer_encoder_layer_fwd"]
    assert all(kind_of_op_name(name) is not None for name in formulas)
