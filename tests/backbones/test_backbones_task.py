import pytest
import torch
import torch.nn.functional as F

from trimkit.backbones import TaskAdapter
from trimkit.backbones.base import first_tensor
from trimkit.errors import ConfigError, DataError


def test_unknown_kind_and_contrastive_mode_are_config_errors():
    with pytest.raises(ConfigError, match="regression"):
        TaskAdapter("regression")
    with pytest.raises(ConfigError, match="hinge"):
        TaskAdapter("contrastive", contrastive="hinge")


def test_logits_by_key_and_position():
    outputs = {"loss": None, "logits": torch.arange(24.0).reshape(2, 3, 4), "other": torch.zeros(1)}
    assert torch.equal(TaskAdapter("lm").logits(outputs), outputs["logits"])
    assert torch.equal(TaskAdapter("classification", position=-1).logits(outputs), outputs["logits"][:, -1])
    with pytest.raises(DataError, match="itm_score"):
        TaskAdapter("matching", key="itm_score").logits(outputs)


def test_first_tensor_skips_missing_entries_and_nests():
    inner = torch.ones(2)
    assert first_tensor({"loss": None, "parts": (None, [inner, torch.zeros(1)])}) is inner
    with pytest.raises(DataError):
        first_tensor({"a": None, "b": "text"})


def test_classification_loss_with_class_ids_and_soft_scores():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], requires_grad=True)
    task = TaskAdapter("classification", num_labels=3)
    ids = torch.tensor([0, 2])
    torch.testing.assert_close(task.loss({"logits": logits}, {"labels": ids}), F.cross_entropy(logits, ids))
    soft = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(logits, soft) * 3
    torch.testing.assert_close(task.loss({"logits": logits}, {"labels": soft}), expected)
    with pytest.raises(DataError, match="labels"):
        task.loss({"logits": logits}, {"input_ids": ids})
    with pytest.raises(DataError, match="do not fit"):
        task.loss({"logits": logits}, {"labels": torch.tensor([0, 1, 2])})


def test_contrastive_losses_match_their_definitions():
    logits = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    targets = torch.arange(2)
    softmax = TaskAdapter("contrastive", key="logits_per_image").loss({"logits_per_image": logits}, {})
    torch.testing.assert_close(softmax, (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2)
    sigmoid_task = TaskAdapter("contrastive", key="logits_per_image", contrastive="sigmoid")
    sigmoid = sigmoid_task.loss({"logits_per_image": logits}, {})
    manual = -(F.logsigmoid(logits.diag()).sum() + F.logsigmoid(-logits[0, 1]) + F.logsigmoid(-logits[1, 0])) / 2
    torch.testing.assert_close(sigmoid, manual)
    better = TaskAdapter("contrastive", key="logits_per_image").loss({"logits_per_image": logits * 10}, {})
    assert better < softmax


def test_lm_loss_shifts_and_ignores_padding_and_placeholders():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 10)
    ids = torch.tensor([[1, 9, 4, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    task = TaskAdapter("lm", ignore_ids=(9,))
    loss = task.loss({"logits": logits}, {"input_ids": ids, "attention_mask": mask})
    # targets after the shift: 9 (placeholder, ignored), 4, 5, 0 (padding, ignored)
    expected = F.cross_entropy(logits[0, 1:3], torch.tensor([4, 5]))
    torch.testing.assert_close(loss, expected)
    labels = torch.tensor([[-100, 3, 3, 3, 3]])
    torch.testing.assert_close(task.loss({"logits": logits}, {"labels": labels}),
                               F.cross_entropy(logits[0, :4], torch.tensor([3, 3, 3, 3])))
    with pytest.raises(DataError, match="input_ids"):
        task.loss({"logits": logits}, {})


def test_features_loss_uses_labels_of_the_output_shape():
    task = TaskAdapter("features", key=None)
    out = (torch.ones(2, 3),)
    torch.testing.assert_close(task.loss(out, {"labels": torch.zeros(2, 3)}), torch.tensor(1.0))
    torch.testing.assert_close(task.loss(out, {"labels": torch.tensor([0, 1])}), torch.log(torch.tensor(3.0)))
    with pytest.raises(DataError, match="labels"):
        task.loss(out, {})


def test_example_labels_are_deterministic_and_in_range():
    task = TaskAdapter("classification", num_labels=7)
    a, b = task.example_labels(6, seed=2), task.example_labels(6, seed=2)
    assert torch.equal(a, b) and a.dtype == torch.long and ((a >= 0) & (a < 7)).all()
    assert torch.equal(task.example_labels(2, seed=2), a[:2])
    assert TaskAdapter("lm").example_labels(3) is None
