"""Whole-split sweeps: every item's executed FLOPs priced by shape signature, checked against
direct counts."""
import numpy as np
import pytest
import torch

from trimkit.backbones import load_backbone
from trimkit.bench import sweep as sweep_module
from trimkit.bench.run import smarttrim_configs
from trimkit.bench.sweep import SweepError, pack_bits, score_items, sweep, unpack_bits
from trimkit.data import collate
from trimkit.evaluate import fitted
from trimkit.evaluate import eval_inputs, executed_flops, length_buckets
from trimkit.tasks import task_dataset
from trimkit.train import TrainConfig, train

SPEC = "synthetic:vqa?image=48&objects=2-3&grid=3&jitter=0&questions=where&n={n}&seed=3"


@pytest.fixture(scope="module")
def trimmed():
    torch.manual_seed(0)
    result = train(load_backbone("vilt-vqa-where"), SPEC.format(n=32), target_ratio=0.5, steps=3,
                   recipe=smarttrim_configs("smarttrim", 0.5), progress=False,
                   config=TrainConfig(batch_size=8, lr_trimmer=0.5, measure_every=0))
    backbone, binding, spec = fitted(result.backbone, SPEC.format(n=24), "val")
    items = [task_dataset(spec, binding)[i] for i in range(24)]
    return backbone.model.eval(), binding, items


def test_pack_bits_round_trips():
    bits = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1], dtype=np.uint8)
    assert unpack_bits(pack_bits(bits), bits.size).tolist() == bits.tolist()


@pytest.mark.slow
def test_every_item_priced_by_signature_equals_its_direct_count(trimmed):
    model, binding, items = trimmed
    known = {}
    result = sweep(model, binding, items, batch_size=5, verify=0, known=known)
    direct = [executed_flops(model, eval_inputs(binding, collate([it]), "cpu")) for it in items]
    assert result.flops.tolist() == pytest.approx([t for t, _ in direct], rel=1e-9)
    assert result.flops_untrimmed.tolist() == pytest.approx([f for _, f in direct], rel=1e-9)
    assert len(set(result.flops.tolist())) > 1  # the decisions differ per item
    assert result.counted == len(known["trimmed"]) <= len(items)
    again = sweep(model, binding, items, batch_size=7, verify=3, known=known)
    assert again.counted == 0 and again.flops.tolist() == result.flops.tolist()  # all priced from `known`
    with torch.no_grad():
        inputs = eval_inputs(binding, collate(items), "cpu")
        labels = torch.tensor([it["labels"] for it in items])
        assert result.correct.tolist() == (model(**inputs).logits.argmax(-1) == labels).int().tolist()


@pytest.mark.slow
def test_a_signature_that_misses_a_decision_fails_verification(trimmed, monkeypatch):
    model, binding, items = trimmed

    def shapes_only(model, inputs):
        rows = inputs["input_ids"].shape[0]
        return [tuple((k, tuple(v.shape[1:])) for k, v in sorted(inputs.items()) if isinstance(v, torch.Tensor))] * rows

    monkeypatch.setattr(sweep_module, "row_signatures", shapes_only)
    with pytest.raises(SweepError, match="counted alone"):
        sweep(model, binding, items, batch_size=24, verify=24)


def test_sweep_refuses_empty_and_generative_inputs(trimmed):
    model, binding, _ = trimmed
    with pytest.raises(Exception, match="at least one item"):
        sweep(model, binding, [])


def test_score_items_skips_signatures_when_asked(trimmed, monkeypatch):
    from trimkit.progress import progress
    model, binding, items = trimmed
    groups = length_buckets(items, 8)
    with progress(False) as bar:
        correct, sigs = score_items(model, binding, items, groups, "cpu", bar, full=False)
        assert all(s is not None for s in sigs)

        def no_signatures(model, inputs):
            raise AssertionError("row_signatures ran although signatures were not asked for")

        monkeypatch.setattr(sweep_module, "row_signatures", no_signatures)
        hits, none = score_items(model, binding, items, groups, "cpu", bar, full=False, with_signatures=False)
        assert none == [None] * len(items) and hits.tolist() == correct.tolist()
        _, none = score_items(model, binding, items, groups, "cpu", bar, full=True, with_signatures=False)
        assert none == [None] * len(items)
