"""Grounding targets and the ViLT grounding probe of the where-question bases."""
import pytest
import torch

from trimkit.bench.models import build_model, model_config
from trimkit.bench.where import (StreamGroundingProbe, ViltGroundingProbe, grounding_probe, grounding_targets,
                                 patch_cells, question_type, referents)
from trimkit.data import SceneObject, collate, load_dataset
from trimkit.errors import ConfigError

SPEC = "synthetic:vqa?n=8&image=48&objects=2-3&grid=3&jitter=0&questions=where"


def _obj(colour, shape, row, col):
    return SceneObject(colour=colour, shape=shape, size="large", row=row, col=col, cy=0.0, cx=0.0, radius=1.0)


SCENE = (_obj("red", "circle", 0, 0), _obj("blue", "circle", 1, 2), _obj("red", "square", 2, 1))


@pytest.mark.parametrize("text, named", [("what shape is the blue object ?", [1]), ("what colour is the square ?", [2]),
                                         ("is there a red circle ?", [0]), ("is there a blue square ?", [])])
def test_referents_are_the_objects_the_question_names(text, named):
    assert referents(SCENE, text) == [SCENE[i] for i in named]


def test_referents_refuse_other_questions():
    assert question_type("how many circles are there ?") == "count"
    with pytest.raises(ValueError, match="not a where question"):
        referents(SCENE, "how many circles are there ?")


def test_grounding_targets_mark_the_named_cell_in_patch_order():
    assert patch_cells(48, 8, 3).tolist() == [0, 0, 1, 1, 2, 2]
    t = grounding_targets(SCENE, "what colour is the square ?", 48, 8, 3)
    assert t.shape == (36, 3) and t.dtype == torch.long
    named = t[:, 0].view(6, 6)
    assert named[4:, 2:4].eq(1).all() and named.sum() == 4  # the square's cell: rows 4-5, columns 2-3
    assert t[:, 1].view(6, 6)[0, 0] == 1 and t[:, 2].view(6, 6)[0, 0] == 2  # red (1st colour), circle (2nd shape)
    assert t[:, 1].view(6, 6)[0, 2] == 0  # an empty cell


def test_probe_reads_image_tokens_in_vilts_order_and_removes_itself():
    ds = load_dataset(SPEC)
    net = build_model(model_config("vilt", ds, hidden=32, layers=1, heads=2, patch=8))
    probe = ViltGroundingProbe(net.vilt)
    batch = collate([ds[i] for i in range(4)])
    targets = torch.stack([grounding_targets(ds.record(i).objects, ds.record(i).text, 48, 8, 3) for i in range(4)])
    net(**{k: v for k, v in batch.items() if k != "labels"})
    loss = probe.loss(targets, side=6)
    loss.backward()
    assert torch.isfinite(loss) and probe.heads.weight.grad.abs().sum() > 0
    assert net.vilt.vilt.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    probe.remove()
    assert "visual_embed" not in vars(net.vilt.vilt.embeddings)
    net(**{k: v for k, v in batch.items() if k != "labels"})
    assert probe._states is None


def _grounded_forward(family: str):
    ds = load_dataset(SPEC)
    net = build_model(model_config(family, ds, hidden=64, layers=1, heads=2, patch=8, cross_layers=1))
    probe = grounding_probe(net)
    batch = collate([ds[i] for i in range(4)])
    targets = torch.stack([grounding_targets(ds.record(i).objects, ds.record(i).text, 48, 8, 3) for i in range(4)])
    net(**{k: v for k, v in batch.items() if k != "labels"})
    return net, probe, targets


@pytest.mark.parametrize("family, columns, text_grad", [("blip", (1, 2), False), ("bridgetower", (0, 1, 2), True)])
def test_stream_probe_reads_the_image_tokens_that_can_carry_its_targets(family, columns, text_grad):
    net, probe, targets = _grounded_forward(family)
    assert isinstance(probe, StreamGroundingProbe) and probe.columns == columns
    assert probe.heads.out_features == sum((2, 7, 5)[k] for k in columns)
    assert probe._states.shape == (4, 36, 64)  # the image [CLS] is dropped
    loss = probe.loss(targets, side=6)
    loss.backward()
    assert torch.isfinite(loss) and probe.heads.weight.grad.abs().sum() > 0
    words = net.text_encoder.embeddings.word_embeddings if family == "blip" else \
        net.bridgetower.text_model.embeddings.word_embeddings
    grad = words.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == text_grad  # BridgeTower's image stream reads the question
    with pytest.raises(ConfigError, match="did not see"):
        probe.loss(targets, side=6)  # the states of one forward are read once
    probe.remove()
    net(**{k: v for k, v in _batch_of(4).items() if k != "labels"})
    assert probe._states is None


def test_grounding_probe_picks_the_vilt_probe_and_refuses_unknown_models():
    ds = load_dataset(SPEC)
    net = build_model(model_config("vilt", ds, hidden=32, layers=1, heads=2, patch=8))
    probe = grounding_probe(net)
    assert isinstance(probe, ViltGroundingProbe)
    probe.remove()
    with pytest.raises(ConfigError, match="BLIP or BridgeTower"):
        StreamGroundingProbe(net)


def _batch_of(n: int) -> dict:
    ds = load_dataset(SPEC)
    return collate([ds[i] for i in range(n)])
