"""One cross-attention module called in both directions in each layer (co-attention): one site per
call with its own query / key streams, one layer per stream, and trimming that stays exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from toy_vlms import SharedCrossVLM, ToyConfig, make_inputs, shared_cross, spread_trimmer_scores
from trimkit.cli import cli
from trimkit.locate import ModelMap, locate
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig, token_runtime
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig, head_runtime
from trimkit.profile import count_flops

TOY = Path(__file__).resolve().parents[1] / "models" / "toy_vlms.py"
STREAMS = {"text": "layers:text", "vision": "layers:vision"}


def _site(a):
    return a.path, a.kind, a.query_stream, a.key_stream


@pytest.mark.parametrize("cfg", [ToyConfig(), ToyConfig(t_width=24, t_heads=3, t_ffn=48, t_layers=2, text_len=4)],
                         ids=["default", "other"])
def test_one_site_per_call_with_its_own_streams(cfg):
    torch.manual_seed(0)
    model = SharedCrossVLM(cfg).eval()
    mm = locate(model, make_inputs(cfg))
    assert [(s.name, s.modality, len(s.layers)) for s in mm.streams] == [
        ("layers:text", "text", cfg.t_layers), ("layers:vision", "vision", cfg.t_layers)]
    assert mm.unclassified == []
    for mod, other, short in (("text", "vision", "t"), ("vision", "text", "v")):
        for i, layer in enumerate(mm.stream(STREAMS[mod]).layers):
            assert (layer.path, layer.width) == (f"layers.{i}", cfg.t_width)
            assert [_site(a) for a in layer.attention] == [
                (f"layers.{i}.{short}_attn", "self", STREAMS[mod], STREAMS[mod]),
                (f"layers.{i}.cross", "cross", STREAMS[mod], STREAMS[other])]
            assert all((a.heads, a.head_dim) == (cfg.t_heads, cfg.t_width // cfg.t_heads) for a in layer.attention)
            assert (layer.ffn.path, layer.ffn.hidden) == (f"layers.{i}.{short}_mlp", cfg.t_ffn)
    calls = [[a.call for a in mm.sites() if a.path == f"layers.{i}.cross"] for i in range(cfg.t_layers)]
    assert all(len(set(c)) == 2 for c in calls)  # the two calls of one module: two sites, told apart by `call`
    assert ModelMap.from_dict(json.loads(mm.to_json())).to_dict() == mm.to_dict()


def test_inspect_json_lists_both_calls():
    result = CliRunner().invoke(cli, ["inspect", "--model", f"{TOY}:shared_cross", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    entries = [a for s in data["streams"] for layer in s["layers"] for a in layer["attention"]
               if a["path"] == "layers.0.cross"]
    assert sorted((a["kind"], a["query_stream"], a["key_stream"]) for a in entries) == [
        ("cross", "layers:text", "layers:vision"), ("cross", "layers:vision", "layers:text")]
    assert all({"path", "kind", "heads", "head_dim", "query_stream", "key_stream", "call"} <= set(a) for a in entries)


def _rows(model, inputs):
    n = inputs["image"].shape[0]
    with torch.no_grad():
        return torch.cat([model(**{k: v[i:i + 1] for k, v in inputs.items()}) for i in range(n)])


@pytest.mark.slow
def test_tokens_and_heads_stay_exact_and_cut_flops():
    model, _ = shared_cross()
    inputs = make_inputs(ToyConfig(), batch=3)
    with torch.no_grad():
        expected = model(**inputs)
    before = count_flops(model, inputs).flops
    results = apply_(model, [SmartTrimTokensConfig(threshold=0.0), SmartTrimHeadsConfig(threshold=0.0)],
                     inputs=inputs).results
    tokens, heads = results[0].report, results[1].report
    assert tokens["trimmed_streams"] == ["layers:text"] and "layers:vision" in tokens["skipped_streams"]
    assert any("'layers:vision' runs inside the layers of stream 'layers:text'" in n for n in tokens["notes"])
    assert {f"layers.{i}.cross" for i in range(ToyConfig().t_layers)} <= set(heads["trimmed_sites"])
    with torch.no_grad():
        assert (model(**inputs) - expected).abs().max().item() <= 1e-5
    spread_trimmer_scores(model)
    trt, hrt = token_runtime(model), head_runtime(model)
    trt.threshold = hrt.threshold = 1.0
    assert count_flops(model, inputs).flops < before
    trt.threshold = hrt.threshold = 0.5  # rows keep different tokens and heads: batched == one by one
    with torch.no_grad():
        batched = model(**inputs)
    assert (_rows(model, inputs) - batched).abs().max().item() <= 1e-4
