"""Tests for trimkit.data: synthetic tasks, tokenizer, spec parsing, folder format, collate, metric."""

import hashlib
import json
import pickle
import re
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trimkit.data import (
    COLOURS, IMAGE_MEAN, IMAGE_STD, SHAPES, SIZES, TASKS, VQA_ANSWERS, DataSpec, WordTokenizer, caption,
    collate, format_data_spec, generate_scene, itm_pairs, load_dataset, metric, negative_caption,
    normalize_image, parse_data_spec, recall_at_k, render_scene,
)
from trimkit.errors import DataError

torch.set_num_threads(1)

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_DESC = rf"the (?:(small|large) )?(?:({_C}) )?({_S}|object)"
_NUMBERS = ("zero", "one", "two", "three", "four", "five")
_PLURAL = {"squares": "square", "circles": "circle", "triangles": "triangle", "crosses": "cross"}


# ----------------------------------------------------------------------------- an independent oracle

def _resolve(objects, size, colour, shape):
    """The one object a description names; fails the test when it names zero or several."""
    hits = [o for o in objects
            if (size is None or o.size == size) and (colour is None or o.colour == colour)
            and (shape == "object" or o.shape == shape)]
    assert len(hits) == 1, f"description names {len(hits)} objects"
    return hits[0]


def _holds(a, b, word):
    if word in ("left of", "right of"):
        assert a.col != b.col, "horizontal relation between objects in one column"
        return a.col < b.col if word == "left of" else a.col > b.col
    assert a.row != b.row, "vertical relation between objects in one row"
    return a.row < b.row if word == "above" else a.row > b.row


def _count(objects, noun):
    if noun in _PLURAL:
        return sum(o.shape == _PLURAL[noun] for o in objects)
    colour = noun.removesuffix(" objects")
    assert colour in COLOURS
    return sum(o.colour == colour for o in objects)


def _vqa_answer(question, objects):
    if m := re.fullmatch(rf"what (colour|shape|size) is {_DESC} \?", question):
        attr, size, colour, shape = m.groups()
        named = {"size": size, "colour": colour, "shape": None if shape == "object" else shape}
        assert named[attr] is None, "question names the attribute it asks about"
        return getattr(_resolve(objects, size, colour, shape), attr)
    if question == "how many objects are there ?":
        return _NUMBERS[len(objects)]
    if m := re.fullmatch(r"how many (\w+(?: objects)?) are there \?", question):
        return _NUMBERS[_count(objects, m.group(1))]
    if m := re.fullmatch(rf"what (colour|shape) is the object (left of|right of|above|below|closest to) {_DESC} \?",
                         question):
        attr, word, *desc = m.groups()
        ref = _resolve(objects, *desc)
        others = [o for o in objects if o is not ref]
        if word == "closest to":
            dist = sorted((o.row - ref.row) ** 2 + (o.col - ref.col) ** 2 for o in others)
            assert len(dist) == 1 or dist[0] < dist[1], "two objects are closest"
            hits = [o for o in others if (o.row - ref.row) ** 2 + (o.col - ref.col) ** 2 == dist[0]]
        else:
            hits = [o for o in others if {"left of": o.col < ref.col, "right of": o.col > ref.col,
                                          "above": o.row < ref.row, "below": o.row > ref.row}[word]]
        assert len(hits) == 1, f"{len(hits)} objects are {word} the reference"
        return getattr(hits[0], attr)
    if m := re.fullmatch(rf"is {_DESC} (left of|right of|above|below) {_DESC} \?", question):
        g = m.groups()
        a, b = _resolve(objects, *g[0:3]), _resolve(objects, *g[4:7])
        return "yes" if _holds(a, b, g[3]) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def _statement_truth(text, objects):
    if m := re.fullmatch(rf"there is an? (?:(small|large) )?({_C}) ({_S})", text):
        size, colour, shape = m.groups()
        return any((size is None or o.size == size) and o.colour == colour and o.shape == shape for o in objects)
    if m := re.fullmatch(rf"there (?:is|are) exactly (\w+) (\w+)", text):
        number, noun = m.groups()
        noun = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}.get(noun, noun)
        return _count(objects, noun) == _NUMBERS.index(number)
    if m := re.fullmatch(rf"{_DESC} is (left of|right of|above|below) {_DESC}", text):
        g = m.groups()
        return _holds(_resolve(objects, *g[0:3]), _resolve(objects, *g[4:7]), g[3])
    if m := re.fullmatch(rf"{_DESC} is (?:a )?(\w+)", text):
        size, colour, shape, value = m.groups()
        obj = _resolve(objects, size, colour, shape)
        attr = "colour" if value in COLOURS else "shape" if value in SHAPES else "size"
        named = {"size": size, "colour": colour, "shape": None if shape == "object" else shape}
        assert named[attr] is None, "statement names the attribute it states"
        return getattr(obj, attr) == value
    raise AssertionError(f"unparsed statement {text!r}")


