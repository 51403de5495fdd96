"""Pure pieces of trimkit.runtime: decisions, their application, switches and the model-state accessor."""
from __future__ import annotations

import pytest
import torch

from trimkit.errors import ConfigError
from trimkit.runtime import TokenDecision, TokenStep, relaxed_decision, set_threshold, state, threshold_keep
from trimkit.runtime.control import register_runtime, runtimes
from trimkit.runtime.streams import StreamState, alive_tokens, pool_states
from trimkit.runtime.tokens import apply_decision


def _step(hidden, **kw):
    b, length = hidden.shape[:2]
    fields = dict(stream="s", layer="l", ordinal=1, hidden=hidden, length=length, index=None, valid=None, mask=None,
                  special=[0], training=False, threshold=0.5, tau=1.0, skip=False)
    fields.update(kw)
    return TokenStep(**fields)


def test_threshold_keep_keeps_specials_and_at_least_one_real_token():
    logits = torch.tensor([[-9.0, 2.0, -3.0, 4.0], [-9.0, -9.0, -9.0, -9.0]])
    keep = threshold_keep(_step(torch.zeros(2, 4, 3)), logits)
    assert keep.shape == (2, 4) and keep.dtype == torch.bool
    assert keep.tolist() == [[True, True, False, True], [True, False, False, False]]
    valid = torch.tensor([[True] * 4, [False, True, True, False]])
    keep = threshold_keep(_step(torch.zeros(2, 4, 3), valid=valid, special=[], threshold=1.0), logits)
    assert keep.sum(1).tolist() == [1, 1] and not bool((keep & ~valid).any())


def test_relaxed_decision_shapes_and_specials():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    d = relaxed_decision(_step(torch.zeros(3, 5, 2), training=True, special=[0, -1]), logits)
    assert d.relaxed.shape == (3, 5) and d.probs.shape == (3, 5) and d.logits.shape == (9,)
    assert bool((d.relaxed[:, [0, 4]] == 1).all()) and bool((d.probs[:, [0, 4]] == 1).all())


def test_apply_decision_removes_merges_and_relaxes():
    hidden = torch.arange(24.0).view(2, 4, 3)
    st = StreamState(4)
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    out = apply_decision(st, hidden, TokenDecision(keep=keep))
    assert out.shape == (2, 3, 3) and st.index.shape == (2, 3) and st.valid.tolist()[1] == [True, True, False]
    assert st.kept[-1].tolist() == [3, 2] and alive_tokens(st).tolist() == [3, 2]
    merged = torch.zeros(2, 1, 3)
    out = apply_decision(st, out, TokenDecision(merged=merged, index=torch.tensor([[2], [1]])))
    assert out is merged and st.index.tolist() == [[3], [1]]
    st2 = StreamState(4)
    assert apply_decision(st2, hidden, None) is hidden and st2.kept[-1].tolist() == [4, 4]
    apply_decision(st2, hidden, TokenDecision(relaxed=torch.full((2, 4), 0.5)))
    apply_decision(st2, hidden, TokenDecision(relaxed=torch.full((2, 4), 0.5)))
    assert torch.equal(st2.mask, torch.full((2, 4), 0.25)) and len(st2.masks) == 2


def test_pool_states_ignores_padding():
    st = StreamState(3, valid=torch.tensor([[True, True, False]]))
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert pool_states(st, h).tolist() == [[2.0]]


def test_set_threshold_checks_its_range():
    model = torch.nn.Linear(2, 2)

    class _Rt:
        threshold = 0.5

    rt = _Rt()
    register_runtime(model, rt)
    assert runtimes(model) == [rt]
    with pytest.raises(ConfigError, match=r"^threshold must be in \[0, 1\], got 5.0$"):
        set_threshold(model, 5.0)
    set_threshold(model, 0.25)
    assert rt.threshold == 0.25


def test_state_accessor_round_trip():
    model = torch.nn.Linear(2, 2)
    assert state.get(model, state.MAP) is None
    state.put(model, state.MAP, "map")
    assert state.get(model, state.MAP) == "map" and "_trimkit_map" in vars(model)
    state.drop(model, state.MAP)
    assert state.get(model, state.MAP) is None
    assert state.mark_no_quant(model) and not state.mark_no_quant(model) and state.no_quant(model)
    state.unmark_no_quant(model)
    assert not state.no_quant(model)
