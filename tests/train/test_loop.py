"""The training loop and its loss terms on a toy model: summing, accumulation, logging, stopping."""
import math
from types import SimpleNamespace

import click
import pytest
import torch
from click.testing import CliRunner

from trimkit.cli.options import config_options, given
from trimkit.errors import TrimkitError
from trimkit.train import Batch, Loop, TrainConfig, run_loop
from trimkit.train.loop import NonFiniteLoss, SeededBatches, weighted_sum
from trimkit.train.losses import CostLoss, CrossEntropy, Distillation, LagrangeMultiplier, LogitPenalty, TaskLoss


def _data(n: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return x, (x[:, 0] > 0).long()


def _forward(model, batch):
    return SimpleNamespace(student=SimpleNamespace(logits=model(batch.inputs["x"])))


def _loop(model, x, y, rows: int, **kw) -> Loop:
    def batch(m: int) -> Batch:
        lo = (m * rows) % len(x)
        return Batch({"x": x[lo:lo + rows]}, y[lo:lo + rows])

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Loop(model, opt, batch, _forward, [CrossEntropy()], **kw)


class _Term:
    def __init__(self, name, weight, value, logged=True):
        self.name, self.weight, self.value, self.logged = name, weight, value, logged

    def __call__(self, outputs, batch):
        return self.value


def test_weighted_sum_skips_missing_terms_and_keeps_order():
    a, b = torch.tensor(2.0), torch.tensor(3.0)
    terms = [_Term("a", 1.0, a), _Term("b", 0.5, b), _Term("c", 7.0, None)]
    assert float(weighted_sum(terms, [t.value for t in terms])) == 3.5
    with pytest.raises(TrimkitError, match="no loss term"):
        weighted_sum(terms[2:], [None])


def test_grad_accumulation_of_two_halves_equals_one_full_batch():
    x, y = _data()
    torch.manual_seed(0)
    whole = torch.nn.Linear(4, 2)
    halves = torch.nn.Linear(4, 2)
    halves.load_state_dict(whole.state_dict())
    rows_whole = run_loop(_loop(whole, x, y, rows=16), 1)
    rows_halves = run_loop(_loop(halves, x, y, rows=8, grad_accum=2), 1)
    assert torch.allclose(whole.weight, halves.weight, atol=1e-6)
    assert rows_whole[0]["loss"] == pytest.approx(rows_halves[0]["loss"], abs=1e-6)
    assert set(rows_whole[0]) == {"step", "loss", "task"} and rows_whole[0]["step"] == 1


def test_rows_log_terms_metrics_and_step_values():
    x, y = _data()
    model = torch.nn.Linear(4, 2)
    extra = _Term("extra", 2.0, torch.tensor(0.25))
    hidden = _Term("hidden", 1.0, torch.tensor(1.0), logged=False)
    loop = _loop(model, x, y, rows=8, before_step=lambda step: {"target": 0.5, "tau": 1.0 - step})
    loop.terms = [*loop.terms, extra, hidden]
    rows = run_loop(loop, 3)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["tau"] for r in rows] == [1.0, 0.0, -1.0]
    assert all(r["extra"] == 0.25 and "hidden" not in r for r in rows)
    assert all(r["loss"] == pytest.approx(r["task"] + 2.0 * 0.25 + 1.0) for r in rows)


def test_a_finite_batch_source_ends_the_run():
    x, y = _data()
    batches = iter([Batch({"x": x[:4]}, y[:4]), Batch({"x": x[4:8]}, y[4:8])])
    loop = Loop(torch.nn.Linear(4, 2), None, lambda m: next(batches), _forward, [CrossEntropy()])
    loop.optimizer = torch.optim.SGD(loop.model.parameters(), lr=0.1)
    assert len(run_loop(loop, 5)) == 2


