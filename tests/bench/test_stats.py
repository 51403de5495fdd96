"""Paired bootstrap of Δ accuracy and the non-inferiority verdict."""
import math

import numpy as np
import pytest

from trimkit.bench.stats import PairedDelta, paired_bootstrap


def test_identical_models_have_a_zero_interval():
    a = np.array([1, 0, 1, 1, 0] * 40)
    d = paired_bootstrap(a, a, resamples=500)
    assert (d.delta, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 200)
    assert d.verdict(1.0) == "non-inferior"


def test_delta_is_b_minus_a_in_points_and_the_interval_holds_it():
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.90).astype(int)
    b = a.copy()
    b[rng.choice(2000, 60, replace=False)] = 0  # b loses up to 3 points
    d = paired_bootstrap(a, b, resamples=2000, seed=3)
    assert d.delta == pytest.approx(100 * (b.mean() - a.mean()))
    assert d.low < d.delta < d.high <= 0.0
    # pairing: the interval is set by the items that differ, far narrower than two unpaired accuracies
    changed = (a != b).mean()
    paired_se = 100 * math.sqrt(changed / 2000)
    assert d.high - d.low == pytest.approx(2 * 1.96 * paired_se, rel=0.2)


def test_the_interval_covers_the_true_difference_at_about_its_confidence():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        a = (rng.random(400) < 0.8).astype(int)
        b = np.where(rng.random(400) < 0.1, 1 - a, a)  # true Δ = 0.1 * (1 - 2 * 0.8) = -6 points
        d = paired_bootstrap(a, b, resamples=400, seed=trial)
        covered += d.low <= -6.0 <= d.high
    assert 48 <= covered <= 60


@pytest.mark.parametrize("low, high, verdict", [(-0.9, 1.0, "non-inferior"), (-1.5, 0.5, "inconclusive"),
                                                (-3.0, -1.2, "inferior"), (-1.0, 0.0, "non-inferior")])
def test_verdict_against_a_margin(low, high, verdict):
    d = PairedDelta(delta=(low + high) / 2, low=low, high=high, n=100, resamples=10, confidence=0.95, scale=100.0)
    assert d.verdict(1.0) == verdict


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="margin"):
        paired_bootstrap([1], [1], resamples=5).verdict(-1)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1], [0], confidence=1.0)
