import copy

import pytest
import torch

from trimkit.backbones import TINY_CONFIGS, list_backbones, load_backbone, tiny_config
from trimkit.errors import ConfigError, UnknownModelError


TINY_NAMES = [name for name in list_backbones() if name.endswith("-tiny")]
FAMILIES = ["blip-vqa", "blip-itm", "blip-caption", "bridgetower-itm", "vilt-vqa", "clip", "siglip", "llava",
            "qwen2-vl"]

CLASSES = {
    "blip-vqa-tiny": "BlipForQuestionAnswering",
    "blip-itm-tiny": "BlipForImageTextRetrieval",
    "blip-caption-tiny": "BlipForConditionalGeneration",
    "bridgetower-itm-tiny": "BridgeTowerForImageAndTextRetrieval",
    "vilt-vqa-tiny": "ViltForQuestionAnswering",
    "clip-tiny": "CLIPModel",
    "siglip-tiny": "SiglipModel",
    "llava-tiny": "LlavaForConditionalGeneration",
    "qwen2-vl-tiny": "Qwen2VLForConditionalGeneration",
}

# layer list -> the tiny config entry giving its length
LAYER_LISTS = {
    "blip-vqa-tiny": {"vision_model.encoder.layers": ("vision_config", "num_hidden_layers"),
                      "text_encoder.encoder.layer": ("text_config", "num_hidden_layers"),
                      "text_decoder.bert.encoder.layer": ("text_config", "num_hidden_layers")},
    "blip-itm-tiny": {"vision_model.encoder.layers": ("vision_config", "num_hidden_layers"),
                      "text_encoder.encoder.layer": ("text_config", "num_hidden_layers")},
    "blip-caption-tiny": {"vision_model.encoder.layers": ("vision_config", "num_hidden_layers"),
                          "text_decoder.bert.encoder.layer": ("text_config", "num_hidden_layers")},
    "bridgetower-itm-tiny": {"bridgetower.vision_model.visual.transformer.resblocks":
                             ("vision_config", "num_hidden_layers"),
                             "bridgetower.text_model.encoder.layer": ("text_config", "num_hidden_layers"),
                             "bridgetower.cross_modal_text_layers": ("num_hidden_layers",)},
    "vilt-vqa-tiny": {"vilt.encoder.layer": ("num_hidden_layers",)},
    "clip-tiny": {"vision_model.encoder.layers": ("vision_config", "num_hidden_layers"),
                  "text_model.encoder.layers": ("text_config", "num_hidden_layers")},
    "siglip-tiny": {"vision_model.encoder.layers": ("vision_config", "num_hidden_layers"),
                    "text_model.encoder.layers": ("text_config", "num_hidden_layers")},
    "llava-tiny": {"model.vision_tower.encoder.layers": ("vision_config", "num_hidden_layers"),
                   "model.language_model.layers": ("text_config", "num_hidden_layers")},
    "qwen2-vl-tiny": {"model.visual.blocks": ("vision_config", "depth"),
                      "model.language_model.layers": ("text_config", "num_hidden_layers")},
}


def _lookup(mapping, keys):
    for key in keys:
        mapping = mapping[key]
    return mapping


def _forward(bb, batch_size, **kw):
    inputs = bb.example_inputs(batch_size, **kw)
    with torch.no_grad():
        return bb.task.logits(bb.model(**inputs))


def test_list_backbones_has_every_family_and_tiny_variant():
    assert list_backbones() == [n for f in FAMILIES for n in (f, f"{f}-tiny")]
    assert sorted(TINY_CONFIGS) == sorted(TINY_NAMES)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_builds_in_eval_mode_with_expected_class(tiny, name):
    bb = tiny(name)
    assert type(bb.model).__name__ == CLASSES[name]
    assert bb.name == name and bb.source == "registry"
    assert not bb.model.training
    assert sum(p.numel() for p in bb.model.parameters()) < 1_000_000
    assert bb.hints["family"] == name.removesuffix("-tiny")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_layer_counts_follow_config(tiny, name):
    bb = tiny(name)
    counts = {}
    for path, keys in LAYER_LISTS[name].items():
        counts[path] = len(bb.model.get_submodule(path))
        assert counts[path] == _lookup(TINY_CONFIGS[name], keys)
    config = bb.model.config
    for keys in LAYER_LISTS[name].values():
        assert _lookup(config.to_dict(), keys) == _lookup(TINY_CONFIGS[name], keys)


