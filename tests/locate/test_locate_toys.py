"""The locator on plain-PyTorch VLMs: structure must match the config exactly."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from toy_vlms import ToyConfig, SingleStreamVLM, TwoStreamVLM, make_inputs
from trimkit.locate import locate


def _check_paths(model, mm):
    for s in mm.streams:
        for layer in s.layers:
            model.get_submodule(layer.path)
            for a in layer.attention:
                model.get_submodule(a.path)
            if layer.ffn:
                model.get_submodule(layer.ffn.path)


def check_two_stream(cfg: ToyConfig, batch: int = 2):
    torch.manual_seed(0)
    model = TwoStreamVLM(cfg).eval()
    mm = locate(model, make_inputs(cfg, batch))
    assert [(s.name, s.modality, len(s.layers)) for s in mm.streams] == [
        ("vision", "vision", cfg.v_layers), ("text", "text", cfg.t_layers)]
    for i, layer in enumerate(mm.streams[0].layers):
        assert layer.path == f"vision.{i}"
        (a,) = layer.attention
        assert (a.kind, a.heads, a.head_dim, a.fused_qkv) == ("self", cfg.v_heads, cfg.v_width // cfg.v_heads, True)
        assert (a.query_stream, a.key_stream) == ("vision", "vision")
        assert (layer.ffn.path, layer.ffn.hidden, layer.ffn.width) == (f"vision.{i}.mlp", cfg.v_ffn, cfg.v_width)
    for i, layer in enumerate(mm.streams[1].layers):
        sa, xa = layer.attention
        assert (sa.path, sa.kind, sa.heads) == (f"text.{i}.attn", "self", cfg.t_heads)
        assert (xa.path, xa.kind, xa.heads, xa.head_dim) == (f"text.{i}.xattn", "cross", cfg.t_heads,
                                                             cfg.t_width // cfg.t_heads)
        assert (xa.query_stream, xa.key_stream) == ("text", "vision")
        assert (xa.q, xa.k, xa.v, xa.o) == (f"text.{i}.xattn.to_q", f"text.{i}.xattn.to_kv",
                                            f"text.{i}.xattn.to_kv", f"text.{i}.xattn.proj")
        assert layer.ffn.hidden == cfg.t_ffn
    assert mm.unclassified == []
    _check_paths(model, mm)


def check_single_stream(cfg: ToyConfig, batch: int = 2):
    torch.manual_seed(0)
    model = SingleStreamVLM(cfg).eval()
    mm = locate(model, make_inputs(cfg, batch, names=("img", "txt")))
    (s,) = mm.streams
    assert (s.name, s.modality, len(s.layers), s.inputs) == ("blocks", "fused", cfg.t_layers, ["img", "txt"])
    for i, layer in enumerate(s.layers):
        (a,) = layer.attention
        assert (a.path, a.kind, a.heads, a.head_dim) == (f"blocks.{i}.mha", "self", cfg.t_heads,
                                                         cfg.t_width // cfg.t_heads)
        # torch takes the fused fast path only for some sizes; both forms must be found
        assert a.op in ("native_mha", "sdpa") and a.fused_qkv
        assert (layer.ffn.path, layer.ffn.hidden) == (f"blocks.{i}.ff", cfg.t_ffn)
    _check_paths(model, mm)


def test_two_stream_default():
    check_two_stream(ToyConfig())


def test_single_stream_default():
    check_single_stream(ToyConfig())


def test_single_stream_uses_fast_path():
    torch.manual_seed(0)
    cfg = ToyConfig()
    from trimkit.graph import capture

    cap = capture(SingleStreamVLM(cfg).eval(), make_inputs(cfg, names=("img", "txt")))
    ops = {str(n.target) for n in cap.nodes if n.op == "call_function"}
    assert "aten._native_multi_head_attention.default" in ops


_sizes = st.fixed_dictionaries({
    "v_heads": st.integers(1, 4), "t_heads": st.integers(1, 4), "head_dim": st.sampled_from([4, 8]),
    "v_layers": st.integers(1, 3), "t_layers": st.integers(1, 3), "v_mult": st.integers(2, 4),
    "t_mult": st.integers(2, 4), "image": st.sampled_from([16, 24, 32]), "text_len": st.integers(2, 9),
    "batch": st.integers(1, 3),
})


def _cfg(d) -> ToyConfig:
    vw, tw = d["v_heads"] * d["head_dim"], d["t_heads"] * d["head_dim"]
    return ToyConfig(image=d["image"], patch=8, text_len=d["text_len"], v_width=vw, v_layers=d["v_layers"],
                     v_heads=d["v_heads"], v_ffn=vw * d["v_mult"], t_width=tw, t_layers=d["t_layers"],
                     t_heads=d["t_heads"], t_ffn=tw * d["t_mult"])


@settings(max_examples=12, deadline=None)
@given(_sizes)
def test_two_stream_property(d):
    check_two_stream(_cfg(d), d["batch"])


@settings(max_examples=12, deadline=None)
@given(_sizes)
def test_single_stream_property(d):
    check_single_stream(_cfg(d), d["batch"])
