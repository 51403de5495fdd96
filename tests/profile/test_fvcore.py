"""fvcore with trimkit's handles against the dispatch counter."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

from trimkit.profile import count_flops, flop_disagreement
from trimkit.profile.fvcore_counter import family_of

TOLERANCE = 0.01


class _Blocks(nn.Module):
    """MHA (fast path), einsum, broadcast matmul, 1-D matmul and a conv in one model."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Parameter(torch.randn(16, 8))
        self.vec = nn.Parameter(torch.randn(8))
        self.conv = nn.Conv1d(16, 4, 3, padding="valid")

    def forward(self, x, y):
        a = self.mha(x, x, x, need_weights=False)[0]
        c = self.mha(x, y, y)[0]  # cross-attention: slow path
        s = torch.einsum("bld,bmd->blm", a, c)
        p = torch.matmul(a, self.proj)  # [B, L, D] x [D, 8]: broadcast
        v = torch.matmul(p, self.vec)  # 1-D right operand
        k = self.conv(a.transpose(1, 2))
        return s.sum() + v.sum() + k.sum()


def _vit_layer():
    cfg = transformers.ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                 attn_implementation="sdpa")
    return transformers.models.vit.modeling_vit.ViTLayer(cfg), {"hidden_states": torch.randn(2, 9, 32)}


def _bert_layer(impl):
    def make():
        cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=40,
                                      is_decoder=True, add_cross_attention=True, vocab_size=50,
                                      attn_implementation=impl)
        layer = transformers.models.bert.modeling_bert.BertLayer(cfg, layer_idx=0)
        return layer, {"hidden_states": torch.randn(2, 7, 32), "encoder_hidden_states": torch.randn(2, 5, 32),
                       "attention_mask": torch.zeros(2, 1, 7, 7)}
    return make


CASES = {
    "vit-block-sdpa": _vit_layer,
    "bert-cross-eager": _bert_layer("eager"),
    "bert-cross-sdpa": _bert_layer("sdpa"),
    "mha-einsum-matmul-conv": lambda: (_Blocks(), {"x": torch.randn(2, 5, 16), "y": torch.randn(2, 3, 16)}),
    "encoder-layer": lambda: (nn.TransformerEncoderLayer(16, 2, 24, batch_first=True),
                              {"src": torch.randn(2, 5, 16)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fvcore_with_handles_agrees_on_test_blocks(case):
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    report = flop_disagreement(model.eval(), inputs)
    assert report["torch"]["flops"] > 0
    assert abs(report["rel_diff"]) <= TOLERANCE, report["by_op"]
    assert report["agree"]
    assert report["notes"] == []  # no handle failed
    diff = sum(row["diff"] for row in report["by_op"])
    assert diff == pytest.approx(report["fvcore"]["flops"] - report["torch"]["flops"], abs=1e-6)


def test_disagreement_report_shows_fused_op_against_its_parts():
    """At dispatch level the encoder layer is one fused op; fvcore sees it split up."""
    model, inputs = CASES["encoder-layer"]()
    report = flop_disagreement(model.eval(), inputs)
    rows = {row["op"]: row for row in report["by_op"]}
    assert rows["encoder_layer"]["torch"] == report["torch"]["flops"]
    assert rows["encoder_layer"]["fvcore"] == 0
    assert report["agree"]


def test_count_flops_with_fvcore_counter_reports_flops_not_macs():
    model = nn.Linear(8, 4)
    report = count_flops(model, (torch.randn(3, 8),), counter="fvcore")
    assert report.counter == "fvcore"
    assert report.flops == 2 * 8 * 4
    assert report.elementwise_flops == 4  # the bias add


class _RefusesTracing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if torch.jit.is_tracing():  # stands in for a forward the tracer cannot follow
            raise RuntimeError("data-dependent branch")
        return self.fc(x)


def test_fvcore_fallback_names_the_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = count_flops(_RefusesTracing(), (torch.randn(2, 4),), counter="fvcore")
    assert report.counter == "torch (fvcore fallback)"
    assert report.flops == 2 * 4 * 4
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("fvcore cannot trace _RefusesTracing: RuntimeError: data-dependent branch")
               for m in messages)
    assert report.notes and "_RefusesTracing" in report.notes[0]


def _tiny_backbones() -> list:
    try:
        from trimkit.backbones import list_backbones
    except ImportError as exc:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"trimkit.backbones not importable: {exc}"))]
    return [name for name in list_backbones() if name.endswith("-tiny")]


@pytest.mark.parametrize("name", _tiny_backbones())
@pytest.mark.slow
def test_fvcore_agrees_on_every_tiny_backbone(name):
    from trimkit.backbones import load_backbone

    backbone = load_backbone(name)
    report = flop_disagreement(backbone.model, backbone.example_inputs(1), name=name)
    assert report["torch"]["flops"] > 0
    assert abs(report["rel_diff"]) <= TOLERANCE, report["by_op"][:3]
    assert report["notes"] == []


@pytest.mark.parametrize("op, family", [
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "attention"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten._scaled_dot_product_efficient_attention.default", "attention"),
    ("aten._native_multi_head_attention.default", "multi_head_attention"),
    ("aten::_transformer_encoder_layer_fwd.elementwise", "encoder_layer"),
    ("aten.bmm.default", "matmul"),
    ("aten::_convolution", "conv"),
])
def test_families_of_attention_ops_come_from_their_kinds(op, family):
    assert family_of(op) == family
