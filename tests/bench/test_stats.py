"""Paired bootstrap of Δ accuracy and the non-inferiority verdict."""
import math

import numpy as np
import pytest

from trimkit.bench.stats import PairedDelta, paired_bootstrap, seeded_bootstrap


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


def test_seeded_bootstrap_with_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    a, b = (rng.random(500) < 0.8).astype(float), (rng.random(500) < 0.75).astype(float)
    one, paired = seeded_bootstrap(a, b[None], resamples=2000), paired_bootstrap(a, b, resamples=2000)
    assert one.delta == pytest.approx(paired.delta)
    assert (one.low, one.high) == pytest.approx((paired.low, paired.high), abs=1e-6)


def test_seeded_bootstrap_widens_with_the_spread_between_seeds():
    rng = np.random.default_rng(4)
    full = (rng.random(2000) < 0.9).astype(float)
    same = np.stack([full] * 4)
    spread = np.stack([np.where(rng.random(2000) < p, 1.0, 0.0) for p in (0.80, 0.85, 0.95, 0.99)])
    steady = seeded_bootstrap(full, same, resamples=1000)
    assert steady.delta == 0 and steady.low == pytest.approx(0, abs=1e-9) and steady.high == pytest.approx(0, abs=1e-9)
    wide = seeded_bootstrap(full, spread, resamples=1000)
    items_only = paired_bootstrap(full, spread.mean(axis=0), resamples=1000)  # ignores the seeds' spread
    assert wide.high - wide.low > 1.5 * (items_only.high - items_only.low)
    assert wide.delta == pytest.approx((spread.mean() - full.mean()) * 100)


def test_seeded_bootstrap_paired_seeds_need_matching_rows():
    with pytest.raises(ValueError, match="paired seeds"):
        seeded_bootstrap(np.ones((2, 10)), np.ones((3, 10)), paired_seeds=True)
    with pytest.raises(ValueError, match="differ in length"):
        seeded_bootstrap(np.ones((2, 10)), np.ones((2, 11)))
    trimmed = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=float)
    assert seeded_bootstrap(trimmed, trimmed, paired_seeds=True, resamples=200).high == pytest.approx(0, abs=1e-9)
