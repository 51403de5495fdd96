"""Loss terms of decoder training: distillation on the answer positions only; gradients reach the trimmers."""
from types import SimpleNamespace

import pytest
import torch

from trimkit.backbones.base import TaskAdapter
from trimkit.train import TrainConfig
from trimkit.train.losses import AnswerDistillation, Batch, Distillation, answer_positions, smarttrim_terms

LM = TaskAdapter("lm")


def _outputs(student: torch.Tensor, teacher: torch.Tensor):
    return SimpleNamespace(student=SimpleNamespace(logits=student), teacher_logits=lambda: teacher)


def test_answer_positions_are_the_ones_before_a_label():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, 7, 2, -100]])
    assert answer_positions(labels).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_distillation_reads_the_answer_positions_only():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, -100, 5, 2]])
    teacher = torch.randn(1, 5, 11)
    term = AnswerDistillation(logits=LM.logits)
    off_answer = teacher.clone()
    off_answer[:, [0, 1, 4]] += 3 * torch.randn(1, 3, 11)  # positions that predict no answer token
    assert float(term(_outputs(off_answer, teacher), Batch({}, labels))) == pytest.approx(0.0, abs=1e-6)
    on_answer = teacher.clone()
    on_answer[:, 2] += 3 * torch.randn(11)
    assert float(term(_outputs(on_answer, teacher), Batch({}, labels))) > 0.01
    assert term(_outputs(on_answer, teacher), Batch({}, torch.full((1, 5), -100))) is None


def test_decoders_get_the_answer_distillation_term():
    terms = smarttrim_terms(TrainConfig(), LM)
    assert [type(t).__name__ for t in terms] == ["TaskLoss", "AnswerDistillation", "CostLoss"]
    assert type(smarttrim_terms(TrainConfig(), TaskAdapter("classification", num_labels=3))[1]) is Distillation


def test_the_terms_reach_the_trimmers_on_llava_tiny():
    from trimkit.cost import calibrate, expected_ratio
    from trimkit.data import collate
    from trimkit.passes import trainable_parameters
    from trimkit.runtime import trimming_off
    from trimkit.tasks import model_batch, task_dataset
    from trimkit.train import prepare

    torch.manual_seed(0)
    recipe = '[[pass]]\nname = "smarttrim.tokens"\n'
    backbone, binding, _, spec = prepare("llava-tiny", "synthetic:vqa?n=8", recipe=recipe)
    dataset = task_dataset(spec, binding)
    inputs, labels = model_batch(binding, collate([dataset[i] for i in range(4)]))
    model = backbone.model
    calibrate(model, inputs)
    model.train()
    with torch.no_grad(), trimming_off(model):
        teacher = model(**inputs).logits
    student = model(**inputs)
    outputs = SimpleNamespace(student=student, teacher_logits=lambda: teacher, ratio=expected_ratio(model))
    batch = Batch(inputs, labels, target=0.5)
    trimmers = trainable_parameters(model)
    for term in smarttrim_terms(TrainConfig(), backbone.task):
        model.zero_grad(set_to_none=True)
        value = term(outputs, batch)
        value.backward(retain_graph=True)
        grads = [p.grad for p in trimmers if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, term.name
