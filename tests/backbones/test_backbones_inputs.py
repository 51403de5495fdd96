import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trimkit.backbones import TINY_CONFIGS, ImageSpec, InputMaker, RepeatBatch, TextSpec, list_backbones
from trimkit.errors import ConfigError
from trimkit.rows import take_rows

TINY_NAMES = [name for name in list_backbones() if name.endswith("-tiny")]
FIXED_IMAGE = {"llava-tiny"}


@pytest.mark.parametrize("name", TINY_NAMES)
def test_text_len_changes_only_the_text_axis(tiny, name):
    bb = tiny(name)
    short, long = bb.example_inputs(2, text_len=4), bb.example_inputs(2, text_len=9)
    extra = bb.hints.get("image_tokens", 0)
    assert short["input_ids"].shape == (2, 4 + extra) and long["input_ids"].shape == (2, 9 + extra)
    assert short["attention_mask"].shape == short["input_ids"].shape
    assert torch.equal(short["pixel_values"], long["pixel_values"])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_image_size_changes_pixels_where_the_model_allows(tiny, name):
    bb = tiny(name)
    native = bb.hints["image_size"]["native"]
    big = native + 2 * bb.hints["image_size"]["patch"]
    inputs = bb.example_inputs(2, image_size=big)
    if name in FIXED_IMAGE:
        assert not bb.hints["image_size"]["variable"]
        assert inputs["pixel_values"].shape[-1] == native
        return
    assert bb.hints["image_size"]["variable"]
    if bb.hints["image_size"]["packed"]:  # Qwen2-VL: patch rows of every image, and their grids
        cells = big // bb.hints["image_size"]["patch"]
        assert inputs["image_grid_thw"].tolist() == [[1, cells, cells]] * 2
        assert inputs["pixel_values"].shape[0] == 2 * cells * cells
        merged = (big // bb.hints["image_size"]["step"]) ** 2
        assert ((inputs["input_ids"] == bb.hints["image_token_id"]).sum(1) == merged).all()
    else:
        assert inputs["pixel_values"].shape == (2, 3, big, big)
    assert ("interpolate_pos_encoding" in inputs) == (bb.hints["image_size"]["via"] == "interpolate_pos_encoding")
    assert "interpolate_pos_encoding" not in bb.example_inputs(2)
    if "pixel_mask" in inputs:
        assert inputs["pixel_mask"].shape == (2, big, big)
    with torch.no_grad():
        bb.task.logits(bb.model(**inputs))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_inputs_are_deterministic_by_seed_and_row(tiny, name):
    bb = tiny(name)
    a, b, other, three = bb.example_inputs(2), bb.example_inputs(2), bb.example_inputs(2, seed=5), bb.example_inputs(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], other["pixel_values"])
    assert not torch.equal(a["input_ids"], other["input_ids"])
    first_two = take_rows(three, [0, 1])
    assert all(torch.equal(a[k], first_two[k]) for k in a)
    row0, row1 = take_rows(a, [0]), take_rows(a, [1])
    assert not torch.equal(row0["pixel_values"], row1["pixel_values"])
    assert not torch.equal(a["input_ids"][0], a["input_ids"][1])


def test_text_starts_with_the_special_token_of_each_family(tiny):
    clip_text = TINY_CONFIGS["clip-tiny"]["text_config"]
    ids = tiny("clip-tiny").example_inputs(3)["input_ids"]
    assert (ids[:, 0] == clip_text["bos_token_id"]).all() and (ids[:, -1] == clip_text["eos_token_id"]).all()
    ids = tiny("blip-caption-tiny").example_inputs(3)["input_ids"]
    assert (ids[:, 0] == TINY_CONFIGS["blip-caption-tiny"]["text_config"]["bos_token_id"]).all()
    vqa = tiny("blip-vqa-tiny").example_inputs(3)
    assert (vqa["input_ids"][:, 0] == 101).all()
    assert vqa["decoder_input_ids"].tolist() == [[TINY_CONFIGS["blip-vqa-tiny"]["text_config"]["bos_token_id"]]] * 3
    ids = tiny("bridgetower-itm-tiny").example_inputs(3)["input_ids"]
    assert (ids[:, 0] == TINY_CONFIGS["bridgetower-itm-tiny"]["text_config"]["bos_token_id"]).all()
    siglip = tiny("siglip-tiny")
    siglip_eos = TINY_CONFIGS["siglip-tiny"]["text_config"]["eos_token_id"]
    assert (siglip.example_inputs(3)["input_ids"][:, -1] == siglip_eos).all()
    assert siglip.hints["special_tokens"] == {"vision": [], "text": [-1]}


