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


# ---------------------------------------------------------------------------------------- calibration
class _Runtime:
    threshold = 0.5


def _ratio_model(monkeypatch, ratio_of_logit):
    """A module with one runtime whose executed ratio is `ratio_of_logit(log-odds of its threshold)`."""
    import trimkit.train.calibrate as calibrate_mod
    from trimkit.runtime import state

    model = torch.nn.Linear(1, 1)
    rt = _Runtime()
    model.__dict__[state.RUNTIMES] = [rt]

    def ratio(m, batches):
        th = rt.threshold
        return ratio_of_logit(math.log(th / (1 - th)) if 0 < th < 1 else math.copysign(math.inf, th - 0.5))

    monkeypatch.setattr(calibrate_mod, "hard_ratio", ratio)
    return model, rt


def test_calibration_reaches_targets_that_need_keep_logits_far_above_9(monkeypatch):
    from trimkit.train import calibrate_threshold

    # saturated trimmers: each unit of log-odds above 0 removes 2 % of the FLOPs, down to 0.2
    model, rt = _ratio_model(monkeypatch, lambda z: max(0.2, 0.6 - 0.02 * z))
    th, ratio = calibrate_threshold(model, [], target=1 / 3)
    assert abs(ratio - 1 / 3) < 0.002 and math.log(th / (1 - th)) > 13  # a search over [0, 1] stopped at 9
    assert rt.threshold == th
    model, _ = _ratio_model(monkeypatch, lambda z: 0.5 - 0.01 * z)
    th, ratio = calibrate_threshold(model, [], target=0.5)
    assert th == 0.5 and ratio == 0.5  # the start is kept when it is on target
    model, _ = _ratio_model(monkeypatch, lambda z: 0.9 - 0.01 * z)
    th, ratio = calibrate_threshold(model, [], target=1 / 3)
    assert ratio == pytest.approx(0.9 - 0.01 * 24, abs=0.002)  # out of reach: the closest end of the range
