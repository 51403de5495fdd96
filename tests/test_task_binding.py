"""A model fitted to one task is never scored on another task's data."""
from __future__ import annotations

import pytest

from trimkit.data import load_dataset
from trimkit.errors import DataError
from trimkit.tasks import Binding, bound_task, task_dataset

KEYS = (("input_ids", "input_ids"), ("pixel_values", "pixel_values"))


@pytest.mark.parametrize("metric_task, data_task", [("vqa", "vqa"), ("truefalse", "truefalse"),
                                                    ("itm", "retrieval"), ("retrieval", "retrieval")])
def test_bound_task(metric_task, data_task):
    assert bound_task(Binding(keys=KEYS, metric_task=metric_task)) == data_task


@pytest.mark.parametrize("other", ["truefalse", "retrieval"])
def test_a_vqa_model_on_other_data_names_both_tasks(other):
    spec = f"synthetic:{other}?n=4&image=32"
    with pytest.raises(DataError) as info:
        task_dataset(spec, Binding(keys=KEYS, metric_task="vqa"))
    shown = f"synthetic:{other}?n=4&seed=0&image=32&split=train&objects=2-5&texture=1"
    assert str(info.value) == (f"the model was fitted to vqa data, but {shown} is {other} data; "
                               "evaluate it on vqa data (e.g. synthetic:vqa)")


def test_matching_pairs_are_made_from_retrieval_data():
    pairs = task_dataset("synthetic:retrieval?n=4&image=32", Binding(keys=KEYS, metric_task="itm", pairs=True))
    assert len(pairs) == 2 * len(load_dataset("synthetic:retrieval?n=4&image=32"))
