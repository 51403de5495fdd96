"""The ``where`` question set: one named object among distractors, answers only the image gives."""

from collections import Counter

import numpy as np
import pytest

from trimkit.data import (WHERE_TYPES, SceneObject, format_data_spec, load_dataset, parse_data_spec,
                          where_question)
from trimkit.bench.where import blind_prior, question_type

SPEC = "synthetic:vqa?n=300&image=48&objects=2-3&grid=3&jitter=0&questions=where"


def _obj(colour: str, shape: str, col: int = 0) -> SceneObject:
    return SceneObject(colour=colour, shape=shape, size="large", row=0, col=col, cy=8.0, cx=8.0 + 16 * col,
                       radius=6.0)


def _answer(text: str, objects) -> str:
    words = text.split()
    if words[0] == "is":
        colour, shape = words[3], words[4]
        return "yes" if any(o.colour == colour and o.shape == shape for o in objects) else "no"
    if words[1] == "shape":
        named = [o for o in objects if o.colour == words[4]]
        assert len(named) == 1, text
        return named[0].shape
    named = [o for o in objects if o.shape == words[4]]
    assert len(named) == 1, text
    return named[0].colour


def test_where_questions_are_correct_name_one_object_and_mix_the_types():
    ds = load_dataset(SPEC)
    kinds, answers = Counter(), Counter()
    for i in range(len(ds)):
        rec = ds.record(i)
        assert ds.answers[rec.label] == _answer(rec.text, rec.objects), rec.text
        assert len(rec.objects) >= 2
        kinds[question_type(rec.text)] += 1
        answers[ds.answers[rec.label]] += 1
    assert set(kinds) == set(WHERE_TYPES) and min(kinds.values()) > 60, kinds
    assert 0.3 < answers["yes"] / kinds["exists"] < 0.7, answers
    assert ds.max_text_len >= max(len(ds.tokenizer.encode_one(ds.record(i).text)) for i in range(50))


def test_where_no_pairs_a_colour_and_a_shape_of_the_scene_when_it_can():
    objects = (_obj("red", "circle"), _obj("blue", "square", 1))
    seen = set()
    for seed in range(60):
        text, answer = where_question(np.random.default_rng(seed), objects)
        if answer == "no":
            seen.add(text)
    assert seen == {"is there a red square ?", "is there a blue circle ?"}


def test_where_shape_and_colour_questions_name_a_unique_object():
    objects = (_obj("red", "circle"), _obj("red", "square", 1), _obj("green", "circle", 2))
    asked = {where_question(np.random.default_rng(seed), objects) for seed in range(80)}
    asked = {(t, a) for t, a in asked if not t.startswith("is")}
    assert asked == {("what shape is the green object ?", "circle"), ("what colour is the square ?", "red")}


def test_a_type_that_does_not_fit_the_scene_raises_so_the_scene_is_redrawn():
    objects = (_obj("red", "circle"), _obj("red", "square", 1))  # no colour of its own
    kinds = Counter()
    for seed in range(200):
        try:
            kinds[question_type(where_question(np.random.default_rng(seed), objects)[0])] += 1
        except ValueError as err:
            assert "colour of its own" in str(err)
            kinds["redrawn"] += 1
    assert set(kinds) == {"colour", "exists", "redrawn"} and 50 < kinds["redrawn"] < 110, kinds


def test_where_spec_round_trips_and_has_its_own_vocabulary():
    spec = parse_data_spec(SPEC)
    assert spec.extra["questions"] == "where" and parse_data_spec(format_data_spec(spec)) == spec
    where_vocab = load_dataset(SPEC).tokenizer.vocab
    assert "an" in where_vocab and "an" not in load_dataset("synthetic:vqa?n=1").tokenizer.vocab


def test_blind_prior_is_the_majority_answer_per_question_text():
    train, val = load_dataset(SPEC), load_dataset(SPEC.replace("n=300", "n=200") + "&split=val")
    prior = blind_prior(train, val)
    assert prior["n"] == 200 and set(prior["by_type"]) == set(WHERE_TYPES)
    assert prior["by_type"]["exists"]["accuracy"] < 0.7  # yes/no are balanced per question
    assert prior["accuracy"] < 0.45  # the image is needed; chance by type is about 0.3
    assert prior["accuracy"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in prior["by_type"].values()) / 200)