def _caption_objects(text):
    return re.findall(rf"a (small|large) ({_C}) ({_S})", text)


def _digest(image):
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- scenes

def test_generate_scene_draws_each_object_in_its_own_cell():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = generate_scene(rng, 64)
        assert scene.image.shape == (3, 64, 64) and scene.image.dtype == np.float32
        assert 2 <= len(scene.objects) <= 5
        assert 0.0 <= scene.image.min() and scene.image.max() <= 1.0
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        for o in scene.objects:
            assert o.row * 16 <= o.cy - o.radius and o.cy + o.radius <= (o.row + 1) * 16
            assert o.col * 16 <= o.cx - o.radius and o.cx + o.radius <= (o.col + 1) * 16
            centre = scene.image[:, int(o.cy), int(o.cx)]
            assert np.abs(centre - np.asarray(COLOURS[o.colour])).max() <= 0.05, (o, centre)


def test_shapes_and_sizes_have_distinct_footprints():
    masks = {}
    for shape in SHAPES:
        for size in SIZES:
            scene = generate_scene(np.random.default_rng(0), 64, objects=(1, 1), texture=False)
            obj = replace(scene.objects[0], shape=shape, size=size, colour="red", cy=8.0, cx=8.0,
                          radius=16 * {"small": 0.24, "large": 0.42}[size])
            image = render_scene([obj], 64, np.random.default_rng(1), texture=False)
            masks[shape, size] = np.abs(image - image[:, -1:, -1:]).sum(0) > 0.3
    footprints = {k: m.tobytes() for k, m in masks.items()}
    assert len(set(footprints.values())) == len(footprints)
    for shape in SHAPES:
        assert masks[shape, "large"].sum() > 2 * masks[shape, "small"].sum() > 0


def test_generate_scene_is_a_pure_function_of_the_rng():
    a = generate_scene(np.random.default_rng(11), 48, objects=(3, 4), texture=False)
    b = generate_scene(np.random.default_rng(11), 48, objects=(3, 4), texture=False)
    assert a.objects == b.objects and np.array_equal(a.image, b.image)
    assert 3 <= len(a.objects) <= 4
    with pytest.raises(ValueError, match="objects"):
        generate_scene(np.random.default_rng(0), 64, objects=(4, 2))


# ----------------------------------------------------------------------------- tasks

@pytest.fixture(scope="module")
def vqa():
    ds = load_dataset("synthetic:vqa?n=1500&seed=2")
    return ds, [ds.record(i) for i in range(len(ds))]


@pytest.fixture(scope="module")
def truefalse():
    ds = load_dataset("synthetic:truefalse?n=1000&seed=2")
    return ds, [ds.record(i) for i in range(len(ds))]


@pytest.mark.slow
def test_vqa_answers_are_correct_and_questions_unambiguous(vqa):
    ds, records = vqa
    assert ds.answers == list(VQA_ANSWERS) and ds.num_labels == len(VQA_ANSWERS)
    for rec in records:
        assert ds.answers[rec.label] == _vqa_answer(rec.text, rec.objects), rec.text


@pytest.mark.slow
def test_vqa_answer_distribution_is_not_degenerate(vqa):
    _, records = vqa
    shares = Counter(r.label for r in records)
    assert max(shares.values()) / len(records) < 0.5
    assert len(shares) >= 15
    kinds = Counter(r.text.split()[0] + (r.text.split()[1] if r.text.startswith("what") else "") for r in records)
    assert {"whatcolour", "whatshape", "whatsize", "how", "is"} <= set(kinds)