def test_llava_text_holds_one_placeholder_per_patch(tiny):
    bb, cfg = tiny("llava-tiny"), TINY_CONFIGS["llava-tiny"]
    ids = bb.example_inputs(2, text_len=5)["input_ids"]
    patches = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
    assert ((ids == cfg["image_token_index"]).sum(dim=1) == patches).all()
    assert (ids[:, 0] == cfg["text_config"]["bos_token_id"]).all()
    assert (ids[:, 1:1 + patches] == cfg["image_token_index"]).all()
    assert bb.hints["image_tokens"] == patches and bb.hints["image_token_id"] == cfg["image_token_index"]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_out_of_range_sizes_are_config_errors(tiny, name):
    bb = tiny(name)
    with pytest.raises(ConfigError, match="text_len"):
        bb.example_inputs(1, text_len=bb.hints["text_len"]["max"] + 1)
    with pytest.raises(ConfigError, match="text_len"):
        bb.example_inputs(1, text_len=bb.hints["text_len"]["min"] - 1)
    with pytest.raises(ConfigError, match="batch_size"):
        bb.example_inputs(0)
    if name not in FIXED_IMAGE:
        with pytest.raises(ConfigError, match="multiple of the patch size"):
            bb.example_inputs(1, image_size=bb.hints["image_size"]["native"] + 1)


SPEC = TextSpec(vocab_size=50, max_len=20, first_id=3, last_id=4, reserved=(0, 1, 2), image_token_id=5, image_tokens=2)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), text_len=st.integers(SPEC.min_len, SPEC.max_len), seed=st.integers(0, 10_000))
def test_text_spec_layout(batch, text_len, seed):
    ids = InputMaker(text=SPEC)(batch, text_len=text_len, seed=seed)["input_ids"]
    assert ids.shape == (batch, text_len + 2)
    assert (ids[:, 0] == 3).all() and (ids[:, 1:3] == 5).all() and (ids[:, -1] == 4).all()
    body = ids[:, 3:-1]
    assert ((body >= 6) & (body < 50)).all()


def test_image_spec_rejects_unknown_resize_mode():
    with pytest.raises(ConfigError, match="resize"):
        ImageSpec(32, 8, resize="stretch")


def test_repeat_batch_repeats_and_slices_batched_tensors_only():
    example = {"x": torch.arange(6.0).reshape(2, 3), "scale": torch.tensor(2.0), "flag": True}
    make = RepeatBatch(example)
    five = make(5, text_len=99, image_size=7, seed=3)
    assert five["x"].tolist() == [example["x"][i % 2].tolist() for i in range(5)]
    assert five["scale"] is example["scale"] and five["flag"] is True
    assert make(1)["x"].tolist() == [[0.0, 1.0, 2.0]]


def test_qwen2_vl_text_wraps_merged_placeholders_in_vision_tokens(tiny):
    bb, cfg = tiny("qwen2-vl-tiny"), TINY_CONFIGS["qwen2-vl-tiny"]
    vision = cfg["vision_config"]
    inputs = bb.example_inputs(2, text_len=5)
    ids = inputs["input_ids"]
    merged = (vision["image_size"] // vision["patch_size"] // vision["spatial_merge_size"]) ** 2
    assert ids.shape == (2, 5 + merged) and bb.hints["image_tokens"] == merged
    assert (ids[:, 0] == cfg["vision_start_token_id"]).all()
    assert (ids[:, 1:1 + merged] == cfg["image_token_id"]).all()
    assert (ids[:, 1 + merged] == cfg["vision_end_token_id"]).all()
    assert torch.equal(inputs["mm_token_type_ids"], (ids == cfg["image_token_id"]).int())
    assert list(inputs)[:2] == ["input_ids", "attention_mask"]  # batch-carrying inputs first


def test_packed_patches_hold_every_pixel_once_in_merge_window_order():
    spec = ImageSpec(8, 2, "native", channels=1, temporal_patch=2, merge=2)
    image = torch.arange(64.0).reshape(1, 8, 8)
    rows, grid = spec._packed(image)
    assert grid.tolist() == [1, 4, 4] and rows.shape == (16, 1 * 2 * 2 * 2)
    assert torch.equal(rows[:, :4], rows[:, 4:])  # the image repeated along time
    assert rows[:, :4].flatten().sort().values.tolist() == list(range(64))
    # the first merge window holds the top-left 2x2 patches, each patch row-major
    assert rows[:4, :4].tolist() == [[0, 1, 8, 9], [2, 3, 10, 11], [16, 17, 24, 25], [18, 19, 26, 27]]
    assert spec.placeholders(None) == 4 and spec.placeholders(16) == 16
    with pytest.raises(ConfigError, match="merge size 2"):
        spec.placeholders(6)


def test_take_rows_selects_packed_patch_rows_per_image():
    grid = torch.tensor([[1, 2, 2], [1, 2, 3], [1, 1, 1]])
    inputs = {"input_ids": torch.arange(6).reshape(3, 2), "pixel_values": torch.arange(11.0)[:, None],
              "image_grid_thw": grid}
    picked = take_rows(inputs, [2, 0, 2])
    assert picked["input_ids"].tolist() == [[4, 5], [0, 1], [4, 5]]
    assert picked["pixel_values"].flatten().tolist() == [10, 0, 1, 2, 3, 10]
    assert picked["image_grid_thw"].tolist() == [[1, 1, 1], [1, 2, 2], [1, 1, 1]]
    assert RepeatBatch(inputs)(4)["pixel_values"].flatten().tolist() == list(range(11)) + [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="one image per row"):
        take_rows({**inputs, "image_grid_thw": grid[:2]}, [0])
