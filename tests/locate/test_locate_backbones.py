"""`trimkit inspect --json` on every tiny backbone, checked against the tiny configs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trimkit.backbones import load_backbone
from trimkit.cli import cli


def _cfg(bb):
    return bb.model.config


def _expected(name, c):
    """[(stream suffix, modality, layers, heads, ffn, [(kind, key stream suffix)])]."""
    v, t = getattr(c, "vision_config", None), getattr(c, "text_config", None)
    if name in ("blip-vqa-tiny", "blip-itm-tiny", "blip-caption-tiny"):
        vis = ("vision_model.encoder.layers", "vision", v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
               [("self", "vision_model.encoder.layers")])
        enc = ("text_encoder.encoder.layer", "text", t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
               [("self", "text_encoder.encoder.layer"), ("cross", "vision_model.encoder.layers")])
        dec_key = "text_encoder.encoder.layer" if name == "blip-vqa-tiny" else "vision_model.encoder.layers"
        dec = ("text_decoder.bert.encoder.layer", "text", t.num_hidden_layers, t.num_attention_heads,
               t.intermediate_size, [("self", "text_decoder.bert.encoder.layer"), ("cross", dec_key)])
        return {"blip-vqa-tiny": [vis, enc, dec], "blip-itm-tiny": [vis, enc], "blip-caption-tiny": [vis, dec]}[name]
    if name == "vilt-vqa-tiny":
        return [("vilt.encoder.layer", "fused", c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                 [("self", "vilt.encoder.layer")])]
    if name in ("clip-tiny", "siglip-tiny"):
        return [("vision_model.encoder.layers", "vision", v.num_hidden_layers, v.num_attention_heads,
                 v.intermediate_size, [("self", "vision_model.encoder.layers")]),
                ("text_model.encoder.layers", "text", t.num_hidden_layers, t.num_attention_heads,
                 t.intermediate_size, [("self", "text_model.encoder.layers")])]
    if name == "llava-tiny":
        return [("model.vision_tower.encoder.layers", "vision", v.num_hidden_layers, v.num_attention_heads,
                 v.intermediate_size, [("self", "model.vision_tower.encoder.layers")]),
                ("model.language_model.layers", "fused", t.num_hidden_layers, t.num_attention_heads,
                 t.intermediate_size, [("self", "model.language_model.layers")])]
    if name == "qwen2-vl-tiny":  # vision blocks attend within each image (one SDPA call per image): one site
        return [("model.visual.blocks", "vision", v.depth, v.num_heads, v.embed_dim * v.mlp_ratio,
                 [("self", "model.visual.blocks")]),
                ("model.language_model.layers", "fused", t.num_hidden_layers, t.num_attention_heads,
                 t.intermediate_size, [("self", "model.language_model.layers")])]
    if name == "bridgetower-itm-tiny":
        pre = "bridgetower."
        return [(pre + "text_model.encoder.layer", "text", t.num_hidden_layers, t.num_attention_heads,
                 t.intermediate_size, [("self", pre + "text_model.encoder.layer")]),
                (pre + "vision_model.visual.transformer.resblocks", "vision", v.num_hidden_layers,
                 v.hidden_size // 64, v.hidden_size * 4, [("self", pre + "vision_model.visual.transformer.resblocks")]),
                (pre + "cross_modal_text_layers", "text", c.num_hidden_layers, c.num_attention_heads,
                 t.intermediate_size, [("self", pre + "cross_modal_text_layers"), ("cross", None)]),
                (pre + "cross_modal_image_layers", "vision", c.num_hidden_layers, c.num_attention_heads,
                 t.intermediate_size, [("self", pre + "cross_modal_image_layers"), ("cross", None)])]
    raise KeyError(name)


TINY = ["blip-vqa-tiny", "blip-itm-tiny", "blip-caption-tiny", "vilt-vqa-tiny", "clip-tiny", "siglip-tiny",
        "llava-tiny", "qwen2-vl-tiny", "bridgetower-itm-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_inspect_json_matches_config(name):
    res = CliRunner().invoke(cli, ["inspect", "--model", name, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    bb = load_backbone(name)
    streams = [s for s in d["streams"] if not s["name"].endswith("vision_model")]  # SigLIP's pooling head
    exp = _expected(name, _cfg(bb))
    assert [s["name"] for s in streams] == [e[0] for e in exp]
    for s, (sname, modality, n_layers, heads, ffn, sites) in zip(streams, exp):
        assert (s["modality"], len(s["layers"])) == (modality, n_layers), sname
        for i, layer in enumerate(s["layers"]):
            bb.model.get_submodule(layer["path"])
            assert layer["ffn"] and layer["ffn"]["hidden"] == ffn, (sname, layer)
            bb.model.get_submodule(layer["ffn"]["path"])
            got = [(a["kind"], a["key_stream"]) for a in layer["attention"]]
            assert len(got) == len(sites)
            for (kind, key), (ekind, ekey) in zip(got, sites):
                assert kind == ekind
                if ekey is not None:
                    assert key == ekey
            for a in layer["attention"]:
                assert a["heads"] == heads and a["query_stream"] == sname
                bb.model.get_submodule(a["path"])
    assert d["unclassified"] == []


def test_bridgetower_cross_layers_key_on_each_other():
    d = json.loads(CliRunner().invoke(cli, ["inspect", "--model", "bridgetower-itm-tiny", "--json"]).stdout)
    by = {s["name"].split(".")[-1]: s for s in d["streams"]}
    text, image = by["cross_modal_text_layers"], by["cross_modal_image_layers"]
    assert text["layers"][0]["attention"][1]["key_stream"].endswith("resblocks")
    assert image["layers"][0]["attention"][1]["key_stream"].endswith("text_model.encoder.layer")
    assert text["layers"][1]["attention"][1]["key_stream"].endswith("cross_modal_image_layers")
    assert image["layers"][1]["attention"][1]["key_stream"].endswith("cross_modal_text_layers")


def test_factory_reference_and_unknown_model():
    res = CliRunner().invoke(cli, ["inspect", "--model", "tests/models/toy_vlms.py:two_stream", "--json"])
    assert res.exit_code == 0, res.output
    assert [s["name"] for s in json.loads(res.stdout)["streams"]] == ["vision", "text"]
    bad = CliRunner().invoke(cli, ["inspect", "--model", "no-such-model"])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "blip-vqa-tiny" in bad.output
    assert "Traceback" not in bad.output
