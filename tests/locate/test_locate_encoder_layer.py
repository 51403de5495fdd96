"""nn.TransformerEncoderLayer: the capture sees the fused kernel the layer runs in eval, and the map
is the same on that path as on the Python one (train mode): attention site and FFN of every layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.nn.modules import module as torch_module

from toy_vlms import EncoderLayerVLM, ToyConfig, encoder_layers, make_inputs, spread_trimmer_scores
from trimkit.cli import cli
from trimkit.errors import CaptureError
from trimkit.graph import capture
from trimkit.locate import locate
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig, token_runtime
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig, head_runtime
from trimkit.profile import count_flops

TOY = Path(__file__).resolve().parents[1] / "models" / "toy_vlms.py"
FAST_OP = "aten._transformer_encoder_layer_fwd.default"


def _ops(model, inputs) -> set[str]:
    return {str(n.target) for n in capture(model, inputs).nodes if n.op == "call_function"}


def _layers(mm):
    return [(layer.path, layer.width, [(a.path, a.kind, a.heads, a.head_dim, a.q, a.o) for a in layer.attention],
             (layer.ffn.path, layer.ffn.hidden, layer.ffn.width, layer.ffn.fc_in, layer.ffn.fc_out))
            for s in mm.streams for layer in s.layers]


def test_capture_records_the_fused_kernel_in_eval_only():
    model, inputs = encoder_layers()
    assert FAST_OP in _ops(model, inputs)
    model.train()
    assert FAST_OP not in _ops(model, inputs)


@pytest.mark.parametrize("cfg", [ToyConfig(), ToyConfig(t_width=48, t_heads=4, t_ffn=72, t_layers=2)],
                         ids=["default", "other"])
def test_fused_path_finds_the_ffn_as_the_python_path_does(cfg):
    torch.manual_seed(0)
    model = EncoderLayerVLM(cfg).eval()
    inputs = make_inputs(cfg, names=("img", "txt"))
    fast = locate(model, inputs)
    slow = locate(model.train(), inputs)
    assert fast.unclassified == [] and slow.unclassified == []
    assert {a.op for a in fast.sites()} == {"encoder_layer"}
    assert "encoder_layer" not in {a.op for a in slow.sites()}
    assert _layers(fast) == _layers(slow)
    for i, (path, width, sites, ffn) in enumerate(_layers(fast)):
        block = model.blocks[i]
        assert (path, width) == (f"blocks.{i}", cfg.t_width)
        assert sites == [(f"blocks.{i}.self_attn", "self", cfg.t_heads, cfg.t_width // cfg.t_heads,
                          f"blocks.{i}.self_attn.in_proj_weight", f"blocks.{i}.self_attn.out_proj")]
        assert ffn == (f"blocks.{i}", block.linear1.out_features, cfg.t_width, [f"blocks.{i}.linear1"],
                       f"blocks.{i}.linear2")


def test_inspect_json_lists_the_ffn_of_every_fused_layer():
    result = CliRunner().invoke(cli, ["inspect", "--model", f"{TOY}:encoder_layers", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (stream,) = data["streams"]
    assert stream["modality"] == "fused"
    cfg = ToyConfig()
    assert [(layer["path"], layer["ffn"]["path"], layer["ffn"]["hidden"]) for layer in stream["layers"]] == [
        (f"blocks.{i}", f"blocks.{i}", cfg.t_ffn) for i in range(cfg.t_layers)]
    assert all(len(layer["attention"]) == 1 and layer["attention"][0]["kind"] == "self"
               for layer in stream["layers"])
    assert data["unclassified"] == []


def test_capture_leaves_no_global_hooks():
    model, inputs = encoder_layers()
    before = (dict(torch_module._global_forward_pre_hooks), dict(torch_module._global_forward_hooks))
    capture(model, inputs)
    with pytest.raises(CaptureError):
        capture(model, {"img": inputs["img"][:, :2], "txt": inputs["txt"]})
    assert (dict(torch_module._global_forward_pre_hooks), dict(torch_module._global_forward_hooks)) == before


@pytest.mark.slow
def test_tokens_and_heads_trim_fused_layers_exactly_at_threshold_zero():
    model, inputs = encoder_layers()
    with torch.no_grad():
        expected = model(**inputs)
    before = count_flops(model, inputs).flops
    results = apply_(model, [SmartTrimTokensConfig(threshold=0.0), SmartTrimHeadsConfig(threshold=0.0)],
                     inputs=inputs).results
    assert results[0].report["trimmed_streams"] == ["blocks"]
    assert results[1].report["trimmed_sites"] == [f"blocks.{i}.self_attn" for i in range(ToyConfig().t_layers)]
    with torch.no_grad():
        assert (model(**inputs) - expected).abs().max().item() <= 1e-5
    spread_trimmer_scores(model)
    token_runtime(model).threshold = head_runtime(model).threshold = 1.0
    assert count_flops(model, inputs).flops < before


class _PaddedEncoder(torch.nn.Module):
    """nn.TransformerEncoder with a padding mask: in eval it runs its layers' kernel on nested tensors."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 96, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, input_ids, attention_mask):
        return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_tensor_path_is_located_and_left_whole_by_trimming():
    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": mask}
    mm = locate(model, inputs)
    assert [(layer.path, layer.width, layer.ffn.path, layer.ffn.hidden, [a.op for a in layer.attention])
            for s in mm.streams for layer in s.layers] == [
        (f"encoder.layers.{i}", 32, f"encoder.layers.{i}", 96, ["encoder_layer"]) for i in range(2)]
    with torch.no_grad():
        expected = model(**inputs)
    results = apply_(model, [SmartTrimTokensConfig(threshold=0.0), SmartTrimHeadsConfig(threshold=0.0)],
                     inputs=inputs).results
    assert results[0].report["trimmed_streams"] == [] and results[1].report["trimmed_sites"] == []
    with torch.no_grad():
        assert (model(**inputs) - expected).abs().max().item() <= 1e-5
