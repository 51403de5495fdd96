"""The plain-PyTorch decoder VLM: cached greedy decoding, left padding, and what trimkit locates in it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from toy_decoder import (ToyDecoderConfig, ToyDecoderVLM, ToyKVCache, attention_mask_4d, make_prompts,
                         rotary_table, toy_decoder_factory)
from trimkit.cli import cli

REF = str(Path(__file__).with_name("toy_decoder.py")) + ":toy_decoder_factory"
CFG = ToyDecoderConfig()


def _model():
    return toy_decoder_factory()[0]


def test_mask_is_causal_and_hides_padding_and_covers_the_cache():
    mask = attention_mask_4d(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), query_len=2)
    assert mask.shape == (2, 1, 2, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert mask[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_rotary_table_shapes_and_position_zero():
    cos, sin = rotary_table(torch.tensor([[0, 0, 1], [0, 1, 2]]), head_dim=8, theta=10000.0)
    assert cos.shape == sin.shape == (2, 3, 8)
    assert torch.equal(cos[0, 0], torch.ones(8)) and torch.equal(sin[0, 0], torch.zeros(8))
    torch.testing.assert_close(cos[0, 2], cos[1, 1])


def test_cache_grows_by_concatenation_per_layer():
    cache = ToyKVCache()
    k = torch.randn(2, 2, 5, 4)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    k2, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert k2.shape == (2, 2, 6, 4) and cache.length(0) == 6 and cache.length(1) == 5


def test_image_features_land_at_the_placeholders_by_index_assignment():
    model, inputs = toy_decoder_factory()
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        feats = model.projector(model.vision(inputs["pixel_values"]))
    image = inputs["input_ids"] == CFG.image_id
    assert int(image.sum()) == 2 * CFG.image_tokens
    torch.testing.assert_close(embeds[image], feats.reshape(-1, CFG.width))
    torch.testing.assert_close(embeds[~image], model.embed(inputs["input_ids"])[~image])


def test_cached_greedy_generation_equals_recomputing_every_step():
    model, inputs = toy_decoder_factory()
    cached = model.generate(**inputs, max_new_tokens=6)
    full = model.generate(**inputs, max_new_tokens=6, use_cache=False)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    with torch.no_grad():  # the cached step's logits match the full forward's last position
        out = model(**inputs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        step = model(token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        whole = model(torch.cat([inputs["input_ids"], token], 1), inputs["pixel_values"], mask)
    assert step.past_key_values.length() == mask.shape[1]
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_generates_as_rows_one_by_one():
    model = _model()
    batch = make_prompts(CFG, [6, 3, 5], seed=3)
    assert (batch["attention_mask"] == 0).any()
    together = model.generate(**batch, max_new_tokens=5)
    for i in range(3):
        keep = batch["attention_mask"][i].bool()
        row = {"input_ids": batch["input_ids"][i:i + 1, keep], "pixel_values": batch["pixel_values"][i:i + 1]}
        alone = model.generate(**row, max_new_tokens=5)
        assert torch.equal(alone[0, -5:], together[i, -5:]), i
        with torch.no_grad():
            padded = model(**batch).logits[i, keep]
            single = model(**row).logits[0]
        torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)


def test_placeholder_count_must_match_the_image_features():
    model, inputs = toy_decoder_factory()
    ids = inputs["input_ids"].clone()
    ids[0, 1] = 5
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, inputs["pixel_values"])


@pytest.mark.slow
def test_inspect_finds_the_vision_and_language_streams():
    res = CliRunner().invoke(cli, ["inspect", "--model", REF, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    streams = {s["name"]: s for s in d["streams"]}
    assert [(s["modality"], len(s["layers"])) for s in streams.values()] == [("vision", CFG.v_layers),
                                                                           ("fused", CFG.layers)]
    vision, lm = streams["vision.blocks"], streams["layers"]
    for i, layer in enumerate(vision["layers"]):
        (a,) = layer["attention"]
        assert (layer["path"], a["path"], a["heads"], a["head_dim"]) == (f"vision.blocks.{i}", f"vision.blocks.{i}.attn",
                                                                        CFG.v_heads, CFG.v_width // CFG.v_heads)
        assert layer["ffn"]["hidden"] == CFG.v_ffn
    for i, layer in enumerate(lm["layers"]):
        (a,) = layer["attention"]
        assert (layer["path"], a["path"], a["kind"], a["heads"]) == (f"layers.{i}", f"layers.{i}.self_attn", "self",
                                                                     CFG.heads)
        assert layer["ffn"]["hidden"] == CFG.ffn
    assert d["unclassified"] == []