def test_non_finite_loss_raises_before_backward():
    x, y = _data()
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    loop = _loop(model, x, y, rows=8, check_finite=True)
    loop.terms = [*loop.terms, _Term("bad", 1.0, torch.tensor(math.nan))]
    with pytest.raises(NonFiniteLoss, match="not finite at step 1") as err:
        run_loop(loop, 2)
    assert err.value.step == 0 and torch.equal(model.weight, before) and model.weight.grad is None


def test_lagrange_multiplier_moves_by_the_mean_gap_and_adds_nothing_at_zero():
    term = LagrangeMultiplier(lr=0.5)
    outputs, batch = SimpleNamespace(ratio=torch.tensor(0.8)), Batch({}, target=0.5)
    assert term(outputs, batch) is None
    row = {"ratio": 0.8, "target": 0.5}
    term.end_step(row)
    assert row["lambda"] == pytest.approx(0.15) and term.weight == row["lambda"]
    assert float(term(outputs, batch)) == pytest.approx(0.3)


def test_terms_read_their_outputs():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    task = SimpleNamespace(loss=lambda out, batch: out.logits.sum() * 0 + 1.5, logits=lambda out: out.logits)
    outputs = SimpleNamespace(student=SimpleNamespace(logits=logits), full=lambda: SimpleNamespace(logits=logits),
                              teacher_logits=lambda: logits, ratio=torch.tensor(0.7),
                              keep_logits=[torch.tensor([5.0, -1.0])])
    batch = Batch({}, labels, target=0.5)
    assert float(TaskLoss(task)(outputs, batch)) == 1.5
    assert float(TaskLoss(task, full_weight=2.0)(outputs, batch)) == 1.5 + 2.0 * 1.5
    assert float(CrossEntropy()(outputs, batch)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert float(Distillation(logits=task.logits)(outputs, batch)) == pytest.approx(0.0, abs=1e-7)
    assert float(CostLoss(kind="above")(outputs, batch)) == pytest.approx(0.04)
    assert float(LogitPenalty(1.0, margin=4.0)(outputs, batch)) == pytest.approx(0.5)


def test_seeded_batches_are_a_function_of_seed_and_index():
    data = [{"input_ids": torch.tensor([[i]])} for i in range(10)]
    a, b = SeededBatches(data, 4, seed=3), SeededBatches(data, 4, seed=3)
    assert torch.equal(a(5)["input_ids"], b(5)["input_ids"])
    first_epoch = torch.cat([a(m)["input_ids"] for m in range(2)]).flatten().tolist()
    assert len(set(first_epoch)) == 8


def test_train_options_come_from_the_config_fields():
    @click.command()
    @config_options(TrainConfig)
    def show(**settings):
        click.echo(repr(TrainConfig(**settings)))

    result = CliRunner().invoke(show, ["--alpha", "0.5", "--freeze-backbone", "--cost", "above"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(TrainConfig(alpha=0.5, freeze_backbone=True, cost="above",
                                                     checkpoint_every=100))
    assert CliRunner().invoke(show, ["--batch-size", "0"]).exit_code == 2  # the field's lower bound
    assert "Weight of the distillation loss." in CliRunner().invoke(show, ["--help"]).output


def test_unset_options_override_only_what_is_given():
    names = ("alpha", "freeze_backbone")

    @click.command()
    @config_options(TrainConfig, names, unset=True, help={"alpha": "Own words."})
    def show(**settings):
        click.echo(repr(given(TrainConfig, settings, names)))

    assert CliRunner().invoke(show, []).output.strip() == "{}"
    assert CliRunner().invoke(show, ["--alpha", "0"]).output.strip() == "{'alpha': 0.0}"
    assert "Own words." in CliRunner().invoke(show, ["--help"]).output


@pytest.mark.parametrize("code", [
    "import trimkit.passes; import trimkit.train; trimkit.train.train",
    "import trimkit.evaluate; import trimkit.bench.run",
    "import sys; from trimkit.train import TrainConfig; assert 'torch' not in sys.modules",
])
@pytest.mark.slow
def test_modules_import_in_a_fresh_interpreter(code):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
