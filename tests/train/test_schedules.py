import math

import pytest
import torch

from trimkit.errors import ConfigError
from trimkit.train import TrainConfig, cost_loss, distill_loss, target_at, tau_at


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_target_anneals_from_one_to_final(schedule):
    values = [target_at(s, 100, 0.4, 0.5, schedule) for s in range(100)]
    assert values[0] > 0.98
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
    assert values[49] == pytest.approx(0.4)
    assert values[-1] == pytest.approx(0.4)


def test_cosine_is_slower_than_linear_at_the_start():
    assert target_at(5, 100, 0.4, 0.5, "cosine") > target_at(5, 100, 0.4, 0.5, "linear")


def test_zero_anneal_starts_at_the_target():
    assert target_at(0, 10, 0.3, 0.0) == pytest.approx(0.3)


def test_tau_runs_from_start_to_end():
    assert tau_at(0, 11, 1.0, 0.5) == pytest.approx(1.0)
    assert tau_at(5, 11, 1.0, 0.5) == pytest.approx(0.75)
    assert tau_at(10, 11, 1.0, 0.5) == pytest.approx(0.5)


def test_cost_losses():
    r = torch.tensor(0.7, requires_grad=True)
    assert float(cost_loss(r.detach(), 0.5)) == pytest.approx(0.04)
    assert float(cost_loss(r.detach(), 0.5, "above")) == pytest.approx(0.04)
    assert float(cost_loss(torch.tensor(0.3), 0.5)) == pytest.approx(0.04)
    assert float(cost_loss(torch.tensor(0.3), 0.5, "above")) == 0.0
    cost_loss(r, 0.5).backward()
    assert float(r.grad) == pytest.approx(0.4)


def test_distill_loss_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(4, 7)
    assert float(distill_loss(a, a.clone())) == pytest.approx(0.0, abs=1e-7)
    b = torch.randn(4, 7)
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(distill_loss(a, b)) == pytest.approx(float(kl), rel=1e-5)
    assert float(distill_loss(a, b, 2.0)) > 0
    assert distill_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5)).dim() == 0


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("anneal", 1.5), ("cost", "both"), ("lr_trimmer", 0.0),
                                         ("beta", -1.0), ("schedule", "step"), ("tau_end", 0.0),
                                         ("grad_accum", True), ("alpha", math.nan)])
def test_bad_train_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})