@pytest.mark.parametrize("name", [n for n in TINY_NAMES if "vilt" not in n])
def test_tiny_streams_differ(name):
    cfg = TINY_CONFIGS[name]
    vision, text = cfg["vision_config"], cfg["text_config"]
    shape = lambda c: (c.get("num_hidden_layers", c.get("depth")),
                       c.get("num_attention_heads", c.get("num_heads", c["hidden_size"] // 64)),
                       c.get("intermediate_size", c.get("mlp_ratio", 4) * c.get("embed_dim", c["hidden_size"])))
    assert shape(vision) != shape(text)


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiny_forward_logits_and_loss(name, batch_size):
    bb = load_backbone(name)
    batch = bb.example_batch(batch_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = bb.task.logits(bb.model(**inputs))
    expected_rows = batch_size
    assert logits.shape[0] == expected_rows
    if bb.task.kind == "contrastive":
        assert logits.shape == (batch_size, batch_size)
    loss = bb.task.loss(bb.model(**inputs), batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in bb.model.parameters() if p.grad is not None]
    assert grads
    if batch_size > 1:
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_batch_rows_do_not_depend_on_batch_size(tiny, name):
    bb = tiny(name)
    one, three = _forward(bb, 1), _forward(bb, 3)
    if bb.task.kind == "contrastive":
        one, three = one[0, 0], three[0, 0]
    else:
        three = three[:1]
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-4)


def test_tiny_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone("clip-tiny").model.state_dict()
    assert torch.equal(torch.rand(3), expected)
    b = load_backbone("clip-tiny").model.state_dict()
    c = load_backbone("clip-tiny", seed=1).model.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


def test_tiny_config_is_fresh_and_matches_table():
    config = tiny_config("clip")
    assert config.vision_config.num_hidden_layers == TINY_CONFIGS["clip-tiny"]["vision_config"]["num_hidden_layers"]
    config.vision_config.num_hidden_layers = 99
    assert tiny_config("clip-tiny").vision_config.num_hidden_layers != 99
    with pytest.raises(TypeError):
        TINY_CONFIGS["clip-tiny"]["projection_dim"] = 3


@pytest.mark.parametrize("name", TINY_NAMES)
def test_save_pretrained_folder_round_trip(tiny, tmp_path, name):
    bb = tiny(name)
    bb.model.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert loaded.source == "folder" and loaded.name == str(tmp_path)
    assert type(loaded.model) is type(bb.model) and not loaded.model.training
    assert loaded.task == bb.task
    assert {k: v for k, v in loaded.hints.items()} == bb.hints
    inputs = bb.example_inputs(2)
    assert all(torch.equal(inputs[k], v) for k, v in loaded.example_inputs(2).items())
    torch.testing.assert_close(_forward(loaded, 2), _forward(bb, 2), atol=1e-6, rtol=0)


def test_trimkit_folder_is_handed_to_the_saved_folder_loader(tmp_path, monkeypatch):
    from trimkit.backbones import registry

    (tmp_path / "trimkit.json").write_text("{}")
    seen = []
    monkeypatch.setattr(registry, "load_folder", lambda path, load_base: seen.append((path, load_base)) or "restored")
    assert load_backbone(str(tmp_path)) == "restored"
    assert seen == [(str(tmp_path), registry._saved_base)]


def _assert_unknown(ref):
    with pytest.raises(UnknownModelError) as info:
        load_backbone(ref)
    message = str(info.value)
    assert "\n" not in message and repr(ref) in message
    assert all(name in message for name in list_backbones())


@pytest.mark.parametrize("ref", ["clip", "llava", "Salesforce/blip-vqa-base", "no-such-model-xyz",
                                 "someone/no-such-model", "a/b/c", "./missing-dir", "no_such_mod_xyz:factory"])
def test_unknown_references_offline_are_one_line_with_names(monkeypatch, ref):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_unknown(ref)


def test_unreachable_hub_is_unknown_without_network(monkeypatch):
    from trimkit.backbones import registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda: False)
    _assert_unknown("someone/not-cached-model")


def test_folder_without_config_is_unknown(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    _assert_unknown(str(tmp_path))


def test_attn_implementation_is_passed_through():
    sdpa = load_backbone("clip-tiny")
    eager = load_backbone("clip-tiny", attn_implementation="eager")
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert eager.model.config.vision_config._attn_implementation == "eager"
    torch.testing.assert_close(_forward(eager, 2), _forward(sdpa, 2), atol=1e-5, rtol=1e-5)


def test_unsupported_attn_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="vilt-vqa-tiny"):
        load_backbone("vilt-vqa-tiny", attn_implementation="sdpa")


def test_blip_vqa_logits_are_decoder_logits_and_survive_deepcopy():
    bb = load_backbone("blip-vqa-tiny")
    inputs = bb.example_inputs(2)
    with torch.no_grad():
        outputs = bb.model(**inputs)
        decoder = bb.model.text_decoder(
            input_ids=inputs["decoder_input_ids"],
            encoder_hidden_states=bb.model.text_encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                encoder_hidden_states=outputs.image_embeds).last_hidden_state,
            encoder_attention_mask=inputs["attention_mask"]).logits
    logits = bb.task.logits(outputs)
    assert logits.shape == (2, TINY_CONFIGS["blip-vqa-tiny"]["text_config"]["vocab_size"])
    torch.testing.assert_close(logits, decoder[:, -1])
    clone = copy.deepcopy(bb.model)
    with torch.no_grad():
        torch.testing.assert_close(bb.task.logits(clone(**inputs)), logits)
    hooks = len(bb.model._forward_hooks)
    from trimkit.backbones import backbone_for_model
    backbone_for_model(bb.model)
    assert len(bb.model._forward_hooks) == hooks