@pytest.mark.slow
def test_truefalse_labels_balanced_and_true(truefalse):
    ds, records = truefalse
    assert ds.num_labels == 2 and ds.answers == ["false", "true"]
    labels = [r.label for r in records]
    assert sum(labels) == len(labels) // 2
    for rec in records:
        assert _statement_truth(rec.text, rec.objects) == bool(rec.label), rec.text
    kinds = Counter(r.text.split()[0] for r in records)
    assert kinds["there"] > 100 and kinds["the"] > 100


def test_truefalse_statement_wording_does_not_give_the_label_away(truefalse):
    _, records = truefalse
    words = Counter()
    for rec in records:
        for word in set(rec.text.split()):
            words[word, rec.label] += 1
    for word in {w for w, _ in words}:
        pos, neg = words[word, 1], words[word, 0]
        if pos + neg >= 100:
            assert 0.25 < pos / (pos + neg) < 0.75, (word, pos, neg)


def test_retrieval_captions_list_every_object_and_hard_negatives_differ():
    ds = load_dataset("synthetic:retrieval?n=200&seed=4")
    assert ds.task == "retrieval" and ds.answers is None and ds.num_labels == 2
    records = [ds.record(i) for i in range(len(ds))]
    for rec in records:
        assert rec.label == 1
        assert _caption_objects(rec.text) == [o.attrs for o in rec.objects]
    assert len({r.text for r in records}) >= 0.97 * len(records)
    pairs = itm_pairs(ds, seed=1)
    assert len(pairs) == 2 * len(ds) and pairs.num_labels == 2 and pairs.vocab_size == ds.vocab_size
    for i in range(0, 60, 2):
        pos, neg = pairs[i], pairs[i + 1]
        assert pos["labels"].item() == 1 and neg["labels"].item() == 0
        assert torch.equal(pos["pixel_values"], neg["pixel_values"])
        truth = Counter(o.attrs for o in records[i // 2].objects)
        assert Counter(_caption_objects(ds.tokenizer.decode(pos["input_ids"]))) == truth
        assert Counter(_caption_objects(ds.tokenizer.decode(neg["input_ids"]))) != truth
    easy = itm_pairs(ds, hard=False)
    assert easy[1]["labels"].item() == 0 and not torch.equal(easy[1]["input_ids"], easy[0]["input_ids"])
    with pytest.raises(DataError, match="retrieval"):
        itm_pairs(load_dataset("synthetic:vqa?n=4"))


def test_negative_caption_changes_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        objects = generate_scene(rng, 64).objects
        neg = negative_caption(rng, objects)
        assert Counter(_caption_objects(neg)) != Counter(o.attrs for o in objects)
        assert _caption_objects(caption(objects)) == [o.attrs for o in objects]


@pytest.mark.parametrize("task", TASKS)
def test_items_shapes_and_normalisation(task):
    ds = load_dataset(f"synthetic:{task}?n=64&seed=1")
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        assert set(item) == {"pixel_values", "input_ids", "attention_mask", "labels"}
        assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
        assert item["input_ids"][0] == 1 and item["input_ids"][-1] == 2
        assert item["attention_mask"].sum() == len(item["input_ids"]) <= ds.max_text_len
        assert 0 <= item["labels"].item() < ds.num_labels and item["labels"].dtype == torch.long
    pixels = torch.stack([it["pixel_values"] for it in items])
    assert pixels.mean().abs() < 0.3 and 0.7 < pixels.std() < 1.3


@pytest.mark.slow
def test_vocabulary_small_and_complete():
    for task in TASKS:
        ds = load_dataset(f"synthetic:{task}?n=400&seed=9&objects=1-8")
        assert ds.vocab_size == ds.tokenizer.vocab_size < 200
        for i in range(len(ds)):
            ids = ds.tokenizer.encode_one(ds.record(i).text)
            assert ds.tokenizer.unk_token_id not in ids and len(ids) <= ds.max_text_len


def test_determinism_and_random_access():
    a = load_dataset("synthetic:truefalse?n=20&seed=7")
    b = load_dataset("synthetic:truefalse?n=20&seed=7")
    late = a[13]
    for i in range(20):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(late[k], b[13][k]) for k in late)
    c = load_dataset("synthetic:truefalse?n=20&seed=8")
    assert sum(torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(20)) == 0
    restored = pickle.loads(pickle.dumps(a))
    assert torch.equal(restored[5]["input_ids"], a[5]["input_ids"])


def test_splits_and_seeds_never_share_scenes():
    digests = {}
    for split in ("train", "val", "test"):
        ds = load_dataset("synthetic:retrieval?n=300&seed=1", split=split)
        assert ds.spec.split == split
        digests[split] = {_digest(ds.record(i).image) for i in range(len(ds))}
        assert len(digests[split]) == 300
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    spec_split = load_dataset("synthetic:retrieval?n=5&seed=1&split=val")
    assert _digest(spec_split.record(0).image) in digests["val"]
    assert load_dataset("synthetic:retrieval?n=5&seed=1&split=val", split="test").spec.split == "test"


def test_options_objects_texture_and_image_size():
    ds = load_dataset("synthetic:vqa?n=30&objects=3&texture=0&image=96")
    for i in range(len(ds)):
        rec = ds.record(i)
        assert len(rec.objects) == 3 and rec.image.shape == (3, 96, 96)
        corner = rec.image[:, :2, :2].reshape(3, -1)
        assert torch.all(corner == corner[:, :1])  # plain background
    assert ds[0]["pixel_values"].shape == (3, 96, 96)
    crowded = load_dataset("synthetic:vqa?n=30&objects=16")
    for i in range(len(crowded)):
        rec = crowded.record(i)
        assert len(rec.objects) == 16
        assert crowded.answers[rec.label] == _vqa_answer(rec.text, rec.objects)


def test_jitter_0_centres_objects_in_their_cells_and_keeps_the_scenes():
    moved = load_dataset("synthetic:vqa?n=40&objects=2-3")
    centred = load_dataset("synthetic:vqa?n=40&objects=2-3&jitter=0")
    shifted = 0
    for i in range(len(moved)):
        a, b = moved.record(i), centred.record(i)
        assert a.text == b.text and a.label == b.label
        for o, c in zip(a.objects, b.objects):
            assert (o.colour, o.shape, o.size, o.row, o.col) == (c.colour, c.shape, c.size, c.row, c.col)
            assert (c.cy, c.cx) == ((c.row + 0.5) * 16, (c.col + 0.5) * 16)
            shifted += (o.cy, o.cx) != (c.cy, c.cx)
    assert shifted > 20  # the default does move them
    assert "jitter" not in format_data_spec(moved.spec)  # older specs keep their canonical text


@pytest.mark.slow
def test_open_questions_are_correct_and_cover_counts_and_relations():
    ds = load_dataset("synthetic:vqa?n=600&objects=2-4&questions=open&grid=8&image=128")
    kinds = Counter()
    for i in range(len(ds)):
        rec = ds.record(i)
        assert ds.answers[rec.label] == _vqa_answer(rec.text, rec.objects), rec.text
        words = rec.text.split()
        kinds["closest" if "closest" in words else "direction" if {"left", "right", "above", "below"} & set(words)
              else "all" if words[2] == "objects" else words[0] + words[1]] += 1
        assert not rec.text.startswith("is "), "no yes/no relation in the open set"
    assert {"closest", "direction", "all", "howmany", "whatcolour", "whatshape", "whatsize"} <= set(kinds), kinds
    assert min(kinds.values()) > 20, kinds
    assert "closest" in ds.tokenizer.vocab and "closest" not in load_dataset("synthetic:vqa?n=1").tokenizer.vocab
    assert "questions=open" in format_data_spec(ds.spec) and "grid=8" in format_data_spec(ds.spec)


def test_grid_option_places_objects_on_finer_cells():
    ds = load_dataset("synthetic:vqa?n=60&image=128&grid=8&objects=2-3&jitter=0")
    rows = set()
    for i in range(len(ds)):
        rec = ds.record(i)
        assert rec.image.shape == (3, 128, 128)
        for o in rec.objects:
            assert 0 <= o.row < 8 and 0 <= o.col < 8 and (o.cy, o.cx) == ((o.row + 0.5) * 16, (o.col + 0.5) * 16)
            assert o.radius == 16 * {"small": 0.24, "large": 0.42}[o.size]
            rows.add(o.row)
    assert rows == set(range(8))
    assert parse_data_spec("synthetic:vqa?grid=8&objects=40").extra["objects"] == (40, 40)
    with pytest.raises(DataError, match="within 1..16"):
        parse_data_spec("synthetic:vqa?objects=17")
    with pytest.raises(DataError, match="questions='open' is for synthetic:vqa"):
        parse_data_spec("synthetic:truefalse?questions=open")
    with pytest.raises(DataError, match="expected one of yesno, open"):
        parse_data_spec("synthetic:vqa?questions=maybe")


@pytest.mark.slow
def test_generation_is_fast():
    ds = load_dataset("synthetic:vqa?n=1000&seed=5")
    start = time.process_time()
    for i in range(len(ds)):
        ds[i]
    assert time.process_time() - start < 10.0


# ----------------------------------------------------------------------------- tokenizer, collate

def test_tokenizer_specials_padding_and_truncation():
    tok = WordTokenizer(["the", "red", "circle", "?"])
    assert tok.vocab_size == 8 and tok.id_to_word[:4] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    ids, mask = tok.encode(["The red circle?", "red blob"])
    red, circle, q = tok.vocab["red"], tok.vocab["circle"], tok.vocab["?"]
    assert ids.tolist() == [[1, tok.vocab["the"], red, circle, q, 2], [1, red, 3, 2, 0, 0]]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    short, _ = tok.encode("the red circle ?", max_len=4)
    assert short.tolist() == [[1, tok.vocab["the"], red, 2]]
    assert tok.decode(ids[0]) == "the red circle ?"
    called = tok(["red", "the red circle"], max_len=4)
    assert called["input_ids"].tolist() == [[1, red, 2, 0], [1, tok.vocab["the"], red, 2]]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("red", max_len=1)
    freq = WordTokenizer.from_texts(["b a a", "c a b"])
    assert freq.id_to_word[4:] == ["a", "b", "c"]


def test_collate_pads_text_to_batch_max():
    ds = load_dataset("synthetic:vqa?n=16&seed=3")
    items = [ds[i] for i in range(16)]
    batch = collate(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["pixel_values"].shape == (16, 3, 64, 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, max(lengths))
    assert batch["labels"].shape == (16,)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    assert [b["labels"].shape[0] for b in loader] == [5, 5, 5, 1]


# ----------------------------------------------------------------------------- metric

def test_metric_accuracy_and_recall():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 2.0]])
    assert metric("vqa", logits, torch.tensor([0, 1, 2, 2])) == ("accuracy", 0.75)
    assert metric("truefalse", torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1, 0, 0])) == ("accuracy", 2 / 3)
    # matched / mismatched pairs made from retrieval data: pair accuracy, named as such
    assert metric("itm", torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 0, 0])) == \
        ("itm_accuracy", 2 / 3)
    sim = torch.eye(5) + 0.01 * torch.arange(5.0)
    assert metric("retrieval", sim) == ("recall@1", 1.0)
    swapped = 0.5 * torch.eye(5)
    swapped[0, 1] = swapped[1, 0] = 1.0
    assert metric("retrieval", swapped) == ("recall@1", 0.6)
    assert metric("retrieval", swapped, torch.tensor([1, 0, 2, 3, 4]))[1] == 1.0
    assert recall_at_k(swapped, 2) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metric("vqa", logits[:3], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown task"):
        metric("caption", logits, torch.tensor([0, 1, 2, 2]))


# ----------------------------------------------------------------------------- spec

def test_parse_data_spec_values_and_defaults():
    spec = parse_data_spec("synthetic:vqa?n=2000&seed=1&image=64")
    assert (spec.task, spec.n, spec.seed, spec.image, spec.split, spec.source) == ("vqa", 2000, 1, 64, "train", "synthetic")
    assert spec.extra == {"objects": (2, 5), "texture": True, "jitter": True, "grid": 4, "questions": "yesno"}
    assert parse_data_spec("synthetic:retrieval?objects=3&texture=0&split=test&jitter=0").extra == {
        "objects": (3, 3), "texture": False, "jitter": False, "grid": 4, "questions": "yesno"}
    folder = parse_data_spec("folder:/data/mine?task=vqa&n=5")
    assert (folder.source, folder.path, folder.task, folder.n) == ("folder", "/data/mine", "vqa", 5)
    plain = parse_data_spec("./mine")
    assert (plain.source, plain.path, plain.task, plain.n) == ("folder", "./mine", "auto", None)


@pytest.mark.parametrize("spec, message", [
    ("synthetic:nlvr", "valid tasks: vqa, truefalse, retrieval"),
    ("synthetic:vqa?size=3", "valid options: n, seed, image, split, objects, texture, jitter"),
    ("synthetic:vqa?n=ten", "n='ten' is not an integer"),
    ("synthetic:vqa?n=0", "expected 1..10000000"),
    ("synthetic:vqa?image=8", "expected 32..1024"),
    ("synthetic:vqa?split=dev", "expected one of train, val, test"),
    ("synthetic:vqa?objects=9-2", "MIN-MAX within 1..16"),
    ("synthetic:vqa?texture=yes", "expected 0 or 1"),
    ("synthetic:vqa?jitter=2", "jitter='2' is invalid; expected 0 or 1"),
    ("synthetic:vqa?n=1&n=2", "given twice"),
    ("synthetic:vqa?seed", "needs a value"),
    ("vqa", "did you mean synthetic:vqa"),
    ("", "empty data spec"),
    ("folder:/x?seed=1", "valid options: n, image, split, task"),
    ("folder:/x?task=caption", "expected one of vqa, truefalse, retrieval"),
])
def test_parse_data_spec_errors_are_one_line(spec, message):
    with pytest.raises(DataError, match=re.escape(message)) as info:
        parse_data_spec(spec)
    assert "\n" not in str(info.value)


@settings(max_examples=20, deadline=None)
@given(task=st.sampled_from(TASKS), n=st.integers(1, 10_000), seed=st.integers(0, 2**40),
       image=st.integers(32, 1024), split=st.sampled_from(["train", "val", "test"]),
       lo=st.integers(1, 16), extra=st.integers(0, 15), texture=st.booleans(), jitter=st.booleans(),
       grid=st.integers(4, 16), open_questions=st.booleans())
def test_spec_round_trip(task, n, seed, image, split, lo, extra, texture, jitter, grid, open_questions):
    questions = "open" if open_questions and task == "vqa" else "yesno"
    spec = DataSpec(task=task, n=n, seed=seed, image=image, split=split,
                    extra={"objects": (lo, min(lo + extra, 16)), "texture": texture, "jitter": jitter,
                           "grid": grid, "questions": questions})
    assert parse_data_spec(format_data_spec(spec)) == spec


def test_folder_spec_round_trip():
    spec = parse_data_spec("folder:/tmp/x?n=3&split=val&task=truefalse")
    assert parse_data_spec(format_data_spec(spec)) == spec


# ----------------------------------------------------------------------------- folder format

def _write_folder(root, answers=True):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    pics = []
    rows = []
    for i in range(6):
        pic = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        pics.append(pic)
        if i % 3 == 0:
            name = f"images/{i}.png"
            Image.fromarray(pic).save(root / name)
        elif i % 3 == 1:
            name = f"images/{i}.npy"
            np.save(root / name, pic)
        else:
            name = f"images/{i}.npy"
            np.save(root / name, np.moveaxis(pic, -1, 0).astype(np.float32) / 255.0)
        rows.append({"image": name, "text": f"Is picture {i} red?", "label": ["red", "blue", "green"][i % 3],
                     "split": "train" if i < 4 else "val"})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if answers:
        (root / "answers.json").write_text(json.dumps(["green", "red", "blue", "yellow"]))
    return pics, rows


def test_folder_round_trip(tmp_path):
    pics, rows = _write_folder(tmp_path / "mine")
    ds = load_dataset(f"folder:{tmp_path / 'mine'}")
    assert ds.task == "vqa" and ds.answers == ["green", "red", "blue", "yellow"] and ds.num_labels == 4
    assert len(ds) == 4 and len(load_dataset(str(tmp_path / "mine"), split="val")) == 2
    for i in range(4):
        rec = ds.record(i)
        assert torch.allclose(rec.image, torch.from_numpy(np.moveaxis(pics[i], -1, 0)).float() / 255.0, atol=1e-6)
        assert ds.answers[rec.label] == rows[i]["label"]
        item = ds[i]
        assert torch.allclose(item["pixel_values"], normalize_image(rec.image))
        assert ds.tokenizer.decode(item["input_ids"]) == f"is picture {i} red ?"
        assert ds.tokenizer.unk_token_id not in item["input_ids"].tolist()
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["labels"].tolist() == [1, 2, 0, 1]
    small = load_dataset(f"folder:{tmp_path / 'mine'}?image=32&n=2")
    assert len(small) == 2 and small[0]["pixel_values"].shape == (3, 32, 32)


def test_folder_task_inference(tmp_path):
    _write_folder(tmp_path / "a", answers=False)
    assert load_dataset(str(tmp_path / "a")).answers == ["blue", "green", "red"]
    root = tmp_path / "b"
    root.mkdir()
    np.save(root / "x.npy", np.zeros((8, 8, 3), dtype=np.uint8))
    (root / "data.jsonl").write_text('{"image": "x.npy", "text": "a", "label": 1}\n'
                                     '{"image": "x.npy", "text": "b", "label": 0}\n')
    tf = load_dataset(f"folder:{root}?image=8")
    assert tf.task == "truefalse" and tf.num_labels == 2 and [tf[i]["labels"].item() for i in range(2)] == [1, 0]
    (root / "data.jsonl").write_text('{"image": "x.npy", "text": "a caption"}\n{"image": "x.npy", "text": "b"}\n')
    ret = load_dataset(f"folder:{root}")
    assert ret.task == "retrieval" and ret[0]["labels"].item() == 1
    assert itm_pairs(ret)[1]["labels"].item() == 0


@pytest.mark.parametrize("lines, message", [
    (['{"image": "x.npy", "text": "a", "label": 0}', '{"image": "x.npy", "text": "b", "label": 0'],
     "data.jsonl:2: invalid JSON"),
    (['{"image": "x.npy", "text": "a", "label": 0}', "", '{"image": "nope.png", "text": "b", "label": 0}'],
     "data.jsonl:3: image file"),
    (['{"image": "x.npy", "label": 0}'], 'data.jsonl:1: needs "text"'),
    (['{"image": "x.npy", "text": "a", "label": 1.5}'], 'data.jsonl:1: "label" must be an integer or a string'),
    (['{"image": "x.npy", "text": "a", "label": 0}', '{"image": "x.npy", "text": "b"}'],
     'data.jsonl:2: has no "label"'),
    (['{"image": "x.npy", "text": "a", "label": "cat"}'], "data.jsonl:1: label 'cat' is not an answer class"),
    (['{"image": "x.npy", "text": "a", "label": 7}'], "data.jsonl:1: label 7 is out of range 0..2"),
    (['{"image": "x.npy", "text": "a", "label": 0, "split": "dev"}'], 'data.jsonl:1: "split" must be one of'),
])
def test_folder_errors_name_file_and_line(tmp_path, lines, message):
    np.save(tmp_path / "x.npy", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "answers.json").write_text('["a", "b", "c"]')
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(f"folder:{tmp_path}")


def test_folder_missing_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'absent'}")
    with pytest.raises(DataError, match="has no data.jsonl"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "data.jsonl").write_text('{"image": "bad.png", "text": "a", "label": 0}\n')
    ds = load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataError, match=re.escape("bad.png (data.jsonl line 1)")):
        ds[0]


def test_normalisation_constants_match_synthetic_pixels():
    ds = load_dataset("synthetic:retrieval?n=300&seed=12")
    pixels = torch.stack([ds.record(i).image for i in range(len(ds))])
    mean, std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(IMAGE_MEAN), atol=0.03)
    assert torch.allclose(std, torch.tensor(IMAGE_STD), rtol=0.2)
