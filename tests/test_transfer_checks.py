"""Bias and calibration of predicted transfer-time distributions (pure), and the pass rate
of a correct model: a model that is right passes about as often as its intervals say, a
biased one is caught."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.selection.checks import Transfer, bias, calibration, pass_rate, passes, wilson
from testbed.selection.stochastic import Distribution


def transfers(scale: float, n_runs: int = 40, per_run: int = 6, seed: int = 1):
    """Measurements drawn from lognormal transfer times (CV ~0.5), `scale` times the predicted."""
    rng = np.random.default_rng(seed)
    predicted = Distribution(np.exp(rng.normal(np.log(0.4), 0.47, 2000)))
    out = []
    for run in range(n_runs):
        for _ in range(per_run):
            out.append(Transfer(float(scale * rng.choice(predicted.samples)), predicted, str(run), "g"))
    return out


def test_a_right_model_passes_and_a_biased_one_is_caught():
    right = transfers(1.0)
    b, c = bias(right), calibration(right)
    assert abs(b["bias"]) < 0.06 and b["low"] < 0 < b["high"] and b["clusters"] == 40
    assert 0.72 <= c["inside_p10_p90"] <= 0.88 and 0.40 <= c["below_p50"] <= 0.60
    assert passes(b, c)["all"]
    slow = transfers(1.25)
    b, c = bias(slow), calibration(slow)
    assert b["bias"] > 0.15 and b["low"] > 0
    assert c["below_p50"] < 0.40
    assert not passes(b, c)["bias"] and not passes(b, c)["all"]


def test_bias_interval_resamples_whole_runs():
    """Runs whose transfers move together (one host load per run): the run bootstrap's
    interval is wider than one that treated every transfer as independent."""
    rng = np.random.default_rng(2)
    pred = Distribution(np.full(100, 1.0) + rng.normal(0, 1e-3, 100))
    together = []
    for run in range(20):
        factor = rng.normal(1.0, 0.1)
        together += [Transfer(factor, pred, str(run)) for _ in range(10)]
    apart = [Transfer(t.measured_s, pred, str(i)) for i, t in enumerate(together)]
    w_together = bias(together)["high"] - bias(together)["low"]
    w_apart = bias(apart)["high"] - bias(apart)["low"]
    assert w_together > 2 * w_apart


def test_wilson_interval():
    low, high = wilson(80, 100)
    assert low == pytest.approx(0.711, abs=0.002) and high == pytest.approx(0.866, abs=0.002)
    assert wilson(0, 0) == (0.0, 1.0) and wilson(0, 10)[0] == 0.0


def test_pass_rate_of_a_correct_model_is_high_but_not_certain():
    r = pass_rate(transfers(1.0, n_runs=25), replicates=300)
    assert 0.8 < r["all"] < 1.0 and r["transfers"] == 150
    assert r["inside_p10_p90"] > 0.9 and r["below_p50"] > 0.9
